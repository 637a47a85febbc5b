"""TransformerNet (both variants) and SuperResolutionNet: checkpoint compatibility with the
pytorch/examples layout, and the fused path equal to the plain one."""
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastperc
from examples_net import ExamplesTransformerNet, randomize_norms
from fastperc.nn import set_fused
from helpers import rel_err


def _examples_model(seed=0):
    torch.manual_seed(seed)
    return randomize_norms(ExamplesTransformerNet(), seed).eval()


def test_state_dict_keys_are_the_examples_keys():
    ours = fastperc.TransformerNet().state_dict()
    theirs = ExamplesTransformerNet().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (13, 18)])
def test_examples_checkpoint_gives_the_examples_output(fused, size):
    reference = _examples_model()
    model = fastperc.TransformerNet(fused=fused).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.rand(2, 3, *size) * 255
    with torch.no_grad():
        expected = reference(x)
        got = model(x)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


def test_model_trained_here_loads_there(tmp_path):
    model = randomize_norms(fastperc.TransformerNet(fused=True), seed=3).eval()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    there = ExamplesTransformerNet().eval()
    there.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    x = torch.rand(1, 3, 12, 12) * 255
    with torch.no_grad():
        assert rel_err(model(x), there(x)) < 1e-4


def test_load_accepts_old_checkpoints_with_running_statistics(tmp_path):
    reference = _examples_model(seed=1)
    state = reference.state_dict()
    for key in [k for k in state if k.endswith(".weight") and ("in" in k.split(".")[-2])]:
        prefix = key[: -len("weight")]
        state[prefix + "running_mean"] = torch.zeros_like(state[key])
        state[prefix + "running_var"] = torch.ones_like(state[key])
    assert "res3.in2.running_var" in state and "in1.running_mean" in state
    torch.save(state, tmp_path / "old.model")
    model = fastperc.TransformerNet.load(tmp_path / "old.model").eval()
    x = torch.rand(1, 3, 8, 8) * 255
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) < 1e-4


def test_load_rejects_a_checkpoint_that_does_not_fit(tmp_path):
    torch.save({"conv1.conv2d.weight": torch.zeros(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit TransformerNet"):
        fastperc.TransformerNet.load(tmp_path / "bad.pth")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_load_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.conv2d.weight": _Exploit()}, f)
    with pytest.raises(ValueError, match="evil.pth: not a loadable"):
        fastperc.TransformerNet.load(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("training", [False, True])
def test_paper_variant_fused_equals_plain(norm, training):
    torch.manual_seed(0)
    plain = randomize_norms(fastperc.TransformerNet(fused=False, variant="paper", norm=norm))
    fused = fastperc.TransformerNet(fused=True, variant="paper", norm=norm)
    fused.load_state_dict(plain.state_dict())
    plain.train(training)
    fused.train(training)
    x = torch.rand(2, 3, 12, 16) * 255
    out_plain, out_fused = plain(x), fused(x)
    assert out_fused.shape == (2, 3, 12, 16)
    assert 0 <= out_fused.min() and out_fused.max() <= 255
    assert rel_err(out_fused, out_plain) < 1e-4
    if norm == "batch" and training:
        assert rel_err(fused.in1.running_var, plain.in1.running_var) < 1e-5
        assert int(fused.in1.num_batches_tracked) == int(plain.in1.num_batches_tracked) == 1
    (out_fused.sum() / 1e4).backward()
    (out_plain.sum() / 1e4).backward()
    g_fused, g_plain = fused.conv2.conv2d.weight.grad, plain.conv2.conv2d.weight.grad
    assert rel_err(g_fused, g_plain) < 1e-3


def test_examples_fused_gradients_equal_plain():
    torch.manual_seed(0)
    plain = randomize_norms(fastperc.TransformerNet(fused=False))
    fused = fastperc.TransformerNet(fused=True)
    fused.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 12, 12) * 255
    fused(x).pow(2).mean().backward()
    plain(x).pow(2).mean().backward()
    # (a bias followed by an instance norm has a zero gradient: none of those is compared)
    for name in ["conv1.conv2d.weight", "in1.weight", "res2.in1.weight", "res4.conv2.conv2d.weight",
                 "deconv1.conv2d.weight", "in5.bias", "deconv3.conv2d.bias"]:
        g_fused = fused.get_parameter(name).grad
        g_plain = plain.get_parameter(name).grad
        assert rel_err(g_fused, g_plain) < 1e-3, name


@pytest.mark.parametrize("scale", [4, 8])
def test_super_resolution_shapes_and_gradients(scale):
    torch.manual_seed(0)
    plain = randomize_norms(fastperc.SuperResolutionNet(scale, fused=False))
    fused = fastperc.SuperResolutionNet(scale, fused=True)
    fused.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 5, 7) * 255
    out = fused(x)
    assert out.shape == (2, 3, 5 * scale, 7 * scale)
    assert rel_err(out, plain(x)) < 1e-4
    out.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="lua"), "variant: expected one of"),
    (dict(norm="group"), "norm: expected one of"),
])
def test_bad_network_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastperc.TransformerNet(**kwargs)


