"""ImageFolder-style datasets with PIL only (no torchvision import), robust to unreadable files.

``root/<class>/<image>`` gives one class per sub-folder (sorted names, as torchvision does); a folder
with images directly inside (``flat=True``) is one unlabelled set, the usual layout of OOD test sets.
An image that cannot be decoded is *skipped*: the next readable image of the folder takes its place,
so a batch keeps its size and an epoch never stops half-way; :attr:`ImageFolder.skipped` counts the
distinct unreadable files seen so far, across DataLoader worker processes. An image over PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) counts as unreadable.

What is read (so that no image is counted twice or under another class's label): regular files
with an image extension, or symbolic links to such files; never pipes, sockets or devices (a pipe
named ``x.png`` would block the reader). Class folders (the root's sub-folders) may be symbolic
links, to build a dataset from some classes of another; two of them may not lead to the same
directory, or to one inside another, or to the root. A labelled folder needs at least two classes
(unless ``classes`` fixes the list), and no class folder may be empty (a ``ValueError`` names it).
*Below* a class folder (and below a flat root) directory links are not followed: no cycle, no escape
from the tree. A file link in a class folder
may lead into that class folder or outside the image folder (e.g. to a shared image store), never to
another class's image or elsewhere in the image folder (a ``ValueError`` names it).

Example:
    >>> import os, tempfile
    >>> from PIL import Image
    >>> root = tempfile.mkdtemp()
    >>> for c in ("cat", "dog"):
    ...     os.makedirs(os.path.join(root, c))
    ...     Image.new("RGB", (40, 30), "white").save(os.path.join(root, c, "a.png"))
    >>> ds = ImageFolder(root, transform=ImageTransform(size=32))
    >>> x, y = ds[1]
    >>> ds.classes, tuple(x.shape), y
    (['cat', 'dog'], (3, 32, 32), 1)
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from samnorm.data.decode import decode

__all__ = ["IMG_EXTENSIONS", "ImageFolder", "ImageTransform", "transform_for_model"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


class ImageTransform:
    """PIL image to a normalised ``(C, H, W)`` float tensor: resize the shorter side, centre-crop.

    The image is resized so its shorter side is ``round(size / crop_pct)`` (timm's evaluation
    convention), centre-cropped to ``size`` x ``size``, scaled to ``[0, 1]`` and normalised with
    ``mean``/``std``. No random augmentation: fine-tuning runs about one epoch and resumes exactly;
    the pseudo-OOD sampler supplies the variation.

    Args:
        size: output side in pixels.
        crop_pct: fraction of the resized image kept by the crop (1.0: resize straight to ``size``).
        mean, std: per-channel normalisation (their length sets the channel count, 1 or 3).
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.

    Example:
        >>> from PIL import Image
        >>> t = ImageTransform(size=8, mean=(0.0,), std=(1.0,))
        >>> t(Image.new("RGB", (20, 10), (255, 255, 255))).shape
        torch.Size([1, 8, 8])
    """

    _RESAMPLE: ClassVar[dict[str, int]] = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values

    def __init__(
        self,
        size: int = 224,
        crop_pct: float = 1.0,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        interpolation: str = "bilinear",
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if len(mean) != len(std) or len(mean) not in (1, 3) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 1 or 3 entries each, std > 0; got {mean!r}, {std!r}")
        if interpolation not in self._RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(self._RESAMPLE)}, got {interpolation!r}")
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    @property
    def channels(self) -> int:
        """Number of output channels (1: grayscale, 3: RGB)."""
        return len(self.mean)

    def __call__(self, image: Any) -> Tensor:
        from PIL import Image

        values = decode(image, self.channels)  # every PIL mode by its true range (samnorm.data.decode)
        h, w = values.shape[:2]
        short = max(1, round(self.size / self.crop_pct))
        scale = short / min(w, h)
        nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        # Resize only the crop's region (PIL's box, in source pixels): the same samples as resizing the
        # whole image and cropping, but memory for the output only, whatever the aspect ratio (a
        # 1 x 5,000,000 image would otherwise ask for a 32 x 160M intermediate).
        sx, sy = nw / w, nh / h
        box = (left / sx, top / sy, (left + self.size) / sx, (top + self.size) / sy)
        planes = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(values[..., c])).resize(
                    (self.size, self.size), resample=self._RESAMPLE[self.interpolation], box=box
                )
            )
            for c in range(self.channels)
        ]
        x = torch.from_numpy(np.clip(np.stack(planes), 0.0, 1.0))  # bicubic may overshoot
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return (
            f"ImageTransform(size={self.size}, crop_pct={self.crop_pct}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r})"
        )


def transform_for_model(model: Any, size: int | None = None, in_chans: int | None = None) -> ImageTransform:
    """The evaluation transform a timm model was trained with (its ``pretrained_cfg``).

    ``size`` overrides the input size (keeping the crop fraction); models without a config get
    ``size`` (default 224), no crop and mean = std = 0.5. ``in_chans`` picks 1 or 3 channels.

    Example:
        >>> import timm
        >>> transform_for_model(timm.create_model("resnet18"), size=64).size
        64
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    chans = in_chans or (cfg.get("input_size") or (3,))[0]
    if chans not in (1, 3):
        raise ValueError(f"image folders give 1 or 3 channels; the model takes {chans}")
    mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))
    if chans == 1 and len(mean) == 3:  # grayscale: average the channel statistics
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    cfg_size = (cfg.get("input_size") or (3, 224, 224))[-1]
    interpolation = cfg.get("interpolation")
    return ImageTransform(
        size=size or cfg_size,
        crop_pct=float(cfg.get("crop_pct") or 1.0),
        mean=mean,
        std=std,
        interpolation=interpolation if interpolation in ImageTransform._RESAMPLE else "bilinear",
    )


