"""Datasets and the host-side input pipeline.

Typical use::

    from maskrcnn_jax import data
    cfg = data.get_dataset_config()              # 'shapes'; or get_dataset_config('coco')
    it = data.make_train_iterator(cfg, seed=0, batch_size=8)  # infinite; get/set_state()
    batch = next(it)            # dict of numpy arrays, keys and shapes in maskrcnn_jax/batch.py
    categories = data.get_category_map(cfg)      # labels 1..K <-> category ids, names
"""

from maskrcnn_jax.data.categories import CategoryMap
from maskrcnn_jax.data.config import get_dataset_config
from maskrcnn_jax.data.datasets import (
    PreparedDataset,
    get_builder,
    get_category_map,
    prepare_dataset,
    resolve_data_dir,
)
from maskrcnn_jax.data.errors import DatasetError
from maskrcnn_jax.data.input_pipeline import (
    BATCH_KEYS,
    InputIterator,
    make_train_iterator,
    prepare_train_data,
    train_epoch_size,
)
from maskrcnn_jax.data.shapes import SHAPES_CATEGORIES, write_shapes_coco
from maskrcnn_jax.data.transforms import InputSpec, preprocess

__all__ = [
    "BATCH_KEYS",
    "CategoryMap",
    "DatasetError",
    "InputIterator",
    "InputSpec",
    "PreparedDataset",
    "SHAPES_CATEGORIES",
    "get_builder",
    "get_category_map",
    "get_dataset_config",
    "make_train_iterator",
    "prepare_dataset",
    "prepare_train_data",
    "preprocess",
    "resolve_data_dir",
    "train_epoch_size",
    "write_shapes_coco",
]
