"""Networks built from plain blocks; 2D and 3D from the same code."""

from .ensemble import EnsembleNetwork
from .unet import DualEncoderUNet, NetworkConfig, count_parameters

__all__ = ["DualEncoderUNet", "EnsembleNetwork", "NetworkConfig", "count_parameters"]
