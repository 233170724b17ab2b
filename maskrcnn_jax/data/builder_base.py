"""Common base of our tfds builders: local sources, shared features, metadata.

Both builders generate from local files or code (no downloads), store the
example of ``features.py`` and fill ``info.metadata`` with ``'categories'``
(the COCO categories list, ``CategoryMap.to_coco_categories()``) and
``'splits'`` (per split: counts, instances-per-image histogram, skips).
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from maskrcnn_jax.data.features import example_features


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that is not registered and downloads nothing."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    # tfds derives this through `importlib_resources`, a package it does not
    # declare; we have no checksums file, so the module file is all it needs.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> pathlib.Path:
        import sys

        return pathlib.Path(sys.modules[cls.__module__].__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip().split("\n")[0],
            features=example_features(),
            metadata=tfds.core.MetadataDict(),
        )
