"""benchmarks/accuracy.py: which runs are paired, the paired differences, and a real (tiny) run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402


def test_man_and_manpp_are_paired_with_their_base_method_seed_by_seed():
    methods = ["e2e", "dgl", "infopro", "man:dgl", "manpp:dgl", "man:infopro", "manpp:infopro",
               "manpp:infopro@scale_init=0.5"]
    assert accuracy.base_methods("manpp:dgl", methods) == ["dgl", "man:dgl"]
    assert accuracy.base_methods("man:infopro", methods) == ["infopro"]
    assert accuracy.base_methods("manpp:infopro@scale_init=0.5", methods) == ["manpp:infopro"]
    assert accuracy.base_methods("manpp:predsim", methods) == []  # its base was not run
    assert accuracy.base_methods("dgl", methods) == accuracy.base_methods("manpp", methods) == []
    acc = {("dgl", 0): 0.80, ("dgl", 1): 0.82, ("dgl", 2): 0.81, ("manpp:dgl", 0): 0.83, ("manpp:dgl", 1): 0.81,
           ("e2e", 0): 0.90, ("e2e", 1): 0.91}
    doc = {"setup": {"methods": methods, "dataset": "fashion-mnist", "test_subset": "all", "model": "resnet32",
                     "seeds": [0, 1, 2], "epochs": 2, "train_subset": 40000, "subset_order": "seeded",
                     "batch_size": 128, "lr": 0.1, "machine": "test", "python": "3", "torch": "2", "date": "today",
                     "command": "python benchmarks/accuracy.py", "ks": [16]},
           "runs": [{"fidelity": "ours", "method": m, "k": 1 if m == "e2e" else 16, "seed": s, "test_accuracy": a,
                     "modules": 16, "epoch_time_s": 10.0, "steps": 625, "wall_s": 1800.0, "threads": 1}
                    for (m, s), a in acc.items()]}
    (pair,) = accuracy.paired(doc)  # seed 2 of dgl has no MAN++ partner
    assert (pair["method"], pair["base"], pair["k"]) == ("manpp:dgl", "dgl", 16)
    assert pair["diffs"] == pytest.approx({0: 3.0, 1: -1.0})
    text = accuracy.summarize(doc)
    assert "| manpp:dgl | dgl | 16 | ours | 0: +3.00, 1: -1.00 | +1.00 ± 2.83 | 1 of 2 |" in text
    assert "7 runs, 3.5 CPU hours" in text and "(seeded subset)" in text
    assert accuracy.cpu_hours({"runs": [{"seed": 0}]}) is None  # records without timing: no claim


def test_two_writers_of_one_results_file_keep_each_others_runs(tmp_path):
    path = tmp_path / "r.json"
    run = lambda m, s: {"fidelity": "ours", "method": m, "k": 16, "seed": s, "test_accuracy": 0.5}  # noqa: E731
    first = accuracy._add_record(path, {"setup": {"by": "a"}, "runs": []}, run("dgl", 0))
    second = accuracy._add_record(path, {"setup": {"by": "b"}, "runs": []}, run("manpp:dgl", 0))  # started before
    assert [r["method"] for r in second["runs"]] == ["dgl", "manpp:dgl"]
    again = accuracy._add_record(path, first, {**run("manpp:dgl", 0), "test_accuracy": 0.9})  # a duplicate
    on_disk = json.loads(path.read_text())
    assert on_disk == again and [r["test_accuracy"] for r in on_disk["runs"]] == [0.5, 0.5]


@pytest.mark.slow
def test_the_accuracy_benchmark_trains_real_runs_and_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    from manpp.data import FASHION_SYSTEM_DIR

    if not FASHION_SYSTEM_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    command = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--model", "resnet8", "--ks", "2",
               "--methods", "e2e,dgl,manpp:dgl", "--seeds", "0,1", "--train-subset", "128", "--epochs", "1",
               "--batch-size", "32", "--monitor-subset", "64", "--test-subset", "200", "--jobs", "2",
               "--out", str(tmp_path)]
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "accuracy_fashion_mnist_protocol.json").read_text())
    assert len(doc["runs"]) == 6 and all(r["test_images"] == 200 and r["steps"] == 4 for r in doc["runs"])
    assert {r["objective"] for r in doc["runs"] if r["method"] == "manpp:dgl"} == {"dgl"}
    assert "| manpp:dgl | dgl | 2 | ours |" in (tmp_path / "accuracy_fashion_mnist_protocol.md").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)  # nothing left to train
    assert again.returncode == 0 and "0 runs to train (6 already in" in again.stdout
    setup = json.loads((tmp_path / "accuracy_fashion_mnist_protocol.json").read_text())["setup"]
    assert setup["command"].count("accuracy.py") == 1  # resuming with the same command is not a second command


@pytest.mark.slow
def test_a_run_stopped_with_its_sitting_continues_from_its_checkpoint(tmp_path):
    from manpp.data import FASHION_SYSTEM_DIR

    if not FASHION_SYSTEM_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT / "src"))

    def bench(out, *extra):
        command = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--model", "resnet8", "--ks", "2",
                   "--methods", "manpp:dgl", "--seeds", "0", "--train-subset", "128", "--epochs", "2",
                   "--batch-size", "32", "--monitor-subset", "64", "--test-subset", "200", "--jobs", "1",
                   "--name", "cont", "--out", str(out), *extra]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout, json.loads((out / "cont.json").read_text())["runs"]

    stdout, runs = bench(tmp_path / "a", "max_steps=5")  # a sitting that ends inside epoch 2
    assert runs == [] and "ended stopped: not recorded" in stdout
    _, (continued,) = bench(tmp_path / "a", "--threads", "2")  # the next sitting on 2 threads
    _, (whole,) = bench(tmp_path / "b")  # the same run without a stop
    assert continued["continued_at_step"] == 5 and "continued_at_step" not in whole
    assert continued["steps"] == whole["steps"] == 8
    assert continued["test_accuracy"] == whole["test_accuracy"]
    # CPU time: the first sitting's on 1 thread, the second's on 2 (its wall time counts twice)
    assert (continued["threads"], whole["threads"]) == (2, 1)
    assert whole["cpu_s"] == pytest.approx(whole["wall_s"])
    assert continued["wall_s"] < continued["cpu_s"] < 2 * continued["wall_s"]
    # the same weights after each epoch (a max_steps stop logs its part of epoch 2 as a row of its own, and the
    # next sitting's row of epoch 2 averages the loss of the steps it trained)
    epochs = [[r["test_accuracy"] for r in run["history"] if r["complete"]] for run in (continued, whole)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 2
    assert continued["history"][0]["train_loss"] == whole["history"][0]["train_loss"]


def test_a_run_continued_on_other_threads_counts_each_sittings_cpu_time(tmp_path):
    folder = tmp_path / "ours-dgl-k16-s0"
    assert accuracy.earlier_cpu_s(folder, None) == 0.0  # trained afresh
    assert accuracy.earlier_cpu_s(folder, (500, 100.0)) == 100.0  # no note: sittings before it ran on 1 thread
    accuracy.note_sitting(folder, 100.0, 100.0, 2)  # the second sitting starts after 100 s, on 2 threads
    assert accuracy.earlier_cpu_s(folder, (900, 160.0)) == pytest.approx(100.0 + 60.0 * 2)
    accuracy.note_sitting(folder, 160.0, 220.0, 1)  # a third, on 1 thread again
    assert accuracy.earlier_cpu_s(folder, (950, 170.0)) == pytest.approx(220.0 + 10.0)
    assert not folder.exists()  # the note lies beside the run's folder, which its training run owns
    doc = {"runs": [{"wall_s": 3600.0, "threads": 2}, {"wall_s": 3600.0, "threads": 2, "cpu_s": 5400.0}]}
    assert accuracy.cpu_hours(doc) == pytest.approx(2.0 + 1.5)


def test_the_benchmark_refuses_a_thread_or_job_count_below_one(capsys):
    for flag in ("--threads", "--jobs"):
        for bad in ("0", "two"):
            with pytest.raises(SystemExit):
                accuracy.parse_args([flag, bad])
            assert f"'{bad}' is not a whole number of 1 or more" in capsys.readouterr().err
    assert accuracy.parse_args(["--threads", "2"]).threads == 2


def test_infopro_heads_train_as_the_protocol_was_collected_unless_a_variant_says_otherwise():
    """The protocol's runs keep each method's own schedule of InfoPro's weights (lambda_schedule=auto: by stage
    under MAN/MAN++), so a row's name means what it meant when it was trained; a variant's own schedule wins, and
    heads without the setting get none."""
    from manpp.config import trainconfig as C

    base = C.apply(C.TrainConfig(), {"model": "resnet32", "dataset": "fashion-mnist"})

    def schedule(method: str):
        name = accuracy.method_overrides(method)["method"]
        cfg = C.apply(base, {**accuracy.method_overrides(method), "k": None if name == "e2e" else 16})
        return accuracy.as_collected(cfg).objective_settings.get("lambda_schedule")

    assert [schedule(m) for m in ("infopro", "manpp:infopro", "man", "manpp")] == ["auto"] * 4
    assert [schedule(m) for m in ("e2e", "dgl", "manpp:dgl")] == [None] * 3
    assert schedule("manpp:infopro@heads.lambda_schedule=module") == "module"
    assert schedule("infopro@heads.lambda_schedule=stage+aux_lr_scale=2") == "stage"


def test_the_commands_that_wrote_a_result_are_listed_once_each():
    assert accuracy._commands(None, "python a.py ") == "python a.py"
    assert accuracy._commands("python a.py ; python a.py", "python a.py") == "python a.py"  # older files' repeats
    assert accuracy._commands("python a.py", "python a.py --seeds 3") == "python a.py; python a.py --seeds 3"


def test_the_ladder_pairs_each_budget_seed_by_seed_and_lists_what_is_missing(tmp_path, capsys):
    import ladder

    def record(method, seed, acc, wall=3600.0):
        return {"fidelity": "ours", "method": method, "k": 1 if method == "e2e" else 16, "seed": seed,
                "test_accuracy": acc, "steps": 626, "wall_s": wall, "threads": 1}

    one = [record("e2e", 0, 0.90), record("dgl", 0, 0.86), record("manpp:dgl", 0, 0.87), record("dgl", 1, 0.85),
           record("manpp:dgl", 1, 0.84), record("manpp:dgl@aux_lr_scale=2", 0, 0.99),  # a variant: not a rung
           {**record("dgl", 2, 0.5), "k": 8}]  # another K: not the ladder's
    (tmp_path / "accuracy_fashion_mnist_protocol.json").write_text(json.dumps({"runs": one}))
    same = "manpp:infopro@heads.lambda_schedule=module"
    three = [record("dgl", 0, 0.89), record("infopro", 0, 0.90), record("manpp:infopro", 0, 0.905),
             record(same, 0, 0.906), record(f"{same}+scale_lr_scale=0.1", 0, 0.92),
             {**record(f"{same}+scale_lr_scale=0.1", 1, 0.9), "threads": 2, "cpu_s": 3600.0},  # CPU time counted
             record("manpp:infopro@scale_lr_scale=0.1", 2, 0.99),  # by stage, as first set up: not a hypothesis
             record(f"{same}+warmup_epochs=1", 0, 0.95)]  # its base is InfoPro at that warm-up: not trained
    (tmp_path / "accuracy_fashion_mnist_ladder_3x.json").write_text(json.dumps({"runs": three}))
    assert ladder.main(["--results", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "accuracy_ladder.json").read_text())
    first, third, tenth = doc["budgets"]
    dgl_pair = first["pairs"][0]
    assert dgl_pair["diffs"] == pytest.approx({"0": 1.0, "1": -1.0}) and dgl_pair["mean"] == pytest.approx(0.0)
    assert first["gap_to_e2e"]["dgl"]["mean"] == pytest.approx(-4.0) and first["gap_to_e2e"]["dgl"]["seeds"] == 1
    assert first["cpu_hours"] == pytest.approx(5.0)  # the five ladder runs, one hour each
    assert third["pairs"][0]["diffs"] == {} and "manpp:dgl seed 0" in third["missing"]
    assert len(tenth["missing"]) == 5 and tenth["cpu_hours"] == 0
    text = (tmp_path / "accuracy_ladder.md").read_text()
    assert "| 1x | manpp:dgl − dgl | 0: +1.00, 1: -1.00 | +0.00 ± 1.41 | 1 of 2 |" in text
    assert "| 3x | manpp:dgl − dgl | not yet trained |" in text
    assert ("--epochs 20 --methods e2e,dgl,manpp:dgl,infopro,manpp:infopro@heads.lambda_schedule=module --seeds 0"
            in text)  # at 10x only the pair at the same loss weights
    assert "manpp:infopro seed 0" not in tenth["missing"] and "manpp:infopro seed 1" in third["missing"]
    # the hypotheses: each a setting added to MAN++ at the same weights, minus its base seed by seed, beside the
    # same-weights pair on those seeds
    scale, momentum, warmup = doc["hypotheses"]
    assert scale["diffs"] == pytest.approx({"0": 2.0}) and scale["default_mean"] == pytest.approx(0.6)
    assert scale["missing"] == [f"{same}+scale_lr_scale=0.1 seed 2"] and scale["cpu_hours"] == pytest.approx(2)
    assert momentum["diffs"] == {} and momentum["commands"] == [
        f"python benchmarks/accuracy.py --epochs 6 --methods {same}+ema_momentum=0.98 --seeds 0,1,2 --jobs 1 "
        "--name accuracy_fashion_mnist_ladder_3x"]
    assert warmup["base"] == "infopro@warmup_epochs=1" and warmup["diffs"] == {}
    assert "infopro@warmup_epochs=1 seed 0" in warmup["missing"] and len(warmup["missing"]) == 5
    assert f"| `scale_lr_scale=0.1` ({same}+scale_lr_scale=0.1 − infopro) |" in text
    assert "| 0: +2.00 | +2.00 | +0.60 | 2.0 |" in text
