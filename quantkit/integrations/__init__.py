"""Integrations of quantkit checkpoints with other libraries.

`quantkit.integrations.transformers`: `AutoModelForCausalLM.from_pretrained(<quantkit checkpoint>)` returns the
model `quantkit.load` returns. `import quantkit` registers it without importing transformers (or torch): if
transformers' quantizer table (`transformers.quantizers.auto`) is already imported, at once; otherwise an import
hook registers it right after transformers imports that table, which `from_pretrained` always does first. Call
`quantkit.integrations.transformers.register()` to register explicitly (idempotent).
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_TABLE = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from quantkit.integrations.transformers import register

        register()
    except Exception as e:  # never break `import transformers` over this: warn, and plain transformers refuses
        warnings.warn(f"quantkit could not register its transformers quantizer ({type(e).__name__}: {e}); "
                      f"load quantkit checkpoints with quantkit.load()", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """The real loader of transformers.quantizers.auto, then the registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds transformers.quantizers.auto through the other finders and wraps its loader (once)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TABLE:
            return None
        _remove_hook()
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_HOOK = _Finder()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register the transformers integration now if transformers' quantizer table is imported, else when it is."""
    if _TABLE in sys.modules:
        _register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
