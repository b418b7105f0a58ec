"""`Registry`: name -> factory tables for the plug points users extend (tool and reasoning
parsers), with the decorator that fills them and the lookup that names the known entries."""

from __future__ import annotations

from collections.abc import Callable
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
