"""Image files to a model's stored input, as training data was decoded, inverted to the training data's background."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np

from finetune.data.images import IMAGE_EXTENSIONS, to_stored
from finetune.data.input_spec import InputSpec, border_brightness, polarity
from finetune.errors import DataError, first_line

INVERT_CHOICES = ("auto", "yes", "no")


def image_files(paths) -> list[tuple[Path, str | None]]:
    """Each path, a folder replaced by its image files (by extension, sorted, not recursive, hidden ones skipped).

    A path that cannot be used comes with a one-line problem instead of being dropped.
    """
    found: list[tuple[Path, str | None]] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(
                item
                for item in path.iterdir()
                if item.is_file() and not item.name.startswith(".") and item.suffix.lower() in IMAGE_EXTENSIONS
            )
            found += [(item, None) for item in inside] or [(path, "folder holds no image files")]
        elif path.exists():
            found.append((path, None))
        else:
            found.append((path, "no such file"))
    return found


def should_invert(picture: np.ndarray, background: str, invert: str = "auto") -> bool:
    """Whether ``picture`` (uint8 ``(H, W, C)``) is turned negative before prediction.

    ``auto`` inverts when the training images had one background (``dark`` or
    ``light``) and the median of the picture's outermost ring of pixels is on
    the other side of 128.
    """
    if invert not in INVERT_CHOICES:
        raise ValueError(f"invert must be one of {INVERT_CHOICES}, not {invert!r}")
    if invert != "auto":
        return invert == "yes"
    if background not in ("dark", "light"):
        return False
    return polarity(float(border_brightness(picture[None])[0])) != background


def load_stored(
    path: str | Path | BinaryIO,
    spec: InputSpec,
    invert: str = "auto",
    *,
    name: str | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, bool]:
    """The file at ``path`` (or an open binary file) as the model's stored input (uint8 ``spec.shape``),
    and whether it was inverted.

    Decoding is the ``image_folder`` source's (EXIF orientation, JPEG draft,
    :func:`finetune.data.images.to_stored`); the background is judged and
    inverted at the picture's own size, before it is cropped, padded or
    stretched, so a ``pad`` model's black borders stay black. ``name`` is what
    an error calls the image (default: ``path``); an image of more than
    ``max_pixels`` pixels is refused before it is decoded (Pillow's own limit
    otherwise).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    height, width, channels = spec.shape
    name = str(path) if name is None else name
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise DataError(
                    f"image {name} is {image.width}x{image.height} pixels, over the limit of {max_pixels:,}"
                )
            if image.format == "JPEG":
                image.draft(None, (max(height, width),) * 2)
            image = ImageOps.exif_transpose(image)
            picture = to_stored(image, (image.height, image.width), channels)  # converted, not resized
    except DataError:
        raise
    except UnidentifiedImageError:  # Pillow's own message names a file object, not the image
        raise DataError(f"cannot read image {name}: not an image file (no image format recognised)") from None
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise DataError(f"cannot read image {name}: {first_line(error)}") from None
    inverted = should_invert(picture, spec.background, invert)
    if inverted:
        picture = 255 - picture
    if picture.shape[:2] != (height, width):
        # Back through to_stored for the very resize the training images had (a no-op conversion this time).
        plane = picture[..., 0] if channels == 1 else picture
        picture = to_stored(Image.fromarray(plane), (height, width), channels, spec.resize)
    return picture, inverted
