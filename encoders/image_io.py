"""Turn raw image items (paths, PIL images, arrays) into RGB PIL images with clear errors.

Image files larger than a pixel budget are refused before they are decoded: PIL only refuses
"decompression bombs" above ~179 MP, so a 12000 x 12000 photo (144 MP) would otherwise cost ~430 MB
of RGB (and more while decoding) in every DataLoader worker that meets it, only to be resized to
224 x 224. The budget is :data:`DEFAULT_MAX_IMAGE_PIXELS` (50 MP: every camera photo up to
8660 x 5773); set it with the environment variable ``MMALIGN_MAX_IMAGE_PIXELS`` (inherited by
workers), ``data.init_args.max_image_pixels`` in a recipe, or :func:`pixel_limit` around code that
loads images. ``0`` means no limit (PIL's own bomb check still applies).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Largest image file (width x height) decoded by default: 50 megapixels (~150 MB as RGB).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_limit: int | None = None  # set by pixel_limit(); None: the environment variable or the default


class ImageTooLargeError(ValueError):
    """An image file has more pixels than the budget (see the module docstring)."""


def max_image_pixels() -> int:
    """The pixel budget in force: :func:`pixel_limit`, else ``MMALIGN_MAX_IMAGE_PIXELS``, else the default."""
    if _limit is not None:
        return _limit
    env = os.environ.get("MMALIGN_MAX_IMAGE_PIXELS", "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(f"MMALIGN_MAX_IMAGE_PIXELS must be an integer (0: no limit), got {env!r}") from None
    return DEFAULT_MAX_IMAGE_PIXELS


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Use ``max_pixels`` as the budget inside the block (``None``: leave it as it is; ``0``: no limit)."""
    global _limit
    if max_pixels is None:
        yield
        return
    if max_pixels < 0:
        raise ValueError(f"max_image_pixels must be >= 0 (0: no limit), got {max_pixels}")
    old, _limit = _limit, int(max_pixels)
    try:
        yield
    finally:
        _limit = old


def load_image(item: Any, index: int | None = None) -> Image.Image:
    """Return ``item`` as an RGB PIL image.

    Args:
        item: A path (``str`` / ``os.PathLike``), a PIL image, or an array ``[H, W]``,
            ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (uint8 0..255, or float 0..1).
        index: Position of the item in its batch, quoted in error messages.

    Raises:
        FileNotFoundError: The path does not exist.
        ImageTooLargeError: The file has more pixels than :func:`max_image_pixels` (checked on its header,
            before decoding).
        ValueError: The file is not a readable image, or the array has a bad shape/dtype.
        TypeError: The item is none of the accepted kinds.
    """
    where = f"image item {index}" if index is not None else "image item"
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no such image file {str(path)!r}")
        budget = max_image_pixels()
        try:
            with warnings.catch_warnings():
                if budget and budget <= (Image.MAX_IMAGE_PIXELS or budget):
                    # Our budget is stricter than PIL's bomb warning, and its error below is clearer.
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)  # reads the header only: the size is known before decoding
            with img:
                w, h = img.size
                if budget and w * h > budget:
                    raise ImageTooLargeError(
                        f"{where}: image file {str(path)!r} is {w}x{h} = {w * h:,} pixels, above the budget of "
                        f"{budget:,} (set MMALIGN_MAX_IMAGE_PIXELS or data.init_args.max_image_pixels to raise it)"
                    )
                img.load()  # decode now so truncated files fail here, not later in a worker
                return img.convert("RGB")
        except Image.DecompressionBombError as err:  # beyond PIL's own limit (raised on the header too)
            raise ImageTooLargeError(f"{where}: image file {str(path)!r} is too large to decode ({err})") from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{where}: cannot decode image file {str(path)!r} ({err})") from err
    if hasattr(item, "detach") and hasattr(item, "numpy"):  # a torch tensor
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, where)
    raise TypeError(f"{where}: expected a path, PIL image or array, got {type(item).__name__}")


def load_images(items: Sequence[Any]) -> list[Image.Image]:
    """:func:`load_image` over a batch; errors name the failing item's index."""
    if isinstance(items, (str, os.PathLike, Image.Image, np.ndarray)):
        raise TypeError("expected a sequence of images, got a single item; wrap it in a list")
    return [load_image(item, i) for i, item in enumerate(items)]


def _array_to_pil(arr: np.ndarray, where: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # [C, H, W] -> [H, W, C]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"{where}: array must be [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{where}: empty image array of shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{where}: float image array holds NaN or inf")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{where}: integer image array must lie in 0..255, got dtype {arr.dtype}")
        arr = arr.astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")
