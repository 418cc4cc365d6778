"""Public names imported on first use (PEP 562): a package names the submodule of each, and importing the package
imports none of them, so a command that needs one part does not pay for loading the others."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``: ``name`` is read from the submodule
    ``exports[name]`` (relative to the package) the first time it is asked for, then kept in the package."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
