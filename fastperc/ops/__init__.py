"""The fused ops, each a ``torch.library`` custom op (``torch.ops.fastperc.<name>``).

Each module defines one op family: its custom op(s) with fake implementations, the autograd
formula, the per-backend tables and the public, checked wrapper.
"""
from fastperc.ops._feature_loss import feature_loss
from fastperc.ops._gram import gram, style_loss
from fastperc.ops._norm import batch_norm, batch_norm_relu, instance_norm, instance_norm_relu
from fastperc.ops._tv_loss import tv_loss
from fastperc.ops._upsample import conv_transpose2d, upsample_conv2d

__all__ = [
    "batch_norm",
    "batch_norm_relu",
    "conv_transpose2d",
    "feature_loss",
    "gram",
    "instance_norm",
    "instance_norm_relu",
    "style_loss",
    "tv_loss",
    "upsample_conv2d",
]
