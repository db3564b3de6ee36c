import json

import pytest

from manpp.config import trainconfig as C
from manpp.commands.bench import bench
from manpp.commands.cli import main

KEYS = ("model", "method", "modules", "batch_size", "device", "step_time_s", "images_per_s", "peak_activation_bytes",
        "peak_allocated_bytes", "params", "aux_params", "torch_version")


def test_bench_interleaves_methods_and_reports_ratios():
    cfg = C.apply(C.TrainConfig(), {"model": "resnet32", "dataset": "synthetic", "k": 16, "batch_size": 8,
                                    "device": "cpu", "objective": "dgl"})
    records = bench(cfg, ["e2e", "dgl", "manpp"], steps=2, warmup=1)
    assert [r["method"] for r in records] == ["e2e", "dgl", "manpp"]
    for r in records:
        assert all(r[k] is not None for k in KEYS if k != "peak_allocated_bytes")
        assert r["peak_allocated_bytes"] is None  # CPU
    assert records[0]["step_time_ratio"] == 1.0 and records[0]["activation_ratio"] == 1.0
    assert records[2]["activation_ratio"] < 1.0 and records[2]["aux_params"] > records[1]["aux_params"] > 0
    assert records[2]["images_per_s"] > 0


def test_bench_and_the_strategies_share_one_interleaved_timer():
    from manpp.commands.strategies import interleaved_times

    calls = []

    def step(run):
        calls.append(run)
        return float(len(calls))

    times = interleaved_times(["a", "b"], step, rounds=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then one step of each run per round
    assert times == [[3.0, 5.0], [4.0, 6.0]]


def test_bench_command_json(capsys):
    assert main(["bench", "--model", "resnet8", "--dataset", "synthetic", "--method", "manpp", "--k", "2",
                 "--batch-size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(KEYS) <= set(record) and record["modules"] == 2 and record["method"] == "manpp"
    assert main(["bench", "--model", "resnet8", "--dataset", "synthetic", "--methods", "e2e,manpp", "--k", "2",
                 "--batch-size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "e2e" in out and "manpp" in out and "mem x" in out
    assert main(["bench", "--steps", "0"]) == 2


def test_bench_method_objective_pairs(capsys):
    assert main(["bench", "--model", "resnet8", "--dataset", "synthetic", "--methods", "e2e,manpp:dgl,manpp:infopro",
                 "--k", "2", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["method"], r["objective"]) for r in results] == [("e2e", None), ("manpp", "dgl"), ("manpp", "infopro")]
    assert main(["bench", "--methods", "dgl:infopro"]) == 2
    assert "only man and manpp" in capsys.readouterr().err


@pytest.mark.slow
def test_the_device_check_runs_in_quick_mode_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh --device cpu --quick: the GPU check's code path (every setting family,
    method and mode, the fast path through compile_parts, the accuracy run), so it cannot rot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(__import__("os").environ, PYTHON=sys.executable)
    from manpp.data import FASHION_SYSTEM_DIR

    fashion = FASHION_SYSTEM_DIR.is_dir()  # the accuracy part trains on Fashion-MNIST (Debian's package)
    parts = ["accuracy"] * fashion + ["frontier", "speed", "sanity"]
    proc = subprocess.run([str(root / "benchmarks" / "gpu.sh"), "--device", "cpu", "--quick", "--out", str(tmp_path),
                           "--parts", ",".join(parts)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = [p for p in tmp_path.glob("gpu_*_quick.json") if "_accuracy_" not in p.name]
    doc = json.loads(json_path.read_text())
    assert [s["name"] for s in doc["settings"]] == ["resnet8_k2", "vit_tiny_k2"]
    for setting in doc["settings"]:
        assert sorted(setting["modes"]) == ["bf16", "eager", "fast"]
        for records in setting["modes"].values():
            assert [r["method"] for r in records] == ["e2e", "dgl", "infopro", "manpp"]
            timed = [r for r in records if "skipped" not in r]
            assert all(r["images_per_s"] > 0 and r["peak_activation_bytes"] > 0 for r in timed)
            e2e, manpp_ = timed[0], timed[-1]
            assert manpp_["modules"] == 2 and e2e["modules"] == 1
    for setting in doc["settings"]:  # the fast path's first step agrees with eager mode
        for r in setting["modes"]["fast"]:
            if "skipped" not in r:
                assert r["fast_vs_eager"]["max_loss_rel_diff"] < 1e-5 and r["fast_vs_eager"]["grad_rel_diff"] < 1e-4
        assert all(r.get("fast_vs_eager") is None for r in setting["modes"]["eager"])
    vit_infopro = doc["settings"][1]["modes"]["eager"][2]
    assert "skipped" in vit_infopro
    assert doc["sanity"]["status"] == "finished" and doc["sanity"]["test_accuracy"] is not None
    assert json_path.with_suffix(".md").read_text().startswith("# Device check:")
    assert "error" not in doc["frontier"] and (tmp_path / "frontier_cpu_quick.png").exists()
    assert doc["parts"] == parts
    if fashion:  # every protocol method trained and evaluated after each epoch
        assert doc["accuracy"]["exit_code"] == 0
        (acc_path,) = tmp_path.glob("gpu_*_accuracy_quick.json")
        runs = json.loads(acc_path.read_text())["runs"]
        assert [r["method"] for r in runs] == ["e2e", "manpp:dgl"]
        assert all(r["status"] == "finished" and len(r["accuracy_per_epoch"]) == 2 for r in runs)
        assert acc_path.with_suffix(".png").exists()


@pytest.mark.slow
def test_the_frontier_benchmark_maps_the_regimes(tmp_path):
    """benchmarks/frontier.py --quick: every strategy family at two batches, one measured and one estimated,
    Pareto-marked; the crossover sweep; a rerun resumes (skips what is done)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(__import__("os").environ, PYTHONPATH=str(root / "src"))
    command = [sys.executable, str(root / "benchmarks" / "frontier.py"), "--quick", "--device", "cpu", "--jobs", "1",
               "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "frontier_cpu_quick.json").read_text())
    measured, estimated = doc["points"]
    assert (measured["batch_size"], measured["measured"], estimated["measured"]) == (4, "all", None)
    records = {r["label"]: r for r in measured["records"]}
    assert {"E2E", "E2E + ckpt(units)", "E2E + ckpt(sqrt) + bf16", "manpp K=2", "manpp K=2 + ckpt(units) + bf16",
            "dgl K=2 + ckpt(sqrt)", "E2E + early step", "manpp K=2 + early step"} <= set(records)
    assert records["E2E + ckpt(units)"]["peak_activation_bytes"] < records["E2E"]["peak_activation_bytes"]
    assert records["manpp K=2 + ckpt(units)"]["peak_activation_bytes"] < records["manpp K=2"]["peak_activation_bytes"]
    early = {label: r for label, r in records.items() if label.endswith(" + early step")}
    assert len(early) == len(records) // 2  # every strategy, once stepping at the end and once early
    assert all(r["total_bytes"] <= records[label.removesuffix(" + early step")]["total_bytes"]
               for label, r in early.items())  # freeing gradients early never costs memory
    assert records["E2E + ckpt(units) + early step"]["total_bytes"] < records["E2E + ckpt(units)"]["total_bytes"]
    for r in records.values():  # measured, and the estimate kept beside it: the same bytes
        assert r["memory_source"].startswith("measured") and r["time_source"].startswith("measured")
        assert r["step_time_s"] > 0 and r["total_bytes"] > r["state_bytes"] > 0
        assert r["estimated"]["total_bytes"] == pytest.approx(r["measured"]["total_bytes"], rel=0.02)
    assert all(r["memory_source"].startswith("estimated") for r in estimated["records"])
    front = [r for r in records.values() if r["pareto"]]
    assert front and not any(o["step_time_s"] < r["step_time_s"] and o["total_bytes"] < r["total_bytes"]
                             for r in front for o in records.values())
    assert measured["verdict"]["smallest_exact"] and measured["verdict"]["smallest_local"]
    sweep = doc["sweeps"]["resnet8_quick"]
    assert [r["batch_size"] for r in sweep["rows"]] == doc["sweep_batches"] and "text" in sweep["local"]
    text = (tmp_path / "frontier_cpu_quick.md").read_text()
    assert text.startswith("# The regime map") and "**" in text and "The crossover" in text
    assert (tmp_path / "frontier_cpu_quick.png").stat().st_size > 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "strategies, 4 units; estimating" not in again.stdout  # nothing redone
    # --redo of one point, without the sweep: that point is made again, the other point and the sweep stay
    redo = subprocess.run(command + ["--redo", "--points", "resnet8_quick@16", "--no-sweep"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert redo.returncode == 0, redo.stderr[-3000:]
    kept = json.loads((tmp_path / "frontier_cpu_quick.json").read_text())
    assert [p["batch_size"] for p in kept["points"]] == [4, 16] and kept["points"][0] == measured
    assert kept["sweeps"] == doc["sweeps"]
