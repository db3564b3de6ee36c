"""Detection and segmentation datasets: synthetic shapes, COCO and Cityscapes folders (tiny fakes)."""

import contextlib
import io
import json
import time

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import write_png

from manpp.data import (SHAPE_CLASSES, CityscapesSegmentation, CocoDetection, ShapesDetection, ShapesSegmentation,
                        detection_collate, make_shapes)
from manpp.base.errors import ManppError

# torchvision 0.29 deprecates write_png in favour of torchcodec
pytestmark = pytest.mark.filterwarnings("ignore:.*TorchVision are deprecated:DeprecationWarning")

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


@pytest.fixture(scope="module")
def shapes():
    return make_shapes(48, image_size=64, seed=1)


def first_item_where(dataset, index, flipped, tries=50):
    """Draw item ``index`` until its image is (or is not) the mirrored un-augmented image."""
    reference = dataset.images[index]
    for _ in range(tries):
        item = dataset[index]
        if torch.equal(item[0], reference.flip(-1)) == flipped:
            return item
    raise AssertionError(f"no {'flipped' if flipped else 'unflipped'} item in {tries} draws")


def check_boxes_against_mask(boxes, labels, mask):
    """Every box holds pixels of its class on each of its four edges; no class pixel lies outside its boxes."""
    size = mask.shape[-1]
    covered = torch.zeros(len(SHAPE_CLASSES) + 1, size, size, dtype=torch.bool)
    for (x1, y1, x2, y2), label in zip(boxes.long().tolist(), labels.tolist()):
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        region = mask[y1:y2, x1:x2] == label + 1
        assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
        covered[label + 1, y1:y2, x1:x2] = True
    for c in range(1, len(SHAPE_CLASSES) + 1):
        assert not ((mask == c) & ~covered[c]).any()


# --- make_shapes ------------------------------------------------------------------------------

def test_make_shapes_is_deterministic_in_range_and_fast():
    images, masks, targets = make_shapes(6, image_size=32, seed=7)
    again = make_shapes(6, image_size=32, seed=7)
    other = make_shapes(6, image_size=32, seed=8)
    assert torch.equal(images, again[0]) and torch.equal(masks, again[1])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(targets, again[2]))
    assert not torch.equal(images, other[0]) and not torch.equal(masks, other[1])
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (6, 32, 32) and masks.dtype == torch.long
    assert images.min() >= 0 and images.max() <= 1
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3}
    start = time.perf_counter()
    big, _, _ = make_shapes(512, image_size=64)
    assert time.perf_counter() - start < 2.0
    assert big.shape == (512, 3, 64, 64)


def test_make_shapes_masks_agree_with_boxes(shapes):
    images, masks, targets = shapes
    kinds_seen = set()
    for mask, (boxes, labels) in zip(masks, targets):
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.long and 1 <= len(labels) <= 3
        assert set(mask.unique().tolist()) - {0} == {int(c) + 1 for c in labels}
        for (x1, y1, x2, y2), label in zip(boxes.long().tolist(), labels.tolist()):
            assert (mask[y1:y2, x1:x2] == label + 1).sum() >= 1
        check_boxes_against_mask(boxes, labels, mask)
        kinds_seen.update(labels.tolist())
        assert (mask == 0).float().mean() > 0.2  # the background stays visible
    assert kinds_seen == {0, 1, 2}
    # the shapes stand out: their pixels differ clearly from the image's background colour
    image, mask = images[0], masks[0]
    background = image[:, mask == 0].mean(dim=1, keepdim=True)
    assert ((image[:, mask > 0] - background).norm(dim=0) > 0.2).float().mean() > 0.9


def test_make_shapes_rejects_bad_arguments():
    with pytest.raises(ManppError, match="n=0"):
        make_shapes(0)
    with pytest.raises(ManppError, match="image_size=8"):
        make_shapes(2, image_size=8)
    with pytest.raises(ManppError, match="max_shapes=0"):
        make_shapes(2, max_shapes=0)


# --- shapes datasets --------------------------------------------------------------------------

