"""The fused ops, each a ``torch.library`` custom op (``torch.ops.fastperc.<name>``).

Each module defines one op family: its custom op(s) with fake implementations, the autograd
formula, the per-backend tables and the public, checked wrapper.
"""
from fastperc.ops._feature_loss import feature_loss

__all__ = ["feature_loss"]
