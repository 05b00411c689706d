"""Image checks and conversions (pillow) and the augmentations (numpy), shared by ingest and readers.

Ingest calls `check_image` once per file: it decodes fully (so truncation is caught), converts
what has one well-defined conversion, and raises Rejected for the rest:

| input                               | outcome                                               |
|-------------------------------------|-------------------------------------------------------|
| zero-byte file, non-image bytes     | rejected                                              |
| truncated / corrupt data            | rejected (the decoder's error is the reason)          |
| over `max_pixels` (decompression bomb) | rejected from the header, before decoding          |
| CMYK, YCbCr, LAB, HSV               | converted to RGB                                      |
| palette (P)                         | expanded to RGB (or RGBA when it has transparency)    |
| RGBA / LA                           | alpha dropped if fully opaque; rejected if any pixel  |
|                                     | is transparent (no single right background)           |
| 16-bit (gray or RGB)                | scaled to 8-bit, round(v * 255 / 65535)               |
| 1-bit                               | converted to 8-bit gray                               |
| grayscale where RGB is expected     | channels replicated                                   |
| RGB where grayscale is expected     | ITU-R 601-2 luma (pillow's "L")                       |
| EXIF orientation other than 1       | rotated / flipped upright                             |
| aligned image not 2H x H            | rejected                                              |

A file that needed no change keeps its bytes; a changed or resized one is re-encoded (PNG when
the source was PNG or lossless, JPEG quality 95 otherwise). Stored images decode straight to
mode "L" (1 channel) or "RGB" (3 channels).
"""

import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 8192 * 8192  # larger images are rejected before decoding (decompression bombs)
JPEG_QUALITY = 95
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
EXIF_ORIENTATION = 0x0112
MIN_SIDE = 8  # ingest's default: smaller images are rejected (MNIST's 28 px passes)
QUOTE_WINDOW = 6  # a reason sharing this many consecutive characters with the file is withheld
_BYTES_REPR = re.compile(r"""b(['"]).*?(?<!\\)\1""")


class Rejected(ValueError):
    """The file cannot be used as an image; str() is the reason."""


@dataclass
class Checked:
    data: bytes  # bytes to store: the original, or re-encoded when anything changed
    format: str  # "jpeg" | "png"
    width: int
    height: int
    channels: int  # 1 ("L") or 3 ("RGB")
    changes: list[str] = field(default_factory=list)


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode, turning every failure into Rejected with a plain reason."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow's own bomb check is a warning below 2x its limit; ours is the size check below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": the EXIF check reports it
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Rejected("not an image: unknown format") from None  # no bytes quoted: see describe()
        except Image.DecompressionBombError as exc:
            raise Rejected(f"over the size limit: {describe(exc, data)}") from None
        except Exception as exc:  # noqa: BLE001 - a header cut short or lying; any parser error is a reject
            raise Rejected(f"cannot read the image header: {describe(exc, data)}") from None
        width, height = img.size
        if width * height > max_pixels:
            raise Rejected(f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}")
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
            raise Rejected(f"cannot decode {img.format or 'image'}: {describe(exc, data)}") from None
    if img.format == "JPEG" and (broken := jpeg_damage(data)):
        raise Rejected(f"corrupt JPEG data: {broken}")
    return img


def describe(exc: BaseException, data: bytes) -> str:
    """The exception as a reject reason that never quotes the file: Pillow's messages can carry
    its bytes ("not a TIFF file (header b'root:x:0' not valid)", an IM header line), so byte
    literals are cut and a message that still shares QUOTE_WINDOW characters with the file is
    withheld; the exception type always stays."""
    text = _BYTES_REPR.sub("<bytes>", str(exc))
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)[:160]
    windows = (text[i : i + QUOTE_WINDOW] for i in range(max(0, len(text) - QUOTE_WINDOW + 1)))
    if any(w.encode() in data for w in windows):
        text = "message withheld (it quotes the file)"
    kind = type(exc).__qualname__
    if type(exc).__module__ != "builtins":
        kind = f"{type(exc).__module__}.{kind}"  # "struct.error" rather than "error"
    return f"{kind}: {text}" if text else kind


