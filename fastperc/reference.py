"""The spec: every fused op written literally in plain torch.

These functions are the oracle the backends are tested against (in float64), and the
``reference`` backend. They favour the clearest statement of the formula over speed. The
forward functions are differentiable by torch autograd; each ``*_backward`` states the
gradient formula explicitly (the reference backend's backward), and the tests check it
against autograd of the forward in float64. Shapes are NCHW; any memory format is accepted.

Losses are computed in float32 for half-precision inputs (float64 for float64 inputs) and
return a tensor of that dtype.
"""
from __future__ import annotations

import torch

from fastperc.rules import acc_dtype, running_stats, split_mean


def gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix of each image's features (paper eq. 3).

    x: (N, C, H, W). With psi = x[n] reshaped to (C, H*W):
        G[n] = psi @ psi.T / (C * H * W)                       -> (N, C, C), x's dtype
    """
    n, c, h, w = x.shape
    psi = x.reshape(n, c, h * w).to(acc_dtype(x.dtype))
    return (psi @ psi.transpose(1, 2) / (c * h * w)).to(x.dtype)


def style_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of Gram matrices, mean over the batch (paper eq. 4).

    x: (N, C, H, W); target: (C, C), broadcast over the batch, or (N, C, C).
        loss = mean_n || G(x)[n] - target[n] ||_F^2               -> scalar
    The Gram matrix is formed in the loss dtype (float32 for half inputs).
    """
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    psi = x.reshape(n, c, h * w).to(acc)
    g = psi @ psi.transpose(1, 2) / (c * h * w)
    return (g - target.to(acc)).pow(2).sum(dim=(1, 2)).mean()


def gram_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d gram / d x for the upstream gradient ``grad`` = dL/dG, (N, C, C).

    With psi = x[n] reshaped to (C, H*W):
        d psi = (dG + dG.T) @ psi / (C * H * W)                   -> x's shape and dtype
    """
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    psi = x.reshape(n, c, h * w).to(acc)
    dg = grad.to(acc)
    dpsi = (dg + dg.transpose(1, 2)) @ psi / (c * h * w)
    return dpsi.reshape(x.shape).to(x.dtype)


def style_loss_backward(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d style_loss / d x for the 0-d upstream gradient ``grad``.

    With G = G(x)[n] (in the loss dtype) and T = target[n] (or the broadcast target):
        d psi = grad * 2 / (N * C * H * W) * (2 G - T - T.T) @ psi   -> x's shape and dtype
    (The gradient with respect to the target is -2 * grad * (G - T) / N, summed over the
    batch when the target is broadcast.)
    """
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    psi = x.reshape(n, c, h * w).to(acc)
    g = psi @ psi.transpose(1, 2) / (c * h * w)
    t = target.to(acc)
    m = 2 * g - t - t.transpose(-1, -2)
    dpsi = grad.to(acc) * (2.0 / (n * c * h * w)) * (m @ psi)
    return dpsi.reshape(x.shape).to(x.dtype)


def feature_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Feature reconstruction loss (paper eq. 2), mean over the batch.

    a, b: (N, C, H, W).
        loss = mean_n || a[n] - b[n] ||_2^2 / (C * H * W)          -> scalar
    """
    n, c, h, w = a.shape
    acc = acc_dtype(a.dtype)
    d = a.to(acc) - b.to(acc)
    return (d.pow(2).sum(dim=(1, 2, 3)) / (c * h * w)).mean()


def feature_loss_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d feature_loss / d a = 2 (a - b) * grad / (N C H W), in a's dtype (d / d b is its negative)."""
    acc = acc_dtype(a.dtype)
    return (2 * (a.to(acc) - b.to(acc)) * grad.to(acc) / a.numel()).to(a.dtype)


def tv_loss(x: torch.Tensor, p: int = 2, reduction: str = "mean") -> torch.Tensor:
    """Total variation of each image.

    x: (N, C, H, W), p in {1, 2}.
        tv[n] = sum_{c,i,j} |x[n,c,i+1,j] - x[n,c,i,j]|^p + |x[n,c,i,j+1] - x[n,c,i,j]|^p
    reduction "none" -> tv (N,); "sum" -> sum_n tv[n]; "mean" -> mean_n tv[n].
    """
    xa = x.to(acc_dtype(x.dtype))
    dh = xa[:, :, 1:, :] - xa[:, :, :-1, :]
    dw = xa[:, :, :, 1:] - xa[:, :, :, :-1]
    per_image = dh.abs().pow(p).sum(dim=(1, 2, 3)) + dw.abs().pow(p).sum(dim=(1, 2, 3))
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.mean()


