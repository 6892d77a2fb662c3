"""Training/validation models; importing this package registers MFGHMoEModel (and the authors' name
MFGHMOEModel) in BasicSR's MODEL_REGISTRY."""
from .mfghmoe_model import MFGHMoEModel, NonFiniteLossError

__all__ = ['MFGHMoEModel', 'NonFiniteLossError']
