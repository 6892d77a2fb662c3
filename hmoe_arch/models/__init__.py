"""Training/validation models; importing this package registers MFGHMoEModel (and the authors' name
MFGHMOEModel) in BasicSR's MODEL_REGISTRY."""
from .mfghmoe_model import MFGHMoEModel

__all__ = ['MFGHMoEModel']
