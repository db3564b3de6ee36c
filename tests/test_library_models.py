"""Any timm or torchvision classifier from the command line: ``--model timm/<name>`` and
``--model torchvision/<name>`` train, export the library model's own keys (which load strictly),
and work in describe, plan, bench and compare; ``pretrained=FILE`` starts from a state dict."""

import json

import pytest
import torch
import torchvision

from manpp.commands.cli import main
from manpp.base.errors import ManppError
from manpp.models import build_backbone

timm = pytest.importorskip("timm")

TINY = ["--dataset", "digits", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet", "--k", "3",
        "train_subset=32", "test_subset=32", "eval_batch_size=32", "recompute_ema=false"]


@pytest.mark.parametrize("name,plain", [
    ("timm/resnet10t", lambda: timm.create_model("resnet10t", num_classes=10)),
    ("torchvision/mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10)),
])
def test_a_library_model_trains_and_exports_its_own_keys(tmp_path, capsys, name, plain):
    out = tmp_path / "run"
    assert main(["train", "--model", name, *TINY, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["model"] == name and summary["modules"] == 3
    assert main(["export", str(out), "--out", str(tmp_path / "b.pt"), "--format", "pt"]) == 0
    assert "loads with strict=True into" in capsys.readouterr().out
    model = plain()
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    model.load_state_dict(state, strict=True)  # the library model's own keys and shapes
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    first = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    assert any(torch.equal(state[first], v) for k, v in trained.items() if k.startswith("backbone."))
    # digits are grayscale: library models read RGB, so the data was replicated (and recorded)
    assert "gray_to_rgb: true" in (out / "config.yaml").read_text()


@pytest.mark.slow  # 9 s: the fast tier trains and exports a library model above
def test_every_command_takes_a_library_model(tmp_path, capsys):
    common = ["--dataset", "synthetic", "--batch-size", "4", "--device", "cpu"]
    assert main(["describe", "--model", "timm/resnet10t", "--k", "3", *common]) == 0
    assert "timm/resnet10t / manpp (infopro): 3 modules" in capsys.readouterr().out
    assert main(["bench", "--model", "torchvision/mobilenet_v3_small", "--methods", "e2e,dgl", "--steps", "1",
                 "--warmup", "0", *common]) == 0
    assert main(["plan", "--model", "timm/resnet10t", "--budget", "4GB", "--max-k", "2", "--method", "dgl",
                 "--rounds", "1", *common]) == 0
    assert main(["compare", "--model", "timm/resnet10t", "--methods", "e2e,dgl", "--k", "2", "--max-steps", "1",
                 "--epochs", "1", "--quiet", "train_subset=8", "test_subset=8", "--out", str(tmp_path / "c"),
                 *common]) == 0
    records = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert [r["model"] for r in records] == ["timm/resnet10t"] * 2


def test_pretrained_weights_from_a_state_dict_file(tmp_path):
    """The file of the plain library model (1000 classes, as published): everything but the classifier loads."""
    torch.manual_seed(3)
    published = torchvision.models.mobilenet_v3_small(num_classes=1000)
    path = tmp_path / "weights.pt"
    torch.save(published.state_dict(), path)
    backbone = build_backbone("torchvision/mobilenet_v3_small", num_classes=10, image_size=32, pretrained=str(path))
    exported = backbone.export_state_dict()
    for key, value in published.state_dict().items():
        if key.startswith("classifier.3."):  # the new 10-class layer keeps its own initialisation
            assert exported[key].shape[0] == 10
        else:
            assert torch.equal(exported[key], value), key
    wrong = tmp_path / "wrong.pt"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(ManppError, match="do not fit torchvision/mobilenet_v3_small: unexpected key"):
        build_backbone("torchvision/mobilenet_v3_small", num_classes=10, image_size=32, pretrained=str(wrong))


def test_the_library_weights_offline_are_one_line(monkeypatch, capsys, tmp_path):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert main(["train", "--model", "torchvision/resnet18", "--pretrained", *TINY, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights of 'resnet18' are not on disk and could not be downloaded" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_unknown_library_model_names_the_close_ones(capsys):
    assert main(["train", "--model", "timm/convnext_atoo", *TINY]) == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'convnext_atoo'" in err and "did you mean timm/convnext_atto" in err
    assert main(["describe", "--model", "keras/resnet50"]) == 2
    assert "unknown model library 'keras'" in capsys.readouterr().err
