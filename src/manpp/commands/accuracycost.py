"""The accuracy a local strategy costs, read from a result of ``benchmarks/accuracy.py``.

``manpp plan`` ranks strategies by memory and time; a local one trains with each module's own loss,
so its accuracy can differ from E2E's. Where an accuracy benchmark measured the method (mean over
seeds, ``fidelity=ours``), :func:`accuracy_cost` gives its gap to E2E in points with the context it
was measured in (dataset, model, K, seeds, optimizer steps), so that a user can judge how far it
carries to their own model. Nothing here estimates: a method that was not measured is ``None``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..base.errors import ManppError
from ..config.trainconfig import parse_overrides

# where plan looks for the accuracy protocol's result when no file is given: the working directory's
# checkout, then the checkout this package is installed from (editable installs)
DEFAULT_RESULT = Path("benchmarks") / "results" / "accuracy_fashion_mnist_protocol.json"


def default_result_path() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / DEFAULT_RESULT).is_file():
            return root / DEFAULT_RESULT
    return None


def load_result(path: str | Path | None) -> dict | None:
    """The accuracy result at ``path`` (``None``: the default one when it exists, else ``None``)."""
    chosen = Path(path) if path is not None else default_result_path()
    if chosen is None:
        return None
    try:
        doc = json.loads(chosen.read_text())
    except FileNotFoundError:
        raise ManppError(f"no accuracy result at '{chosen}': give a JSON file written by benchmarks/accuracy.py")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManppError(f"cannot read the accuracy result '{chosen}': {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise ManppError(f"'{chosen}' is not a result of benchmarks/accuracy.py (it has no list of runs)")
    doc["path"] = str(chosen)
    return doc


def _is_run_of(label: str, name: str, aux_lr_scale: float) -> bool:
    """Whether a run labelled ``label`` is ``name`` at ``aux_lr_scale``: the plain label at 1 (the
    benchmark runs every method at 1), a variant that sets only ``aux_lr_scale`` otherwise."""
    base, _, variant = label.partition("@")
    if base != name:
        return False
    if not variant:
        return aux_lr_scale == 1
    try:
        overrides = parse_overrides(variant.split("+"))  # the benchmark's NAME@KEY=VALUE+... labels
        return set(overrides) == {"aux_lr_scale"} and float(overrides["aux_lr_scale"]) == aux_lr_scale
    except (ManppError, TypeError, ValueError):
        return False


def _accuracies(runs: list[dict], name: str, aux_lr_scale: float = 1.0) -> dict[int, list[dict]]:
    """K -> the runs of ``name`` at ``aux_lr_scale`` (fidelity ours, finished with an accuracy)."""
    out: dict[int, list[dict]] = {}
    for r in runs:
        if (_is_run_of(str(r.get("method")), name, aux_lr_scale) and r.get("fidelity", "ours") == "ours"
                and r.get("test_accuracy") is not None):
            out.setdefault(int(r.get("k", 1)), []).append(r)
    return out


def _paired(e2e: list[dict], ours: list[dict]) -> tuple[list[float], list[float]]:
    """The accuracies of E2E and of the method on the seeds both have (the same training images and
    initial backbone), or of all their runs where the result names no common seed."""
    e2e_by_seed = {r["seed"]: r["test_accuracy"] for r in e2e if r.get("seed") is not None}
    common = [r for r in ours if r.get("seed") in e2e_by_seed]
    if common:
        return [float(e2e_by_seed[r["seed"]]) for r in common], [float(r["test_accuracy"]) for r in common]
    return [float(r["test_accuracy"]) for r in e2e], [float(r["test_accuracy"]) for r in ours]


def accuracy_cost(doc: dict | None, method: str, objective: str | None, default_objective: str | None,
                  k: int, aux_lr_scale: float = 1.0, family: str | None = None) -> dict | None:
    """E2E's mean accuracy minus the method's (points), at ``k``, over the seeds both were measured on;
    ``None`` when the result holds no run of the method (or of E2E) at that K and ``aux_lr_scale`` (the run's
    resolved one: 2 by default on InfoPro's heads), or (``family`` given: the plan's backbone family) when it
    was measured on a backbone of another family: a cost carries only to the networks it was measured on."""
    if doc is None or method == "e2e":
        return None
    if family is not None and result_family(doc) not in (None, family):
        return None
    names = [f"{method}:{objective}"] if objective and objective != method else []
    if objective in (None, method, default_objective):
        names.append(method)  # the accuracy benchmark names a method on its own objective plainly
    e2e = [r for runs in _accuracies(doc["runs"], "e2e").values() for r in runs]
    for name in names:
        by_k = _accuracies(doc["runs"], name, float(aux_lr_scale))
        if k in by_k and e2e:
            near = k
            e2e_acc, ours = _paired(e2e, by_k[near])
            setup = doc.get("setup", {})
            steps = {r.get("steps") for r in by_k[near]}
            return {"points": 100 * (statistics.mean(e2e_acc) - statistics.mean(ours)), "k": near,
                    "aux_lr_scale": float(aux_lr_scale),
                    "accuracy": statistics.mean(ours), "e2e_accuracy": statistics.mean(e2e_acc), "seeds": len(ours),
                    "dataset": setup.get("dataset"), "model": setup.get("model"),
                    "steps": setup.get("steps") or (steps.pop() if len(steps) == 1 else None),
                    "source": doc.get("path")}
    return None


def result_family(doc: dict) -> str | None:
    """The backbone family of the model an accuracy result was measured on (None: it does not say)."""
    model = doc.get("setup", {}).get("model")
    if not model:
        return None
    from ..config import trainconfig as C
    from ..config.resolve import backbone_facts

    try:
        return backbone_facts(C.TrainConfig(model=model)).family
    except Exception:  # noqa: BLE001 - a result of a model this version does not know: no family
        return None


def describe_cost(cost: dict | None, how: str | None = None) -> str:
    """The cost in words; without one, "not measured" and (``how``) the command that would measure it."""
    if cost is None:
        return "accuracy cost not measured" + (f" (measure it: {how})" if how else "")
    where = ", ".join(str(v) for v in (cost["dataset"], cost["model"]) if v)
    steps = f", {cost['steps']} steps" if cost.get("steps") else ""
    sign = "-" if cost["points"] >= 0 else "+"
    scale = f", aux_lr_scale={cost['aux_lr_scale']:g}" if cost.get("aux_lr_scale", 1.0) != 1 else ""
    return (f"accuracy {sign}{abs(cost['points']):.2f} points vs E2E ({where}, K={cost['k']}{scale}, "
            f"{cost['seeds']} seed(s){steps})")


__all__ = ["DEFAULT_RESULT", "accuracy_cost", "describe_cost", "load_result", "result_family"]