def test_bad_scale():
    with pytest.raises(ValueError, match=r"scale: expected one of \[4, 8\], got 3"):
        fastperc.SuperResolutionNet(3)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("make", [fastperc.TransformerNet, lambda fused: fastperc.SuperResolutionNet(4, fused=fused)],
                         ids=["transformer", "superres"])
def test_fused_network_keeps_the_input_layout(make, fmt):
    """On the CPU the fused networks run in channels_last inside; the result comes back in the
    input's layout and equals the plain network's."""
    torch.manual_seed(0)
    plain = randomize_norms(make(fused=False)).eval()
    fused = make(fused=True).eval()
    fused.load_state_dict(plain.state_dict())
    seen = []
    fused.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = (torch.rand(2, 3, 20, 12) * 255).contiguous(memory_format=fmt)
    with torch.no_grad():
        out = fused(x)
        expected = plain(x.contiguous())
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert out.is_contiguous(memory_format=fmt)
    assert rel_err(out, expected) < 1e-4


class _OpNames(TorchDispatchMode):
    """Records the name of every op dispatched inside the block (fastperc's are fastperc::...)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make,fused_ops", [
    (lambda: fastperc.TransformerNet(), {"fastperc::instance_norm", "fastperc::upsample_conv2d"}),
    (lambda: fastperc.TransformerNet(variant="paper"), {"fastperc::batch_norm", "fastperc::conv_transpose2d"}),
    (lambda: fastperc.SuperResolutionNet(4, norm="instance"),
     {"fastperc::instance_norm", "fastperc::conv_transpose2d"}),
], ids=["examples", "paper", "superres"])
def test_set_fused_switches_the_whole_network(make, fused_ops):
    """set_fused(net, False) turns a fused network into the plain torch one: no fastperc op runs,
    the layout is the caller's, the output the same."""
    torch.manual_seed(0)
    net = randomize_norms(make()).eval()
    x = torch.rand(1, 3, 8, 12) * 255
    seen = []
    net.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad(), _OpNames() as fused_run:
        y_fused = net(x)
    assert fused_ops <= fused_run.names
    assert set_fused(net, False) is net and not net.fused
    assert not any(getattr(m, "fused", False) for m in net.modules())
    with torch.no_grad(), _OpNames() as plain_run:
        y_plain = net(x)
    assert not [name for name in plain_run.names if name.startswith("fastperc::")]
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and seen[1].is_contiguous()
    assert rel_err(y_plain, y_fused) < 1e-4
    set_fused(net, True)
    with torch.no_grad(), _OpNames() as again:
        net(x)
    assert fused_ops <= again.names


def test_set_fused_wants_a_bool():
    with pytest.raises(TypeError, match="fused: expected a bool, got int"):
        set_fused(fastperc.TransformerNet(), 0)
