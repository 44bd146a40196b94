"""adampx: AdamP and SGDP (Heo et al., ICLR 2021) for PyTorch — exact, sync-free, drop-in."""

from adampx.adamp import AdamP
from adampx.inspection import inspect
from adampx.sgdp import SGDP

__all__ = ["SGDP", "AdamP", "__version__", "inspect"]
__version__ = "0.1.0"
