"""Load a repository script that is not a package module (images/build.py, scripts/*.py) by path.

Those files run as programs (`python3 images/build.py`), so they live outside the `ipvsproxy`
package; the tests still import their functions, through this one loader.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(relpath: str, name: str) -> ModuleType:
    """The module at ROOT/relpath, registered as `name` (dataclasses need it in sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    assert spec and spec.loader, relpath
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
