"""selftrain-d2: label-efficient segmentation on Detectron2.

``import selftrain_d2`` is light (it reads the version; torch and Detectron2 are not imported). The components
(backbones, meta-architectures, mappers, datasets, evaluators, trainers) and every subsystem's config keys are
registered with Detectron2's registries when a config is built (:func:`add_selftrain_config`,
``selftrain_d2.config.load_config``), when a subsystem is imported (``selftrain_d2.modeling`` ...), or by
:func:`register_all`.
"""
from .version import __version__

__all__ = ["__version__", "add_selftrain_config", "register_all"]


def register_all():
    """Import every subsystem, registering all components and config keys (what a config build does too)."""
    from .config import register_all as register

    register()


def __getattr__(name):
    # `from selftrain_d2 import add_selftrain_config` (the Detectron2 projects' idiom) imports the config module
    # only when asked; calling it registers everything.
    if name == "add_selftrain_config":
        from .config import add_selftrain_config

        return add_selftrain_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
