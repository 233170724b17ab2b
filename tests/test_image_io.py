"""image_io: reading image files (modes, EXIF, one-line errors) and the shared batch loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn_jax import image_io
from tests.cli_fixtures import write_truncated_jpeg


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("missing.png", None, "no such file"),
        ("notes.jpg", lambda p: Path(p).write_text("not an image"), "not an image"),
        ("empty.png", lambda p: Path(p).write_bytes(b""), "not an image"),
        ("cut.jpg", write_truncated_jpeg, "truncated"),
    ],
)
def test_load_image_errors_name_the_file_on_one_line(tmp_path, name, make, reason):
    path = tmp_path / name
    if make:
        make(str(path))
    with pytest.raises(image_io.ImageError) as e:
        image_io.load_image(path)
    message = str(e.value)
    assert message.startswith(str(path)) and reason in message and "\n" not in message
    assert isinstance(e.value, ValueError)


def test_load_image_converts_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), np.uint8)
    cases = {
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((6, 5), 9, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "grey16.png": Image.fromarray((np.arange(30).reshape(6, 5) * 2000).astype(np.uint16)),
        "la.png": Image.fromarray(rgb[..., 0]).convert("LA"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
    out = {name: image_io.load_image(tmp_path / name) for name in cases}
    for name, array in out.items():
        assert array.shape == (6, 5, 3) and array.dtype == np.uint8, name
    np.testing.assert_array_equal(out["grey.png"], np.repeat(rgb[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(out["rgba.png"], rgb)  # Alpha dropped, colour kept.
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    expected16 = np.round(np.arange(30).reshape(6, 5) * 2000 * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out["grey16.png"][..., 1], expected16)


def test_load_image_exif_orientation(tmp_path):
    image = Image.new("RGB", (4, 2))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
    image.save(tmp_path / "rotated.png", exif=exif)
    upright = image_io.load_image(tmp_path / "rotated.png")
    stored = image_io.load_image(tmp_path / "rotated.png", exif_transpose=False)
    assert stored.shape == (2, 4, 3) and upright.shape == (4, 2, 3)
    assert tuple(upright[0, 1]) == (255, 0, 0)


def test_list_images_expands_directories(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    listed = image_io.list_images([str(tmp_path), "x.gif"])
    assert listed == [str(tmp_path / "a.JPG"), str(tmp_path / "b.png"), "x.gif"]


def _write(path: Path, shape=(6, 5)) -> str:
    Image.fromarray(np.zeros((*shape, 3), np.uint8)).save(path)
    return str(path)


def test_load_batches_skips_reports_and_keeps_order(tmp_path):
    good = [_write(tmp_path / f"{k}.png", (k + 2, 3)) for k in range(4)]
    bad = str(tmp_path / "missing.png")
    items = [good[0], bad, good[1], good[2], good[3]]
    lines = []
    batches = list(image_io.load_batches(items, image_io.load_image, 2, log=lines.append,
                                         log_prefix="skipped"))  # fmt: skip
    assert [b.items for b in batches] == [[good[0]], [good[1], good[2]], [good[3]]]
    assert [[im.shape[0] for im in b.images] for b in batches] == [[2], [3, 4], [5]]
    assert batches[0].skipped == [(bad, f"{bad}: no such file")]
    assert not batches[1].skipped and not batches[2].skipped
    assert lines == [f"skipped: {bad}: no such file"]


def test_load_batches_yields_a_batch_whose_images_all_failed(tmp_path):
    bad = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    (batch,) = image_io.load_batches(bad, image_io.load_image, 4, log=lambda _: None)
    assert batch.items == [] and batch.images == [] and [p for p, _ in batch.skipped] == bad


def test_load_batches_default_log_is_one_stderr_line_each(tmp_path, capsys):
    write_truncated_jpeg(str(tmp_path / "cut.jpg"))
    list(image_io.load_batches([str(tmp_path / "cut.jpg")], image_io.load_image, 1,
                               log_prefix="error"))  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'cut.jpg'}: corrupt or truncated") and (
        len(err.splitlines()) == 1
    )


def test_load_batches_rejects_bad_batch_size_and_lets_other_errors_through(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        list(image_io.load_batches(["x"], image_io.load_image, 0))

    def load(item):
        raise KeyError(item)

    with pytest.raises(KeyError):
        list(image_io.load_batches(["x"], load, 1))
