"""The names the ``basicsr`` command line offers as choices, without importing the modules that implement them
(torch, basicsr, OpenCV), so ``--help`` and argument errors come at once. A test checks each tuple against the
implementing module's own table."""

DATASETS = ('aid', 'rsscn7', 'ucmerced', 'whurs19')
"""``basicsr prepare``'s data sets: :data:`hmoe_arch.commands.prepare.DATASETS`."""
DEGRADATIONS = ('bicubic', 'bilinear')
"""LR synthesis: :data:`hmoe_arch.data.degradations.DEGRADATIONS`."""
PROTOCOLS = ('basicsr-y', 'ttst-y', 'transenet-rgb', 'haunet-rgb')
"""Evaluation protocols: :data:`hmoe_arch.protocols.PROTOCOLS`."""
DEFAULT_PROTOCOL = 'basicsr-y'
"""``bench``'s default protocol: :data:`hmoe_arch.protocols.DEFAULT_PROTOCOL`."""
EXPORT_FORMATS = ('safetensors', 'onnx')
"""``basicsr export`` formats: :data:`hmoe_arch.commands.export.FORMATS`."""
