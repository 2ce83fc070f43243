"""Turn raw image items (paths, PIL images, arrays) into RGB PIL images with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError


def load_image(item: Any, index: int | None = None) -> Image.Image:
    """Return ``item`` as an RGB PIL image.

    Args:
        item: A path (``str`` / ``os.PathLike``), a PIL image, or an array ``[H, W]``,
            ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (uint8 0..255, or float 0..1).
        index: Position of the item in its batch, quoted in error messages.

    Raises:
        FileNotFoundError: The path does not exist.
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
        try:
            with Image.open(path) as img:
                img.load()  # decode now so truncated files fail here, not later in a worker
                return img.convert("RGB")
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
