"""The ``torch`` backend: the fastest plain-torch compositions of the fused ops."""
