"""The import paths of the modules before the layered layout (0.2), kept working.

``import manpp.engine`` or ``from manpp.rundir import RunFolder`` give the very module that now lives in
its layer (``manpp.core.engine``, ``manpp.run.rundir``): one module object under two names, so a
monkeypatch through either name reaches the same code. ``manpp.config``, ``manpp.memory`` and
``manpp.train`` became packages of the same name; they re-export what the old modules offered.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {  # old name under manpp -> its name now
    "accuracycost": "commands.accuracycost",
    "bench": "commands.bench",
    "build": "train.build",
    "checkpoint": "base.checkpoint",
    "cli": "commands.cli",
    "compare": "commands.compare",
    "console": "base.console",
    "describe": "commands.describe",
    "distributed": "base.distributed",
    "earlystep": "memory.earlystep",
    "engine": "core.engine",
    "errors": "base.errors",
    "estimate": "memory.estimate",
    "export": "commands.export",
    "extras": "base.extras",
    "fidelity": "config.fidelity",
    "forecast": "commands.forecast",
    "lifecycle": "run.lifecycle",
    "methods": "objectives.methods",
    "momentum": "core.momentum",
    "optim": "core.optim",
    "partition": "core.partition",
    "pipeline": "train.pipeline",
    "plan": "commands.plan",
    "predict": "commands.predict",
    "presets": "config.presets",
    "recompute": "memory.recompute",
    "registry": "base.registry",
    "replica": "train.replica",
    "resolve": "config.resolve",
    "rundir": "run.rundir",
    "runlock": "run.runlock",
    "runlog": "run.runlog",
    "runsummary": "run.runsummary",
    "safeio": "base.safeio",
    "saved": "memory.saved",
    "settings": "base.settings",
    "settingslist": "commands.settingslist",
    "stopsignals": "run.stopsignals",
    "strategies": "commands.strategies",
    "validate": "config.validate",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``manpp.<old name>`` and hands back the module at its new name (imported once)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("manpp.") and fullname[6:] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("manpp." + MOVED[spec.name[6:]])

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


def install() -> None:
    """Add the finder once (importing manpp calls this); nothing is imported until an old name is."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
