"""Dataset mappers, chosen by name with ``cfg.INPUT.DATASET_MAPPER_NAME``.

A mapper turns one Detectron2 dataset dict into model inputs. To add one, decorate a class whose
``__init__(cfg, is_train)`` (or ``@configurable`` equivalent) builds it::

    @MAPPER_REGISTRY.register()
    class MyMapper: ...

and set ``INPUT.DATASET_MAPPER_NAME: MyMapper`` (or the name given with ``register(name=...)``).
"""
from ...utils.registry import NamedRegistry

MAPPER_REGISTRY = NamedRegistry("MAPPER")
MAPPER_REGISTRY.__doc__ = "Dataset mappers: callables dataset_dict -> model input dict, built from (cfg, is_train)."


def build_mapper(cfg, is_train):
    return MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, is_train)


from . import semantic  # noqa: E402,F401  (registration on import)

__all__ = ["MAPPER_REGISTRY", "build_mapper"]
from . import mask_former  # noqa
from . import views  # noqa
