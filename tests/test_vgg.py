"""VGG16Features: torchvision's layout and keys, the named activations, weight loading."""
import pickle

import pytest
import torch
import torch.nn.functional as F

from fastperc import VGG16Features
from fastperc.models import vgg as vgg_module
from helpers import rel_err

# torchvision vgg16().features: conv/relu pairs and pools, by index.
CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
POOL_AFTER = {3, 8, 15, 22, 29}


def _torchvision_like_state(seed=0):
    """A full torchvision-format VGG-16 state dict (features + classifier), random."""
    g = torch.Generator().manual_seed(seed)
    state, in_ch = {}, 3
    for i, out_ch in zip(CONV_INDICES, [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]):
        state[f"features.{i}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g) * (2 / (9 * in_ch)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(out_ch, generator=g) * 0.1
        in_ch = out_ch
    state["classifier.0.weight"] = torch.randn(8, 8, generator=g)
    state["classifier.0.bias"] = torch.randn(8, generator=g)
    return state


def _by_hand(state, x, upto):
    """conv(3x3, pad 1) + ReLU, with 2x2 max-pools, written out: activations by ReLU index."""
    out = {}
    for i in CONV_INDICES:
        if i > upto:
            break
        x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
        out[i + 1] = x
        if i + 1 in POOL_AFTER:
            x = F.max_pool2d(x, 2, 2)
    return out


def test_layer_names_follow_torchvision():
    assert vgg_module.LAYERS["relu1_2"] == 3
    assert vgg_module.LAYERS["relu2_2"] == 8
    assert vgg_module.LAYERS["relu3_3"] == 15
    assert vgg_module.LAYERS["relu4_3"] == 22
    assert vgg_module.LAYERS["relu5_3"] == 29


def test_truncated_after_deepest_layer_with_torchvision_keys():
    net = VGG16Features(layers=("relu2_2",))
    assert len(net.features) == 9
    assert list(net.state_dict()) == [f"features.{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")]
    assert not any(p.requires_grad for p in net.parameters())


def test_activations_match_hand_written_network(tmp_path):
    state = _torchvision_like_state()
    torch.save(state, tmp_path / "vgg16.pth")
    net = VGG16Features(weights=tmp_path / "vgg16.pth").double()
    x = torch.randn(2, 3, 32, 24, dtype=torch.float64)
    got = net(x)
    expected = _by_hand({k: v.double() for k, v in state.items()}, x, upto=21)
    assert list(got) == ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]
    for name, value in got.items():
        assert rel_err(value, expected[vgg_module.LAYERS[name]]) < 1e-12, name
    assert got["relu4_3"].shape == (2, 512, 4, 3)


def test_forward_can_stop_early():
    net = VGG16Features()
    out = net(torch.randn(1, 3, 16, 16), layers=("relu1_2",))
    assert list(out) == ["relu1_2"]


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    state = _torchvision_like_state(seed=5)
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "vgg16-397923af.pth")
    net = VGG16Features(weights="imagenet", layers=("relu1_2",))
    assert torch.equal(net.features[2].weight, state["features.2.weight"])


def test_imagenet_weights_without_network_name_the_file(tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match=r"vgg16-397923af\.pth.*put it at .*checkpoints"):
        VGG16Features(weights="imagenet")


def test_weights_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: not a loadable VGG-16 checkpoint"):
        VGG16Features(weights=tmp_path / "notes.txt")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG-16 checkpoint"):
        VGG16Features(weights=tmp_path / "partial.pth")


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weights_file_with_pickled_code_runs_nothing(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"features.0.weight": _Exploit()}, f)
    with pytest.raises(ValueError, match="evil.pth: not a loadable"):
        VGG16Features(weights=tmp_path / "evil.pth")
    assert "pickled code ran" not in capsys.readouterr().out


def test_unknown_layer():
    with pytest.raises(ValueError, match="layers: expected names from"):
        VGG16Features(layers=("relu9_9",))
