"""fastperc: fused kernels for perceptual-loss image transformation (Johnson et al. 2016).

    from fastperc import gram, style_loss, feature_loss, tv_loss
"""
from fastperc.backends import available_backends, get_backend, set_backend, use_backend
from fastperc.ops import batch_norm, batch_norm_relu, feature_loss, instance_norm, instance_norm_relu

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "batch_norm",
    "batch_norm_relu",
    "feature_loss",
    "get_backend",
    "instance_norm",
    "instance_norm_relu",
    "set_backend",
    "use_backend",
]
