"""Packaging of hmoe_arch, the MFG-HMoE BasicSR plugin."""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).parent
START_UP = 'hmoe_arch_import_hook.pth'
"""Put in site-packages: Python runs it at start-up (see hmoe_arch_import_hook.py)."""
START_UP_LINE = ("import importlib.util as _util; _util.find_spec('hmoe_arch_import_hook') is not None and "
                 "__import__('hmoe_arch_import_hook').install()\n")
"""A no-op when the module is gone (an editable install whose checkout was moved or deleted): a failing line
would print a traceback at every Python start-up."""


class BuildWithStartUpHook(build_py):
    """Wheels and regular installs: the start-up file beside the packages."""

    def run(self) -> None:
        super().run()
        Path(self.build_lib, START_UP).write_text(START_UP_LINE)


class EditableWithStartUpHook(editable_wheel):
    """``pip install -e``: the start-up file in the editable wheel (setuptools >= 64)."""

    def _install_namespaces(self, installation_dir, pth_prefix) -> None:
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, START_UP).write_text(START_UP_LINE)


def read_version() -> str:
    for line in (HERE / 'hmoe_arch' / '__init__.py').read_text().splitlines():
        if line.startswith('__version__'):
            return line.split('=')[1].strip().strip("'\"")
    raise RuntimeError('hmoe_arch/__init__.py defines no __version__')


setup(
    name='hmoe_arch',
    version=read_version(),
    description='MFG-HMoE (heterogeneous mixture of experts for remote-sensing super-resolution) as a BasicSR '
    'plugin, with an exact HAT backbone',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['hmoe_arch', 'hmoe_arch.*']),
    py_modules=['hmoe_arch_import_hook'],
    cmdclass={'build_py': BuildWithStartUpHook, 'editable_wheel': EditableWithStartUpHook},
    install_requires=[
        'basicsr==1.4.2',
        'torch>=2.6',
        'torchvision>=0.21',
        'timm>=0.9',
        'einops>=0.6',
        'opencv-python',
        'lmdb',
        'numpy',
        'pyyaml',
    ],
    extras_require={
        'test': ['pytest>=7', 'pytest-timeout>=2', 'ruff>=0.5', 'rasterio>=1.3', 'spandrel>=0.4', 'safetensors>=0.4',
                 'onnx>=1.15', 'onnxruntime>=1.17', 'lpips>=0.1.4'],
        'geo': ['rasterio>=1.3'],
        'lpips': ['lpips>=0.1.4'],
        'spandrel': ['spandrel>=0.4'],
        'export': ['safetensors>=0.4', 'onnx>=1.15', 'onnxruntime>=1.17'],
    },
    entry_points={'console_scripts': ['basicsr = hmoe_arch.commands.cli:main']},
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
