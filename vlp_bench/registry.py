"""One registry per kind of plug-in (methods, tasks), keyed by name, with suggestions on typos.

Every entry, built-in or not, is found through Python entry points in the registry's group
("vlp_bench.methods", "vlp_bench.tasks"; docs/adding-a-method.md). An entry point names either one
class:

    [project.entry-points."vlp_bench.methods"]
    stride = "vlp_bench_stride:Stride"

or, with no ":attr", a package whose import registers its classes with the decorator (this is how
vlp-bench's own methods/ and tasks/ come in: pyproject.toml names them, and methods/__init__.py
is their one registration list):

    @METHODS.register("baseline")
    class Baseline(FrozenLLMMethod): ...

The core never imports a plug-in by name. The registry loads the entry points lazily on first
lookup, so `import vlp_bench` stays cheap, vlp-bench's own first (their names are kept). A plug-in
that fails to import, is not a method (task) class, or reuses a taken name is left out with a
one-line warning naming its package; the other entries work as before.

Compositions ("bridge+side", vlp_bench.method.compose) are registered by name with the settings the
pair needs beyond its parts' (`register_composition`), and listed and tested like any entry; any
other pair can be named and is composed on demand.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib import metadata
from typing import Callable, Generic, TypeVar

from vlp_bench.errors import UserError, suggest
from vlp_bench.log import warn

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str, base: str, composer: str = ""):
        self.kind = kind
        self.group = group  # the entry-point group its entries are declared in
        self.base = base  # "module:Class" every entry subclasses (checked for plug-ins)
        self.composer = composer  # "module:function" building entry "a+b" from entries a and b
        self._entries: dict[str, T] = {}
        self._composed: dict[str, T] = {}  # built on demand: usable by name, not listed
        self._compositions: dict[str, dict] = {}  # registered pairs -> their own config defaults
        self._origins: dict[str, str] = {}  # plug-in name -> "package version"; absent = built-in
        self.problems: list[str] = []  # why each plug-in left out was (one line each)
        self._broken: dict[str, str] = {}  # a name only a plug-in that failed to load had -> why
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = obj
            obj.name = name  # the registered name is the one results and configs use
            return obj

        return deco

    def register_composition(self, name: str, **defaults) -> None:
        """List the composition `name` ("bridge+side") with the settings it needs beyond its parts'
        (e.g. a smaller merge rate); it is built when the registry loads."""
        self._compositions[name] = defaults

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        module, _, cls = self.base.partition(":")
        base = getattr(importlib.import_module(module), cls)
        for ep in sorted(self._entry_points(), key=_own_first):
            self._load_entry_point(ep, base)
        for name in self._compositions:  # listed (and tested) like any entry
            self.register(name)(self.compose(name))
        if not self._entries and not self.problems:
            raise UserError(f"no {self.kind} is registered: vlp-bench's own come from its entry points, so it "
                            f"must be installed (pip install -e .)")

    def _entry_points(self) -> list:
        """The group's entry points of every installed distribution. Not metadata.entry_points(),
        which keeps the first distribution of a name on the path: a stale vlp_bench.egg-info in the
        working directory would then hide the installed one's."""
        found = {}
        for dist in metadata.distributions():
            for ep in dist.entry_points.select(group=self.group):
                found.setdefault((ep.name, ep.value), ep)  # the same distribution seen twice: once
        return list(found.values())

    def _load_entry_point(self, ep, base: type) -> None:
        package = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unnamed package"
        where = f"plug-in {self.kind} '{ep.name}' of {package} ({ep.value})"
        if ":" not in ep.value:  # a package of entries that register themselves
            before = dict(self._entries)
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001 - any error of a third-party import: report it, go on
                self._entries = before  # none of a package that failed half-way
                self._left_out(f"{where} cannot be imported: {type(e).__name__}: {e}")
                return
            for name in set(self._entries) - set(before):  # the checks a class entry gets
                why = self._unfit(name, self._entries[name], base)
                if why:
                    del self._entries[name]
                    self._left_out(f"{where}: {self.kind} '{name}' {why}", name)
                elif ep.dist is None or ep.dist.name != OWN_DISTRIBUTION:
                    self._origins[name] = package
            return
        if "+" in ep.name:
            self._left_out(f"{where}: '+' is kept for compositions")
            return
        if ep.name in self._entries:  # the name keeps meaning the entry that holds it
            taken = f"the one of {self._origins[ep.name]}" if ep.name in self._origins else "a built-in one"
            self._left_out(f"{where}: the name is taken by {taken}")
            return
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - any error of a third-party import: report it, go on
            self._left_out(f"{where} cannot be imported: {type(e).__name__}: {e}", ep.name)
            return
        why = self._unfit(ep.name, obj, base)
        if why:
            self._left_out(f"{where} {why}", ep.name)
        else:
            self._entries[ep.name] = obj
            obj.name = ep.name
            self._origins[ep.name] = package

    def _unfit(self, name: str, obj, base: type) -> str:
        """Why `obj` cannot be entry `name` ("" when it can)."""
        if "+" in name:
            return "uses '+', which is kept for compositions"
        if not (isinstance(obj, type) and issubclass(obj, base)):
            return f"is not a subclass of {self.base}"
        if not dataclasses.is_dataclass(getattr(obj, "Config", None)):
            return "has no Config dataclass"
        return ""

    def _left_out(self, why: str, name: str = "") -> None:
        """A plug-in left out: kept for `vlp-bench list` and `validate`, said once on stderr (rank
        zero); asking for its name later gives the same reason."""
        self.problems.append(why)
        if name:
            self._broken[name] = why
        warn(f"{why}; left out")

    def origin(self, name: str) -> str:
        """Where entry `name` comes from: "built-in" or the plug-in's "package version"."""
        self._load()
        return self._origins.get(name, "built-in")

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
            if name in self._broken:
                raise UserError(self._broken[name])
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
            obj = getattr(importlib.import_module(module), func)(name, first, second, self._compositions.get(name, {}))
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


def _own_first(ep) -> tuple:
    """vlp-bench's own entry points before any other package's (their names are kept), then by name."""
    return (ep.dist is None or ep.dist.name != OWN_DISTRIBUTION, ep.name, ep.value)


OWN_DISTRIBUTION = "vlp-bench"
METHODS: Registry = Registry("method", "vlp_bench.methods", "vlp_bench.method:Method",
                             composer="vlp_bench.method:compose")
TASKS: Registry = Registry("task", "vlp_bench.tasks", "vlp_bench.task:Task")
