"""How every patch puts its forward on a module: on the instance, never on the transformers class."""

from __future__ import annotations

import types
from typing import Any


def replace_forward(module: Any, fn) -> None:
    """`fn` as `module`'s forward, on the instance only; the module's own stays reachable as `_ftw_original_forward`
    (the first one, however often the module is patched)."""
    if not hasattr(module, "_ftw_original_forward"):
        module._ftw_original_forward = module.forward
    module.forward = types.MethodType(fn, module)
