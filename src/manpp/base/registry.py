"""Registries of local objectives and methods, by name.

An objective registers itself in its own file::

    @register_objective("predsim", settings=PredSimSettings, families=("cifar", "imagenet"))
    def build(spec, settings, **context):
        return PredSimHead(...)

and becomes ``--objective predsim`` (the base head of MAN/MAN++) and, unless ``method=False``,
also ``--method predsim`` (the plain local method). Every list of names (command-line choices and
help, ``describe``, ``compare``, the checks of ``train``) reads these registries, so a new
objective or method is one new file plus the line that imports it.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ManppError, choices
from .settings import coerce_fields

T = TypeVar("T")

# What an auxiliary network can read, by the backbone's ``aux_family``:
# 'cifar' and 'imagenet': (B, C, H, W) feature maps (CIFAR-width or ImageNet-width heads);
# 'vit': (B, tokens, width) with a class token first; 'detection' and 'segmentation': feature maps
# of a dense backbone, with the task's targets.
FAMILIES = ("cifar", "imagenet", "vit", "detection", "segmentation")


class Registry(Generic[T]):
    """Named entries of one kind, in registration order; unknown names get one clear error."""

    def __init__(self, kind: str, order: Callable[[T], Any] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._order = order  # sort key of names(); None: registration order

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ManppError(f"unknown {self.kind} {name!r}: accepted are {choices(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        if self._order is None:
            return list(self._entries)
        return sorted(self._entries, key=lambda n: self._order(self._entries[n]))  # stable: ties keep their order

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return [(n, self._entries[n]) for n in self.names()]

    def values(self):
        return [self._entries[n] for n in self.names()]

    def __getitem__(self, name: str) -> T:
        return self.get(name)


@dataclass(frozen=True)
class Objective:
    """A local objective: how to build the auxiliary head of one module, and its settings."""

    name: str
    build: Callable[..., Any]  # build(spec, settings, *, momentum, next_unit, task) -> nn.Module
    settings: type  # a dataclass of the objective's own settings (``objective_settings.<field>=value``)
    families: tuple[str, ...]  # the backbone families whose features it reads
    default_for: tuple[str, ...] = ()  # families for which it is the default objective
    summary: str = ""
    release: dict = dataclasses.field(default_factory=dict)  # settings of the authors' release (fidelity=release)
    # its heads' lr over the backbone's under fidelity=ours, whichever local method trains them (plain, MAN,
    # MAN++), when the run leaves aux_lr_scale unset; 1 under the release. Measured (docs/results.md, ablations)
    aux_lr_scale: float = 1.0

    def make_settings(self, values: dict[str, Any] | None = None):
        """The settings dataclass from ``values`` (checked and typed).

        A key that is a setting of another objective only (e.g. InfoPro's ``ixx_1`` in a DGL run of
        ``manpp compare``) is left out with a warning; a key no objective knows is an error naming
        the accepted ones.
        """
        values = dict(values or {})
        accepted = self.settings_names()
        for key in list(values):
            if key in accepted:
                continue
            owners = [o.name for o in OBJECTIVES.values() if key in o.settings_names()]
            if not owners:
                listed = ", ".join(f"objective_settings.{a}" for a in accepted) or "none"
                raise ManppError(f"unknown setting 'objective_settings.{key}' for objective '{self.name}': its "
                                 f"settings are {listed}")
            warnings.warn(f"objective_settings.{key} is a setting of objective {choices(owners)}, not of "
                          f"'{self.name}': "
                          f"not used here", stacklevel=3)
            del values[key]
        return self.settings(**coerce_fields(self.settings, values, prefix="objective_settings."))

    def settings_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.settings)]

    def check_family(self, family: str) -> None:
        if family not in self.families:
            fits = [o.name for o in OBJECTIVES.values() if family in o.families]
            raise ManppError(f"objective '{self.name}' reads {' or '.join(self.families)} features, but this backbone "
                             f"gives {family} ones: use objective {choices(fits)}")


@dataclass(frozen=True)
class Method:
    """A training method: end-to-end, a plain local objective, or a momentum wrapper around one."""

    name: str
    objective: str | None  # the objective it always uses; None: the user's choice (MAN/MAN++ wrap one)
    momentum: bool = False  # wrap the head in an EMA + learnable copy of the next unit
    learnable_scale: bool = False  # MAN++'s s_j (else s = 1, i.e. MAN)
    local: bool = True  # False: one module, end-to-end
    summary: str = ""

    @property
    def takes_objective(self) -> bool:
        return self.local and self.objective is None


def aux_lr_scale_of(method: str, objective: str | None, *, release: bool = False) -> float:
    """The auxiliary networks' lr over the backbone's when a run leaves ``aux_lr_scale`` unset: that of
    ``objective``'s heads (``Objective.aux_lr_scale``) under fidelity=ours, the same under every local
    method that trains them, so a method and its MAN/MAN++ variant compare at the same head settings; 1
    for end-to-end and under the release. Applied by :func:`manpp.config.resolve.resolve_local` (the command
    line, ``local_model`` and ``wrap``)."""
    if release or not METHODS.get(method).local or objective is None:
        return 1.0
    return float(OBJECTIVES.get(objective).aux_lr_scale)


OBJECTIVES: Registry[Objective] = Registry("objective")
# end-to-end first, then the plain local methods, then the momentum wrappers
METHODS: Registry[Method] = Registry("method", order=lambda m: 0 if not m.local else 2 if m.momentum else 1)


def register_objective(name: str, *, settings: type, families: tuple[str, ...], default_for: tuple[str, ...] = (),
                       summary: str = "", method: bool = True, release: dict | None = None,
                       aux_lr_scale: float = 1.0):
    """Decorator registering ``build`` as objective ``name`` (and, with ``method``, method ``name``).

    ``release``: the settings where the authors' release differs from ``settings``' defaults,
    applied by ``fidelity=release`` (:mod:`manpp.config.fidelity`). ``aux_lr_scale``: its heads' lr over the
    backbone's under ``fidelity=ours`` (see :func:`aux_lr_scale_of`).
    """
    unknown = [f for f in (*families, *default_for) if f not in FAMILIES]
    if unknown:
        raise ValueError(f"objective '{name}': unknown families {unknown}; known are {FAMILIES}")

    def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
        OBJECTIVES.add(name, Objective(name, build, settings, tuple(families), tuple(default_for), summary,
                                       dict(release or {}), float(aux_lr_scale)))
        if method:
            METHODS.add(name, Method(name, name, summary=summary))
        return build

    return decorator


def register_method(method: Method) -> Method:
    return METHODS.add(method.name, method)


def default_objective(family: str) -> str:
    """The objective a backbone of ``family`` gets when none is asked for."""
    for objective in OBJECTIVES.values():
        if family in objective.default_for:
            return objective.name
    for objective in OBJECTIVES.values():
        if family in objective.families:
            return objective.name
    raise ManppError(f"no registered objective reads {family!r} features")


def objective_names(family: str | None = None) -> list[str]:
    return [o.name for o in OBJECTIVES.values() if family is None or family in o.families]


def objective_takers() -> list[str]:
    """The methods that wrap an objective of the user's choice (MAN, MAN++)."""
    return [name for name, method in METHODS.items() if method.takes_objective]


def method_names() -> list[str]:
    """Every method: end-to-end first, then the plain local ones, then the momentum wrappers."""
    return METHODS.names()