def tv_loss_backward(grad: torch.Tensor, x: torch.Tensor, p: int, reduction: str) -> torch.Tensor:
    """d tv_loss / d x, in x's dtype and memory format.

    With dh = x[.., i+1, j] - x[.., i, j], dw = x[.., i, j+1] - x[.., i, j] and
    phi'(d) = 2 d (p = 2) or sign(d) (p = 1, sign(0) = 0 as torch.abs's gradient):
        dx[n, c, i, j] = g_n * (phi'(dh[i-1, j]) - phi'(dh[i, j]) + phi'(dw[i, j-1]) - phi'(dw[i, j]))
    where a difference that falls outside the image is 0, and g_n = grad[n] ("none"),
    grad ("sum") or grad / N ("mean").
    """
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    dh = xa[:, :, 1:, :] - xa[:, :, :-1, :]
    dw = xa[:, :, :, 1:] - xa[:, :, :, :-1]
    fh, fw = (2 * dh, 2 * dw) if p == 2 else (dh.sign(), dw.sign())
    dx = torch.zeros_like(xa)
    dx[:, :, 1:, :] += fh
    dx[:, :, :-1, :] -= fh
    dx[:, :, :, 1:] += fw
    dx[:, :, :, :-1] -= fw
    g = grad.to(acc)
    if reduction == "none":
        g = g.reshape(-1, 1, 1, 1)
    elif reduction == "mean":
        g = g / x.shape[0]
    return dx.mul_(g).to(x.dtype)


# -- normalisation: instance norm and batch norm, with ReLU and the residual add -----------
#
# y = γ (x − μ) / √(σ² + ε) + β, then ReLU if asked, then + residual if given. μ and the biased
# variance σ² are taken per (n, c) over H×W (instance norm) or per c over N×H×W (batch norm).
# Everything is computed in float64 and returned in x's dtype and memory layout.
#
# The backend-level functions (``*_forward`` / ``*_backward``) have the launcher signatures
# every backend implements, and return the saved statistics in the accumulation dtype A
# (float32, float64 for float64 inputs):
#   mean: (2, G, C), a double-float: mean[0] + mean[1] is μ, mean[0] is μ rounded to A, so
#         that x − μ = (x − mean[0]) − mean[1] stays exact when |μ| ≫ σ;
#   rstd: (G, C) = 1/√(σ² + ε) (instance norm, G = N); var: (C,) = σ² (batch norm, G = 1).
# Instance norm's γ and β are (C,) or (N, C) (one scale and shift per sample and channel: the
# conditional instance norm of multi-style networks), each independently; their gradients have
# the shape of the parameter. Batch norm's are (C,).


def _norm_dims(per_sample: bool) -> tuple[int, ...]:
    return (2, 3) if per_sample else (0, 2, 3)


def _as_channel(t: torch.Tensor | None, per_sample: bool) -> torch.Tensor | None:
    """(C,), (G, C) or (2, G, C)[i] statistics/parameters -> broadcastable over (N, C, H, W)
    (a (G, C) tensor per sample where ``per_sample``)."""
    if t is None:
        return None
    t = t.double()
    return t.reshape(-1, t.shape[-1], 1, 1) if (per_sample and t.dim() == 2) else t.reshape(1, -1, 1, 1)