def jpeg_damage(data: bytes) -> str | None:
    """Why a JPEG's marker structure is broken, or None. libjpeg decodes through damaged
    entropy data with only a warning, which Pillow drops, so a file with bytes overwritten
    mid-scan loads "fine"; here every segment must have a sane length, the scan data may hold
    only stuffed 0xFF00 and in-order restart markers, and the end-of-image marker must come.
    Damage that leaves a valid Huffman stream (no 0xFF in it) stays undetectable this way."""
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            return f"expected a marker at byte {pos}"
        while pos < end and data[pos] == 0xFF:
            pos += 1  # fill bytes
        if pos >= end:
            break
        marker, pos = data[pos], pos + 1
        if marker == 0xD9:
            return None  # end of image (anything after it is ignored, as every decoder does)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # standalone markers
        if marker < 0xC0 or marker == 0xD8:
            return f"invalid marker 0x{marker:02X} at byte {pos - 1}"
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > end:
            return f"segment 0x{marker:02X} at byte {pos - 1} has a bad length"
        pos += length
        if marker == 0xDA:
            pos, why = _scan_end(data, pos)
            if why:
                return why
    return "no end-of-image marker"


def _scan_end(data: bytes, pos: int) -> tuple[int, str | None]:
    """(position of the marker that ends the entropy-coded data at pos, why it is broken or None)."""
    restart = 0
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < len(data):
        following = data[pos + 1]
        if following in (0x00, 0xFF):
            pos += 1 if following == 0xFF else 2
        elif 0xD0 <= following <= 0xD7:
            if following - 0xD0 != restart:
                return pos, f"restart marker {following - 0xD0} at byte {pos}, expected {restart}"
            restart, pos = (restart + 1) % 8, pos + 2
        elif following < 0xC0 or following == 0xD8:
            return pos, f"invalid marker 0x{following:02X} inside the image data at byte {pos}"
        else:
            return pos, None
    return len(data), "no end-of-image marker"


def probe_channels(data: bytes) -> int | None:
    """1 for grayscale, 3 for anything else, from the header only; None when unreadable."""
    try:
        mode = Image.open(io.BytesIO(data)).mode
    except Exception:  # noqa: BLE001 - a probe only votes; the real check reports the reason
        return None
    return 1 if mode in GRAY_MODES else 3


def check_image(
    data: bytes,
    channels: int = 3,
    aligned: bool = False,
    load_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    min_side: int = 1,
) -> Checked:
    """Validate and normalise one encoded image (see the module table); raises Rejected, and only
    Rejected: whatever a decoder raises on a hostile file becomes a reason."""
    try:
        return _check_image(data, channels, aligned, load_size, max_pixels, min_side)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop an ingest
        raise Rejected(f"cannot convert the image: {describe(exc, data)}") from None


