"""Pictures of any size and mode turned into the stored form: uint8, (height, width, channels)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


def is_gray_mode(mode: str) -> bool:
    # Palette images count as colour: telling a grey palette apart needs the pixels decoded.
    return mode in _GRAY_MODES or mode.startswith("I;16")


def to_stored(image: PILImage.Image, size_hw: tuple[int, int], channels: int, resize: str = "crop") -> np.ndarray:
    """A PIL image as uint8 ``(height, width, channels)``.

    16-bit images are scaled to 8 bits; transparency is composited on white;
    ``resize`` is ``crop`` (scale to cover, centre crop: aspect kept, edges
    lost), ``pad`` (scale to fit, black borders) or ``stretch``.
    """
    from PIL import Image, ImageOps

    image = _eight_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("L" if channels == 1 else "RGB")
    height, width = size_hw
    if image.size != (width, height):
        method = Image.Resampling.BICUBIC
        if resize == "crop":
            image = ImageOps.fit(image, (width, height), method=method)
        elif resize == "pad":
            image = ImageOps.pad(image, (width, height), method=method, color=0)
        else:
            image = image.resize((width, height), method)
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def _eight_bit(image: PILImage.Image) -> PILImage.Image:
    """Integer and float images as 8-bit greyscale (PIL's own conversion clips at 255)."""
    from PIL import Image

    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    pixels = np.asarray(image)
    # 'I' holds 16-bit PNG/TIFF data on some Pillow versions: scale it when it exceeds 8 bits.
    sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255)
    return Image.fromarray(as_uint8(pixels, sixteen_bit), "L")


def as_uint8(pixels: np.ndarray, sixteen_bit: bool | None = None) -> np.ndarray:
    """Pixels as uint8: 16-bit values scaled by 1/257 (65535 -> 255), others rounded and clipped.

    ``sixteen_bit`` defaults to whether the array's dtype is uint16.
    """
    if pixels.dtype == np.uint8:
        return pixels
    if sixteen_bit is None:
        sixteen_bit = pixels.dtype == np.uint16
    values = pixels.astype(np.float64)
    if sixteen_bit:
        values = values / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
