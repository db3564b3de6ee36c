"""Training: build (the model and data of a resolved config), loop (the one epoch loop), and its step
strategies, replica (a process holding the whole model) and pipeline (one stage of modules per process).

``from manpp.train import train`` works as before the layout; it imports the loop only when asked.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module 'manpp.train' has no attribute {name!r}")


__all__ = ["train"]
