"""Messages that were wrong or missing (the reliability audit's): each now says what happened, in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import manpp
from manpp.commands.cli import main
from manpp.base.errors import ManppError

FAST = ["--model", "resnet8", "--quiet", "train_subset=64", "test_subset=32", "--batch-size", "32"]


def test_an_empty_out_names_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "", *FAST]) == 2
    assert "--out '' names no file or folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing trained into the default folder


def test_an_empty_export_format_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--epochs", "1", *FAST]) == 0
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "e") + "/", "--format", ""]) == 2
    assert "unknown export format ''" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("kwargs,words", [
    ({"k": "2"}, "k must be a whole number of at least 1 (or None for the default), got '2' (str)"),
    ({"k": True}, "got True (bool)"),
    ({"image_size": -3}, "image_size must be a whole number of at least 1"),
    ({"image_size": 0}, "image_size must be a whole number of at least 1"),
    ({"in_channels": -1}, "in_channels must be a whole number of at least 1"),
    ({"ema_momentm": 0.9}, "unknown keyword 'ema_momentm' (did you mean 'ema_momentum'?)"),
])
def test_wrap_names_a_bad_keyword_or_size(kwargs, words):
    with pytest.raises(ManppError) as err:
        manpp.wrap(torchvision.models.resnet18(num_classes=10), **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_resume_hints_are_quoted_for_the_shell(tmp_path, capsys):
    out = tmp_path / "my run's folder"
    assert main(["train", "--out", str(out), "--max-steps", "1", *FAST]) == 0
    text = capsys.readouterr().out
    assert "--resume '" in text and "'\"'\"'" in text  # a quote inside the name, quoted as a shell needs


def test_a_resume_with_nothing_to_train_says_how_many_epochs_the_run_has(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--epochs", "2", *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "epochs=1"]) == 2
    assert "has trained 2 epoch(s), and epochs is 1" in capsys.readouterr().err


def test_our_own_exports_are_pretrained_weights(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), "--max-steps", "2", *FAST]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "e") + "/"]) == 0
    exported = torch.load(tmp_path / "e" / "backbone.pt", weights_only=True)
    for name in ("backbone.safetensors", "backbone.pt"):  # a CIFAR ResNet's own keys, in either format
        out = tmp_path / name
        assert main(["train", "--out", str(out), "--max-steps", "1", "--pretrained", str(tmp_path / "e" / name),
                     "--lr", "1e-9", "warmup_epochs=0", "weight_decay=0", *FAST]) == 0
        loaded = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
        assert torch.allclose(loaded["backbone.units.0.0.weight"], exported["units.0.0.weight"], atol=1e-6)
    capsys.readouterr()


def test_an_impossible_budget_is_one_line(capsys):
    assert main(["plan", "--model", "resnet8", "--budget", "1e400GB"]) == 2
    err = capsys.readouterr().err
    assert "is not a size a machine has" in err and err.count("\n") == 1


def test_a_folder_left_by_a_killed_process_is_not_in_use_by_the_one_that_looks(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--max-steps", "1", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps(dict(summary, status="running")))  # as kill -9 leaves it
    (out / ".manpp.lock").write_text(json.dumps({"pid": 99999999, "host": "elsewhere"}))  # its stale lock file
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--max-steps", "1", *FAST]) == 2
    err = capsys.readouterr().err
    assert "killed: its process ended without recording how" in err and "in use by" not in err


def test_parallel_modules_without_torchrun_says_it_runs_one_stage(tmp_path):
    with pytest.warns(UserWarning, match="parallel=modules without torchrun runs every module in this one process"):
        assert main(["train", "--out", str(tmp_path / "r"), "--max-steps", "1", "--parallel", "modules", *FAST]) == 0


def test_an_unreachable_hub_reads_only_its_cache(monkeypatch):
    """Offline, timm's weights come from the cache or fail at once (the hub otherwise retries for about a
    minute before the same error)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    from manpp.models import library

    monkeypatch.setattr(library, "HUB_HOST", ("manpp-offline-test.invalid", 443))
    before = constants.HF_HUB_OFFLINE
    with library.hub_offline_unless_reachable(True):
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before
    with library.hub_offline_unless_reachable(False):
        assert constants.HF_HUB_OFFLINE == before  # no download asked: nothing changes
