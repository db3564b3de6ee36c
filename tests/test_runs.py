"""Run folders: one run per folder, resume where it was resumed from, how a run ended, export."""

import csv
import json
import shutil
import sys

import pytest
import torch

from manpp.config import trainconfig as C
from manpp.commands.cli import main
from manpp.base.errors import ManppError
from manpp.base.checkpoint import load as load_checkpoint
from manpp.run.rundir import log_text
from manpp.train.loop import train

# resnet8 on 64 digits images, 4 steps per epoch
RUN = ["--model", "resnet8", "--dataset", "digits", "--method", "manpp", "--k", "2", "--batch-size", "16",
       "--device", "cpu", "--quiet", "train_subset=64", "test_subset=64", "eval_batch_size=64", "warmup_epochs=0"]


def run(out, *extra) -> int:
    return main(["train", *RUN, "--out", str(out), *extra])


def summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def step_of(out) -> int:
    return load_checkpoint(out)["step"]


def test_resuming_a_copied_folder_writes_into_the_copy(tmp_path, capsys):
    x, y = tmp_path / "X", tmp_path / "Y"
    assert run(x, "--epochs", "1", "--max-steps", "2") == 0
    shutil.copytree(x, y)
    before = (x / "checkpoint.pt").read_bytes()
    assert main(["train", "--resume", str(y), "--max-steps", "3", "--quiet"]) == 0
    assert f"results in {y}" in capsys.readouterr().out
    assert (x / "checkpoint.pt").read_bytes() == before  # the original is untouched
    assert step_of(y) == 3 and C.load_yaml(y / "config.yaml")["out"] == str(y)
    # a resumed run cannot be sent elsewhere with --out
    assert main(["train", "--resume", str(y), "--out", str(tmp_path / "Z"), "--quiet"]) == 2
    assert "writes into the folder it was resumed from" in capsys.readouterr().err


def test_a_folder_holding_a_run_is_refused_unless_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", "1") == 0
    log = (out / "log.csv").read_text()
    assert run(out, "--epochs", "1", "--k", "3") == 2
    err = capsys.readouterr().err
    assert "already holds a run (finished)" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "log.csv").read_text() == log  # nothing was written
    assert run(out, "--epochs", "1", "--k", "3", "--overwrite") == 0  # another K: other columns
    rows = list(csv.reader((out / "log.csv").open()))
    assert len(rows) == 2 and len(rows[0]) == len(rows[1]) and "loss_2" in rows[0]
    assert main(["train", "--resume", str(out), "--overwrite", "--quiet"]) == 2


def test_the_log_is_written_whole_from_the_history():
    text = log_text([{"epoch": 1, "loss_0": 1.0}, {"epoch": 2, "loss_0": 0.5, "loss_scale": 8.0}])
    rows = list(csv.reader(text.splitlines()))
    assert rows == [["epoch", "loss_0", "loss_scale"], ["1", "1.0", ""], ["2", "0.5", "8.0"]]


def test_max_steps_is_not_kept_for_the_next_resume_and_epochs_count_completed_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", "2", "--max-steps", "2") == 0
    assert summary(out)["status"] == "stopped" and summary(out)["epochs"] == 0
    assert "stopped: max_steps 2" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--max-steps", "5", "--quiet"]) == 0
    assert step_of(out) == 5 and summary(out)["epochs"] == 1
    assert main(["train", "--resume", str(out), "--max-steps", "5", "--quiet"]) == 2  # would train nothing
    assert "is not beyond the run's step 5" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # no --max-steps: to the end
    s = summary(out)
    assert s["status"] == "finished" and s["reason"] is None and s["steps"] == 8
    assert s["epochs"] == 2 and s["epochs_planned"] == 2  # 4 rows (2 partial) but 2 epochs
    assert [h["complete"] for h in s["history"]] == [0, 1, 0, 1]
    assert C.load_yaml(out / "config.yaml")["max_steps"] is None


def test_nan_weights_are_a_divergence_not_a_success(tmp_path, capsys):
    out = tmp_path / "nan"
    assert run(out, "--epochs", "1", "--max-steps", "1", "lr=1e38") == 2
    err = capsys.readouterr().err
    assert "training diverged by step 1" in err and len(err.strip().splitlines()) == 1
    s = summary(out)
    assert s["status"] == "diverged" and "lower the learning rate" in s["reason"]
    assert not (out / "checkpoint.pt").exists() and not (out / "best.pt").exists()
    # a run that diverged later keeps its last finite checkpoint, which export refuses as unfinished
    late = tmp_path / "late"
    assert run(late, "--epochs", "2", "--max-steps", "4") == 0
    assert main(["train", "--resume", str(late), "lr=1e38", "--quiet"]) == 2
    assert summary(late)["status"] == "diverged" and step_of(late) == 4
    assert main(["export", str(late), "--out", str(tmp_path / "b.pt")]) == 2
    assert "is not finished" in capsys.readouterr().err


