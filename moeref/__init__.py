"""moeref: a reference implementation (ground-truth oracle) of Mixture-of-Experts formulations."""

from ._version import __version__
from . import core

__all__ = ["__version__", "core"]
