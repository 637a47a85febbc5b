"""Triton kernels and their launchers (installed as ``fastperc.kernels``).

Launchers take tensors and return tensors: no autograd, no state. Each module holds the
kernels of one op family; ``common`` holds what they share (element types, dense layouts, the
one ``launch`` every kernel launch goes through). The launchers import only this package and
``fastperc.rules``.
"""
