"""Access to the compiled extension hpclm._C, with the reason when it cannot be loaded."""
from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from hpclm import _C
    except ImportError as e:  # not built, or built for another Python / missing shared library
        return None, f"hpclm._C cannot be imported ({e}); build it with 'pip install -e .' or scripts/setup.sh"
    return _C, None


def extension() -> ModuleType | None:
    """hpclm._C, or None when it is not usable (see load_error())."""
    return _load()[0]


def load_error() -> str | None:
    return _load()[1]


def require() -> ModuleType:
    """hpclm._C, or an ImportError that says how to build it."""
    mod, err = _load()
    if mod is None:
        raise ImportError(err)
    return mod
