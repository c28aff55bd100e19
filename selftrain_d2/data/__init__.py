from . import config as _config  # noqa: F401  (registers this subsystem's config keys)
from . import datasets, mappers  # noqa: F401  (registration on import)
from .build import build_test_loader, build_train_loader
from .mappers import MAPPER_REGISTRY, build_mapper

__all__ = ["MAPPER_REGISTRY", "build_mapper", "build_train_loader", "build_test_loader"]
