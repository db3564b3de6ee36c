"""manpp: supervised local learning for vision networks, built around MAN++.

Quick start, on your own model::

    import manpp
    model = manpp.wrap(my_net, k=4)                 # my_net itself is trained
    opt = torch.optim.SGD(model.parameters_to_optimize(), lr=0.1, momentum=0.9, nesterov=True)
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        model.train_step(x, y)        # K local forward/backward passes
        opt.step()
    print(manpp.evaluate(model, test_loader))
"""

from __future__ import annotations

from .api import local_model, wrap
from .base import moved
from .base.errors import ManppError
from .base.registry import METHODS, OBJECTIVES, Method, register_method, register_objective
from .core.engine import LocalContext, LocalModel, StepResult, evaluate, local_step
from .core.optim import parameter_groups
from .core.partition import Partition, make_partition
from .models import build_backbone
from .objectives.methods import LocalSettings, build_local_model

moved.install()  # the import paths before the layered layout (manpp.core.engine, manpp.run.rundir, ...) keep working

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "LocalContext", "LocalModel", "LocalSettings", "ManppError", "METHODS", "Method", "OBJECTIVES", "Partition",
    "StepResult",
    "build_backbone", "build_local_model", "evaluate", "local_model", "local_step", "make_partition", "parameter_groups",
    "register_method", "register_objective", "wrap",
]
