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
from .engine import LocalContext, LocalModel, StepResult, evaluate, local_step
from .errors import ManppError
from .methods import LocalSettings, build_local_model
from .optim import parameter_groups
from .models import build_backbone
from .partition import Partition, make_partition
from .registry import METHODS, OBJECTIVES, Method, register_method, register_objective

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "LocalContext", "LocalModel", "LocalSettings", "ManppError", "METHODS", "Method", "OBJECTIVES", "Partition",
    "StepResult",
    "build_backbone", "build_local_model", "evaluate", "local_model", "local_step", "make_partition", "parameter_groups",
    "register_method", "register_objective", "wrap",
]
