"""The scale-invariance test and the radial projection (see :mod:`adampx.algorithm.projection`).

Kept at this path for code that imports ``adampx.projection``.
"""

from adampx.algorithm.projection import *  # noqa: F403
from adampx.algorithm.projection import __all__  # noqa: F401
