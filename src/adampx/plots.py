"""Plots of weight norms and effective step sizes (see :mod:`adampx.tools.plots`).

Kept at this path for code that imports ``adampx.plots``.
"""

from adampx.tools.plots import *  # noqa: F403
from adampx.tools.plots import __all__  # noqa: F401