def _inside(a: str, b: str) -> bool:
    """Is the real path ``a`` the real path ``b`` or below it?"""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _check_class_dirs(root: str, subdirs: Sequence[str]) -> None:
    """Class folders must be distinct directory trees, none holding the root or another class."""
    real_root = os.path.realpath(root)
    reals = {c: os.path.realpath(os.path.join(root, c)) for c in subdirs}
    for c, real in reals.items():
        if _inside(real_root, real):
            raise ValueError(
                f"class folder {os.path.join(root, c)!r} leads to {real!r}, which holds the image "
                "folder itself: its images would be counted twice; remove the link"
            )
        for other, real_other in reals.items():
            if other != c and _inside(real, real_other):
                raise ValueError(
                    f"class folders {c!r} and {other!r} of {root!r} lead to the same images "
                    f"({real!r} is inside {real_other!r}): one label per image; remove the link"
                )


def _check_file_links(root: str, subdirs: Sequence[str], links: Sequence[tuple[str, str]]) -> None:
    """A file link may not put an image of one class (or of the root's tree) under another's label.

    ``links`` holds ``(class, link path)``. A link into its own class folder, or to a file outside the
    root and every class folder (a shared image store), is fine.
    """
    real_root = os.path.realpath(root)
    reals = {c: os.path.realpath(os.path.join(root, c)) for c in subdirs}
    for c, path in links:
        target = os.path.realpath(path)
        if _inside(target, reals[c]):
            continue
        owner = next((o for o, r in reals.items() if _inside(target, r)), None)
        if owner is not None or _inside(target, real_root):
            whose = (
                f"an image of class {owner!r}"
                if owner is not None
                else f"a file of the image folder outside class {c!r}"
            )
            raise ValueError(
                f"{path!r} links to {target!r}, {whose}: one label per image; remove the link "
                "(or copy the image if it really belongs to both classes)"
            )


