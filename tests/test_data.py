import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from manpp.data import (DATASETS, FASHION_SYSTEM_DIR, RandomCropFlip, TensorImageDataset, build_datasets, dataset_info,
                        denormalize, read_idx_images, read_idx_labels, torchvision_transforms)
from manpp.base.errors import ManppError


@pytest.fixture(scope="module")
def digits():
    return build_datasets("digits")


# --- dataset_info -----------------------------------------------------------------------------

def test_every_dataset_has_consistent_info():
    for name in DATASETS:
        info = dataset_info(name)
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.in_channels
        expected = {"imagenet": 1000, "shapes": 4, "coco": 80, "cityscapes": 19, "cifar100": 100,
                    "folder": 2}.get(name, 10)  # (folder, imagenet: until the folder is read)
        assert info.num_classes == expected
    assert dataset_info("stl10").image_size == 96
    assert dataset_info("imagenet").image_size == 224 and dataset_info("imagenet", image_size=64).image_size == 64
    assert dataset_info("shapes", task="detection").num_classes == 3  # no background class for boxes
    with pytest.raises(ManppError, match="'coco' is for detection, but the model does segmentation"):
        dataset_info("coco", task="segmentation")
    with pytest.raises(ManppError, match="use 'shapes' or 'coco'"):
        dataset_info("cifar10", task="detection")
    assert dataset_info("CIFAR10").name == "cifar10"


def test_unknown_dataset_names_the_value_and_the_choices():
    with pytest.raises(ManppError) as err:
        dataset_info("imagenet-tiny")
    assert "imagenet-tiny" in str(err.value) and "'digits'" in str(err.value)
    with pytest.raises(ManppError, match="imagenet-tiny"):
        build_datasets("imagenet-tiny")


def test_import_stays_light():
    code = "import sys, manpp.data; print('torchvision' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], "import manpp.data must not import torchvision or sklearn"


# --- digits -----------------------------------------------------------------------------------

def test_digits_shapes_and_split(digits):
    train, test, info = digits
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape == (1437, 1, 32, 32) and train.images.dtype == torch.float32
    assert test.images.shape == (360, 1, 32, 32)
    for split in (train, test):
        assert sorted(split.labels.unique().tolist()) == list(range(10))
    image, label = test[0]
    assert image.shape == (info.in_channels, info.image_size, info.image_size)
    assert isinstance(label, int)


def test_digits_pixels_and_constants(digits):
    train, test, info = digits
    pixels = denormalize(train.images, info)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert denormalize(test.images, info).min() >= -1e-6
    assert abs(pixels.mean().item() - info.mean[0]) < 1e-3
    assert abs(pixels.std().item() - info.std[0]) < 1e-3


def test_digits_split_is_deterministic(digits):
    train, test, _ = digits
    train2, test2, _ = build_datasets("digits", seed=123)
    assert torch.equal(train.images, train2.images) and torch.equal(test.labels, test2.labels)


