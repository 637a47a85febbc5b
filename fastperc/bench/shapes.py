"""The shapes that matter (DESIGN.md): training at batch 4, 256x256.

On a CPU (and with ``quick``) the same layers are benchmarked at 1/4 of the spatial size
(1/16 of the pixels), so that a CPU run takes minutes, not hours.
"""
from __future__ import annotations

# VGG-16 activations of a (4, 3, 256, 256) batch: where the losses are taken.
VGG = {
    "relu1_2": (4, 64, 256, 256),
    "relu2_2": (4, 128, 128, 128),
    "relu3_3": (4, 256, 64, 64),
    "relu4_3": (4, 512, 32, 32),
}
# TransformerNet activations at 256x256 (the normalisation layers).
TRANSFORMER = {
    "t32": (4, 32, 256, 256),
    "t64": (4, 64, 128, 128),
    "t128": (4, 128, 64, 64),
}
IMAGE = {"image": (4, 3, 256, 256)}
# The two upsampling layers of TransformerNet: (input shape, output channels).
UPSAMPLE = {
    "up1": ((4, 128, 64, 64), 64),
    "up2": ((4, 64, 128, 128), 32),
    "up1_1024": ((1, 128, 256, 256), 64),
    "up2_1024": ((1, 64, 512, 512), 32),
}


def shrink(shape: tuple[int, ...], factor: int = 4) -> tuple[int, ...]:
    """The shape with H and W divided by ``factor`` (at least 1)."""
    n, c, h, w = shape
    return (n, c, max(1, h // factor), max(1, w // factor))


def scaled(shapes: dict, small: bool) -> dict:
    return {k: shrink(v) for k, v in shapes.items()} if small else dict(shapes)