def _like(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in x's dtype, laid out as ``torch.empty_like(x)``."""
    return torch.empty_like(x).copy_(value)


def _affine(xhat, weight, bias, relu, residual, per_sample: bool = True):
    z = xhat
    if weight is not None:
        z = z * _as_channel(weight, per_sample)
    if bias is not None:
        z = z + _as_channel(bias, per_sample)
    y = torch.relu(z) if relu else z
    if residual is not None:
        y = y + residual.double()
    return z, y


def _stats(x: torch.Tensor, per_sample: bool):
    """float64 (μ, σ²) of shape (G, C): per (n, c) over H×W (G = N), or per c over N×H×W (G = 1)."""
    x64 = x.double()
    dims = _norm_dims(per_sample)
    mu = x64.mean(dim=dims, keepdim=True)
    var = (x64 - mu).pow(2).mean(dim=dims, keepdim=True)
    return mu.reshape(mu.shape[:2]), var.reshape(var.shape[:2])


def instance_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  eps: float = 1e-5, relu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Instance normalisation, then ReLU if ``relu``, then + ``residual``.

    x: (N, C, H, W); weight γ, bias β: (C,), (N, C) (per sample: γ[n,c], β[n,c]) or None
    (1 and 0); residual: like x or None.
        μ[n,c] = mean_{h,w} x[n,c],  σ²[n,c] = mean_{h,w} (x[n,c] − μ[n,c])²
        y = relu?(γ (x − μ[n,c]) / √(σ²[n,c] + ε) + β) (+ residual)     -> x's dtype
    with γ = γ[c] or γ[n,c], β likewise.
    Differentiable by autograd (the tests' oracle for the backward).
    """
    return instance_norm_forward(x, weight, bias, residual, eps, relu)[0]


def batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
               training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
               relu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Batch normalisation as ``F.batch_norm``, then ReLU if ``relu``, then + ``residual``.

    training: μ[c], σ²[c] (biased) over (N, H, W); the running statistics, when given, are
    updated in place: r_μ ← (1 − m) r_μ + m μ,  r_σ² ← (1 − m) r_σ² + m σ² M/(M − 1), M = N H W.
    Otherwise μ, σ² are the running statistics. y as in :func:`instance_norm`, per channel.
    """
    y, mean, var = batch_norm_forward(x, weight, bias, residual, running_mean, running_var, training, eps, relu)
    if training and running_mean is not None:
        mu, var = _stats(x.detach(), False)
        m = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.copy_((1 - momentum) * running_mean.double() + momentum * mu[0])
            running_var.copy_((1 - momentum) * running_var.double() + momentum * var[0] * m / (m - 1))
    return y


def instance_norm_forward(x, weight, bias, residual, eps: float, relu: bool):
    """Backend signature: -> (y, mean (2, N, C), rstd (N, C)); see the section comment."""
    mu, var = _stats(x, True)
    rstd = 1 / torch.sqrt(var + eps)
    xhat = (x.double() - _as_channel(mu, True)) * _as_channel(rstd, True)
    _, y = _affine(xhat, weight, bias, relu, residual)
    return _like(x, y), split_mean(mu, acc_dtype(x.dtype)), rstd.to(acc_dtype(x.dtype))


def batch_norm_forward(x, weight, bias, residual, running_mean, running_var, training: bool,
                       eps: float, relu: bool):
    """Backend signature: -> (y, mean (2, 1, C), var (1, C)): the batch statistics when
    ``training`` (biased σ²), else the running ones. Running statistics are not touched."""
    if training:
        mu, var = _stats(x, False)
        saved = split_mean(mu, acc_dtype(x.dtype)), var.to(acc_dtype(x.dtype))
    else:
        mu, var = running_mean.double().reshape(1, -1), running_var.double().reshape(1, -1)
        saved = running_stats(running_mean, running_var, x.dtype)
    xhat = (x.double() - _as_channel(mu, False)) / torch.sqrt(_as_channel(var, False) + eps)
    _, y = _affine(xhat, weight, bias, relu, residual, per_sample=False)
    return (_like(x, y), *saved)


def _norm_backward(dy, x, weight, bias, mean, rstd, relu: bool, per_sample: bool, centred: bool):
    """The gradient of y = relu?(γ x̂ + β) (+ r), x̂ = (x − μ) rstd, M elements per statistic:
        g   = dy · [γ x̂ + β > 0]  (dy without ReLU)
        A   = Σ g,  B = Σ g x̂   (per statistic, over its M elements)
        dx  = γ rstd (g − A/M − x̂ B/M)   (centred: μ, σ² are statistics of x)
            = γ rstd g                    (otherwise: running statistics are constants)
        dγ  = Σ_{n,h,w} g x̂,  dβ = Σ_{n,h,w} g  (Σ_{h,w} for a per-sample (N, C) γ or β);
        d residual = dy.
    """
    dims = _norm_dims(per_sample)
    mu = _as_channel(mean[0], per_sample) + _as_channel(mean[1], per_sample)
    r = _as_channel(rstd, per_sample)
    xhat = (x.double() - mu) * r
    z, _ = _affine(xhat, weight, bias, False, None, per_sample)
    g = dy.double()
    if relu:
        g = torch.where(z > 0, g, torch.zeros_like(g))
    gamma = _as_channel(weight, per_sample) if weight is not None else 1.0
    if centred:
        m = x.numel() // (x.shape[0] * x.shape[1]) if per_sample else x.numel() // x.shape[1]
        a = g.sum(dim=dims, keepdim=True)
        b = (g * xhat).sum(dim=dims, keepdim=True)
        dx = gamma * r * (g - a / m - xhat * b / m)
    else:
        dx = gamma * r * g
    acc = acc_dtype(x.dtype)
    return (_like(x, dx), _param_grad(g * xhat, weight).to(acc), _param_grad(g, bias).to(acc))


def _param_grad(terms: torch.Tensor, param: torch.Tensor | None) -> torch.Tensor:
    """Σ of the (N, C, H, W) ``terms`` in the shape of ``param``: (N, C) for a per-sample
    parameter, else (C,)."""
    if param is not None and param.dim() == 2:
        return terms.sum(dim=(2, 3))
    return terms.sum(dim=(0, 2, 3))


def instance_norm_backward(dy, x, weight, bias, mean, rstd, relu: bool):
    """Backend signature: -> (dx in x's dtype and layout, dweight, dbias in A, each (C,) or,
    for a per-sample (N, C) parameter, (N, C))."""
    return _norm_backward(dy, x, weight, bias, mean, rstd, relu, True, True)


def batch_norm_backward(dy, x, weight, bias, mean, var, training: bool, eps: float, relu: bool):
    """Backend signature: -> (dx, dweight (C,), dbias (C,)); rstd = 1/√(var + ε)."""
    rstd = 1 / torch.sqrt(var.double() + eps)
    return _norm_backward(dy, x, weight, bias, mean, rstd, relu, False, training)


# -- upsampling convolutions: upsample_conv2d and conv_transpose2d ----------------------------
#
# Both map (N, C_in, H, W) to (N, C_out, 2H, 2W):
#   upsample_conv2d(x, w, b), w (C_out, C_in, 3, 3): nearest x2, reflection pad 1, 3x3 conv
#       (the upsampling layer of pytorch/examples' fast_neural_style);
#   conv_transpose2d(x, w, b), w (C_in, C_out, 3, 3): the transposed 3x3 conv with stride 2,
#       padding 1, output_padding 1 (the paper's fractionally strided convolution).
# Computed in the accumulation dtype (float32 for half inputs, float64 for float64 inputs) and
# returned in x's dtype. Backend signatures: ``*_forward(x, weight, bias) -> y`` and
# ``*_backward(dy, x, weight, needs_x, needs_weight, needs_bias) -> (dx, dweight, dbias)``, where
# a gradient that is not needed is an empty (0,) tensor.


def _upsampled_padded(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(
        torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1), mode="reflect")


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1), mode="reflect"),
    weight, bias): (N, C_in, H, W) -> (N, C_out, 2H, 2W), x's dtype. Differentiable by autograd."""
    acc = acc_dtype(x.dtype)
    b = None if bias is None else bias.to(acc)
    return torch.nn.functional.conv2d(_upsampled_padded(x.to(acc)), weight.to(acc), b).to(x.dtype)


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv_transpose2d(x, weight, bias, stride=2, padding=1, output_padding=1):
    (N, C_in, H, W) -> (N, C_out, 2H, 2W), x's dtype. Differentiable by autograd."""
    acc = acc_dtype(x.dtype)
    b = None if bias is None else bias.to(acc)
    y = torch.nn.functional.conv_transpose2d(x.to(acc), weight.to(acc), b, stride=2, padding=1, output_padding=1)
    return y.to(x.dtype)


