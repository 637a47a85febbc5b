"""The bottom layer's shared rules (fastperc.rules)."""
import pytest
import torch

import fastperc
from fastperc import rules
from helpers import needs_triton


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "On", "y", "0", "false", "", "2", "ok", " 1"])
def test_interpreter_mode_is_read_as_triton_reads_it(value, monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert rules.interpreter_requested(value) == triton.knobs.runtime.interpret


def test_interpreter_facts():
    facts = rules.device_facts(torch.device("cpu"))
    assert facts == rules.DeviceFacts(compiled=False, sms=rules.INTERPRETER_SMS)
    assert rules.H200 == rules.DeviceFacts(compiled=True, sms=132)


def test_power_of_two_blocks():
    triton = pytest.importorskip("triton")
    for n in range(1, 600):
        assert rules.next_pow2(n) == triton.next_power_of_2(n)
    assert rules.next_pow2(0) == 1
    assert [rules.pow2_block(n, 16, 64) for n in (1, 16, 17, 64, 65, 1000)] == [16, 16, 32, 64, 64, 64]
    assert rules.cdiv(7, 2) == 4 and rules.cdiv(8, 2) == 4


def test_hw_strides():
    x = torch.randn(2, 3, 4, 5)  # values, not torch.empty: torch.equal is False on NaN garbage
    assert rules.hw_strides(x) == (60, 20, 1)
    assert rules.hw_strides(x.contiguous(memory_format=torch.channels_last)) == (60, 1, 3)
    assert rules.hw_strides(x[:, :, :, 1:]) is None  # cropped rows: no single stride
    assert rules.hw_strides(x[:, :, :1, 1:]) == (60, 20, 1)  # one row: W's stride
    assert rules.hw_strides(x[:, :, 1:, :1]) == (60, 20, 5)  # one column: H's stride
    copy, strides = rules.walkable(x[:, :, :, 1:])
    assert copy.is_contiguous() and strides == (48, 16, 1) and torch.equal(copy, x[:, :, :, 1:])


def test_natural_format():
    x = torch.empty(2, 3, 4, 5)
    assert rules.natural_format(x) == torch.contiguous_format
    assert rules.natural_format(x.contiguous(memory_format=torch.channels_last)) == torch.channels_last
    assert rules.natural_format(torch.empty(2, 1, 4, 5).contiguous(memory_format=torch.channels_last)) \
        == torch.contiguous_format  # C = 1: both at once


def test_running_stats_keep_the_low_word():
    mean64 = 1000 + torch.tensor([1.3e-5, -3.1e-5], dtype=torch.float64)
    var = torch.tensor([2.0, 3.0], dtype=torch.float64)
    mean, v = rules.running_stats(mean64, var, torch.float32)
    assert mean.shape == (2, 1, 2) and v.shape == (1, 2) and mean.dtype == v.dtype == torch.float32
    assert torch.equal(mean[0, 0], mean64.float())
    assert (mean[0, 0].double() + mean[1, 0].double() - mean64).abs().max() < 1e-9
    mean, v = rules.running_stats(mean64, var, torch.float64)
    assert torch.equal(mean[0, 0], mean64) and torch.equal(mean[1, 0], torch.zeros(2, dtype=torch.float64))
    assert v.data_ptr() != var.data_ptr()  # a new tensor: op outputs never alias inputs


@pytest.fixture
def restore_tf32():
    """Leaves torch's TF32 setting as it found it (through the API that set it)."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    try:
        legacy = matmul.allow_tf32
    except RuntimeError:  # set through fp32_precision: restore that
        legacy = None
    saved = matmul.fp32_precision if new_api else None
    yield new_api
    if new_api:
        matmul.fp32_precision = saved if legacy is None else "none"
    if legacy is not None:
        matmul.allow_tf32 = legacy
        assert matmul.allow_tf32 == legacy


def test_tf32_policy_reads_the_legacy_flag(restore_tf32):
    matmul = torch.backends.cuda.matmul
    for allow in (True, False):
        matmul.allow_tf32 = allow
        assert rules.matmul_tf32() is allow
        assert rules.tf32_allowed(rules.H200) is allow
        # The interpreter's dots are exact.
        assert rules.tf32_allowed(rules.device_facts(torch.device("cpu"))) is False
    assert rules.dot_precision(torch.float32, True) == "tf32"
    assert rules.dot_precision(torch.float16, True) == rules.dot_precision(torch.float64, True) == "ieee"
    assert rules.dot_precision(torch.float32, False) == "ieee"


@needs_triton
def test_tf32_policy_reads_fp32_precision_and_the_launchers_still_run(restore_tf32):
    """Where torch has fp32_precision, setting it makes reading allow_tf32 raise (torch >= 2.9);
    the policy and every fp32 Triton launcher that reads it still work."""
    if not restore_tf32:
        pytest.skip(f"torch {torch.__version__} has no torch.backends.cuda.matmul.fp32_precision")
    matmul = torch.backends.cuda.matmul
    x = torch.randn(1, 4, 3, 5)
    w = torch.randn(2, 4, 3, 3)
    for precision in ("tf32", "ieee"):
        matmul.fp32_precision = precision
        assert rules.matmul_tf32() is (precision == "tf32")
        fastperc.gram(x, backend="triton")
        fastperc.upsample_conv2d(x, w, backend="triton")
