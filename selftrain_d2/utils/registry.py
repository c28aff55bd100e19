"""Detectron2's (fvcore's) Registry, plus registration under a chosen name."""
from detectron2.utils.registry import Registry

__all__ = ["NamedRegistry"]


class NamedRegistry(Registry):
    """``@REG.register()`` registers under the object's ``__name__``; ``@REG.register("name")`` under
    ``name`` (e.g. a config-friendly or reference-compatible name)."""

    def register(self, obj=None, name=None):
        if isinstance(obj, str):
            obj, name = None, obj
        if obj is not None:
            self._do_register(name or obj.__name__, obj)
            return obj

        def deco(func_or_class):
            self._do_register(name or func_or_class.__name__, func_or_class)
            return func_or_class

        return deco
