"""Register the model with transformers' Auto classes on ``import stgc`` without importing torch then.

``import stgc`` must be cheap (``stgc --help`` imports the package) and must still make
``AutoModelForImageTextToText.from_pretrained(path)`` load this project's checkpoints. Registration needs
transformers (whose config module imports torch: ~2 s), so it happens at the first moment transformers is
there:

- transformers already imported when ``import stgc`` runs: register at once (it costs nothing more);
- otherwise a meta-path finder watches imports and registers as soon as transformers has finished
  importing and no module that ``stgc.modeling`` needs is half-initialised (a ``stgc.*``, ``transformers.*``
  or ``torch.*`` module mid-import would make the registration's own imports circular: e.g. ``import
  stgc.backbones`` imports transformers from its first lines). It retries after each later ``stgc.*``
  module finishes importing, and after any import once transformers is loaded.

After registration the finder removes itself. ``register_now()`` forces it (tests, explicit callers).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_WATCHED_PREFIXES = ("stgc.", "transformers.", "torch.")
_WATCHED_ROOTS = ("stgc", "transformers", "torch")


def register_now() -> None:
    """Import ``stgc.modeling``, whose import registers the config, model and processor classes."""
    _FINDER.pending = False
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    importlib.import_module("stgc.modeling")


def _half_initialised(exclude: str | None) -> bool:
    for name, module in list(sys.modules.items()):
        if name == exclude or not (name in _WATCHED_ROOTS or name.startswith(_WATCHED_PREFIXES)):
            continue
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


class _RegisterWhenSafe(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.pending = True
        self.transformers_loaded = False  # transformers' own import has finished

    def try_register(self, just_loaded: str | None = None) -> None:
        if self.pending and self.transformers_loaded and not _half_initialised(just_loaded):
            register_now()

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib's signature)
        if not self.pending:
            return None
        if fullname != "transformers" and not fullname.startswith("stgc."):
            self.try_register()  # any later import is a chance, once transformers is loaded
            return None
        spec = _find_with_others(fullname, path)  # the real spec; our check runs after its module's exec
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            if fullname == "transformers":
                self.transformers_loaded = True
            self.try_register(just_loaded=fullname)

        loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


def _find_with_others(fullname: str, path) -> importlib.machinery.ModuleSpec | None:  # noqa: ANN001
    for finder in sys.meta_path:
        if finder is _FINDER or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path)
        if spec is not None:
            return spec
    return None


_FINDER = _RegisterWhenSafe()


def install() -> None:
    """Called by ``stgc/__init__``: register now if transformers is loaded, else watch imports."""
    if "transformers" in sys.modules:
        register_now()
    elif _FINDER.pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
