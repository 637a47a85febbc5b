"""nn.Module wrappers of the fused ops.

Each module keeps the parameters, buffers and state-dict keys of the ``torch.nn`` module it
replaces (it subclasses it), so checkpoints move between the two unchanged; only ``forward``
runs the fused op. Modules are added here per op family.
"""
from __future__ import annotations

from torch import Tensor, nn

from fastperc.ops import batch_norm, instance_norm

# -- normalisation ---------------------------------------------------------------------------


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (affine by default) with the fused ReLU and residual add.

    ``forward(x, residual=None)`` computes ``y = γ (x − μ)/√(σ² + ε) + β`` per (n, c) over
    H×W, then ReLU if ``relu``, then ``+ residual`` if one is given (the end of a residual
    block: ``InstanceNorm2d(c)(conv2(h), residual=x)``). Parameters ``weight`` and ``bias``
    (absent with ``affine=False``) are those of ``nn.InstanceNorm2d(c, affine=True)``; running
    statistics are not tracked (``track_running_stats=False``, as in the style networks).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, *,
                 relu: bool = False, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False,
                         device=device, dtype=dtype)
        self.relu = relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps, relu=self.relu, residual=residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}"


class InstanceNormReLU(InstanceNorm2d):
    """``InstanceNorm2d(num_features, relu=True)``: instance norm followed by ReLU, fused."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, *,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, affine=affine, relu=True, device=device, dtype=dtype)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the fused ReLU and residual add.

    Same parameters, buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) and
    behaviour as ``nn.BatchNorm2d``: batch statistics in training mode (running statistics
    updated with ``momentum``, or as a cumulative average when ``momentum=None``), running
    statistics in eval mode. ``forward(x, residual=None)``: normalise, ReLU if ``relu``, then
    ``+ residual``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, relu: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.relu = relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        # The bookkeeping of nn.BatchNorm2d.forward, verbatim in meaning.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return batch_norm(
            x, self.weight, self.bias,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            training=use_batch_stats, momentum=factor, eps=self.eps,
            relu=self.relu, residual=residual,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}"


class BatchNormReLU(BatchNorm2d):
    """``BatchNorm2d(num_features, relu=True)``: batch norm followed by ReLU, fused (the
    paper's own network's normalisation)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, relu=True,
                         device=device, dtype=dtype)
