"""One registry per kind of plug-in (methods, tasks), keyed by name, with suggestions on typos.

Built-in entries register themselves with a decorator when their package is imported:

    @METHODS.register("baseline")
    class Baseline(FrozenLLMMethod): ...

The registry imports its package lazily on first lookup, so `import vlp_bench` stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

from vlp_bench.config import suggest
from vlp_bench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, composer: str = ""):
        self.kind = kind
        self.package = package  # every module of this package is imported to populate the registry
        self.composer = composer  # "module:function" building entry "a+b" from entries a and b
        self._entries: dict[str, T] = {}
        self._composed: dict[str, T] = {}  # built on demand: usable by name, not listed
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = obj
            obj.name = name  # the registered name is the one results and configs use
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")
        for name in getattr(pkg, "COMPOSITIONS", ()):  # compositions listed (and tested) like any entry
            self.register(name)(self.compose(name))

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries and self.composer and "+" in name:
            if name not in self._composed:
                self._composed[name] = self.compose(name)
            return self._composed[name]
        if name not in self._entries:
            known = ", ".join(self.names())
            raise UserError(f"unknown {self.kind} '{name}'{suggest(name, self._entries)}; known: {known}")
        return self._entries[name]

    def compose(self, name: str) -> T:
        """Entry "a+b" (e.g. simvlg+tome-vit), built from entries a and b by the composer."""
        parts = name.split("+")
        if len(parts) != 2:
            raise UserError(f"{self.kind} '{name}': a composition has exactly two parts, 'a+b'")
        first, second = (self.get(p) for p in parts)
        module, _, func = self.composer.partition(":")
        try:
            obj = getattr(importlib.import_module(module), func)(name, first, second)
        except ValueError as e:
            raise UserError(str(e)) from None
        obj.name = name
        return obj

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UserError:
            return False
        return True


METHODS: Registry = Registry("method", "vlp_bench.methods", composer="vlp_bench.method:compose")
TASKS: Registry = Registry("task", "vlp_bench.tasks")
