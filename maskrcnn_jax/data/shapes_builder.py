"""tfds builder for the synthetic ``shapes`` dataset (see ``shapes.py``).

Same stored example and metadata as ``CocoInstances``, so both go through the
same input pipeline. Prepared data: ``<data_dir>/maskrcnn_shapes/<config
name>/1.0.0/``, where the config name spells out the spec, the counts and the
seed (``s128_n4000_v200_k1-4_p16-56_seed0``).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator

import tensorflow_datasets as tfds

from maskrcnn_jax.data import shapes
from maskrcnn_jax.data.builder_base import LocalBuilder


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Spec, split sizes and seed of a shapes dataset."""

    image_size: int = 128
    num_train: int = 4000
    num_val: int = 200
    min_shapes: int = 1
    max_shapes: int = 4
    min_size: int = 16
    max_size: int = 56
    seed: int = 0

    @classmethod
    def create(cls, **kwargs: int) -> ShapesConfig:
        """A config named after its fields."""
        c = cls(name="tmp", **kwargs)
        c.name = (
            f"s{c.image_size}_n{c.num_train}_v{c.num_val}_k{c.min_shapes}-{c.max_shapes}"
            f"_p{c.min_size}-{c.max_size}_seed{c.seed}"
        )
        return c

    @property
    def spec(self) -> shapes.ShapesSpec:
        return shapes.ShapesSpec(
            self.image_size, self.min_shapes, self.max_shapes, self.min_size, self.max_size
        )


class Shapes(LocalBuilder, skip_registration=True):
    """Procedurally drawn circles, squares and triangles with exact visible masks."""

    name = "maskrcnn_shapes"

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        cfg = self.builder_config
        self.info.metadata["categories"] = shapes.SHAPES_CATEGORIES.to_coco_categories()
        self.info.metadata["splits"] = {}
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_val),
        }

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg = self.builder_config
        histogram: collections.Counter[int] = collections.Counter()
        for image_id, example in shapes.generate_shapes_examples(split, num, cfg.spec, cfg.seed):
            histogram[len(example["objects"]["id"])] += 1
            yield image_id, example
        self.info.metadata["splits"][split] = {
            "num_images": num,
            "num_annotations": sum(k * v for k, v in histogram.items()),
            "num_crowd": 0,
            "instances_per_image": {str(k): v for k, v in sorted(histogram.items())},
            "skipped": {},
        }
