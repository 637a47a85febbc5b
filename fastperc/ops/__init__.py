"""The fused ops, each a ``torch.library`` custom op (``torch.ops.fastperc.<name>``).

Each module defines one op family: its custom op(s) with fake implementations, the autograd
formula, the per-backend tables and the public, checked wrapper.
"""
from fastperc.ops._feature_loss import feature_loss
from fastperc.ops._norm import batch_norm, batch_norm_relu, instance_norm, instance_norm_relu

__all__ = [
    "batch_norm",
    "batch_norm_relu",
    "feature_loss",
    "instance_norm",
    "instance_norm_relu",
]
