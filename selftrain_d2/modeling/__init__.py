from . import backbone  # noqa: F401  (registration on import)
