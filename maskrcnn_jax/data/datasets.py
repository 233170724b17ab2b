"""Config -> prepared dataset: builder choice, preparation, data sources, category map.

``config.name`` picks the builder (``'shapes'`` or ``'coco'``); preparation
writes array_record files under the data dir once and reuses them afterwards.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from maskrcnn_jax.data.categories import CategoryMap
from maskrcnn_jax.data.coco_builder import CocoInstances, CocoInstancesConfig
from maskrcnn_jax.data.config import DATASET_NAMES
from maskrcnn_jax.data.shapes_builder import Shapes, ShapesConfig

DATA_DIR_ENV = "MASKRCNN_JAX_DATA_DIR"
DEFAULT_DATA_DIR = "data_cache"  # Relative to the current directory (git-ignored).
SPLITS = ("train", "validation")


def dataset_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The dataset part of a config: ``config.dataset`` if present, else ``config``."""
    return config.dataset if "dataset" in config else config


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
    """``config.data_dir``, else ``$MASKRCNN_JAX_DATA_DIR``, else ``./data_cache``."""
    c = dataset_config(config)
    return os.path.abspath(c.get("data_dir") or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The (not necessarily prepared) tfds builder a dataset config names."""
    c = dataset_config(config)
    data_dir = resolve_data_dir(c)
    if c.name == "shapes":
        s = c.shapes
        builder_config = ShapesConfig.create(
            image_size=s.image_size, num_train=s.num_train, num_val=s.num_val,
            min_shapes=s.min_shapes, max_shapes=s.max_shapes, min_size=s.min_size,
            max_size=s.max_size, seed=s.seed,
        )
        return Shapes(config=builder_config, data_dir=data_dir, file_format="array_record")
    if c.name == "coco":
        builder_config = CocoInstancesConfig.from_paths(
            c.train_annotations, c.train_images, c.val_annotations, c.val_images,
            skip_bad_annotations=c.skip_bad_annotations,
        )
        return CocoInstances(config=builder_config, data_dir=data_dir, file_format="array_record")
    raise ValueError(f"config.dataset.name must be one of {DATASET_NAMES}, got {c.name!r}")


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset.

    Attributes:
      builder: the tfds builder (``builder.data_dir`` is where the files are).
      categories: contiguous label <-> category id map.
      split_stats: split -> ``num_images``, ``num_annotations``, ``num_crowd``,
        ``instances_per_image`` (histogram ``{str(n): images}``) and
        ``skipped`` (reason -> count of bad items skipped at preparation).
    """

    builder: tfds.core.DatasetBuilder
    categories: CategoryMap
    split_stats: dict[str, dict[str, Any]]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if s in self.builder.info.splits)

    def data_source(self, split: str) -> Any:
        """Random-access source of stored examples (``tfds.data_source``, no TF)."""
        if split not in self.splits:
            raise ValueError(f"split {split!r} not prepared; have {self.splits}")
        return self.builder.as_data_source(split=split)

    def num_skipped(self, split: str | None = None) -> int:
        """Bad items skipped at preparation, for one split or all."""
        splits = [split] if split else list(self.split_stats)
        return sum(sum(self.split_stats[s].get("skipped", {}).values()) for s in splits)


def prepare_dataset(config: ml_collections.ConfigDict) -> PreparedDataset:
    """Prepares the dataset a config names (a no-op when already prepared).

    Raises:
      DatasetError: bad source files (unless skipping), or no usable image.
    """
    builder = get_builder(config)
    builder.download_and_prepare()
    metadata = builder.info.metadata or {}
    categories = CategoryMap.from_coco_categories(metadata["categories"])
    return PreparedDataset(builder, categories, dict(metadata.get("splits", {})))


def get_category_map(config: ml_collections.ConfigDict) -> CategoryMap:
    """The label <-> category id map (prepares the dataset if needed)."""
    return prepare_dataset(config).categories