def test_shapes_segmentation_items_and_flip():
    plain = ShapesSegmentation(4, image_size=32, seed=2)
    assert len(plain) == 4 and plain.num_classes == 4 and plain.ignore_index == 255
    assert plain.class_names == ("background", "circle", "square", "triangle")
    images, masks, _ = make_shapes(4, image_size=32, seed=2)
    image, mask = plain[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.long
    assert torch.allclose(image * STD + MEAN, images[1], atol=1e-5) and torch.equal(mask, masks[1])
    torch.manual_seed(0)
    augmented = ShapesSegmentation(4, image_size=32, seed=2, augment=True)
    image, mask = first_item_where(augmented, 1, flipped=True)
    assert torch.equal(mask, masks[1].flip(-1))
    image, mask = first_item_where(augmented, 1, flipped=False)
    assert torch.equal(mask, masks[1])


def test_shapes_detection_items_and_flip():
    plain = ShapesDetection(6, image_size=48, seed=3)
    assert plain.num_classes == 3 and plain.class_names == SHAPE_CLASSES and plain.category_ids == [1, 2, 3]
    _, masks, targets = make_shapes(6, image_size=48, seed=3)
    image, target = plain[2]
    assert image.shape == (3, 48, 48) and 0 <= image.min() and image.max() <= 1
    assert set(target) == {"boxes", "labels", "image_id"} and target["image_id"] == 2
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert torch.equal(target["boxes"], targets[2][0]) and torch.equal(target["labels"], targets[2][1])
    torch.manual_seed(0)
    augmented = ShapesDetection(6, image_size=48, seed=3, augment=True)
    for index in range(6):
        image, target = first_item_where(augmented, index, flipped=True)
        check_boxes_against_mask(target["boxes"], target["labels"], masks[index].flip(-1))
        original = targets[index][0]
        assert torch.equal(target["boxes"][:, [1, 3]], original[:, [1, 3]])
        assert torch.equal(target["boxes"][:, 0], 48 - original[:, 2])
        assert torch.equal(augmented.targets[index][0], original)  # the stored boxes are untouched


def test_shapes_detection_ground_truth_scores_ap_one_against_itself():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = ShapesDetection(12, image_size=64, seed=4)
    gt_dict = dataset.coco_ground_truth()
    n_boxes = sum(len(labels) for _, labels in dataset.targets)
    assert len(gt_dict["images"]) == 12 and len(gt_dict["annotations"]) == n_boxes
    assert [a["id"] for a in gt_dict["annotations"]] == list(range(1, n_boxes + 1))
    assert gt_dict["categories"] == [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
                                     {"id": 3, "name": "triangle"}]
    first = gt_dict["annotations"][0]
    x1, y1, x2, y2 = dataset.targets[0][0][0].tolist()
    assert first["bbox"] == [x1, y1, x2 - x1, y2 - y1] and first["area"] == (x2 - x1) * (y2 - y1)
    assert first["category_id"] == int(dataset.targets[0][1][0]) + 1 and first["iscrowd"] == 0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                      for a in gt_dict["annotations"]]
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_detection_collate_keeps_variable_sizes():
    batch = [(torch.zeros(3, 10, 20), {"image_id": 0}), (torch.zeros(3, 30, 15), {"image_id": 1})]
    images, targets = detection_collate(batch)
    assert [tuple(im.shape) for im in images] == [(3, 10, 20), (3, 30, 15)]
    assert [t["image_id"] for t in targets] == [0, 1]
    loader = DataLoader(ShapesDetection(5, image_size=32), batch_size=2, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 2 and targets[1]["image_id"] == 1


# --- COCO -------------------------------------------------------------------------------------

def write_coco(root, split, nested):
    """Three PNG images and an annotation file; returns the pixels by image id."""
    image_dir = root / "images" / f"{split}2017" if nested else root / f"{split}2017"
    image_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    g = torch.Generator().manual_seed(0)
    sizes = {10: (20, 30), 20: (16, 16), 30: (24, 12)}  # id: (height, width)
    pixels = {}
    for image_id, (h, w) in sizes.items():
        pixels[image_id] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        write_png(pixels[image_id], str(image_dir / f"{image_id:012d}.png"))
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 18, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 600, "iscrowd": 1},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0.5, 4], "area": 2, "iscrowd": 0},
        {"id": 4, "image_id": 10, "category_id": 3, "bbox": [20, 1, 6, 12.5], "area": 75, "iscrowd": 0},
        {"id": 5, "image_id": 30, "category_id": 90, "bbox": [1, 2, 9, 20], "area": 180, "iscrowd": 0},
    ]
    data = {
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i:012d}.png"} for i, (h, w) in sizes.items()],
        "annotations": annotations,
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
    }
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return pixels


@pytest.mark.parametrize("nested", [False, True])
def test_coco_detection_reads_both_layouts(tmp_path, nested):
    pixels = write_coco(tmp_path, "val", nested)
    dataset = CocoDetection(tmp_path, split="val")
    assert len(dataset) == 3 and dataset.num_classes == 3
    assert dataset.category_ids == [3, 18, 90] and dataset.class_names == ("car", "dog", "toothbrush")
    assert dataset.annotation_file == tmp_path / "annotations" / "instances_val2017.json"
    assert len(dataset.coco_ground_truth()["annotations"]) == 5

    image, target = dataset[0]
    assert target["image_id"] == 10
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32
    assert torch.allclose(image, pixels[10].float() / 255)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    # the crowd box and the 0.5 px wide box are dropped
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 11.0], [20.0, 1.0, 26.0, 13.5]]))
    assert target["labels"].tolist() == [1, 0]

    image, target = dataset[1]  # no annotations: kept, with empty targets
    assert target["image_id"] == 20 and image.shape == (3, 16, 16)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)

    _, target = dataset[2]
    assert target["labels"].tolist() == [2]
    assert torch.equal(target["boxes"], torch.tensor([[1.0, 2.0, 10.0, 22.0]]))

    images, targets = detection_collate([dataset[0], dataset[2]])
    assert [tuple(im.shape) for im in images] == [(3, 20, 30), (3, 24, 12)]


