"""tfds builder for COCO-format instance segmentation (COCO 2017 or custom).

tfds's own ``coco/2017`` has no instance masks; this builder reads the user's
``instances_*.json`` and image folder per split and stores images as encoded
bytes and masks as compressed RLE (see ``features.py``) in array_record files,
readable with ``tfds.data_source`` and grain without TensorFlow.

Prepared data: ``<data_dir>/coco_instances/<config name>/1.0.0/``. The config
name is derived from the source paths, so different datasets never collide and
preparing the same one again reuses the files. ``info.metadata`` holds the
category map (``'categories'``) and, per split, counts and skipped items
(``'splits'``).

Prepare ahead of training with ``python -m maskrcnn_jax.data.prepare --name coco ...``
(see ``prepare.py``); the iterators also prepare on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from typing import Any, Iterator

import tensorflow_datasets as tfds

from maskrcnn_jax.data import coco_json
from maskrcnn_jax.data.builder_base import LocalBuilder
from maskrcnn_jax.data.categories import CategoryMap
from maskrcnn_jax.data.errors import DatasetError, SkipCounter

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
    """Source files of a COCO-format dataset. Empty val_* means no validation split."""

    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""
    val_images: str = ""
    skip_bad_annotations: bool = False

    @classmethod
    def from_paths(
        cls,
        train_annotations: str,
        train_images: str,
        val_annotations: str = "",
        val_images: str = "",
        skip_bad_annotations: bool = False,
    ) -> CocoInstancesConfig:
        """A config named ``<train json stem>_<hash of paths, sizes and skip flag>``."""
        paths = [os.path.abspath(p) if p else "" for p in
                 (train_annotations, train_images, val_annotations, val_images)]
        key = "|".join(paths + [str(skip_bad_annotations)] +
                       [str(os.path.getsize(p)) for p in paths[::2] if p and os.path.exists(p)])
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        stem = os.path.splitext(os.path.basename(train_annotations or val_annotations))[0]
        stem = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "coco"
        return cls(
            name=f"{stem}_{digest}",
            description=f"COCO-format instances from {train_annotations} / {val_annotations}",
            train_annotations=paths[0],
            train_images=paths[1],
            val_annotations=paths[2],
            val_images=paths[3],
            skip_bad_annotations=skip_bad_annotations,
        )


class CocoInstances(LocalBuilder, skip_registration=True):
    """COCO-format instance segmentation: boxes, classes, crowd flags, RLE masks."""

    name = "coco_instances"

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # The sources are local files.
        cfg = self.builder_config
        if not isinstance(cfg, CocoInstancesConfig):
            raise ValueError("CocoInstances needs a CocoInstancesConfig")
        sources = {}
        if cfg.train_annotations:
            sources["train"] = (cfg.train_annotations, cfg.train_images)
        if cfg.val_annotations:
            sources["validation"] = (cfg.val_annotations, cfg.val_images)
        if not sources:
            raise DatasetError("no annotation files given (train_annotations / val_annotations)")
        for split, (ann, imgs) in sources.items():
            if not imgs or not os.path.isdir(imgs):
                raise DatasetError(f"{ann}: image folder {imgs!r} of split {split} not found")
        categories = coco_json.category_map_from_json(next(iter(sources.values()))[0])
        self.info.metadata["categories"] = categories.to_coco_categories()
        self.info.metadata["splits"] = {}
        return {
            split: self._generate_examples(split, ann, imgs, categories)
            for split, (ann, imgs) in sources.items()
        }

    def _generate_examples(
        self, split: str, annotations: str, images_dir: str, categories: CategoryMap
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        counter = SkipCounter(self.builder_config.skip_bad_annotations)
        stats: dict[str, Any] = {}
        yield from coco_json.generate_coco_examples(
            annotations, images_dir, categories, counter, stats
        )
        if stats["num_images"] == 0:
            raise DatasetError(f"{annotations}: no usable image ({counter.summary(split)})")
        stats["skipped"] = dict(counter.counts)
        self.info.metadata["splits"][split] = stats
        log = logger.warning if counter.total else logger.info
        log("%s", counter.summary(f"{self.name}/{self.builder_config.name} {split}"))
