"""Decoding one image file safely: any mode to 8-bit RGB, EXIF orientation, bomb and strip guards.

The read of every image goes through :func:`load_image`: the file actually opened must lie inside
the allowed folders (:func:`~refineclip_core.loading.confine.current`), Pillow's decompression-bomb guard stays on, and anything that
cannot be decoded raises :class:`~refineclip_core.errors.ImageLoadError` with a specific reason
(extraction records the file as skipped with it; a run never stops for one file).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import warnings
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageLoadError, OutsideRootsError
from .confine import OUTSIDE_REASON, SpecialFileError, open_confined

#: Longest-to-shortest side ratio :func:`load_image` keeps. CLIP preprocessing (resize the shortest
#: side, centre crop) only sees the central square, so a more extreme strip is centre-cropped to
#: this ratio first; otherwise a few-hundred-byte 1 x 10^6 PNG is upscaled to gigabytes by the resize.
MAX_ASPECT_RATIO = 20

#: Environment variable: how many pixels this process decodes at once, in all threads together,
#: counted as 8-bit colour pixels (:func:`pixel_cost`).
DECODE_PIXELS_ENV = "REFINECLIP_DECODE_PIXELS"
#: Its default: 100 megapixels. Measured peak (``benchmarks/decode_memory.py``, 6000 x 6000 images,
#: exact decoding and the model's transform): 4.6 bytes per pixel for 8-bit colour (PNG or JPEG),
#: so the default budget holds about 0.5 GB of decoding at once.
DEFAULT_DECODE_PIXELS = 100_000_000


def pixel_cost(img: Image.Image) -> int:
    """How many 8-bit colour pixels one pixel of the opened ``img`` counts as in the budget: what
    decoding it costs, measured relative to 8-bit colour (4.6 bytes a pixel, ``benchmarks/decode_memory.py``):
    16-bit grey 7.5 bytes (counts 2), 32-bit integer or float grey 12.5 (3), transparency composited on
    white 16.4 (4)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return 4
    if img.mode in ("I", "F"):
        return 3
    return 2 if img.mode.startswith("I;16") else 1


class PixelBudget:
    """Pixels being decoded at once in this process, bounded: a decoder waits until the pixels
    in flight plus its own fit in ``limit``; an image larger than the whole budget is decoded
    alone. Decoding memory is thus bounded by about one budget's worth of pixels, whatever the
    number of decode workers or sessions (with ``DecodeConfig(kind="process")`` each worker
    process has a budget of its own)."""

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self._in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        if self._limit is not None:
            return self._limit
        text = os.environ.get(DECODE_PIXELS_ENV, "").strip()
        try:
            return max(1, int(float(text))) if text else DEFAULT_DECODE_PIXELS
        except ValueError:
            return DEFAULT_DECODE_PIXELS

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = max(1, int(pixels))
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0 or self._in_flight + pixels <= self.limit)
            self._in_flight += pixels
            self.peak = max(self.peak, self._in_flight)
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= pixels
                self._cond.notify_all()


#: The process-wide budget every :func:`load_image` decodes within.
DECODE_BUDGET = PixelBudget()


