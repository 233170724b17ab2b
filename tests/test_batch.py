"""The batch spec: one definition of keys, shapes, dtypes and padding values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from maskrcnn_jax import batch
from maskrcnn_jax.data import input_pipeline, transforms
from tests.test_transforms import _example


def test_keys_are_defined_once():
    assert batch.BATCH_KEYS == batch.TRAIN_KEYS + batch.HOST_KEYS
    assert len(set(batch.BATCH_KEYS)) == len(batch.BATCH_KEYS)
    assert batch.TRAIN_KEYS == (
        "image", "image_size", "boxes", "labels", "masks", "is_crowd", "valid",
    )  # fmt: skip
    assert input_pipeline.BATCH_KEYS is batch.BATCH_KEYS


def test_example_and_batch_spec_shapes():
    spec = batch.example_spec((32, 48), max_instances=5, mask_size=8, image_dtype="float32")
    assert tuple(spec) == batch.BATCH_KEYS
    assert spec["image"] == ((32, 48, 3), np.float32)
    assert spec["boxes"] == ((5, 4), np.float32)
    assert spec["masks"] == ((5, 8, 8), np.uint8)
    assert spec["valid"] == ((5,), np.bool_) and spec["image_id"] == ((), np.int32)
    batched = batch.batch_spec(3, (32, 48), 5, 8)
    assert batched["image"] == ((3, 32, 48, 3), np.uint8)
    assert all(batched[k].shape == (3, *spec[k].shape) for k in batch.BATCH_KEYS)


def test_preprocessing_output_matches_the_spec():
    """What the pipeline produces has exactly the spec's keys, shapes and dtypes."""
    spec = transforms.InputSpec(image_size=(32, 48), scales=(32,), max_size=32,
                                max_instances=5, mask_size=8)  # fmt: skip
    image = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[2:10, 3:12] = True
    out = transforms.preprocess(_example(image, [mask], labels=[2]), spec, train=False)
    want = batch.example_spec((32, 48), 5, 8)
    assert list(out) == list(want)
    for key, (shape, dtype) in want.items():
        assert np.shape(out[key]) == shape and np.asarray(out[key]).dtype == dtype, key


def test_empty_example_and_zeros_batch_padding_values():
    empty = batch.empty_example((4, 6), 2, 3)
    assert empty["image_id"] == -1 and empty["scale"] == 1.0 and not empty["valid_image"]
    assert not any(empty[k].any() for k in ("image", "boxes", "labels", "masks", "valid"))
    empty["boxes"][0] = 1.0  # Fresh, writable arrays.
    assert not batch.empty_example((4, 6), 2, 3)["boxes"].any()
    zeros = batch.zeros_batch(2, (4, 6), 2, 3, keys=batch.TRAIN_KEYS)
    assert tuple(zeros) == batch.TRAIN_KEYS
    assert zeros["masks"].shape == (2, 2, 3, 3) and zeros["image_size"].dtype == np.int32
    np.testing.assert_array_equal(
        batch.zeros_batch(2, (4, 6), 2, 3)["image_id"], [-1, -1]
    )


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="image_dtype"):
        batch.example_spec((4, 4), 1, 1, image_dtype="int8")
    with pytest.raises(ValueError, match="max_instances=0"):
        batch.example_spec((4, 4), 0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        batch.batch_spec(0, (4, 4), 1, 1)
    with pytest.raises(ValueError, match="unknown batch keys.*'imgs'"):
        batch.zeros_batch(1, (4, 4), 1, 1, keys=("imgs",))


def test_importable_without_the_data_stack():
    """A device check imports the spec on a machine without tfds or grain."""
    code = (
        "import sys\n"
        "from maskrcnn_jax import batch\n"
        "batch.zeros_batch(1, (8, 8), 2, 4)\n"
        "heavy = [m for m in ('tensorflow_datasets', 'grain', 'jax', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
