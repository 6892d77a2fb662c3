"""``python -m hmoe_arch COMMAND ...``: the ``basicsr`` command (for torchrun and environments without the script)."""
import sys

from .commands.cli import main

sys.exit(main())
