"""Keep the repository's top-level folders from shadowing installed packages.

`kernels/`, `eval/` and `recipes/` are installed as `quantkit.kernels`, `quantkit.eval` and `quantkit.recipes`.
A Python process whose `sys.path` holds the repository root (`python -m ...` started there, pytest
subprocesses) also finds them under their bare names, and `kernels` is the name of the Hugging Face package
that transformers imports. Each folder's `__init__` calls `hand_over` when it runs under a bare name: the
import then yields the installed package of that name, or, where none is installed, an empty module with no
file and no version (what Python gives for a folder without `__init__.py`), which import checks such as
transformers' read as "not installed".
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types


def hand_over(name: str, init_file: str) -> None:
    """Replace `sys.modules[name]`, being imported from `init_file`, by the installed package `name`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        empty = types.ModuleType(name)
        empty.__path__ = []
        sys.modules[name] = empty
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