def test_an_interrupted_run_says_stopped(tmp_path, monkeypatch):
    from manpp.train.replica import ReplicaSteps

    calls = {"n": 0}
    real = ReplicaSteps.step

    def interrupted(*args, **kw):  # Ctrl-C during the sixth step (five steps done)
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(ReplicaSteps, "step", interrupted)
    out = tmp_path / "run"
    assert run(out, "--epochs", "2") == 130
    s = summary(out)
    assert s["status"] == "stopped" and "interrupted at step 5" in s["reason"] and step_of(out) == 4


BAD_VALUES = [
    (["--lr", "-0.1"], "bad lr -0.1"), (["lr=-0.1"], "bad lr -0.1"), (["weight_decay=-1"], "bad weight_decay"),
    (["eval_batch_size=0"], "bad eval_batch_size 0"), (["--epochs", "-1"], "bad epochs -1"),
    (["--epochs", "0"], "bad epochs 0"), (["--max-steps", "0"], "bad max_steps 0"),
    (["--max-steps", "-1"], "bad max_steps -1"), (["sgd_momentum=1.5"], "bad sgd_momentum 1.5"),
    (["warmup_epochs=-1"], "bad warmup_epochs"), (["lr=.nan"], "bad lr nan"),
    (["logger=wandb"], "unknown logger 'wandb'"), (["log_every=-5"], "bad log_every"),
    (["dist_timeout=0"], "bad dist_timeout"), (["lr_milestones=[0.9,0.5]"], "bad lr_milestones"),
]


