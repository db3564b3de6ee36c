"""One naming of devices and result files, for the benchmark scripts (gpu.py, gpu_accuracy.py, cpu_path.py,
accuracy.py): each imports it from beside itself, and none imports another's names."""

from __future__ import annotations

import multiprocessing
import platform
import re

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def cpu_text() -> str:
    """This CPU as results record it: architecture, cores, vector unit, and whether it computes bf16 natively
    (bf16 autocast is about 1.7x faster than fp32 where it does and about 2.6x slower where it does not)."""
    from manpp.train.build import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 support unknown"}[native]
    return (f"{platform.machine()}, {multiprocessing.cpu_count()} cores, {platform.processor() or 'cpu'} "
            f"({torch.backends.cpu.get_cpu_capability()}, {bf16})")