class ImageFolder(Dataset):
    """Images in ``root/<class>/...`` (or directly in ``root`` with ``flat=True``) as ``(image, label)``.

    Args:
        root: the folder.
        transform: PIL image -> tensor (default: ``ImageTransform()``).
        classes: fix the class list and order (e.g. the training set's for a validation set); a
            sub-folder outside it is an error.
        flat: ``None`` (default) accepts either layout; ``True`` takes every image under ``root``
            (recursively) as class 0; ``False`` requires class sub-folders.

    The module docstring says which files and links are read.

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> Image.new("L", (9, 9)).save(os.path.join(root, "x.png"))
        >>> ImageFolder(root).classes
        ['.']
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Tensor] | None = None,
        classes: Sequence[str] | None = None,
        flat: bool | None = None,
    ) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist (or is not a directory)")
        self.root = root
        self.transform = transform or ImageTransform()
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if flat is None:
            flat = not subdirs
        if flat:
            found = ["."]
            self.samples = [(p, 0) for p in self._images(root)]
        else:
            if not subdirs:
                raise ValueError(
                    f"{root!r} has no class sub-folders: expected {os.path.join(root, '<class>', '<image>')}"
                )
            _check_class_dirs(root, subdirs)
            if classes is None and len(subdirs) < 2:  # one class: the loss is 0 whatever the model does
                raise ValueError(
                    f"{root!r} has one class folder ({subdirs[0]!r}): a classifier needs at least two "
                    "classes, one sub-folder each; name the folder that holds the class folders"
                )
            found = subdirs
            self.samples = []
        self.classes = list(classes) if classes is not None else found
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if not flat:
            unknown = [c for c in subdirs if c not in self.class_to_idx]
            if unknown:
                raise ValueError(
                    f"{root!r} has classes the model was not trained on: {unknown[:5]}; "
                    f"expected sub-folders among {self.classes[:5]}{'...' if len(self.classes) > 5 else ''}"
                )
            links: list[tuple[str, str]] = []
            for c in subdirs:
                found_links: list[str] = []
                images = self._images(os.path.join(root, c), found_links)
                if not images:  # it would be a class no image can teach
                    raise ValueError(
                        f"class folder {os.path.join(root, c)!r} holds no images "
                        f"({', '.join(IMG_EXTENSIONS)}): add its images or remove the folder"
                    )
                self.samples += [(p, self.class_to_idx[c]) for p in images]
                links += [(c, p) for p in found_links]
            _check_file_links(root, subdirs, links)
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}")
        self.targets = [t for _, t in self.samples]
        # One byte per file in shared memory: DataLoader workers (fork or spawn) mark what they skip.
        self._bad = multiprocessing.get_context().RawArray("b", len(self.samples))

    @staticmethod
    def _images(folder: str, links: list[str] | None = None) -> list[str]:
        """Image files under ``folder``, sorted, recursively; directory links are not followed.
        File links found are added to ``links`` (scandir knows them: no extra ``stat``)."""
        out, dirs = [], []
        with os.scandir(folder) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    dirs.append(e.path)
                elif _is_image(e.name) and e.is_file():  # follows a file link; False for a pipe or socket
                    out.append(e.path)
                    if links is not None and e.is_symlink():
                        links.append(e.path)
        for d in dirs:
            out += ImageFolder._images(d, links)
        return out

    def fingerprint(self) -> str:
        """A hash of the file list, the labels and the file sizes: what a resumed run checks that
        its data did not change (cheap: one ``stat`` per file, no image read; modification times
        are left out, so a copy of the folder elsewhere keeps its fingerprint).

        Example:
            >>> import tempfile
            >>> from PIL import Image
            >>> root = tempfile.mkdtemp()
            >>> Image.new("L", (4, 4)).save(os.path.join(root, "a.png"))
            >>> len(ImageFolder(root).fingerprint())
            64
        """
        h = hashlib.sha256()
        for path, label in self.samples:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            h.update(f"{os.path.relpath(path, self.root)}\0{label}\0{size}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tensor | None:
        from PIL import Image, UnidentifiedImageError

        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                image.load()
                return self.transform(image)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            if not self._bad[index]:
                warnings.warn(f"skipping unreadable image {path}: {err}", RuntimeWarning, stacklevel=3)
            self._bad[index] = 1
            return None

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self.samples)
        for offset in range(n):
            i = (index + offset) % n
            if self._bad[i]:
                continue
            x = self._load(i)
            if x is not None:
                return x, self.samples[i][1]
        raise ValueError(f"no readable image left in {self.root!r}: all {n} files failed to decode")

    @property
    def skipped(self) -> int:
        """Distinct unreadable images met so far (in this process and its DataLoader workers)."""
        return int(self.skipped_mask().sum())

    def skipped_mask(self) -> Tensor:
        """Boolean tensor over :attr:`samples`: True where the file could not be decoded."""
        return torch.from_numpy(np.frombuffer(self._bad, dtype=np.int8).copy()).bool()

    def skipped_paths(self) -> list[str]:
        """Paths of the unreadable images met so far."""
        return [p for (p, _), bad in zip(self.samples, self._bad, strict=True) if bad]

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {len(self.classes)} classes)"
