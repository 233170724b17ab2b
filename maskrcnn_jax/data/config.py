"""Dataset and input-pipeline configuration.

Two presets share one set of field names:

* ``get_dataset_config()`` (``'shapes'``): the built-in synthetic dataset at
  128x128, the default of ``make train`` on a CPU machine.
* ``get_dataset_config("coco")``: COCO-format data (COCO 2017 or a custom
  export) at the Detectron2 / torchvision training resolution (shorter side
  640..800, longer side at most 1333, padded to a landscape 800x1344 or a
  portrait 1344x800 canvas by orientation), training images without a
  non-crowd instance dropped. Set the four paths.

Experiments import one of these and override fields, e.g.::

    config.dataset = get_dataset_config("coco")
    config.dataset.train_annotations = "/data/coco/annotations/instances_train2017.json"
"""

from __future__ import annotations

import ml_collections

DATASET_NAMES = ("shapes", "coco")


def get_dataset_config(name: str = "shapes") -> ml_collections.ConfigDict:
    """Returns the dataset config with its defaults.

    Args:
      name: ``'shapes'`` or ``'coco'``; picks the resolution defaults.

    Returns:
      A ConfigDict with the fields documented inline below.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset name must be one of {DATASET_NAMES}, got {name!r}")
    c = ml_collections.ConfigDict()
    c.name = name  # 'shapes' or 'coco'.
    # Where prepared datasets (array_record files) go. '' means
    # $MASKRCNN_JAX_DATA_DIR if set, else ./data_cache (relative to the current dir).
    c.data_dir = ""

    # COCO-format sources (name='coco'): an instances_*.json and its image folder
    # per split. val_* may be left empty for a train-only dataset.
    c.train_annotations = ""
    c.train_images = ""
    c.val_annotations = ""
    c.val_images = ""
    # Bad annotations/images: False raises DatasetError naming the file and the
    # annotation id; True skips them, counts them per reason and logs a summary.
    c.skip_bad_annotations = False

    # Built-in synthetic dataset (name='shapes').
    c.shapes = ml_collections.ConfigDict()
    c.shapes.image_size = 128  # Side of the generated square images.
    c.shapes.num_train = 4000
    c.shapes.num_val = 200
    c.shapes.min_shapes = 1
    c.shapes.max_shapes = 4
    c.shapes.min_size = 16  # Shape extent in pixels.
    c.shapes.max_size = 56
    c.shapes.seed = 0

    # Geometry of the network input.
    # Padded input [H, W]: every batch has this size so the step compiles once.
    c.image_size = (128, 128)
    # Aspect-ratio canvases (training only): () = every image on image_size; or
    # ((H, W) landscape with H <= W, (H, W) portrait with H >= W): each global
    # batch holds images of one orientation (height <= width is landscape) on
    # that orientation's canvas, so the train step compiles once per canvas and
    # a 4:3 image wastes less of it on padding (as torchvision's and Detectron2's
    # aspect-ratio grouping). Sides must be multiples of 32 (the model's P5
    # stride). The batch order is a function of the seed (input_pipeline.py);
    # each epoch drops fewer than train.batch_size images of each orientation.
    c.aspect_canvases = ()
    c.scales = (128,)  # Train: shorter side drawn from these (no augmentation: the largest).
    c.max_size = 128  # Longer side cap.
    c.flip = True  # Random horizontal flip (train only).
    # Large-scale jitter (replaces scales/max_size at train time): resize so
    # the image fits image_size, times a random factor in [min_scale,
    # max_scale], then random-crop / pad to image_size.
    c.lsj = ml_collections.ConfigDict()
    c.lsj.enabled = False
    c.lsj.min_scale = 0.1
    c.lsj.max_scale = 2.0
    # 'uint8' (0..255 RGB, un-normalised, recommended: 4x less host->device
    # traffic) or 'float32' (same values as float). The model normalises.
    c.image_dtype = "uint8"

    # Instances.
    c.max_instances = 100  # Slots per image; more are truncated with a warning.
    c.mask_size = 56  # Side S of the box-cropped instance masks [M, S, S].
    c.drop_empty_images = False  # Train only: drop images with no non-crowd instance.

    # Loader. (The batch size is training's: config.train.batch_size.)
    c.num_workers = 1  # grain worker processes (0 = in the main process).
    c.prefetch = 2  # Batches each worker produces ahead.

    if name == "coco":
        c.image_size = (1344, 1344)  # The single canvas when aspect_canvases is ().
        # A resized image is at most 800 x 1333 (or 1333 x 800): 800 and 1344 are
        # the smallest multiples of 32 that hold it.
        c.aspect_canvases = ((800, 1344), (1344, 800))
        c.scales = (640, 672, 704, 736, 768, 800)
        c.max_size = 1333
        c.lsj.min_scale = 0.1
        c.lsj.max_scale = 2.0
        c.skip_bad_annotations = True  # COCO 2017 has a few degenerate polygons.
        # As torchvision and Detectron2 train: images with no non-crowd instance
        # teach nothing but background (COCO 2017 train: about 1%).
        c.drop_empty_images = True
    return c
