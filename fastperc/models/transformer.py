"""The image transformation network of fast style transfer.

``TransformerNet()`` is the pytorch/examples fast_neural_style network, with that project's
module names and state-dict keys (``conv1.conv2d.weight``, ``in1.weight``,
``res1.conv1.conv2d.weight``, ``deconv1.conv2d.weight``, ...), so checkpoints move both ways:

    conv 9x9 3->32, IN, ReLU; conv 3x3/2 32->64, IN, ReLU; conv 3x3/2 64->128, IN, ReLU;
    5 residual blocks of 128 (conv, IN, ReLU, conv, IN, + input);
    upsample x2 + conv 3x3 128->64, IN, ReLU; upsample x2 + conv 3x3 64->32, IN, ReLU;
    conv 9x9 32->3 (no output activation; images in [0, 255]).
Every conv is preceded by reflection padding of kernel_size // 2.

``variant="paper"`` is the paper's network: the upsampling layers are fractionally strided
(transposed 3x3, stride 2) convolutions, the normalisation is batch norm by default
(``norm="instance"`` selects instance norm), and the output is 127.5 * (tanh(y) + 1), in [0, 255].

``fused=True`` runs the fused ops (instance_norm and batch_norm with their ReLU and residual
add, upsample_conv2d, conv_transpose2d); ``fused=False`` runs plain torch modules.
Both compute the same function of the same weights.

Sizes: a (N, 3, H, W) input gives (N, 3, 4*ceil(ceil(H/2)/2), 4*ceil(ceil(W/2)/2)), the
pytorch/examples network's own rule (H and W multiples of 4 come back unchanged).
"""
from __future__ import annotations

import os
import re

import torch

from fastperc import nn as fnn
from fastperc.checkpoints import load_state_dict_file
from fastperc.models.layers import ConvLayer, ConvTransposeLayer, ImageNetwork, ResidualBlock, make_norm

VARIANTS = ("examples", "paper")


class TransformerNet(ImageNetwork):
    """Fast style transfer network (pytorch/examples layout; see the module docstring).

    Args:
        fused: run the fused fastperc ops (True) or plain torch modules (False); the flag of
            every fastperc.nn module inside, which :func:`fastperc.nn.set_fused` changes later.
        variant: "examples" (nearest-upsample convs, instance norm, linear output) or
            "paper" (transposed convs, scaled-tanh output).
        norm: "instance" or "batch"; default instance for "examples", batch for "paper".
    Forward: (N, 3, H, W) images in [0, 255] -> stylised images, same range.
    """

    def __init__(self, fused: bool = True, variant: str = "examples", norm: str | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
        norm = norm or ("instance" if variant == "examples" else "batch")
        self.variant, self.norm = variant, norm
        self.conv1 = ConvLayer(3, 32, 9, 1)
        self.in1 = make_norm(norm, 32, relu=True)
        self.conv2 = ConvLayer(32, 64, 3, 2)
        self.in2 = make_norm(norm, 64, relu=True)
        self.conv3 = ConvLayer(64, 128, 3, 2)
        self.in3 = make_norm(norm, 128, relu=True)
        for i in range(1, 6):
            setattr(self, f"res{i}", ResidualBlock(128, norm))
        up = fnn.UpsampleConv2d if variant == "examples" else ConvTransposeLayer
        self.deconv1 = up(128, 64)
        self.in4 = make_norm(norm, 64, relu=True)
        self.deconv2 = up(64, 32)
        self.in5 = make_norm(norm, 32, relu=True)
        self.deconv3 = ConvLayer(32, 3, 9, 1)
        fnn.set_fused(self, fused)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        y = self.in1(self.conv1(x))
        y = self.in2(self.conv2(y))
        y = self.in3(self.conv3(y))
        for i in range(1, 6):
            y = getattr(self, f"res{i}")(y)
        y = self.in4(self.deconv1(y))
        y = self.in5(self.deconv2(y))
        y = self.deconv3(y)
        if self.variant == "paper":
            y = 127.5 * (torch.tanh(y) + 1.0)
        return y

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "TransformerNet":
        """A network with the weights of ``path``: a pytorch/examples checkpoint (old ones
        with ``inN.running_mean`` / ``running_var`` keys included), a state dict saved from
        this class, or a fastperc training checkpoint. Loaded with weights_only=True."""
        state = dict(load_state_dict_file(path, what="TransformerNet checkpoint"))
        model = cls(**kwargs)
        if model.norm == "instance":
            # InstanceNorm2d once tracked running statistics by default; they are unused.
            state = {k: v for k, v in state.items() if not re.search(r"in\d+\.running_(mean|var)$", k)}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:2])
            raise ValueError(f"{os.fspath(path)}: does not fit TransformerNet ({detail[:300]})") from None
        return model
