"""Fused ops with a pure-PyTorch reference twin and fast paths chosen automatically."""

from kitelm.ops.scan import available_backends, linear_scan, linear_scan_ref

__all__ = ["available_backends", "linear_scan", "linear_scan_ref"]
