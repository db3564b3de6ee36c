import json
import subprocess
import sys

import pytest
import torch

from manpp.config import trainconfig as C
from manpp.commands.cli import main
from manpp.train.loop import train

SMALL = dict(model="resnet8", dataset="digits", batch_size=64, eval_batch_size=360, device="cpu", lr=0.1,
             warmup_epochs=0.0)


def cfg(tmp_path, **kw):
    return C.apply(C.TrainConfig(), {**SMALL, "out": str(tmp_path / "run"), **kw})


@pytest.mark.slow  # the fast tier's loss decrease on digits: tests/test_lightning.py, tests/test_predsim.py
def test_loss_goes_down_on_digits(tmp_path):
    result = train(cfg(tmp_path, method="manpp", objective="dgl", k=3, epochs=3), verbose=False)
    hist = result.summary["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert result.summary["test_accuracy"] > 0.3  # well above chance (0.1) after 66 steps
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(rows) == 4 and "loss_2" in rows[0] and "test_accuracy" in rows[0]
    header = rows[0].split(",")
    assert "scale_1" in header and "ema_dist_1" in header and "scale_2" not in header
    last = dict(zip(header, rows[-1].split(",")))
    assert float(last["ema_dist_0"]) > 0 and float(last["scale_0"]) != 1.0  # the copy lags; s was learned
    saved = C.load_yaml(tmp_path / "run" / "config.yaml")
    assert saved["method"] == "manpp" and saved["k"] == 3


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("split_at", [pytest.param({"max_steps": 5}, marks=pytest.mark.slow),  # epoch boundary
                                      {"max_steps": 3}])  # mid-epoch (the signal tests resume at boundaries too)
def test_resume_continues_exactly(tmp_path, split_at):
    small = dict(method="manpp", objective="infopro", k=3, epochs=2, train_subset=320, test_subset=128)  # 5 steps/epoch
    full = train(cfg(tmp_path / "a", **small), verbose=False)
    first = cfg(tmp_path / "b", **small)
    train(C.apply(first, split_at), verbose=False)
    resumed = train(first, resume=str(tmp_path / "b" / "run"), verbose=False)
    a, b = _state(full.model), _state(resumed.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.summary["history"][-1]["test_accuracy"] == full.summary["history"][-1]["test_accuracy"]


@pytest.mark.slow  # fp16 convolutions on a CPU: 30 s on some machines
def test_resume_restores_adamw_and_the_fp16_loss_scale(tmp_path):
    """AdamW moments, the one GradScaler of fp16 and the MAN++ state survive an interruption."""
    kw = dict(model="resnet8", dataset="synthetic", image_size=16, train_subset=48, test_subset=16, batch_size=16,
              epochs=2, method="manpp", objective="dgl", k=3, optimizer="adamw", lr=1e-3, weight_decay=0.05,
              amp="fp16", device="cpu", warmup_epochs=0.0)  # fp16 convolutions are slow on a CPU: small images
    full = train(C.apply(C.TrainConfig(), {**kw, "out": str(tmp_path / "a")}), verbose=False)
    first = C.apply(C.TrainConfig(), {**kw, "out": str(tmp_path / "b")})
    train(C.apply(first, {"max_steps": 2}), verbose=False)
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["optimizer"]["state"]  # AdamW moments and the loss scale are saved
    resumed = train(first, resume=str(tmp_path / "b"), verbose=False)
    a, b = _state(full.model), _state(resumed.model)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=False)["history"][-1]
            for run in ("a", "b")]
    assert rows[0]["loss_scale"] == rows[1]["loss_scale"] and rows[0]["skipped_steps"] == rows[1]["skipped_steps"]


