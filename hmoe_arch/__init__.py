"""hmoe_arch: MFG-HMoE (heterogeneous mixture of experts for remote-sensing super-resolution) as a BasicSR
plugin. Importing the package registers its classes in BasicSR's registries."""
from ._compat import install_functional_tensor_stand_in, restore_basicsr_names

install_functional_tensor_stand_in()

from .archs import MFGHMoEArch  # noqa: E402  (registration needs the stand-in above)
from .data import RSPairedDataset  # noqa: E402
from .models import MFGHMoEModel  # noqa: E402

restore_basicsr_names()

__version__ = '0.1.0'
__all__ = ['MFGHMoEArch', 'MFGHMoEModel', 'RSPairedDataset', '__version__']
