"""Decode a row's conditioning image: a still in a common format, as RGB at the row's size.

Pillow runs only the decoders of ``IMAGE_FORMATS`` and is asked for the pixel count from the
header before any pixel is decoded (decompression bombs); animated images are refused; any
mode (16-bit, CMYK, greyscale, palette, transparent) becomes 8-bit RGB; EXIF orientation is
applied; the result is resized by the row's ``media_resize`` policy.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from rendering.contract import MediaInput, MediaSpec
from rendering.media import MediaError, as_count, check_policy
from rendering.media.reader import read_media
from rendering.media.uris import media_name

if TYPE_CHECKING:
    from PIL import Image

# Pillow plugins a conditioning image may use. Anything else (EPS runs Ghostscript, PDF, PSD,
# the many exotic formats) is refused before its plugin sees a byte beyond the header probe.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (camera JPEGs)


def load_image(media: MediaInput, spec: MediaSpec, width: int, height: int) -> tuple["Image.Image", str]:
    """An RGB image of exactly ``width`` x ``height`` (resized per ``spec.resize``) and the
    sha256 of the source bytes."""
    width, height = as_count(width, "width"), as_count(height, "height")
    check_policy(spec)
    data, digest = read_media(media, spec)
    name = media_name(media)
    image = _decode_image(data, spec, name)
    try:
        return _fit_image(image, spec.resize, width, height), digest
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a resize of odd input must still fail the row only
        raise MediaError(f"{name} cannot be resized to {width}x{height}: "
                         f"{type(exc).__name__}: {exc}") from None


def _decode_image(data: bytes, spec: MediaSpec, name: str) -> "Image.Image":
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            width, height = image.size
            if width < 1 or height < 1:
                raise MediaError(f"{name} has an empty size {width}x{height}")
            if width * height > spec.max_pixels:
                raise MediaError(f"{name} is {width}x{height} = {width * height} pixels, over "
                                 f"limits.max_media_pixels ({spec.max_pixels}); not decoded")
            if image.format != "MPO" and getattr(image, "is_animated", False):
                frames = getattr(image, "n_frames", "several")
                raise MediaError(f"{name} is an animated or multi-page {image.format} ({frames} "
                                 "frames); a conditioning image must be a still (send animations "
                                 "as video)")
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
                pass
            return _to_rgb(image)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"{name} is too large to decode safely (decompression bomb): {exc}") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name} is not an image in a supported format "
                         f"({', '.join(IMAGE_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on hostile input
        raise MediaError(f"{name} cannot be decoded (corrupt or truncated?): "
                         f"{type(exc).__name__}: {exc}") from None


def _to_rgb(image: "Image.Image") -> "Image.Image":
    """RGB, 8 bits: high-depth grey is scaled down, transparency composited over black."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        import numpy as np

        values = np.asarray(image).astype(np.float64)
        if mode == "F":
            values = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
        elif mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 257.0  # 16-bit grey (PNG, TIFF) to 8 bits
        grey = np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (0, 0, 0))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _fit_image(image: "Image.Image", policy: str, width: int, height: int) -> "Image.Image":
    from PIL import Image, ImageOps

    if image.size == (width, height):
        return image
    if policy == "error":
        raise MediaError(f"image is {image.width}x{image.height} but the row needs "
                         f"{width}x{height} (render.media_resize is 'error')")
    lanczos = Image.Resampling.LANCZOS
    if policy == "fit":
        return ImageOps.pad(image, (width, height), method=lanczos, color=(0, 0, 0))
    return ImageOps.fit(image, (width, height), method=lanczos)
