"""pycomm: collective communication for PyTorch."""
import torch  # noqa: F401  (loads libtorch before the extension)

from pycomm import _C  # noqa: F401

__version__ = "0.1.0"