def _check_image(data, channels, aligned, load_size, max_pixels, min_side) -> Checked:
    img = open_image(data, max_pixels)
    source_format = (img.format or "").lower()
    img, changes = _upright(img, data)
    img, more = _to_mode(img, channels, data)
    changes += more
    if aligned and img.width != 2 * img.height:
        raise Rejected(
            f"aligned image must be twice as wide as high (A|B side by side), got {img.width}x{img.height}"
        )
    side = min(img.width // 2 if aligned else img.width, img.height)  # aligned: each half's side
    if side < min_side:
        raise Rejected(f"{img.width}x{img.height} is below the minimum side of {min_side} px")
    resized = False
    if load_size and img.size != _target_size(aligned, load_size):
        img, resized = resize_image(img, load_size, aligned), True
    lossless = source_format != "jpeg"
    fmt = "png" if lossless else "jpeg"
    if not changes and not resized and source_format in ("jpeg", "png"):
        return Checked(data, source_format, img.width, img.height, channels)
    return Checked(encode(img, fmt), fmt, img.width, img.height, channels, changes)


def _upright(img: Image.Image, data: bytes) -> tuple[Image.Image, list[str]]:
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - Pillow raises SyntaxError, struct.error, ... on bad EXIF
        raise Rejected(f"corrupt EXIF data, the orientation is unknown: {describe(exc, data)}") from None
    if orientation in (None, 1):
        return img, []
    return ImageOps.exif_transpose(img), [f"applied EXIF orientation {orientation}"]


def _to_mode(img: Image.Image, channels: int, data: bytes) -> tuple[Image.Image, list[str]]:
    """Convert to "L" or "RGB" where one conversion is well defined; else Rejected."""
    changes = []
    if _png_bit_depth(data) == 16 and img.mode == "RGB":
        changes.append("scaled 16-bit to 8-bit")  # pillow already rounded while decoding
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        img = _sixteen_to_eight(img)
        changes.append("scaled 16-bit to 8-bit")
    if img.mode == "1":
        img = img.convert("L")
        changes.append("converted 1-bit to 8-bit gray")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        changes.append("expanded palette")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = _drop_opaque_alpha(img)
        changes.append("dropped fully opaque alpha")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        changes.append(f"converted {img.mode} to RGB")
        img = img.convert("RGB")
    if img.mode not in ("L", "RGB"):
        raise Rejected(f"unsupported image mode {img.mode!r}")
    want = "L" if channels == 1 else "RGB"
    if img.mode != want:
        changes.append("converted grayscale to RGB" if want == "RGB" else "converted RGB to grayscale")
        img = img.convert(want)
    return img, changes


def _drop_opaque_alpha(img: Image.Image) -> Image.Image:
    alpha = np.asarray(img.getchannel(img.mode[-1]))
    if alpha.min() < 255:
        transparent = int((alpha < 255).sum())
        raise Rejected(
            f"{img.mode} image has {transparent} transparent pixels: no well-defined background to flatten on"
        )
    return img.convert("L" if img.mode.startswith("L") else "RGB")


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    wide = np.asarray(img).astype(np.int64)
    if wide.min() < 0 or wide.max() > 65535:
        raise Rejected(f"integer image with values {wide.min()}..{wide.max()} outside 16-bit range")
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        return data[24]
    return None


def _target_size(aligned: bool, load_size: int) -> tuple[int, int]:
    return (2 * load_size, load_size) if aligned else (load_size, load_size)


def resize_image(img: Image.Image, load_size: int, aligned: bool = False) -> Image.Image:
    """Resize to load_size x load_size (aligned: each half, so A and B stay apart)."""
    if not aligned:
        return img.resize((load_size, load_size), Image.Resampling.BICUBIC)
    half = img.width // 2
    out = Image.new(img.mode, (2 * load_size, load_size))
    for k, box in enumerate([(0, 0, half, img.height), (half, 0, img.width, img.height)]):
        out.paste(img.crop(box).resize((load_size, load_size), Image.Resampling.BICUBIC), (k * load_size, 0))
    return out


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def encode_array(pixels: np.ndarray) -> bytes:
    """uint8 H x W (gray) or H x W x 3 (RGB) -> PNG bytes (lossless)."""
    return encode(Image.fromarray(np.ascontiguousarray(pixels)), "png")


# ----------------------------------------------------------------------------- reading side


def decode(data: bytes, channels: int) -> np.ndarray:
    """Stored bytes -> uint8 H x W x C; `channels` 1 or 3 converts gray <-> RGB if needed."""
    img = Image.open(io.BytesIO(data))
    want = "L" if channels == 1 else "RGB"
    if img.mode != want:
        img = img.convert(want)
    pixels = np.asarray(img)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def resize_array(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 H x W x C -> size x size x C, bicubic (as at ingest)."""
    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    out = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))
    return out[:, :, None] if out.ndim == 2 else out


def crop_flip(images: list[np.ndarray], rng: np.random.Generator, crop_size: int | None, flip: bool):
    """The same random crop and horizontal flip for every image in the list (an A/B pair).

    crop_size None keeps the whole image. The random draws happen in a fixed order (top, left,
    flip) so that a given generator state always gives the same augmentation.
    """
    height, width = images[0].shape[:2]
    crop_h, crop_w = (height, width) if crop_size is None else (crop_size, crop_size)
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"crop_size {crop_size} is larger than the image ({width}x{height}): use load_size >= crop_size"
        )
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    mirror = flip and bool(rng.random() < 0.5)
    out = []
    for pixels in images:
        cut = pixels[top : top + crop_h, left : left + crop_w]
        out.append(cut[:, ::-1] if mirror else cut)
    return out


def to_float(batch: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x C -> float32 N x C x H x W in [-1, 1] (numpy; pipeline.data.to_float is
    the torch version the readers use)."""
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(
        127.5
    ) - np.float32(1)
