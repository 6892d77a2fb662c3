"""Every error this package raises on purpose, in one hierarchy; ``basicsr`` exits with ``exit_status``.

All derive from :class:`HmoeError`; those that callers may know as built-in errors keep those bases
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``). The command line prints the message (one line naming the
file or key and what was expected) and exits with the class's ``exit_status``: 2 for "fix the input", 3 for a
training stopped on a non-finite loss or gradient.
"""


class HmoeError(Exception):
    """Base of this package's errors."""

    exit_status = 2


class OptionError(HmoeError, ValueError):
    """A bad option file, ``--force_yml`` entry, flag or input/output location; the message names it."""


class PrepareError(HmoeError):
    """A bad input or output location of ``basicsr prepare``; the message names the file."""


class ImageError(HmoeError, ValueError):
    """An image file that is not an 8-bit RGB image this package can read; the message names it."""


class DatasetError(HmoeError, ValueError):
    """A bad dataset option or image; the message names the key or the file."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A folder, LMDB, split list or image the options name does not exist."""


class CheckpointError(HmoeError, ValueError):
    """A checkpoint file that cannot be read or fetched; the message names it."""


class ConfigError(HmoeError, ValueError):
    """A state_dict that is not one of an MFGHMoEArch (or HAT); the message names the tensor."""


class NonFiniteLossError(HmoeError, RuntimeError):
    """A loss or gradient became NaN/Inf; raised before the optimizer step, so no weight changed."""

    exit_status = 3