def upsample_conv2d_forward(x, weight, bias):
    """Backend signature of :func:`upsample_conv2d`."""
    return upsample_conv2d(x, weight, bias)


def conv_transpose2d_forward(x, weight, bias):
    """Backend signature of :func:`conv_transpose2d`."""
    return conv_transpose2d(x, weight, bias)


def _unneeded(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


def upsample_conv2d_backward(dy, x, weight, needs_x: bool, needs_weight: bool, needs_bias: bool):
    """The gradients of y = conv2d(P, w) + b, P = reflect_pad_1(up_2(x)) (2H + 2 by 2W + 2):
        dP            = conv_transpose2d(dy, w)                       (adjoint of the valid conv)
        dU            = dP[1:-1, 1:-1], plus the reflected border: padded row 0 (a copy of row 1)
                        adds to row 1, padded row 2H + 1 (a copy of row 2H - 2) adds to row 2H - 2;
                        columns likewise
        dx[i, j]      = sum of dU over its 2 x 2 block (2i + a, 2j + b), a, b in {0, 1}
        dw[o, c, k, l] = sum_{n, p, q} dy[n, o, p, q] P[n, c, p + k, q + l]
        db[o]         = sum_{n, p, q} dy[n, o, p, q]
    In x's (weight's) dtype; unneeded gradients are empty (0,) tensors."""
    acc = acc_dtype(x.dtype)
    g, w = dy.to(acc), weight.to(acc)
    n, c, h, wd = x.shape
    dx = dw = db = None
    if needs_x:
        dp = torch.nn.functional.conv_transpose2d(g, w)
        dp[:, :, 2] += dp[:, :, 0]
        dp[:, :, -3] += dp[:, :, -1]
        dp[:, :, :, 2] += dp[:, :, :, 0]
        dp[:, :, :, -3] += dp[:, :, :, -1]
        du = dp[:, :, 1:-1, 1:-1]
        dx = du.unflatten(2, (h, 2)).unflatten(4, (wd, 2)).sum(dim=(3, 5)).to(x.dtype)
    if needs_weight:
        patches = _upsampled_padded(x.to(acc)).unfold(2, 2 * h, 1).unfold(3, 2 * wd, 1)  # (N, C, 3, 3, 2H, 2W)
        dw = torch.einsum("nopq,ncklpq->ockl", g, patches).to(weight.dtype)
    if needs_bias:
        db = g.sum(dim=(0, 2, 3)).to(weight.dtype)
    return (dx if needs_x else _unneeded(x), dw if needs_weight else _unneeded(weight),
            db if needs_bias else _unneeded(weight))


def conv_transpose2d_backward(dy, x, weight, needs_x: bool, needs_weight: bool, needs_bias: bool):
    """The gradients of y[n, o, 2m - 1 + k, 2l - 1 + k'] += x[n, c, m, l] w[c, o, k, k'] (+ b[o]):
        dx             = conv2d(dy, w, stride=2, padding=1)            (the adjoint)
        dw[c, o, k, k'] = sum_{n, m, l} x[n, c, m, l] dy0[n, o, 2m + k, 2l + k'],
                         dy0 = dy zero-padded by one row on top and one column on the left
        db[o]          = sum_{n, p, q} dy[n, o, p, q]
    In x's (weight's) dtype; unneeded gradients are empty (0,) tensors."""
    acc = acc_dtype(x.dtype)
    g, w, xa = dy.to(acc), weight.to(acc), x.to(acc)
    n, c, h, wd = x.shape
    dx = dw = db = None
    if needs_x:
        dx = torch.nn.functional.conv2d(g, w, stride=2, padding=1).to(x.dtype)
    if needs_weight:
        g0 = torch.nn.functional.pad(g, (1, 0, 1, 0))
        dw = torch.stack([
            torch.stack([torch.einsum("ncml,noml->co", xa, g0[:, :, k:k + 2 * h:2, kk:kk + 2 * wd:2])
                         for kk in range(3)], dim=-1)
            for k in range(3)], dim=-2).to(weight.dtype)
    if needs_bias:
        db = g.sum(dim=(0, 2, 3)).to(weight.dtype)
    return (dx if needs_x else _unneeded(x), dw if needs_weight else _unneeded(weight),
            db if needs_bias else _unneeded(weight))
