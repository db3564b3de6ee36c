import json

from manpp import config as C
from manpp.bench import bench
from manpp.cli import main

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
