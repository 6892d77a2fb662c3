"""Packaging of hmoe_arch, the MFG-HMoE BasicSR plugin."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


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
    extras_require={'test': ['pytest>=7', 'rasterio>=1.3'], 'geo': ['rasterio>=1.3']},
    entry_points={'console_scripts': ['basicsr = hmoe_arch.cli:main']},
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
