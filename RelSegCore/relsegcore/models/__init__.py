"""Networks built from plain blocks; 2D and 3D from the same code."""

from .unet import DualEncoderUNet, NetworkConfig, count_parameters

__all__ = ["DualEncoderUNet", "NetworkConfig", "count_parameters"]
