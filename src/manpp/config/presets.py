"""The paper's configs, shipped inside the package: ``--preset NAME`` or ``-c NAME``.

Each preset is a YAML file in ``manpp/configs`` (the setting of one table row of the paper:
dataset, backbone, K, objective and recipe). ``-c`` takes a file path, or a bare preset name.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..base.errors import ManppError

SUFFIX = ".yaml"


def preset_names() -> list[str]:
    """Every shipped preset, by name (the file name without ``.yaml``)."""
    folder = resources.files("manpp") / "configs"
    return sorted(p.name[:-len(SUFFIX)] for p in folder.iterdir() if p.name.endswith(SUFFIX))


def preset_text(name: str) -> str:
    """The YAML of preset ``name``; a clear error listing the presets for an unknown one."""
    name = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
    if name not in preset_names():
        raise ManppError(f"unknown preset '{name}': accepted are {', '.join(preset_names())}")
    return (resources.files("manpp") / "configs" / (name + SUFFIX)).read_text()


def config_source(text: str) -> tuple[str, str]:
    """``(label, YAML)`` of ``-c TEXT``: an existing file, else a preset of that name."""
    path = Path(text)
    if path.is_file():
        try:
            return f"config '{path}'", path.read_text()
        except OSError as exc:
            raise ManppError(f"cannot read config '{path}': {exc.strerror or exc}") from None
    bare = path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    if path.parent == Path("."):
        if bare in preset_names():
            return f"preset '{bare}'", preset_text(bare)
        raise ManppError(f"config '{text}' is neither a file nor a preset: the presets are {', '.join(preset_names())}")
    raise ManppError(f"cannot read config '{path}': no such file (a preset is named without a folder: "
                     f"-c {bare} or --preset {bare})")


__all__ = ["config_source", "preset_names", "preset_text"]
