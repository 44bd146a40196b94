"""Deprecated alias of :mod:`adampx.backends.cpu_kernel` (the ``fused=True`` kernel).

``KernelBuildError`` is ``adampx.KernelBuildError``; ``load`` and ``cache_dir`` live in
:mod:`adampx.backends.cpu_kernel`.
"""

import warnings

from adampx.backends.cpu_kernel import KernelBuildError, cache_dir, load

__all__ = ["KernelBuildError", "cache_dir", "load"]

warnings.warn(
    "adampx.fused is deprecated: use adampx.KernelBuildError and adampx.backends.cpu_kernel",
    DeprecationWarning,
    stacklevel=2,
)
