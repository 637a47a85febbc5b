"""The shapes that matter (DESIGN.md): training at batch 4, 256x256.

On a CPU the same layers are benchmarked at 1/4 of the spatial size (1/16 of the pixels)
so that a module runs in about a minute on two cores.
"""
from conftest import ON_GPU

# VGG-16 activations of a (4, 3, 256, 256) image: where the losses are taken.
VGG_GPU = {
    "relu1_2": (4, 64, 256, 256),
    "relu2_2": (4, 128, 128, 128),
    "relu3_3": (4, 256, 64, 64),
    "relu4_3": (4, 512, 32, 32),
}
# TransformerNet activations at 256x256 (normalisation layers).
TRANSFORMER_GPU = {
    "t32": (4, 32, 256, 256),
    "t64": (4, 64, 128, 128),
    "t128": (4, 128, 64, 64),
}
IMAGE_GPU = {"image": (4, 3, 256, 256)}


def _cpu(shapes: dict) -> dict:
    return {k: (n, c, max(1, h // 4), max(1, w // 4)) for k, (n, c, h, w) in shapes.items()}


VGG = VGG_GPU if ON_GPU else _cpu(VGG_GPU)
TRANSFORMER = TRANSFORMER_GPU if ON_GPU else _cpu(TRANSFORMER_GPU)
IMAGE = IMAGE_GPU if ON_GPU else _cpu(IMAGE_GPU)