def load_image(path: str | os.PathLike, *, min_side: int | None = None,
               transform: Callable[[Image.Image], Any] | None = None) -> Any:
    """Decode one image file into an RGB :class:`PIL.Image.Image` (or ``transform`` of it).

    Applies the EXIF orientation, takes the first frame of animations, centre-crops extreme
    strips to :data:`MAX_ASPECT_RATIO`, maps 16-bit and other modes to 8-bit RGB and
    composites transparency on white. The decoding waits for room in :data:`DECODE_BUDGET`
    (pixels in flight in the whole process, ``REFINECLIP_DECODE_PIXELS``). With ``min_side``, a JPEG is decoded at a reduced
    scale whose sides are still at least ``min_side`` (:func:`reduce_on_decode`). Raises
    :class:`ImageLoadError` with a specific reason for anything it cannot decode, including
    images over Pillow's decompression-bomb limit (the guard stays on), devices and pipes, and
    (under a confinement) files that resolve outside its folders when opened.

    ``transform`` (the model's preprocessing, a thumbnail's resize) runs while the image still holds
    its place in the budget and only its (small) result is returned: a full-size image never lives
    outside the budget, e.g. while a decode worker waits for the model to take its batch.
    """
    path = str(path)
    try:
        with warnings.catch_warnings(), open_confined(path) as fh:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if os.fstat(fh.fileno()).st_size == 0:
                raise ImageLoadError("empty file (0 bytes), not an image Pillow can identify")
            with Image.open(fh) as img:
                img.seek(0)
                reduce_on_decode(img, min_side)
                with DECODE_BUDGET.hold(img.size[0] * img.size[1] * pixel_cost(img)):  # decoding memory, budgeted
                    img.load()
                    ImageOps.exif_transpose(img, in_place=True)  # (a copy of every image otherwise)
                    rgb = _to_rgb(_limit_aspect(img))
                    if transform is None:
                        return rgb
                    try:
                        return transform(rgb)
                    except Exception as exc:  # the transform's own error, not the image's: raised as it is
                        raise _TransformFailed() from exc
    except _TransformFailed as exc:
        raise exc.__cause__ from None
    except OutsideRootsError as exc:
        raise ImageLoadError(OUTSIDE_REASON) from exc
    except SpecialFileError as exc:
        raise ImageLoadError("not a regular file (a device, pipe or socket)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"image too large (decompression-bomb guard): {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError("not an image Pillow can identify") from exc
    except PermissionError as exc:
        raise ImageLoadError("permission denied") from exc
    except FileNotFoundError as exc:
        raise ImageLoadError("file not found (or a dangling symbolic link)") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageLoadError("symbolic link loop") from exc
        if exc.errno == errno.EISDIR:
            raise ImageLoadError("is a folder, not a file") from exc
        raise ImageLoadError(f"corrupt or truncated image ({exc})") from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"corrupt or truncated image ({exc})") from exc


class _TransformFailed(Exception):
    """Carries an exception of ``load_image``'s ``transform`` past its image-error handlers."""


def reduce_on_decode(img: Image.Image, min_side: int | None) -> None:
    """Ask the decoder of an opened, not yet loaded ``img`` for a smaller picture: JPEGs decode
    at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``), the largest reduction that
    keeps both sides at least ``min_side``. Other formats, small images and ``min_side=None``
    are left alone. The exact model transform (resize, centre crop) still runs afterwards."""
    if min_side and img.format in ("JPEG", "MPO") and min(img.size) >= 2 * min_side:
        img.draft(None, (min_side, min_side))


def _limit_aspect(img: Image.Image) -> Image.Image:
    """Centre-crop the long side to at most :data:`MAX_ASPECT_RATIO` times the short side."""
    w, h = img.size
    limit = MAX_ASPECT_RATIO * max(1, min(w, h))
    if w > limit:
        left = (w - limit) // 2
        return img.crop((left, 0, left + limit, h))
    if h > limit:
        top = (h - limit) // 2
        return img.crop((0, top, w, top + limit))
    return img


#: Modes of more than 8 bits per channel: 16-bit and 32-bit integers, 32-bit floats (grey).
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: Pixels scaled at once by :func:`_scale_to_8bit` (a block of rows): its float64 working copy is 8 MB.
SCALE_BLOCK_PIXELS = 1 << 20


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image as 8-bit grey ("L"), its own range stretched to 0-255
    (``(x - lo) / (hi - lo) * 255``, truncated), computed a block of rows at a time: a float64 copy
    of the whole image cost 8 bytes per pixel, three times over in temporaries (1.9 GB more for a
    9000 x 9000 16-bit PNG); now the pixels' own copy (2-4 bytes) and the 8-bit result are all."""
    arr = np.asarray(img)
    lo, hi = float(arr.min()), float(arr.max())
    out = np.zeros(arr.shape, dtype=np.uint8)
    if hi > lo:
        rows = max(1, SCALE_BLOCK_PIXELS // max(1, arr.shape[1]))
        for a in range(0, arr.shape[0], rows):
            out[a:a + rows] = ((arr[a:a + rows].astype(np.float64) - lo) / (hi - lo) * 255.0).astype(np.uint8)
    del arr
    return Image.fromarray(out, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.width < 1 or img.height < 1:
        raise ImageLoadError("image has zero width or height")
    mode = img.mode
    if mode in WIDE_MODES:
        img = _scale_to_8bit(img)
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")  # (convert copies even an RGB image)
