"""User plugins: Python modules imported before the build so that they register things.

One mechanism for every kind of extension: a plugin module calls `register_encoder` /
`register_decoder` (model parts, listed in `model.plugins`) or `register_dataset` (data
sources, listed in `data.plugins`) at import time. An entry is a dotted module name
(`omni_datasets.omni_digits`) or the path of a `.py` file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from engine.config import ConfigError


def load_plugins(paths: list[str], key: str = "model.plugins") -> None:
    """Import each plugin once; `key` names the config key in errors."""
    for item in paths:
        path = Path(item)
        if item.endswith(".py"):
            if not path.is_file():
                raise ConfigError(f"config key '{key}': file {item!r} does not exist; give a path to a .py file or a "
                                  "module")
            name = f"omni_plugin_{path.stem}"
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception:
                    del sys.modules[name]
                    raise
        else:
            try:
                importlib.import_module(item)
            except (ImportError, ValueError, TypeError) as e:  # not found, '' or a relative name
                raise ConfigError(f"config key '{key}': cannot import {item!r} ({e}); check the module name and that "
                                  "its package is installed") from None
