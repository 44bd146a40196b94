"""adampx: AdamP and SGDP (Heo et al., ICLR 2021) for PyTorch — exact, sync-free, drop-in."""

from adampx.adamp import AdamP
from adampx.inspection import inspect
from adampx.monitor import NormMonitor
from adampx.param_groups import param_groups
from adampx.sgdp import SGDP

__all__ = ["SGDP", "AdamP", "NormMonitor", "__version__", "inspect", "param_groups"]
__version__ = "0.1.0"
