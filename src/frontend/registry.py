"""`Registry`: name -> factory tables for the plug points users extend (tool and reasoning
parsers), with the decorator that fills them and the lookup that names the known entries; and
`import_plugin`, which imports the user modules that register into them (or add LoRA resolvers)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A dict of named factories; `flag` is the CLI option that selects one (for errors)."""

    def __init__(self, flag: str):
        super().__init__()
        self.flag = flag

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the factory available as `--<flag> NAME`."""

        def add(factory: T) -> T:
            self[name] = factory
            return factory

        return add

    def get_factory(self, name: str) -> T:
        """The factory registered as `name`; ValueError listing the known names."""
        if name not in self:
            raise ValueError(f"{self.flag}: unknown parser {name!r}; known: "
                             f"{', '.join(sorted(self))}")
        return self[name]


def import_plugin(path: str, flag: str) -> None:
    """Import a user plug-in module (a .py file or a dotted module name) once per process; its
    import registers what it provides. ValueError names `flag` when it cannot be imported."""
    if Path(path).is_file():
        module_name = f"{flag}_{Path(path).stem}"
        if module_name in sys.modules:
            return  # imported already (the launcher validates, each API server imports)
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"{flag}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(path)
    except ImportError as e:
        raise ValueError(f"{flag}: {path} is neither a file nor a module: {e}") from e
