"""pipeline.images: each kind of bad input is converted or rejected with a reason; augment helpers."""

import io

import numpy as np
import pytest
import torch
from fixtures_data import FACADES_SMALL, bad_files, png_bomb
from PIL import Image

from pipeline import data, images

GOOD = Image.open(FACADES_SMALL / "train" / "1.jpg").convert("RGB")
BAD = bad_files(GOOD)


def decoded(checked: images.Checked) -> Image.Image:
    return Image.open(io.BytesIO(checked.data))


@pytest.mark.parametrize("name", sorted(n for n, (_, outcome) in BAD.items() if outcome == "rejected"))
def test_bad_files_are_rejected_with_a_reason(name):
    blob, _ = BAD[name]
    with pytest.raises(images.Rejected) as info:
        images.check_image(blob, channels=3, aligned=True)
    assert str(info.value), name


@pytest.mark.parametrize("name", sorted(n for n, (_, outcome) in BAD.items() if outcome != "rejected"))
def test_convertible_files_decode_to_rgb_and_say_what_changed(name):
    blob, change = BAD[name]
    checked = images.check_image(blob, channels=3, aligned=True)
    assert change in checked.changes
    img = decoded(checked)
    assert img.mode == "RGB" and img.size == (512, 256) == (checked.width, checked.height)
    assert checked.data != blob  # converted images are re-encoded


def test_rejection_reasons_name_the_problem():
    reasons = {}
    for name in (
        "empty.jpg",
        "truncated.jpg",
        "not_an_image.png",
        "too_narrow.jpg",
        "bomb.png",
        "rgba_transparent.png",
    ):
        with pytest.raises(images.Rejected) as info:
            images.check_image(BAD[name][0], channels=3, aligned=True)
        reasons[name] = str(info.value)
    assert "0 bytes" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["not_an_image.png"]
    assert "300x256" in reasons["too_narrow.jpg"]
    assert "12000x12000" in reasons["bomb.png"] and "limit" in reasons["bomb.png"]
    assert "transparent" in reasons["rgba_transparent.png"]


def test_good_jpeg_is_kept_byte_for_byte():
    blob = (FACADES_SMALL / "train" / "2.jpg").read_bytes()
    checked = images.check_image(blob, channels=3, aligned=True)
    assert checked.data == blob and checked.changes == [] and checked.format == "jpeg"


def test_exif_rotation_restores_the_upright_image():
    checked = images.check_image(BAD["exif_rotated.jpg"][0], channels=3, aligned=True)
    upright = np.asarray(decoded(checked), dtype=np.float32)
    # JPEG twice: compare loosely, but far below the difference to a wrongly rotated image
    assert np.abs(upright - np.asarray(GOOD, dtype=np.float32)).mean() < 6


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.arange(256 * 4, dtype=np.uint32).reshape(4, 256) * 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    checked = images.check_image(buf.getvalue(), channels=1)
    got = np.asarray(decoded(checked))
    assert got.dtype == np.uint8 and got.max() == round(int(ramp.max()) * 255 / 65535)
    assert np.array_equal(got, ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))


def test_gray_stays_gray_in_a_gray_domain_and_rgb_becomes_luma():
    gray = GOOD.convert("L")
    buf = io.BytesIO()
    gray.save(buf, "PNG")
    kept = images.check_image(buf.getvalue(), channels=1)
    assert kept.changes == [] and kept.channels == 1 and decoded(kept).mode == "L"
    buf = io.BytesIO()
    GOOD.save(buf, "PNG")
    luma = images.check_image(buf.getvalue(), channels=1)
    assert luma.changes == ["converted RGB to grayscale"] and decoded(luma).mode == "L"


def test_size_limit_is_checked_before_decoding():
    with pytest.raises(images.Rejected, match="over the limit"):
        images.check_image(png_bomb(200, 100), channels=1, max_pixels=10_000)
    assert images.check_image(png_bomb(100, 100), channels=1, max_pixels=10_000).width == 100


def test_load_size_resizes_each_half_separately():
    left = Image.new("RGB", (256, 256), (255, 0, 0))
    pair = Image.new("RGB", (512, 256), (0, 0, 255))
    pair.paste(left, (0, 0))
    buf = io.BytesIO()
    pair.save(buf, "PNG")
    checked = images.check_image(buf.getvalue(), channels=3, aligned=True, load_size=100)
    pixels = np.asarray(decoded(checked))
    assert (checked.width, checked.height) == (200, 100)
    assert (pixels[:, :100] == [255, 0, 0]).all() and (pixels[:, 100:] == [0, 0, 255]).all()  # no bleed


def test_crop_flip_applies_the_same_window_and_flip_to_both_images():
    a = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    b = 255 - a
    for seed in range(8):
        out_a, out_b = images.crop_flip([a, b], np.random.default_rng(seed), 6, flip=True)
        assert out_a.shape == (6, 6, 3)
        assert np.array_equal(out_b, 255 - out_a)
    flips = {images.crop_flip([a], np.random.default_rng(s), None, True)[0][0, 0, 0] for s in range(20)}
    assert flips == {a[0, 0, 0], a[0, -1, 0]}  # both orientations happen, nothing else


def test_crop_larger_than_image_says_what_to_do():
    with pytest.raises(ValueError, match="load_size >= crop_size"):
        images.crop_flip([np.zeros((28, 28, 1), np.uint8)], np.random.default_rng(0), 32, False)


def test_to_float_range_and_layout():
    batch = np.zeros((2, 4, 5, 3), np.uint8)
    batch[0, 1, 2] = [0, 128, 255]
    out = images.to_float(batch)
    assert out.dtype == np.float32 and out.shape == (2, 3, 4, 5)
    assert out[0, :, 1, 2].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    assert out.min() == -1.0
    torch_out = data.to_float({"a": torch.from_numpy(batch), "label_a": torch.tensor([3, 4])})
    assert torch.equal(torch_out["a"], torch.from_numpy(out)) and torch_out["a"].is_contiguous()
    assert torch_out["label_a"].tolist() == [3, 4]


def test_header_cut_short_is_rejected_not_raised():
    """Pillow raises OSError("Truncated File Read") from Image.open when the header itself is cut."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 10, 10)).save(buf, "PNG")
    for cut in (12, 20, 30):
        with pytest.raises(images.Rejected):
            images.open_image(buf.getvalue()[:cut])