def test_coco_detection_flip(tmp_path):
    pixels = write_coco(tmp_path, "train", nested=False)
    dataset = CocoDetection(tmp_path, split="train", augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        image, target = dataset[0]
        flipped = torch.allclose(image, pixels[10].flip(-1).float() / 255)
        assert flipped or torch.allclose(image, pixels[10].float() / 255)
        expected = [[18.0, 3.0, 28.0, 11.0], [4.0, 1.0, 10.0, 13.5]] if flipped else \
            [[2.0, 3.0, 12.0, 11.0], [20.0, 1.0, 26.0, 13.5]]
        assert target["boxes"].tolist() == expected
        seen.add(flipped)
    assert seen == {True, False}


def test_coco_detection_missing_files(tmp_path):
    with pytest.raises(ManppError, match="does not exist.*instances_val2017.json"):
        CocoDetection(tmp_path / "nowhere", split="val")
    with pytest.raises(ManppError, match="annotation file .*instances_train2017.json.* not found"):
        CocoDetection(tmp_path, split="train")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(ManppError, match="image folder .*val2017.* not found.*images/val2017"):
        CocoDetection(tmp_path, split="val")
    with pytest.raises(ManppError, match="unknown split 'test'"):
        CocoDetection(tmp_path, split="test")


# --- Cityscapes -------------------------------------------------------------------------------

def write_cityscapes(root, split, count=2, height=64, width=128):
    """A fake Cityscapes split of one city; returns (images, label ids) as uint8 tensors."""
    image_dir = root / "leftImg8bit" / split / "aachen"
    label_dir = root / "gtFine" / split / "aachen"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    images, labels = [], []
    for i in range(count):
        stem = f"aachen_{i:06d}_000019"
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
        label = (torch.arange(width) % 35).to(torch.uint8).expand(height, width).clone()  # ids 0..34 by column
        label[: height // 2] = 26 if i == 0 else 7
        write_png(image, str(image_dir / f"{stem}_leftImg8bit.png"))
        write_png(label[None], str(label_dir / f"{stem}_gtFine_labelIds.png"))
        (label_dir / f"{stem}_gtFine_color.png").write_bytes(b"")  # other gtFine files are ignored
        images.append(image)
        labels.append(label)
    return images, labels


TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_eval_maps_label_ids(tmp_path):
    images, labels = write_cityscapes(tmp_path, "val")
    dataset = CityscapesSegmentation(tmp_path, split="val")
    assert len(dataset) == 2 and dataset.num_classes == 19 and dataset.ignore_index == 255
    assert len(dataset.class_names) == 19 and dataset.class_names[0] == "road" and dataset.class_names[13] == "car"
    image, mask = dataset[0]
    assert image.shape == (3, 64, 128) and image.dtype == torch.float32
    assert torch.allclose(image * STD + MEAN, images[0].float() / 255, atol=1e-5)
    assert mask.shape == (64, 128) and mask.dtype == torch.long
    expected = torch.tensor([TRAIN_IDS.get(i, 255) for i in range(256)])[labels[0].long()]
    assert torch.equal(mask, expected)
    assert (mask[:32] == 13).all()  # id 26 (car)
    assert mask[40, 7] == 0 and mask[40, 26] == 13 and mask[40, 0] == 255 and mask[40, 34] == 255
    assert (dataset[1][1][:32] == 0).all()  # id 7 (road)


def test_cityscapes_train_crops_and_pads(tmp_path):
    write_cityscapes(tmp_path, "train")
    torch.manual_seed(0)
    dataset = CityscapesSegmentation(tmp_path, split="train", augment=True, crop_size=48)
    for _ in range(4):
        image, mask = dataset[0]
        assert image.shape == (3, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.long
        assert set(mask.unique().tolist()) <= set(TRAIN_IDS.values()) | {255}
    padded = CityscapesSegmentation(tmp_path, split="train", augment=True, crop_size=(80, 160),
                                    scale_range=(1.0, 1.0))
    image, mask = padded[1]
    assert image.shape == (3, 80, 160) and mask.shape == (80, 160)
    assert (mask[64:] == 255).all() and (image[:, 64:] == 0).all()
    assert (mask[:32, :128] == 0).all() or (mask[:32, 32:] == 0).all()  # road, maybe flipped


def test_cityscapes_missing_folders(tmp_path):
    with pytest.raises(ManppError, match="does not exist.*leftImg8bit/train/<city>"):
        CityscapesSegmentation(tmp_path / "nowhere")
    with pytest.raises(ManppError, match="no 'val' split in .*gtFine/val/<city>/\\*_gtFine_labelIds.png"):
        CityscapesSegmentation(tmp_path, split="val")
    with pytest.raises(ManppError, match="unknown split 'testing'"):
        CityscapesSegmentation(tmp_path, split="testing")
    write_cityscapes(tmp_path, "train", count=1)
    next((tmp_path / "gtFine" / "train" / "aachen").glob("*_labelIds.png")).unlink()
    with pytest.raises(ManppError, match="label file .*_gtFine_labelIds.png' not found"):
        CityscapesSegmentation(tmp_path, split="train")
