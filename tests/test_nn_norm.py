"""fastperc.nn normalisation modules: the torch modules' state dicts and behaviour, fused
(``fused=True``) and as the plain torch composition (``fused=False``)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastperc
from fastperc.nn import BatchNorm2d, BatchNormReLU, InstanceNorm2d, InstanceNormReLU
from helpers import assert_close, backend_device_params, make_input

C = 4


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
    return module


def _same_state_dict(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape and sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("cls", [InstanceNorm2d, InstanceNormReLU])
def test_instance_norm_checkpoints_move_both_ways(cls):
    ours, theirs = cls(C), _randomise(nn.InstanceNorm2d(C, affine=True))
    assert isinstance(ours, nn.InstanceNorm2d)
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    ours.load_state_dict(theirs.state_dict())
    _same_state_dict(ours, theirs)
    back = nn.InstanceNorm2d(C, affine=True)
    back.load_state_dict(_randomise(cls(C), seed=1).state_dict())
    assert torch.equal(back.weight, _randomise(cls(C), seed=1).weight)


@pytest.mark.parametrize("cls", [BatchNorm2d, BatchNormReLU])
def test_batch_norm_checkpoints_move_both_ways(cls):
    theirs = _randomise(nn.BatchNorm2d(C))
    theirs.num_batches_tracked.fill_(7)
    ours = cls(C)
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    ours.load_state_dict(theirs.state_dict())
    _same_state_dict(ours, theirs)
    back = nn.BatchNorm2d(C)
    back.load_state_dict(ours.state_dict())
    _same_state_dict(back, theirs)


@pytest.mark.parametrize("fused", [True, False])
def test_instance_norm_modules_match_torch(fused):
    x = make_input((2, C, 6, 5), layout="channels_last").requires_grad_(True)
    skip = make_input((2, C, 6, 5))
    theirs = _randomise(nn.InstanceNorm2d(C, affine=True))
    for ours, fn in [(InstanceNormReLU(C, fused=fused), lambda y: F.relu(y)),
                     (InstanceNorm2d(C, fused=fused), lambda y: y),
                     (InstanceNorm2d(C, relu=True, fused=fused), lambda y: F.relu(y))]:
        ours.load_state_dict(theirs.state_dict())
        y = ours(x)
        expected = fn(theirs(x))
        assert_close(y, expected.double(), torch.float32)
        if fused:  # the fused op keeps channels_last (F.instance_norm does not)
            assert y.is_contiguous(memory_format=torch.channels_last)
        dy = make_input(y.shape, offset=0.5)  # not ones: Σ x̂ = 0 would make dγ vanish
        y.backward(dy)
        expected.backward(dy)
        assert_close(ours.weight.grad, theirs.weight.grad.double(), torch.float32)
        theirs.zero_grad()
    # The end of a residual block: in2(conv2(h)) + x, no ReLU after the add.
    ours = InstanceNorm2d(C, fused=fused)
    ours.load_state_dict(theirs.state_dict())
    assert_close(ours(x, residual=skip), (theirs(x) + skip).double(), torch.float32)


def test_instance_norm_without_affine():
    x = make_input((2, C, 6, 5))
    ours = InstanceNorm2d(C, affine=False)
    assert ours.weight is None and list(ours.state_dict()) == []
    assert_close(ours(x), F.instance_norm(x).double(), torch.float32)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_modules_match_torch_over_train_and_eval(momentum, relu, fused):
    ours = (BatchNormReLU(C, momentum=momentum, fused=fused) if relu
            else BatchNorm2d(C, momentum=momentum, fused=fused))
    theirs = _randomise(nn.BatchNorm2d(C, momentum=momentum))
    ours.load_state_dict(theirs.state_dict())
    post = F.relu if relu else (lambda y: y)
    for step in range(3):
        x = make_input((2, C, 5, 4), layout="channels_last", offset=float(step)).requires_grad_(True)
        y, expected = ours(x), post(theirs(x))
        assert_close(y, expected.double(), torch.float32)
        (y * y).sum().backward()
        (expected * expected).sum().backward()
        assert_close(ours.weight.grad, theirs.weight.grad.double(), torch.float32)
        assert_close(ours.bias.grad, theirs.bias.grad.double(), torch.float32)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    for a, b in [(ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)]:
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    ours.eval()
    theirs.eval()
    x = make_input((1, C, 1, 1))  # one value per channel is fine with running statistics
    assert_close(ours(x), post(theirs(x)).double(), torch.float32)
    before = ours.running_mean.clone()
    ours(make_input((2, C, 3, 3)))
    assert torch.equal(ours.running_mean, before)


@pytest.mark.parametrize("fused", [True, False])
def test_batch_norm_residual_and_untracked_statistics(fused):
    ours = BatchNorm2d(C, track_running_stats=False, fused=fused)
    theirs = nn.BatchNorm2d(C, track_running_stats=False)
    x, skip = make_input((2, C, 4, 4)), make_input((2, C, 4, 4))
    ours.eval()
    theirs.eval()  # no running statistics: batch statistics even in eval mode
    assert_close(ours(x, residual=skip), (theirs(x) + skip).double(), torch.float32)


def test_extra_repr_names_relu_and_fused():
    assert "relu=True" in repr(InstanceNormReLU(C)) and "relu=False" in repr(BatchNorm2d(C))
    assert "affine=True" in repr(InstanceNorm2d(C))
    assert "fused=True" in repr(BatchNormReLU(C)) and "fused=False" in repr(InstanceNorm2d(C, fused=False))


@pytest.mark.parametrize("backend,device", backend_device_params(with_dtype=False))
def test_modules_on_every_backend(backend, device):
    x = make_input((2, C, 5, 3), device=device).requires_grad_(True)
    inorm = _randomise(InstanceNormReLU(C)).to(device)
    bnorm = _randomise(BatchNormReLU(C)).to(device)
    with fastperc.use_backend(backend):
        y = bnorm(inorm(x))
        y.backward(dy := make_input(y.shape, device=device))
    theirs_in = nn.InstanceNorm2d(C, affine=True).to(device)
    theirs_in.load_state_dict(inorm.state_dict())
    theirs_bn = _randomise(nn.BatchNorm2d(C)).to(device)
    x2 = x.detach().clone().requires_grad_(True)
    expected = F.relu(theirs_bn(F.relu(theirs_in(x2))))
    expected.backward(dy)
    assert_close(y, expected.double(), torch.float32)
    assert_close(x.grad, x2.grad.double(), torch.float32, tol=1e-4)
    assert torch.allclose(bnorm.running_var, theirs_bn.running_var, rtol=1e-5)


@pytest.mark.parametrize("cls", [InstanceNormReLU, BatchNormReLU])
def test_module_compiles_fullgraph(cls):
    """Dynamo captures the whole module (running-statistics update included). AOT autograd
    without code generation: test_instance_norm and test_batch_norm compile with inductor."""
    ours, twin = _randomise(cls(C)), _randomise(cls(C))
    x = make_input((2, C, 6, 5)).requires_grad_(True)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert_close(y, twin(x).double(), torch.float32)
    y.backward(torch.ones_like(y))
    for a, b in zip(ours.buffers(), twin.buffers()):
        assert torch.allclose(a, b)