def test_train_command_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--model", "resnet8", "--method", "dgl", "--k", "2", "--epochs", "1", "--max-steps", "2",
                 "--batch-size", "32", "--device", "cpu", "--out", str(out), "--quiet", "ema_momentum=0.9"])
    assert code == 0
    assert {"config.yaml", "log.csv", "checkpoint.pt", "summary.json"} <= {p.name for p in out.iterdir()}
    assert C.load_yaml(out / "config.yaml")["ema_momentum"] == 0.9
    assert "test accuracy" in capsys.readouterr().out
    # resuming from the folder with a larger budget continues from step 2
    assert main(["train", "--resume", str(out), "--max-steps", "4", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_describe_prints_the_module_table(capsys):
    assert main(["describe", "--model", "resnet32", "--method", "manpp", "--k", "16", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "16 modules" in out and "layer3.4 + head" in out and "peak" in out
    lines = [line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert len(lines) == 16
    assert main(["describe", "--model", "resnet32", "--method", "dgl", "--k", "8", "--split", "paper",
                 "--batch-size", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["modules"]) == 9 and data["peak_activation_bytes"] > 0


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    path = tmp_path / "r.json"
    code = main(["compare", "--model", "resnet8", "--dataset", "synthetic", "--methods", "e2e,dgl,manpp", "--k", "2",
                 "--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--device", "cpu", "--out",
                 str(tmp_path / "cmp"), "--json", str(path), "--quiet"])
    assert code == 0
    records = json.loads(path.read_text())
    assert [r["method"] for r in records] == ["e2e", "dgl", "manpp"]
    for r in records:
        for key in ("method", "modules", "test_accuracy", "peak_activation_bytes", "epoch_time_s"):
            assert r[key] is not None, key
    assert [r["modules"] for r in records] == [1, 2, 2]
    assert records[1]["peak_activation_bytes"] < records[0]["peak_activation_bytes"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


BAD = [
    (["train", "--model", "resnet33"], "unknown model 'resnet33'"),
    (["train", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["train", "--method", "backprop"], "unknown method 'backprop'"),
    (["train", "--k", "40"], "K=40 is not possible"),
    (["train", "--method", "e2e", "--k", "4"], "K must be 1"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "/nonexistent/fm"),
    (["train", "-c", "/nonexistent.yaml"], "cannot read config"),
    (["train", "--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["train", "learning_rate=0.1"], "unknown setting 'learning_rate'"),
    (["train", "lr=fast"], "bad value 'fast' for 'lr'"),
    (["compare", "--methods", "e2e,foo"], "unknown method 'foo'"),
    (["describe", "--model", "resnet32", "--method", "manpp", "--k", "20", "--split", "paper"], "no paper preset"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[b[1].split("'")[0].strip() or b[1] for b in BAD])
def test_bad_input_is_one_clear_line(argv, needle, capsys, tmp_path):
    code = main(argv + ["--out", str(tmp_path / "x")] if argv[0] == "train" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("manpp: error:") and needle in err
    assert len(err.splitlines()) == 1


def test_unreadable_config_and_checkpoint(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [resnet32\n")
    assert main(["train", "-c", str(bad_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(junk)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_resume_refuses_another_configuration(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--model", "resnet8", "--method", "dgl", "--k", "2", "--max-steps", "1", "--epochs", "1",
                 "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    assert main(["train", "--resume", str(out), "--method", "manpp", "--quiet"]) == 2
    assert "another configuration: method" in capsys.readouterr().err


def test_module_entry_point_exits_nonzero_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "manpp", "train", "--model", "vgg99"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'vgg99'" in proc.stderr


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parent.parent.glob("src/manpp/configs/cifar10_*.yaml")),
                         ids=lambda p: p.stem)
def test_paper_configs_load_and_build(path):
    from manpp.data import dataset_info
    from manpp.train.build import build_model

    cfg = C.from_dict(C.load_yaml(path))
    assert cfg.split == "paper" and cfg.method == "manpp" and cfg.epochs == 400 and cfg.lr == 0.8
    model = build_model(cfg, dataset_info(cfg.dataset))
    expected = {8: 9, 16: 16, 32: 33, 55: 55}[cfg.k]
    assert model.k == expected and model.partition.nominal_k == cfg.k
    assert len(model.aux) == expected - 1


def test_help_is_grouped_and_every_setting_is_described(capsys):
    """Every config field is in one group of the help and of `manpp settings`, with a meaning; each command's
    help ends with examples."""
    import dataclasses

    from manpp.commands.settingslist import GROUPS, all_settings

    fields = [f.name for f in dataclasses.fields(C.TrainConfig)]
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(fields) and len(grouped) == len(set(grouped))  # each in exactly one
    listed = all_settings()
    assert all(item["meaning"] for items in listed.values() for item in items), \
        [item["key"] for items in listed.values() for item in items if not item["meaning"]]
    assert "objective_settings.ixx_1" in {item["key"] for items in listed.values() for item in items}

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for group in GROUPS:
        assert f"\n{group}:\n" in text
    assert text.index("  --lr LR") > text.index("\noptimisation:\n") > text.index("\nmethod:\n")
    assert "--checkpointing" in text.split("\nmemory and speed:\n")[1].split("\n\n")[0]
    assert "manpp settings" in text and "examples:" in text
    for command in ("compare", "bench", "describe", "plan", "predict", "export", "settings"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = capsys.readouterr().out
        assert "examples:" in help_text and help_text.count("\n  manpp ") >= 2, command
    assert "--quiet" in text and "no per-epoch lines" in text

    assert main(["settings", "ema_momentum"]) == 0
    out = capsys.readouterr().out
    assert "ema_momentum  [default 0.995; a number in [0, 1]]" in out and "EMA copies" in out
    assert main(["settings", "--json"]) == 0
    assert set(GROUPS) <= set(__import__("json").loads(capsys.readouterr().out))
    assert main(["settings", "nosuchthing"]) == 2
    assert "no setting's key contains 'nosuchthing'" in capsys.readouterr().err
