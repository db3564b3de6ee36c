"""The shape of the code: no import cycles, no private names across modules, registries that drive
every list of names, and a contract test over every registered method and objective."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import manpp
from manpp.commands.cli import build_parser
from manpp.base.errors import ManppError
from manpp.base.registry import METHODS, OBJECTIVES, method_names

SRC = Path(manpp.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """``(target module, imported names)`` for every import statement of a module, inside functions too."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if target in modules:
                yield target, [n for n in names if f"{target}.{n}" not in modules]
            for sub in submodules:
                yield sub, []


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _ in _imports(name, path, modules):
            # a module may import its own package (its __init__ has already started running)
            if target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    graph = _graph()
    assert "manpp.core.engine" in graph and len(graph) > 30  # the walk really read the package
    assert _cycles(graph) == []


def test_no_import_cycles_among_the_benchmark_scripts():
    """The scripts import each other by file name, from beside themselves (gpu.py runs gpu_accuracy.py's main)."""
    folder = SRC.parents[1] / "benchmarks"
    scripts = {p.stem: p for p in folder.glob("*.py")}
    graph = {name: set() for name in scripts}
    for name, path in scripts.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            graph[name] |= {t for t in targets if t in scripts and t != name}
    assert graph["gpu"] and _cycles(graph) == []  # (gpu.py imports devices and gpu_accuracy)


# the layers of src/manpp, bottom first (docs/layout.md): a module imports its own layer and the ones below
LAYERS = ["base", "memory", "core", "data", "models", "tasks", "objectives", "config", "run", "train", "commands",
          "api"]


