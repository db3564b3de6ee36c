"""Datasets as ``(train, test, info)`` with normalised float images and int labels, and the
detection / segmentation datasets of the dense tasks.

One module per dataset family (``digits``, ``fashion``, ``torchvision_sets``, ``imagenet``,
``synthetic``, ``shapes``, ``coco``, ``cityscapes``); ``info`` holds the static facts,
``common`` what the families share and ``build`` the dispatch. Importing this package stays
light: torchvision, scikit-learn and pycocotools are imported only by the builders that need them.
"""

from .build import build_datasets
from .cityscapes import CITYSCAPES_CLASSES, CityscapesSegmentation, cityscapes_lookup
from .coco import CocoDetection
from .common import IGNORE_INDEX, RandomCropFlip, TensorImageDataset
from .detection import detection_collate
from .fashion import FASHION_FILES, FASHION_SYSTEM_DIR
from .idx import read_idx_images, read_idx_labels
from .imagenet import IMAGE_EXTENSIONS, imagenet_transforms
from .info import (DATASETS, IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, dataset_info, datasets_for, denormalize,
                   normalize, register_dataset)
from .shapes import SHAPE_CLASSES, SHAPES_SAMPLES, ShapesDetection, ShapesSegmentation, make_shapes
from .torchvision_sets import torchvision_transforms

__all__ = [
    "CITYSCAPES_CLASSES", "DATASETS", "FASHION_FILES", "FASHION_SYSTEM_DIR", "IGNORE_INDEX", "IMAGENET_MEAN",
    "IMAGENET_STD", "IMAGE_EXTENSIONS", "SHAPES_SAMPLES", "SHAPE_CLASSES", "CityscapesSegmentation",
    "CocoDetection", "DatasetInfo", "RandomCropFlip", "ShapesDetection", "ShapesSegmentation", "TensorImageDataset",
    "build_datasets", "cityscapes_lookup", "dataset_info", "datasets_for", "denormalize", "detection_collate", "imagenet_transforms",
    "make_shapes", "normalize", "read_idx_images", "read_idx_labels", "register_dataset", "torchvision_transforms",
]
