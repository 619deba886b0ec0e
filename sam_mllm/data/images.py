"""The one image loader: the model, the feature cache and the HTML report's thumbnails all use it.

Two modes (``data.image_mode``):

- ``released`` (default of the benchmark and paper configs): ``Image.open(path).convert("RGB")``,
  as the released SAM / LAVIS code loads every image: EXIF orientation is ignored, an alpha channel
  is dropped to the stored RGB, 16-bit greyscale is clipped by Pillow, an animation gives its first
  frame. Paper images reach the model exactly as they reached the released model.
- ``upright`` (default of the notebook API, where photos come from phones): EXIF orientation is
  applied, transparency is composited on white, 16-bit images are scaled to 8 bits; still the first
  frame of an animation.

:func:`survey` counts, once per dataset, the images where the two modes differ (or that have several
frames), so that nothing about the pixels changes silently. Every failure is an
:class:`ImageLoadError` naming the file (a directory, a decompression bomb, a truncated file).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from sam_mllm.errors import UserError

IMAGE_MODES = ("released", "upright")
_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(UserError, ValueError):
    """An image that cannot be read; names the file and the sample.

    ``problem``: the message without the sample prefix; ``reason``: Pillow's words, for a file it
    could not decode (empty for a missing file, a directory or a refused decompression bomb).
    """

    def __init__(self, message: str, problem: str | None = None, reason: str = "") -> None:
        super().__init__(message)  # args stay (message,): the error pickles across DataLoader workers
        self.problem, self.reason = problem if problem is not None else message, reason


class ImageTraitWarning(UserWarning):
    """A dataset holds images that the two image modes load differently."""


def load_image(path: str | Path, where: str = "", mode: str = "released",
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` fully (a truncated file fails here, not later) to RGB, as ``mode`` says.

    ``draft``: a size the caller will shrink to anyway (thumbnails); JPEGs then decode at a reduced scale.
    """
    path = Path(path)
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode {mode!r} is not one of {', '.join(IMAGE_MODES)} (data.image_mode)")
    try:
        with Image.open(path) as im:
            if draft is not None:
                im.draft("RGB", draft)
            im.load()
            return to_rgb(im, mode)
    except FileNotFoundError:
        problem = f"image file not found: {path}"
        raise ImageLoadError(where + problem, problem) from None
    except IsADirectoryError:
        problem = f"{path} is a directory, not an image file"
        raise ImageLoadError(where + problem, problem) from None
    except Image.DecompressionBombError as exc:
        problem = f"refusing to decode {path}: {exc}"
        raise ImageLoadError(where + problem, problem) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        problem = f"cannot read image {path}: {reason}"
        raise ImageLoadError(where + problem, problem, reason) from None


def to_rgb(im: Image.Image, mode: str = "released") -> Image.Image:
    """An opened image -> RGB as ``mode`` says (also for PIL images handed to the notebook API)."""
    if mode == "released":
        return im.convert("RGB")
    im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT:
        # Pillow's convert() clips 16-bit values to 255; scale the full range instead.
        values = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, "white")
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return im.convert("RGB")


def traits(im: Image.Image) -> list[str]:
    """What of ``im`` (header only) the released loader ignores or cuts off."""
    found = []
    try:
        if im.getexif().get(_ORIENTATION, 1) not in (1, None):
            found.append("an EXIF rotation")
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: the image itself may be fine
        pass
    if _has_alpha(im):
        found.append("transparency")
    if im.mode in _SIXTEEN_BIT:
        found.append("16 bits")
    if getattr(im, "n_frames", 1) > 1:
        found.append("several frames")
    return found


def survey(name: str, paths: Iterable[Path], mode: str) -> Counter:
    """Count the images with :func:`traits` and warn once for the dataset ``name`` if there are any."""
    counts: Counter = Counter()
    paths = list(dict.fromkeys(paths))
    for path in tqdm(paths, desc=f"survey {name} images", unit="image", disable=len(paths) < 5000):
        try:
            with Image.open(path) as im:
                counts.update(traits(im))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # unreadable images are reported where they are loaded, with their sample
    if counts:
        listed = ", ".join(f"{n} with {t}" for t, n in counts.items())
        if mode == "released":
            effect = ("they reach the model as the released code loaded them (stored pixels, no EXIF rotation, "
                      "alpha dropped, 16-bit clipped, first frame); data.image_mode=upright rotates, composites "
                      "on white and scales them")
        else:
            effect = ("data.image_mode=upright: EXIF rotation applied, transparency on white, 16-bit scaled, "
                      "first frame of several")
        warnings.warn(f"dataset {name!r}: of {len(paths)} images, {listed}; {effect}", ImageTraitWarning,
                      stacklevel=2)
    return counts


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
