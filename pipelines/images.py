"""Reading an uploaded image safely and turning it into the square crop that is trained.

Every upload goes through `load_image`: it refuses non-images, truncated files, images too small to train on
and decompression bombs, before any pixel data is decoded where possible.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.errors import InvalidImage

MIN_SIDE = 64
MAX_PIXELS = 40_000_000  # about 6300 x 6300; more is almost surely a decompression bomb
MAX_FILE_BYTES = 50 * 1024 * 1024
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    *,
    min_side: int = MIN_SIDE,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_FILE_BYTES,
) -> Image.Image:
    """Open and fully decode an image, raising `InvalidImage` with a one-line reason if it is unusable."""
    if isinstance(source, Image.Image):
        image = source
        name = "image"
    else:
        if isinstance(source, bytes):
            data, name = source, "upload"
        else:
            path = Path(source)
            name = path.name
            if not path.is_file():
                raise InvalidImage(f"{path}: no such image file")
            size = path.stat().st_size
            if size > max_bytes:
                raise InvalidImage(f"{name}: file is {size / 1e6:.0f} MB; the limit is {max_bytes / 1e6:.0f} MB")
            data = path.read_bytes()
        if len(data) > max_bytes:
            raise InvalidImage(f"{name}: file is {len(data) / 1e6:.0f} MB; the limit is {max_bytes / 1e6:.0f} MB")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise InvalidImage(f"{name}: not an image (expected JPEG, PNG or WebP)") from None
        except Image.DecompressionBombError:
            raise InvalidImage(f"{name}: image is too large (decompression bomb guard)") from None
        if image.format not in ALLOWED_FORMATS:
            raise InvalidImage(f"{name}: {image.format} images are not accepted; use JPEG, PNG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImage(
            f"{name}: image is {width}x{height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels"
        )
    if min(width, height) < min_side:
        raise InvalidImage(f"{name}: image is {width}x{height}; each side must be at least {min_side} pixels")
    try:
        image.load()
    except (OSError, SyntaxError) as exc:
        raise InvalidImage(f"{name}: image file is truncated or corrupt ({exc})") from None
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _tone_map(image, name)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _tone_map(image: Image.Image, name: str) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image as 8-bit grayscale, mapped by its real range.

    Pillow's own conversion clips these to 0-255, which turns a 16-bit photo white and a 0-1 float image black.
    16-bit images map 0-65535 to black-white, as a viewer shows them; 0-1 floats map 0-1; any other range
    (32-bit integers beyond 16 bits, HDR or signed floats) maps its minimum to black and its maximum to white.
    """
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise InvalidImage(f"{name}: the image holds NaN or infinite pixel values")
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8))


def center_crop_square(image: Image.Image, resolution: int) -> Image.Image:
    """The crop that is trained: the largest centred square, resized to `resolution` (Lanczos)."""
    width, height = image.size
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)


def to_pixels(image: Image.Image):
    """An RGB image as the (1, 3, H, W) tensor in [-1, 1] that diffusers' VAEs encode."""
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
