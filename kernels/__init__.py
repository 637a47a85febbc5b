"""Triton kernels and their launchers (installed as ``fastperc.kernels``).

Launchers take tensors and return tensors: no autograd, no state. Each module holds the
kernels of one op family; ``_common`` holds what they share.
"""
