"""Image folders as datasets: ``ROOT/<class>/**/*.png|jpg|jpeg``, decoded with Pillow into float32 ``[n, C, H, W]``.

Classes are the sub-folders of ROOT in sorted order (an empty sub-folder is still a class, so data holders that
lack a class agree on the ids of the others). Files with other suffixes are ignored. An image Pillow cannot
decode is skipped, counted in ``LocalData.skipped`` and named in one WARNING; a folder where no image can be
decoded is refused. Images are grayscale (C = 1) when every one is, RGB (C = 3) otherwise (alpha dropped);
pixels are scaled to [0, 1] from 8 bits. Images of different sizes are refused unless ``image_size`` asks to
resize them all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.data.local import LocalData, check_num_classes
from fedctl.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_LAYOUT_FIX = "put each class's images in a sub-folder named after the class (ROOT/cat/1.png, ROOT/dog/2.jpg)"


def load_image_folder(root: Path, *, image_size: tuple[int, int] | None = None) -> LocalData:
    """Decode every PNG/JPEG image under ``root``'s class sub-folders (see the module docstring).

    Raises
    ------
    DataError
        No class sub-folders, no images, no readable image, images of different sizes (without
        ``image_size``), or Pillow not installed.
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders", fix=_LAYOUT_FIX)
    check_num_classes(len(classes), str(root))
    files = [(label, path) for label, name in enumerate(classes) for path in sorted((root / name).rglob("*"))
             if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    if not files:
        raise DataError(f"{root} holds no .png, .jpg or .jpeg files in its class sub-folders "
                        f"({', '.join(classes[:5])}{', …' if len(classes) > 5 else ''})", fix=_LAYOUT_FIX)
    image_module = _pillow(root)
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[Path] = []
    failures: list[tuple[Path, str]] = []
    for label, path in files:
        try:
            images.append(_decode(image_module, path, image_size))
        except (OSError, ValueError, image_module.DecompressionBombError) as err:
            failures.append((path, str(err).splitlines()[0] if str(err) else type(err).__name__))
            continue
        labels.append(label)
        names.append(path)
    _report_failures(root, failures, len(files), nothing_read=not images)
    x = _stack(root, images, names)
    return LocalData(x, np.array(labels, dtype=np.int64), tuple(classes), str(root), skipped=len(failures))


def _pillow(root: Path) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"reading the images in {root} needs Pillow, which is not installed",
                        fix="pip install 'fedctl[data]'") from None
    return Image


def _decode(image_module: Any, path: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (colour)."""
    with image_module.open(path) as image:
        image.load()  # decodes now: a truncated file fails here, not later
        converted = image.convert("L" if image.mode in GRAY_MODES else "RGB")
    if image_size is not None:
        height, width = image_size
        converted = converted.resize((width, height), image_module.BILINEAR)
    return np.asarray(converted, dtype=np.uint8)


def _report_failures(root: Path, failures: list[tuple[Path, str]], total: int, nothing_read: bool) -> None:
    if not failures:
        return
    path, reason = failures[0]
    if nothing_read:
        raise DataError(f"none of the {total} image files under {root} could be read ({path}: {reason})",
                        fix="check that they are PNG or JPEG images (not cut short, not another format renamed)")
    log.warning("skipped %d of %d image files under %s that could not be read (first: %s: %s)", len(failures),
                total, root, path, reason)


def _stack(root: Path, images: list[np.ndarray], names: list[Path]) -> np.ndarray:
    """``[n, C, H, W]`` float32 in [0, 1]; grayscale images repeat into three channels when others are colour."""
    sizes: dict[tuple[int, ...], Path] = {}
    for image, name in zip(images, names):
        sizes.setdefault(image.shape[:2], name)  # the first file of each size
    if len(sizes) > 1:
        (first, a), (second, b) = list(sizes.items())[:2]
        raise DataError(f"{root}: images differ in size ({first[1]}x{first[0]} as {a}, {second[1]}x{second[0]} "
                        f"as {b}; {len(sizes)} sizes in all)",
                        fix="resize them to one size (`fedctl partition --input DIR --image-size HxW` does)")
    colour = any(image.ndim == 3 for image in images)
    height, width = images[0].shape[:2]
    x = np.empty((len(images), 3 if colour else 1, height, width), dtype=np.float32)
    for i, image in enumerate(images):
        x[i] = image.transpose(2, 0, 1) if image.ndim == 3 else image[None]  # a gray image fills every channel
    x /= np.float32(255.0)
    return x