def test_digits_augmentation(digits):
    train, test, _ = digits
    torch.manual_seed(0)
    views = [train[7][0] for _ in range(10)]
    assert all(v.shape == (1, 32, 32) for v in views)
    assert any(not torch.equal(v, train.images[7]) for v in views)
    torch.manual_seed(0)
    assert torch.equal(train[7][0], views[0])  # global RNG drives it
    assert torch.equal(test[7][0], test.images[7])  # no test augmentation
    plain, _, _ = build_datasets("digits", augment=False)
    assert torch.equal(plain[7][0], plain.images[7])


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    image = torch.randn(2, 6, 5)
    fill = (-1.5, 2.0)
    padded = torch.stack([F.pad(image[c], (2, 2, 2, 2), value=fill[c]) for c in range(2)])
    crops = [padded[:, i:i + 6, j:j + 5] for i in range(5) for j in range(5)]
    crops += [c.flip(-1) for c in crops]
    torch.manual_seed(1)
    aug = RandomCropFlip(2, flip=True, fill=fill)
    seen = set()
    for _ in range(200):
        out = aug(image)
        matches = [k for k, crop in enumerate(crops) if torch.equal(out, crop)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 25  # shifts and flips both happen


# --- fashion-mnist (IDX) ----------------------------------------------------------------------

def _write_idx(path: Path, magic: int, array: np.ndarray, gz: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _fake_fashion(folder: Path, gz: bool = True, n_train: int = 7, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 4) % 10,
    }
    for stem, array in arrays.items():
        magic = 0x00000803 if array.ndim == 3 else 0x00000801
        _write_idx(folder / (stem + (".gz" if gz else "")), magic, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_reads_idx_files(tmp_path, gz):
    arrays = _fake_fashion(tmp_path, gz=gz)
    train, test, info = build_datasets("fashion-mnist", data_dir=tmp_path, download=False, augment=False)
    assert train.images.shape == (7, 1, 32, 32) and test.images.shape == (3, 1, 32, 32)
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test[2][1] == 6
    pixels = denormalize(train.images, info)
    assert torch.allclose(pixels[:, 0, 2:30, 2:30] * 255,
                          torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32), atol=1e-3)
    border = pixels.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.abs().max() < 1e-5  # zero padding in pixel space


def test_fashion_torchvision_layout_and_augmentation(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _fake_fashion(raw)
    train, _, _ = build_datasets("fashion-mnist", data_dir=tmp_path, download=False)
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(10)]
    assert all(v.shape == (1, 32, 32) for v in views)
    assert any(not torch.equal(v, train.images[0]) for v in views)


def test_idx_bad_magic_names_the_file(tmp_path):
    _fake_fashion(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(bad, 0x00000802, np.arange(7))
    with pytest.raises(ManppError, match="train-labels-idx1-ubyte.gz") as err:
        build_datasets("fashion-mnist", data_dir=tmp_path, download=False)
    assert "0x00000801" in str(err.value)


def test_idx_wrong_size_and_readers(tmp_path):
    path = tmp_path / "images.gz"
    _write_idx(path, 0x00000803, np.zeros((4, 5, 6)))
    assert read_idx_images(path).shape == (4, 5, 6)
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(data[:-3])  # uncompressed and truncated
    with pytest.raises(ManppError, match="images.gz"):
        read_idx_images(path)
    labels = tmp_path / "labels"
    _write_idx(labels, 0x00000801, np.array([3, 1, 2]), gz=False)
    assert read_idx_labels(labels).tolist() == [3, 1, 2]
    with pytest.raises(ManppError, match="labels"):
        read_idx_images(labels)


def test_fashion_mismatched_counts(tmp_path):
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x00000801, np.arange(5))
    with pytest.raises(ManppError, match="3 images but .* 5 labels"):
        build_datasets("fashion-mnist", data_dir=tmp_path, download=False)


def test_fashion_missing_files_and_folder(tmp_path):
    with pytest.raises(ManppError, match="does not exist") as err:
        build_datasets("fashion-mnist", data_dir=tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    with pytest.raises(ManppError, match="download=False") as err:
        build_datasets("fashion-mnist", data_dir=tmp_path, download=False)
    assert str(tmp_path) in str(err.value) and "train-images-idx3-ubyte" in str(err.value)


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_system_copy():
    train, test, info = build_datasets("fashion-mnist", download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    pixels = denormalize(train.images, info)
    assert abs(pixels.mean().item() - info.mean[0]) < 1e-3
    assert abs(pixels.std().item() - info.std[0]) < 1e-3


# --- torchvision datasets ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "svhn", "stl10"])
def test_torchvision_datasets_offline(tmp_path, name):
    with pytest.raises(ManppError) as err:
        build_datasets(name, data_dir=tmp_path, download=False)
    assert repr(name) in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(ManppError, match="does not exist"):
        build_datasets(name, data_dir=tmp_path / "missing")


@pytest.mark.parametrize("name", ["cifar10", "svhn", "stl10"])
def test_torchvision_transforms(name):
    from PIL import Image

    info = dataset_info(name)
    size = info.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    train_tf, test_tf = torchvision_transforms(name)
    out = test_tf(Image.fromarray(pixels))
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, size, size)
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    assert torch.allclose(denormalize(out, info), expected, atol=1e-5)
    torch.manual_seed(0)
    views = [train_tf(Image.fromarray(pixels)) for _ in range(5)]
    assert all(type(v) is torch.Tensor and v.shape == (3, size, size) for v in views)
    assert any(not torch.equal(v, out) for v in views)
    with pytest.raises(ManppError):
        torchvision_transforms("digits")


# --- synthetic --------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_learnable():
    train, test, info = build_datasets("synthetic", synthetic_samples=(200, 100), seed=3)
    assert train.images.shape == (200, 3, 32, 32) and len(test) == 100
    assert train.labels.bincount().tolist() == [20] * 10
    again, _, _ = build_datasets("synthetic", synthetic_samples=(200, 100), seed=3)
    other, _, _ = build_datasets("synthetic", synthetic_samples=(200, 100), seed=4)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images, other.images)
    assert info.mean == (0.0, 0.0, 0.0) and abs(train.images.std().item() - 1) < 0.2
    # Nearest class mean already separates the classes.
    means = torch.stack([train.images[train.labels == c].mean(0) for c in range(10)]).flatten(1)
    predicted = torch.cdist(test.images.flatten(1), means).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.9


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(ManppError, match=r"\(0, 5\)"):
        build_datasets("synthetic", synthetic_samples=(0, 5))


def test_tensor_dataset_checks_shapes():
    with pytest.raises(ValueError):
        TensorImageDataset(torch.zeros(3, 1, 4, 4), torch.zeros(2))


def test_a_dataset_added_as_one_file_is_everywhere(tmp_path, monkeypatch, capsys):
    """CIFAR-100 (src/manpp/data/cifar100.py, one registration): its facts, the --help list, and a run
    on a folder in torchvision's layout (tiny and fake here, so its checksum check is skipped)."""
    import pickle

    import numpy as np
    import torchvision

    from manpp.commands.cli import build_parser, main
    from manpp.data import dataset_info

    info = dataset_info("cifar100")
    assert (info.in_channels, info.image_size, info.num_classes) == (3, 32, 100)
    assert "cifar100" in " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 16)):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(rng.integers(0, 100, n))}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar100", "--data-dir", str(tmp_path), "--model", "resnet8", "--k", "2",
                 "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(out),
                 "download=false"]) == 0
    assert "test accuracy" in capsys.readouterr().out
