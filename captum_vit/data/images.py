"""The one rule for turning an image file into the 8-bit RGB picture every model input starts from.

Both the datasets (:func:`captum_vit.data.boxes.load_rgb`) and ``captum-vit explain``
(:func:`captum_vit.models.preprocess_images`) decode through :func:`decode_image`, so a file gives
the same pixels wherever it is read.

PIL's ``convert("RGB")`` clips wide images instead of scaling them: a 16-bit PNG (mode ``I;16``)
comes out white wherever a value exceeds 255, and a float TIFF (mode ``F``) with values in
``[0, 1]`` comes out black. :func:`decode_image` scales them instead:

* 16-bit integer images (modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and mode ``I``, which
  older Pillow releases give 16-bit PNGs): ``round(v / 257)``, i.e. ``v / 65535`` in 8 bits. A
  mode ``I`` image with values outside ``[0, 65535]`` is not a 16-bit image and is refused.
* float images (mode ``F``): values are taken to be in ``[0, 1]`` and become ``round(v * 255)``.
  Non-finite values, or values outside ``[0, 1]``, are refused: there is no safe guess at the
  range such a file meant.
* every other mode goes through ``convert("RGB")`` (alpha dropped, palette expanded, gray
  replicated), which is exact for 8-bit data.

Gray results are replicated into the three channels. Errors are :class:`DatasetFileError`
naming the file, including PIL's decompression-bomb refusal.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["DatasetFileError", "decode_image"]

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class DatasetFileError(ValueError):
    """A dataset file (image or annotation) is unreadable or inconsistent; the message names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def decode_image(path: str) -> Image.Image:
    """Decode an image file fully (a truncated file fails here, not later) as 8-bit RGB.

    Args:
        path: the image file.

    Returns:
        A ``PIL.Image.Image`` of mode ``"RGB"`` (rules in the module docstring).

    Raises:
        DatasetFileError: the file is unreadable, too large for PIL's decompression-bomb limit, or
            holds values with no 8-bit meaning (a float image outside ``[0, 1]`` or not finite, a
            32-bit integer image outside ``[0, 65535]``); the message names the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in _SIXTEEN_BIT or mode in ("I", "F"):
                arr = np.asarray(im)
            else:
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise DatasetFileError(path, f"image too large to decode safely ({e}); if the file is trusted, raise "
                                     "PIL.Image.MAX_IMAGE_PIXELS before loading it, or downscale it") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetFileError(path, f"unreadable image ({type(e).__name__}: {e})") from e
    return Image.fromarray(_to_uint8(arr, mode, path), "L").convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str, path: str) -> np.ndarray:
    if mode == "F":
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise DatasetFileError(path, f"float image (mode F) holds {int((~np.isfinite(values)).sum())} non-finite "
                                         "value(s); fix or re-save the file with values in [0, 1]")
        lo, hi = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise DatasetFileError(path, f"float image (mode F) has values in [{lo:g}, {hi:g}], but float images are "
                                         "read as [0, 1]; rescale it to [0, 1], or save it as an 8- or 16-bit image")
        return np.rint(values * 255.0).astype(np.uint8)
    values = arr.astype(np.int64)
    lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
    if lo < 0 or hi > 65535:
        # only mode I can get here: a 32-bit image whose range no 8-bit reading can be chosen for
        raise DatasetFileError(path, f"32-bit integer image (mode {mode}) has values in [{lo}, {hi}], outside the "
                                     "16-bit range [0, 65535] it is read in; save it as an 8- or 16-bit image")
    # v / 65535 * 255 == v / 257; rint keeps exact multiples of 257 exact
    return np.rint(values / 257.0).astype(np.uint8)
