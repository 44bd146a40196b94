"""adampx: AdamP and SGDP (Heo et al., ICLR 2021) for PyTorch — exact, sync-free, drop-in."""

from adampx import backends
from adampx.adamp import AdamP
from adampx.backends.cpu_kernel import KernelBuildError
from adampx.projected import Projected
from adampx.sgdp import SGDP
from adampx.tools.inspection import inspect
from adampx.tools.monitor import NormMonitor
from adampx.tools.param_groups import param_groups

__all__ = [
    "SGDP",
    "AdamP",
    "KernelBuildError",
    "NormMonitor",
    "Projected",
    "__version__",
    "backends",
    "inspect",
    "param_groups",
]
__version__ = "0.1.0"
"""The version of this package."""
