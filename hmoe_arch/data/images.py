"""Reading images: 8-bit RGB decoding with named refusals, and the header-only size check against decompression
bombs. Used by ``basicsr prepare``, :class:`~hmoe_arch.data.RSPairedDataset` and ``basicsr infer``."""
import io
from typing import Optional, Tuple

import cv2
import numpy as np
from PIL import Image

from ..errors import ImageError

MAX_IMAGE_PIXELS = 89_478_485
"""Most pixels an image may declare (PIL's own decompression-bomb threshold, about 9459 x 9459); larger scenes
go through the GeoTIFF path of ``basicsr infer``, which reads them block by block."""


def image_header(data: bytes) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """PIL's mode and ``(width, height)`` from the header alone (nothing is decoded); ``(None, None)`` for what
    PIL cannot parse."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the size is checked by the caller, with a message naming the file
    try:
        with Image.open(io.BytesIO(data)) as header:
            return header.mode, header.size
    except (OSError, ValueError, SyntaxError):
        return None, None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def decode_rgb(data: bytes, location: str) -> np.ndarray:
    """Decode an 8-bit RGB image (returned in OpenCV's BGR order, ``(H, W, 3)`` uint8).

    Raises:
        ImageError: naming ``location`` for empty, undecodable, grayscale, RGBA, CMYK or 16-bit files, and for
            images that declare more than :data:`MAX_IMAGE_PIXELS` pixels (refused before decoding).
    """
    if not data:
        raise ImageError(f'{location}: empty file (0 bytes); expected an 8-bit RGB image')
    mode, size = image_header(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageError(f'{location}: {size[0]}x{size[1]} pixels, more than the {MAX_IMAGE_PIXELS} an image may '
                         'have here (a decompression bomb, or a scene for the GeoTIFF path, which reads in blocks)')
    if mode == 'CMYK':  # OpenCV would silently convert a CMYK JPEG to BGR
        raise ImageError(f'{location}: CMYK image; expected an 8-bit RGB image')
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f'{location}: cannot be decoded as an image; expected an 8-bit RGB image')
    if img.dtype != np.uint8:
        raise ImageError(f'{location}: {img.dtype} samples ({img.dtype.itemsize * 8}-bit); expected an 8-bit RGB '
                         'image')
    channels = 1 if img.ndim == 2 else img.shape[2]
    if channels != 3:
        kind = {1: 'grayscale', 2: 'grayscale with alpha', 4: 'RGBA'}.get(channels, f'{channels}-channel')
        raise ImageError(f'{location}: {kind} image; expected an 8-bit RGB image (3 channels)')
    return img


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """8-bit ``(H, W, C)`` -> float32 in [0, 1] (a new, contiguous array)."""
    return img.astype(np.float32) / 255.0
