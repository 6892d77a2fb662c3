"""Network architectures; importing this package registers them in BasicSR's ARCH_REGISTRY."""
from .mfghmoe_arch import MFGHMoEArch

__all__ = ['MFGHMoEArch']