@pytest.mark.parametrize("extra,needle", BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_bad_values_are_one_line_and_leave_nothing(tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    assert run(out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("manpp: error:") and needle in err and "accepted" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_bad_run_folders_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, needle in ((a_file, "is an existing file"), ("/proc/x", "cannot write the run folder")):
        assert run(out, "--max-steps", "1") == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    assert a_file.read_text() == "x"


def test_every_config_field_is_validated_in_one_place():
    """Each field has a rule in manpp.config.validate, or is a name checked by its registry or builder, a
    free-form path or structure, or a boolean (checked by its type when read)."""
    import dataclasses
    import typing

    from manpp.config.validate import RULES

    hints = typing.get_type_hints(C.TrainConfig)
    booleans = {f.name for f in dataclasses.fields(C.TrainConfig) if hints[f.name] in (bool, bool | None)}
    named = {"model", "dataset", "method", "objective", "split", "objective_settings", "data_dir", "out", "pretrained", "device",
             "lr_milestones", "adamw_betas", "classes"}  # classes: validate.check_classes
    fields = {f.name for f in dataclasses.fields(C.TrainConfig)}
    assert fields - set(RULES) - booleans - named == set()
    assert set(RULES) <= fields  # no rule for a field that does not exist


def test_best_checkpoint_and_export(tmp_path, capsys):
    from safetensors.torch import load_file

    from manpp import build_backbone

    out = tmp_path / "run"
    assert run(out, "--epochs", "3", "lr=0.05") == 0
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    scores = [h["test_score"] for h in summary(out)["history"]]
    assert best["score"] == max(scores) and best["metric"] == "accuracy"
    assert best["epoch"] == scores.index(max(scores)) + 1
    # --out a folder: backbone.pt and backbone.safetensors, the same tensors, loading strictly
    (tmp_path / "exp").mkdir()
    assert main(["export", str(out), "--out", str(tmp_path / "exp"), "--best"]) == 0
    assert "best weights" in capsys.readouterr().out
    plain = torch.load(tmp_path / "exp" / "backbone.pt", weights_only=True)
    shared = load_file(str(tmp_path / "exp" / "backbone.safetensors"))
    assert plain.keys() == shared.keys() and all(torch.equal(plain[k], shared[k]) for k in plain)
    for key, value in plain.items():
        assert torch.equal(value, best["model"]["backbone." + key]), key
    build_backbone("resnet8", num_classes=10, in_channels=1).load_state_dict(plain, strict=True)
    assert main(["export", str(out), "--out", str(tmp_path / "last.pt"), "--format", "pt"]) == 0
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "last.safetensors").exists()
    assert main(["export", str(out), "--out", str(tmp_path / "new") + "/", "--format", "safetensors"]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["backbone.safetensors", "classes.json"]


def test_export_takes_a_run_stopped_at_its_max_steps_and_refuses_other_ends_unless_allowed(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert run(out, "--epochs", "2", "--max-steps", "5") == 0
    assert main(["export", str(out), "--out", str(tmp_path / "a.pt")]) == 0  # it ended where the user asked
    assert "the run stopped at its max_steps" in capsys.readouterr().out and (tmp_path / "a.pt").exists()
    record = json.loads((out / "summary.json").read_text())  # the same run, recorded as failed instead
    (out / "summary.json").write_text(json.dumps(dict(record, status="failed", reason="disk full")))
    assert main(["export", str(out), "--out", str(tmp_path / "b.pt")]) == 2
    assert "not finished (failed, 1 of 2 epochs: disk full)" in capsys.readouterr().err  # the summary's word
    assert not (tmp_path / "b.pt").exists()
    with pytest.warns(UserWarning, match="exporting a run that is not finished"):
        assert main(["export", str(out), "--out", str(tmp_path / "b.pt"), "--allow-unfinished"]) == 0
    assert (tmp_path / "b.pt").exists()


def test_checkpoints_load_without_running_pickled_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": Payload()}, path)
    with pytest.raises(ManppError, match="safely"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_run_from_before_aux_lr_scale_resumes_with_the_lr_it_trained_with(tmp_path):
    """MAN++'s default aux_lr_scale became 2; a run whose config predates the field trained at 1 and
    resumes at 1 (not refused as another configuration, not switched to today's default)."""
    import yaml

    out = tmp_path / "run"
    assert run(out, "--epochs", "2", "--max-steps", "2", "aux_lr_scale=1") == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["config"]["aux_lr_scale"]
    del ckpt["checksum"], ckpt["run"]  # as that version wrote it: no checksum, no run identity
    torch.save(ckpt, out / "checkpoint.pt")
    written = yaml.safe_load((out / "config.yaml").read_text())
    del written["aux_lr_scale"]
    (out / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert summary(out)["status"] == "finished" and step_of(out) == 8
    assert load_checkpoint(out)["config"]["aux_lr_scale"] == 1.0
    fresh = tmp_path / "fresh"  # today's MAN++ run: twice the backbone's lr
    assert run(fresh, "--epochs", "1", "--max-steps", "1") == 0
    assert load_checkpoint(fresh)["config"]["aux_lr_scale"] == 2.0
    assert main(["train", "--resume", str(out), "--quiet", "aux_lr_scale=2"]) == 2  # refused: another config


def test_a_checkpoint_that_does_not_fit_names_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", "2", "--max-steps", "1") == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    dropped = next(k for k in ckpt["model"] if k.startswith("backbone.units.1"))
    del ckpt["model"][dropped]
    bent = next(k for k in ckpt["model"] if k.endswith("conv1.weight"))
    ckpt["model"][bent] = torch.zeros(3, 3)
    from manpp.base.checkpoint import checksum

    torch.save(dict(ckpt, checksum=checksum(ckpt)), out / "checkpoint.pt")  # intact, but for another model
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert dropped in err and "size mismatch" in err and bent in err and len(err.strip().splitlines()) == 1


def test_progress_lines_when_not_on_a_terminal_and_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = C.apply(C.TrainConfig(), dict(model="resnet8", dataset="digits", method="manpp", k=2, batch_size=16,
                                        train_subset=64, test_subset=64, epochs=1, device="cpu", log_every=2,
                                        logger="tensorboard", out=str(out)))
    train(cfg, verbose=True)  # pytest's captured stderr is not a terminal
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert " eta " in lines[0] and " eta " not in lines[1]  # the run's remaining time, until it is done
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/module_0", "loss/module_1", "manpp/scale_0", "manpp/ema_distance_0", "test/accuracy",
            "step_loss/module_0"} <= tags
    assert [e.step for e in events.Scalars("step_loss/module_1")] == [2, 4]


def test_a_missing_extra_names_it(monkeypatch, tmp_path):
    from manpp.data.digits import build_digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    with pytest.raises(ManppError, match=r"the digits dataset .* pip install 'manpp\[digits\]'"):
        build_digits(augment=False)


def test_a_missing_tensorboard_names_its_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = C.apply(C.TrainConfig(), dict(model="resnet8", max_steps=1, train_subset=64, test_subset=64,
                                        logger="tensorboard", out=str(tmp_path / "r")))
    with pytest.raises(ManppError, match=r"logger=tensorboard needs tensorboard.*manpp\[tensorboard\]"):
        train(cfg, verbose=False)


def test_a_failed_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    from manpp.data.fashion import fashion_files
    from manpp.data.torchvision_sets import build_torchvision

    def failing(root, *args, **kw):  # what an offline download does: folders made, then an error
        (tmp_path / "FashionMNIST" / "raw").mkdir(parents=True)
        (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"half")
        raise RuntimeError("Error downloading: no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", failing)
    with pytest.raises(ManppError, match="download"):
        fashion_files(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []

    def failing_cifar(root, *args, **kw):
        (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"half")
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", failing_cifar)
    with pytest.raises(ManppError, match="could not be downloaded"):
        build_torchvision("cifar10", tmp_path, download=True, augment=False)
    assert list(tmp_path.iterdir()) == []


def test_coco_evaluation_builds_the_image_set_once(monkeypatch):
    pytest.importorskip("pycocotools")
    import builtins

    from manpp.tasks import detection

    made = {"n": 0}

    def counting_set(*args):
        made["n"] += 1
        return builtins.set(*args)

    ground_truth = {"images": [{"id": i, "width": 64, "height": 64} for i in range(20)],
                    "annotations": [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20],
                                     "area": 400, "iscrowd": 0} for i in range(20)],
                    "categories": [{"id": 1, "name": "box"}]}
    results = [{"image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9} for i in range(200)]  # 20 kept
    monkeypatch.setattr(detection, "set", counting_set, raising=False)
    stats = detection.coco_map(ground_truth, results, list(range(20)))
    assert stats["map"] > 0.9
    assert made["n"] <= 2  # not one per detection (200)