def _layer(module: str) -> int | None:
    """The layer of a module (None: the package itself, manpp/__init__ and __main__, above every layer)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] != "__main__" else None


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {t}" for m, targets in graph.items() for t in sorted(targets)
            if _layer(m) is not None and (_layer(t) is None or _layer(t) > _layer(m))]


def test_the_package_has_at_most_12_top_level_modules_and_each_is_a_layer():
    top = {p.stem for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    top -= {"__init__", "__main__"}
    assert len(top) <= 12 and top == set(LAYERS), sorted(top ^ set(LAYERS))


def test_no_module_imports_a_layer_above_its_own():
    assert _upward({"manpp.core.engine": {"manpp.base.errors", "manpp.core.partition"}}) == []
    assert _upward({"manpp.base.errors": {"manpp.run.rundir"}, "manpp.run.x": {"manpp"}}) == [
        "manpp.base.errors -> manpp.run.rundir", "manpp.run.x -> manpp"]  # the checker catches both kinds
    assert _upward(_graph()) == []


def test_the_import_paths_before_the_layout_still_work():
    import importlib

    from manpp.base.moved import MOVED

    assert len(MOVED) >= 40
    for old, new in MOVED.items():
        assert importlib.import_module(f"manpp.{old}") is importlib.import_module(f"manpp.{new}"), old
    from manpp.config import TrainConfig
    from manpp.memory import measure_step
    from manpp.train import train
    from manpp.train.loop import train as loop_train
    assert train is loop_train and TrainConfig.__module__ == "manpp.config.trainconfig"
    assert measure_step.__module__ == "manpp.memory.measure"


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offences = []
    for name, path in modules.items():
        for target, names in _imports(name, path, modules):
            offences += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert offences == []


def test_the_engine_knows_only_its_contract():
    modules = _modules()
    engine = {t for t, _ in _imports("manpp.core.engine", modules["manpp.core.engine"], modules)}
    assert not any(t.startswith(("manpp.tasks", "manpp.objectives", "manpp.models", "manpp.data")) for t in engine), engine


def test_every_list_of_names_reads_the_registries(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    assert all(f"{name}: {METHODS[name].summary.split()[0]}" in train_help for name in method_names()), train_help
    assert set(method_names()) == set(METHODS) >= {"e2e", "dgl", "infopro", "predsim", "man", "manpp"}
    assert set(OBJECTIVES) >= {"dgl", "infopro", "predsim"}
    for name in OBJECTIVES:  # every objective is also a plain method, and man/manpp can wrap it
        assert METHODS[name].objective == name
    with pytest.raises(ManppError, match="unknown method 'nope': accepted are 'e2e', "):
        manpp.local_model(manpp.build_backbone("resnet8"), method="nope", k=2)


def _contract_cases():
    for method in method_names():
        objectives = [None] if not METHODS[method].takes_objective else OBJECTIVES.names()
        for objective in objectives:
            yield method, objective


@pytest.mark.parametrize("method,objective", list(_contract_cases()))
def test_every_registered_method_and_objective_builds_and_trains(method, objective):
    torch.manual_seed(0)
    net = manpp.build_backbone("resnet8", num_classes=4)
    k = 1 if method == "e2e" else 3
    model = manpp.local_model(net, method=method, k=k, objective=objective)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(model.parameters_to_optimize(), lr=0.05)
    result = model.train_step(x, y)
    opt.step()
    assert len(result.losses) == model.k == k and all(torch.isfinite(v) for v in result.losses)
    assert sum(not torch.equal(a, b) for a, b in zip(before, net.parameters())) > len(before) // 2
    if method != "e2e":  # a module's own head trained it: the first unit's weights have gradients
        assert all(p.grad is not None for p in net.units[0].parameters())


def test_each_objective_owns_its_settings():
    for name, objective in OBJECTIVES.items():
        assert dataclasses.is_dataclass(objective.settings), name
    net = manpp.build_backbone("resnet8")
    model = manpp.local_model(net, method="infopro", k=3, objective_settings={"ixx_1": 2.0})
    assert model.objective_settings.ixx_1 == 2.0 and model.aux[0].lambda1 == 2.0
    with pytest.raises(ManppError, match="unknown setting 'objective_settings.nope' for objective 'dgl': its settings "
                                         "are objective_settings.feature_dim"):
        manpp.local_model(manpp.build_backbone("resnet8"), method="dgl", k=3, objective_settings={"nope": 1})
    with pytest.raises(ManppError, match="bad value 'x' for 'objective_settings.beta': expected float"):
        manpp.local_model(manpp.build_backbone("resnet8"), method="predsim", k=3, beta="x")


def test_the_default_objective_follows_the_backbone(capsys):
    from manpp.commands.cli import main

    assert main(["describe", "--model", "vit_tiny", "--method", "manpp", "--k", "4", "--dataset", "synthetic",
                 "--image-size", "32", "--batch-size", "2"]) == 0
    assert "vit_tiny / manpp (dgl): 4 modules" in capsys.readouterr().out
    cifar = manpp.local_model(manpp.build_backbone("resnet8"), method="manpp", k=2)
    vit = manpp.local_model(manpp.build_backbone("vit_tiny", image_size=32), method="manpp", k=4)
    assert (cifar.objective, vit.objective) == ("infopro", "dgl")
    with pytest.raises(ManppError, match="objective 'infopro' reads cifar or imagenet features, but this backbone "
                                         "gives vit ones: use objective 'dgl'"):
        manpp.local_model(manpp.build_backbone("vit_tiny", image_size=32), method="manpp", k=4, objective="infopro")


def test_local_model_and_the_config_share_one_default_k():
    from manpp.core.partition import default_k

    cifar, imagenet = manpp.build_backbone("resnet32"), manpp.build_backbone("resnet18")
    assert (default_k(cifar), default_k(imagenet)) == (16, 4)
    assert manpp.local_model(cifar, method="dgl").k == 16
    assert manpp.local_model(imagenet, method="dgl", image_size=32).k == 4


def _import_cost_ms(package_root) -> tuple[float, list[str]]:
    """What ``import manpp`` adds to ``import torch``, in ms (``python -X importtime``): manpp's cumulative
    time less torch's (everything manpp imports besides torch counts), and its three heaviest imports.

    manpp is imported from ``package_root`` with bytecode caching on, as an installed package is: with
    ``PYTHONDONTWRITEBYTECODE=1`` (set on this project's machines) every import would compile manpp's sources
    again, and that compile, two thirds of the time here, is not what a user pays."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(package_root)
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import manpp; print(manpp.__file__)"],
                         capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().startswith(str(package_root)), f"imported {out.stdout.strip()}, not the copy"
    total = {}
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            own, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
            if cumulative.isdigit():
                total.setdefault(name.strip(), int(cumulative))
    heaviest = sorted((us, name) for name, us in total.items() if name.split(".")[0] != "torch" and name != "manpp")
    return (total["manpp"] - total["torch"]) / 1000, [name for _, name in heaviest[-3:]]


def test_import_manpp_adds_under_150_ms_to_torch(tmp_path):
    """Heavy imports (torch._dynamo, torchvision, plotting, data libraries) happen where they are used:
    ``import manpp`` itself costs under 150 ms of its own modules' time (the best of three runs, since a
    loaded machine only adds), from a copy of the package whose bytecode the first, unmeasured import wrote."""
    import shutil

    shutil.copytree(Path(manpp.__file__).parent, tmp_path / "manpp", ignore=shutil.ignore_patterns("__pycache__"))
    _import_cost_ms(tmp_path)  # writes the copy's bytecode, as installing a package does
    assert list((tmp_path / "manpp").glob("__pycache__/*.pyc")), "no bytecode was written"
    runs = [_import_cost_ms(tmp_path) for _ in range(3)]
    best, heaviest = min(runs)
    assert best < 150, f"import manpp costs {best:.0f} ms of its own (heaviest: {heaviest})"
    import subprocess
    import sys

    loaded = subprocess.run([sys.executable, "-c", "import sys, manpp; print(sorted(m for m in sys.modules if m in "
                             "('torch._dynamo', 'torchvision', 'matplotlib', 'sklearn', 'scipy', 'timm')))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"import manpp loads {loaded}"
