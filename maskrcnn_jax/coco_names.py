"""COCO category names, in the two layouts checkpoints use.

COCO 2017 has 80 categories with ids 1..90 (ten ids unused). torchvision's COCO
detection checkpoints have 91 classes whose label *is* the COCO category id:
index 0 is ``__background__`` and the ten unused ids are ``N/A``. Checkpoints
trained here on a COCO-format file use contiguous labels instead (see
``maskrcnn_jax.data.categories``), and carry their own names.
"""

from __future__ import annotations

# torchvision's ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]``:
# index = label = COCO category id.
TORCHVISION_COCO_CLASS_NAMES: tuple[str, ...] = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

NUM_TORCHVISION_COCO_CLASSES = len(TORCHVISION_COCO_CLASS_NAMES)  # 91

# The 80 real categories: COCO category id -> name.
COCO_CATEGORY_NAMES: dict[int, str] = {
    i: name for i, name in enumerate(TORCHVISION_COCO_CLASS_NAMES) if i > 0 and name != "N/A"
}

# The 80 names in increasing category-id order (contiguous label k at index k - 1).
COCO_CLASS_NAMES: tuple[str, ...] = tuple(COCO_CATEGORY_NAMES.values())

assert NUM_TORCHVISION_COCO_CLASSES == 91 and len(COCO_CATEGORY_NAMES) == 80
