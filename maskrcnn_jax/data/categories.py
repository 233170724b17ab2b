"""The map between contiguous class labels and a dataset's category ids.

Models predict contiguous labels ``1..K`` (``0`` is background); COCO-format
files use arbitrary category ids (COCO 2017: 1..90 with gaps). Labels are
assigned in increasing category-id order; the map is stored with the prepared
dataset so results can be written back with the file's ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class CategoryMap:
    """Contiguous labels <-> category ids and names.

    Attributes:
      category_ids: [K] the category id of label ``k`` at index ``k - 1``.
      names: [K] the name of label ``k`` at index ``k - 1``.
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if len(self.category_ids) != len(self.names):
            raise ValueError(
                f"{len(self.category_ids)} category ids but {len(self.names)} names"
            )
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"duplicate category ids in {self.category_ids}")

    @classmethod
    def from_coco_categories(cls, categories: Iterable[dict[str, Any]]) -> CategoryMap:
        """Builds the map from a COCO ``categories`` list, sorted by id."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (background excluded)."""
        return len(self.category_ids)

    @property
    def label_names(self) -> tuple[str, ...]:
        """[K + 1] names by label, ``'background'`` at 0."""
        return ("background",) + self.names

    def label_of(self, category_id: int) -> int:
        """Contiguous label (1..K) of a category id; KeyError if unknown."""
        return self._label_of_id[int(category_id)]

    def category_id_of(self, labels: int | Sequence[int] | np.ndarray) -> np.ndarray | int:
        """Category id(s) of contiguous label(s) 1..K (for writing results)."""
        ids = np.asarray((0,) + self.category_ids, np.int64)
        labels_arr = np.asarray(labels)
        if np.any(labels_arr < 1) or np.any(labels_arr > self.num_classes):
            raise ValueError(f"labels must be in 1..{self.num_classes}, got {labels}")
        out = ids[labels_arr]
        return int(out) if out.ndim == 0 else out

    def to_coco_categories(self) -> list[dict[str, Any]]:
        """The COCO ``categories`` list (``id``, ``name``, and our ``label``)."""
        return [
            {"id": i, "name": n, "label": k + 1}
            for k, (i, n) in enumerate(zip(self.category_ids, self.names))
        ]

    @property
    def _label_of_id(self) -> dict[int, int]:
        return {cid: k + 1 for k, cid in enumerate(self.category_ids)}
