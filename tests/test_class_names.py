"""class_names: names for a model's labels, from its config, COCO or a text file."""

from __future__ import annotations

import pytest

from maskrcnn_jax import class_names


def test_default_class_names():
    assert class_names.default_class_names({"num_classes": 91})[1] == "person"
    assert class_names.default_class_names({"num_classes": 4}) is None
    config = {"num_classes": 3, "class_names": ["a", "b"]}
    assert class_names.default_class_names(config) == ["__background__", "a", "b"]


def test_read_class_names_with_and_without_background(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\ntriangle\n\n")
    assert class_names.read_class_names(str(names), 4) == [
        "__background__", "circle", "square", "triangle",
    ]  # fmt: skip
    names.write_text("bg\ncircle\nsquare\ntriangle")
    assert class_names.read_class_names(str(names), 4)[0] == "bg"


def test_read_class_names_errors_name_the_file(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("circle\n")
    with pytest.raises(ValueError, match=r"names\.txt: 1 class names .*num_classes=4"):
        class_names.read_class_names(str(names), 4)
    with pytest.raises(ValueError, match=r"missing\.txt: cannot read class names"):
        class_names.read_class_names(str(tmp_path / "missing.txt"), 4)
