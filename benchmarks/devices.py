"""One naming of devices and result files, for the device-check scripts (gpu.py, gpu_accuracy.py): both
import it from beside themselves, and neither imports the other's names."""

from __future__ import annotations

import platform
import re

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
