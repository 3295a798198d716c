"""aligntool: align and compress language models from one YAML recipe.

The Python API (docs/API.md): ``aligntool.train``, ``aligntool.evaluate`` and ``aligntool.compress`` (and their
result types), loaded from aligntool/api.py on first use, so that ``import aligntool`` and ``aligntool --help`` stay
instant. ``train`` and ``compress`` are also the names of modules of this package (aligntool/train.py, the
aligntool/compress/ package): the package's attribute stays the API's function even after Python imports those
modules (which would set the attribute to the module); ``from aligntool.train import ...`` reaches the module as
before."""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = ("train", "evaluate", "compress", "TrainResult", "CompressResult")
__all__ = ["__version__", *_API]


def _api(name: str):
    # by name, as registry.AlgorithmSpec.load imports a method: the command-line layer's module, loaded on first use
    # (docs/ARCHITECTURE.md)
    return getattr(importlib.import_module("aligntool.api"), name)


class _Package(types.ModuleType):
    """The aligntool package, whose API names are properties: read, the API's object (or one a caller assigned, e.g.
    a test's stand-in); the import system's assignment of the submodule of the same name is ignored."""

    def __dir__(self):
        return sorted({*super().__dir__(), *_API})


def _property(name: str) -> property:
    def get(self):
        return self.__dict__.get("_assigned", {}).get(name) or _api(name)

    def set_(self, value):
        if not (isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}"):
            self.__dict__.setdefault("_assigned", {})[name] = value

    return property(get, set_, doc=f"aligntool.api.{name}")


for _name in _API:
    setattr(_Package, _name, _property(_name))
sys.modules[__name__].__class__ = _Package
del _name
