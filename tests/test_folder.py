"""Your own images: a folder of class subfolders trains from the command line, its class names travel with
the run and the export, and ``manpp predict`` names the classes of new images (on generated PNG and JPEG
folders: three classes of coloured shapes a small network learns in a few steps)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from manpp.commands.cli import main
from manpp.data.folder import build_folder, class_names, split_files
from manpp.data.info import dataset_info
from manpp.base.errors import ManppError

SHAPES = {"blue_bar": (40, 60, 220), "green_square": (30, 200, 60), "red_circle": (220, 30, 30)}


def _same(a: list[dict], b: list[dict]) -> bool:
    """The same images, classes and labels, probabilities equal to float rounding."""
    def flat(rows):
        return [(r["image"], t["class"], t["label"]) for r in rows for t in r["top"]]

    probs = [(t["probability"], u["probability"]) for r, s in zip(a, b) for t, u in zip(r["top"], s["top"])]
    return flat(a) == flat(b) and all(abs(p - q) < 1e-5 for p, q in probs)


def make_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """Classes of shapes, as PNG and JPEG files of 40x40 pixels (a hidden file and a text file among them)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for name, color in SHAPES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (40, 40), (rng.randint(0, 60),) * 3)
            draw = ImageDraw.Draw(image)
            x, y = rng.randint(2, 16), rng.randint(2, 16)
            if name == "red_circle":
                draw.ellipse([x, y, x + 20, y + 20], fill=color)
            elif name == "green_square":
                draw.rectangle([x, y, x + 18, y + 18], fill=color)
            else:
                draw.rectangle([x, 2, x + 6, 38], fill=color)
            image.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
        (root / name / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir(exist_ok=True)
    return root


def test_the_split_is_per_class_seeded_and_never_empties_a_class(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=12)
    assert class_names(root) == sorted(SHAPES)  # hidden folders and non-image files are skipped
    info = dataset_info("folder", image_size=32)
    train, held, info = build_folder(root, info, augment=False, seed=0)
    assert (len(train), len(held), info.num_classes, info.names()) == (30, 6, 3, sorted(SHAPES))
    assert sorted(label for _, label in held.items) == [0, 0, 1, 1, 2, 2]  # 10 % of 12, rounded up, per class
    again = build_folder(root, info, augment=False, seed=0)[1].items
    other = build_folder(root, info, augment=False, seed=1)[1].items
    assert again == held.items and other != held.items  # the seed decides
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y in (0, 1, 2)
    assert split_files([[Path("a")], [Path("b"), Path("c")]], 0.1, 0)[1] == [(Path("c"), 1)] or \
        split_files([[Path("a")], [Path("b"), Path("c")]], 0.1, 0)[1] == [(Path("b"), 1)]  # one of two, none of one


def test_a_train_and_val_layout_is_taken_as_given(tmp_path):
    root = tmp_path / "split"
    make_folder(root / "train", per_class=6)
    make_folder(root / "val", per_class=2, seed=1)
    train, held, info = build_folder(root, dataset_info("folder", image_size=32), augment=True, seed=0)
    assert (len(train), len(held), info.names()) == (18, 6, sorted(SHAPES))


@pytest.mark.parametrize("setup,args,words", [
    ("none", ["--dataset", "folder"], "give --data-dir DIR"),
    ("one", ["--dataset", "folder"], "needs at least two"),
    ("empty", ["--dataset", "folder"], "holds no image"),
    ("train-only", ["--dataset", "folder"], "has a 'train' folder but no 'val'"),
    ("ok", ["--dataset", "digits"], "dataset 'digits' reads no files, so --data-dir"),
    ("ok", [], "dataset 'digits' reads no files"),  # the default dataset: the flag would be ignored
    ("ok", ["--dataset", "folder", "val_fraction=1.5"], "val_fraction"),
])
def test_bad_folders_and_ignored_flags_are_refused_in_one_line(tmp_path, capsys, setup, args, words):
    root = tmp_path / "d"
    if setup == "one":
        make_folder(root)
        for name in list(SHAPES)[1:]:
            for f in (root / name).iterdir():
                f.unlink()
            (root / name).rmdir()
    elif setup == "empty":
        make_folder(root)
        for f in (root / "blue_bar").iterdir():
            f.unlink()
    elif setup == "train-only":
        make_folder(root / "train")
    elif setup == "ok":
        make_folder(root)
    data = [] if setup == "none" else ["--data-dir", str(root)]
    code = main(["train", "--model", "resnet8", "--image-size", "32", "--epochs", "1", "--out",
                 str(tmp_path / "run"), *data, *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_train_predict_and_export_a_folder_by_class_name(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--model", "resnet8", "--method", "dgl",
                 "--k", "2", "--image-size", "32", "--epochs", "3", "--batch-size", "8", "--lr", "0.05", "--quiet",
                 "--out", str(run), "warmup_epochs=0"]) == 0
    capsys.readouterr()
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["classes"] == sorted(SHAPES)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["config"]["classes"] == sorted(SHAPES)

    images = [root / "red_circle" / "1.png", root / "blue_bar" / "2.jpg"]
    assert main(["predict", str(run), *map(str, images), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in from_run] == [str(p) for p in images]
    assert all(len(r["top"]) == 3 and r["top"][0]["class"] in SHAPES for r in from_run)
    assert sum(t["probability"] for t in from_run[0]["top"]) == pytest.approx(1.0, abs=1e-5)

    assert main(["export", str(run), "--out", str(tmp_path / "exp" / "model.pt")]) == 0
    assert "manpp predict" in capsys.readouterr().out
    meta = json.loads((tmp_path / "exp" / "classes.json").read_text())
    assert meta["classes"] == sorted(SHAPES) and meta["image_size"] == 32 and meta["model"] == "resnet8"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exp" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["manpp"])["classes"] == sorted(SHAPES)
    for exported in ("model.pt", "model.safetensors"):
        assert main(["predict", str(tmp_path / "exp" / exported), *map(str, images), "--json"]) == 0
        assert _same(json.loads(capsys.readouterr().out), from_run)
    assert main(["predict", str(run), str(root), "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 36 and all(": " in line and "%" in line for line in lines)  # every image of the folder
    right = sum(Path(line.split(": ")[0]).parent.name == line.split(": ")[1].rsplit(" ", 1)[0] for line in lines)
    assert right >= 24, lines  # it learned the shapes (chance: 12 of 36)

    # a folder whose classes changed cannot continue the run
    (root / "yellow_dot").mkdir()
    for f in (root / "blue_bar").glob("*.png"):
        f.rename(root / "yellow_dot" / f.name)
    assert main(["train", "--resume", str(run), "epochs=4"]) == 2
    assert "the data's classes are not those of" in capsys.readouterr().err


def test_predict_refuses_what_it_cannot_read(tmp_path, capsys):
    for args, words in ((["nowhere", "x.png"], "does not exist"),):
        assert main(["predict", *args]) == 2
        assert words in capsys.readouterr().err
    (tmp_path / "w.pt").write_bytes(b"")
    assert main(["predict", str(tmp_path / "w.pt"), str(tmp_path)]) == 2
    assert "has no classes.json beside it" in capsys.readouterr().err


def test_a_torchvision_keyed_export_predicts_as_its_run(tmp_path, capsys):
    """An ImageNet ResNet exports under torchvision's keys: predict maps them back."""
    root = make_folder(tmp_path / "imgs", per_class=4)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--model", "resnet18", "--method", "e2e",
                 "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--quiet", "--out", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "exp") + "/"]) == 0
    capsys.readouterr()
    image = str(root / "red_circle" / "1.png")
    assert main(["predict", str(run), image, "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["predict", str(tmp_path / "exp" / "backbone.pt"), image, "--json"]) == 0
    assert _same(json.loads(capsys.readouterr().out), from_run)
    with pytest.raises(ManppError, match="--best picks a run's best.pt"):
        from manpp.commands.predict import load_classifier

        load_classifier(tmp_path / "exp" / "backbone.pt", best=True)


@pytest.mark.parametrize("model", ["vit_tiny", "timm/deit_tiny_patch16_224",
                                   pytest.param("torchvision/vit_b_16", marks=pytest.mark.slow)])  # ViT-B: 19 s
def test_an_exported_vit_loads_with_the_printed_line_at_its_image_size(tmp_path, capsys, model):
    """A ViT trained at 32 px holds a position embedding for 32 px: the printed line builds that model."""
    if model == "torchvision/vit_b_16":
        pytest.importorskip("torchvision")
    run = tmp_path / "run"
    assert main(["train", "--model", model, "--dataset", "synthetic", "--image-size", "32", "--method", "e2e",
                 "--max-steps", "1", "--epochs", "1", "--batch-size", "4", "--quiet", "--out", str(run),
                 "train_subset=8", "test_subset=4"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "w.pt")]) == 0
    line = capsys.readouterr().out
    call = line.split("loads with strict=True into ")[1].split("; manpp predict")[0]
    import timm  # noqa: F401 - what the printed calls name
    import torchvision  # noqa: F401

    net = eval(call)  # noqa: S307 - the line a user copies
    net.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
    assert "32" in call
