"""fastperc: fused kernels for perceptual-loss image transformation (Johnson et al. 2016).

    from fastperc import gram, style_loss, feature_loss, tv_loss
"""
from fastperc.backends import available_backends, get_backend, set_backend, use_backend
from fastperc.ops import (
    batch_norm,
    batch_norm_relu,
    conv_transpose2d,
    feature_loss,
    gram,
    instance_norm,
    instance_norm_relu,
    style_loss,
    tv_loss,
    upsample_conv2d,
)
from fastperc import metrics
from fastperc.losses import PerceptualLoss
from fastperc.models import SuperResolutionNet, TransformerNet, VGG16Features
from fastperc.degradation import degrade

__version__ = "0.1.0"

__all__ = [
    "PerceptualLoss",
    "SuperResolutionNet",
    "TransformerNet",
    "VGG16Features",
    "available_backends",
    "batch_norm",
    "batch_norm_relu",
    "conv_transpose2d",
    "degrade",
    "feature_loss",
    "get_backend",
    "gram",
    "instance_norm",
    "instance_norm_relu",
    "metrics",
    "set_backend",
    "style_loss",
    "tv_loss",
    "upsample_conv2d",
    "use_backend",
]
