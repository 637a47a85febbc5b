"""VGG-16 feature extractor: torchvision's ``vgg16().features`` layout, named activations.

The loss network of the paper. Layout and state-dict keys are torchvision's
(``features.0.weight``, ``features.0.bias``, ...), truncated after the deepest layer asked for.
"""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from fastperc.checkpoints import load_state_dict_file

# torchvision's configuration "D": channel counts, "M" = 2x2 max-pool.
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
IMAGENET_FILE = "vgg16-397923af.pth"
IMAGENET_SHA256_PREFIX = "397923af"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _layer_names() -> dict[str, int]:
    """'relu{block}_{conv}' -> index of that ReLU in ``features``."""
    names, index, block, conv = {}, 0, 1, 0
    for item in _CFG:
        if item == "M":
            index += 1
            block, conv = block + 1, 0
        else:
            conv += 1
            names[f"relu{block}_{conv}"] = index + 1
            index += 2
    return names


LAYERS: dict[str, int] = _layer_names()


def _make_features(depth: int) -> nn.Sequential:
    """The first ``depth`` modules of torchvision's ``vgg16().features``."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = item
        if len(layers) >= depth:
            break
    return nn.Sequential(*layers[:depth])


def imagenet_weights_path() -> Path:
    """Where the ImageNet checkpoint lives once downloaded (torch hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE


def _imagenet_state_dict() -> Mapping[str, torch.Tensor]:
    path = imagenet_weights_path()
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(IMAGENET_URL, str(path), hash_prefix=IMAGENET_SHA256_PREFIX)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise RuntimeError(
                f"could not download the VGG-16 ImageNet weights ({exc}); fetch {IMAGENET_URL} by hand "
                f"and put it at {path}, or pass weights=PATH to a torchvision VGG-16 checkpoint"
            ) from None
    return load_state_dict_file(path, what="VGG-16 checkpoint")


def _check_layers(layers: Iterable[str], what: str) -> tuple[str, ...]:
    layers = tuple(layers)
    unknown = [name for name in layers if name not in LAYERS]
    if unknown or not layers:
        raise ValueError(f"{what}: expected names from {list(LAYERS)}, got {list(layers)}")
    return layers


class VGG16Features(nn.Module):
    """VGG-16 convolutional features, returning the named ReLU activations.

    Args:
        weights: None (random initialisation), "imagenet" (torchvision's checkpoint, from the
            torch hub cache, downloaded once with its hash checked), or a path to a
            torchvision-format VGG-16 checkpoint (``classifier.*`` keys are ignored).
        layers: names such as "relu1_2", "relu2_2", "relu3_3", "relu4_3"; the network is
            truncated after the deepest one.
    Forward: x (N, 3, H, W), ImageNet-normalised -> {name: activation} for ``layers``.
    Parameters are frozen (requires_grad=False); the module starts in eval mode.
    """

    def __init__(self, weights: str | os.PathLike | None = None,
                 layers: Iterable[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")):
        super().__init__()
        self.layers = _check_layers(layers, "layers")
        self.features = _make_features(max(LAYERS[name] for name in self.layers) + 1)
        if weights is not None:
            self.load_torchvision(_imagenet_state_dict() if weights == "imagenet"
                                  else load_state_dict_file(weights, what="VGG-16 checkpoint"),
                                  source=str(weights))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def load_torchvision(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the ``features.*`` entries of a torchvision VGG-16 state dict."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"{source}: not a torchvision VGG-16 checkpoint (missing {missing[:3]})")
        for key, value in own.items():
            if state[key].shape != value.shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
                )
        self.load_state_dict({k: state[k] for k in own})

    def forward(self, x: torch.Tensor, layers: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Activations of ``layers`` (default: all of this module's), stopping after the deepest."""
        wanted = self.layers if layers is None else _check_layers(layers, "layers")
        by_index = {LAYERS[name]: name for name in wanted}
        if max(by_index) >= len(self.features):
            raise ValueError(f"layers: {list(wanted)} go deeper than this network's {list(self.layers)}")
        out: dict[str, torch.Tensor] = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in by_index:
                out[by_index[index]] = x
                if len(out) == len(by_index):
                    break
        return out
