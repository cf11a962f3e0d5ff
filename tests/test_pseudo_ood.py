"""Pseudo-OOD sampler: determinism, value ranges on any shape, and each transform against a reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samnorm.data.pseudo_ood import (
    TRANSFORMS,
    Blur,
    FourierMix,
    Jigsaw,
    Noise,
    PatchMix,
    PseudoOOD,
    Rotate,
    default_transforms,
    partner_images,
    pick_partners,
    save_example_grid,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_images_and_global_rng_untouched():
    x, y = torch.rand(12, 3, 20, 24), torch.arange(12) % 3
    state = torch.get_rng_state()
    a, kinds_a = PseudoOOD(seed=7).sample(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    b, kinds_b = PseudoOOD(seed=7).sample(x, y)
    assert torch.equal(a, b) and torch.equal(kinds_a, kinds_b)
    assert not torch.equal(a, PseudoOOD(seed=8)(x, y))


def test_state_dict_resumes_the_stream():
    x, y = torch.rand(6, 1, 16, 16), torch.arange(6) % 2
    s = PseudoOOD(seed=1)
    s(x, y)
    saved = s.state_dict()
    nxt = s(x, y)
    fresh = PseudoOOD(seed=99)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh(x, y), nxt)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    c=st.sampled_from([1, 3]),
    h=st.integers(1, 37),
    w=st.integers(1, 37),
    shift=st.sampled_from([0.0, -0.5]),
    with_labels=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_keeps_shape_and_channel_range(b, c, h, w, shift, with_labels, seed):
    x = torch.rand(b, c, h, w, generator=gen(seed)) * 2 + shift  # also normalised-looking ranges
    y = torch.arange(b) % 2 if with_labels else None
    sampler = PseudoOOD(seed=seed)
    out, kinds = sampler.sample(x, y)
    assert out.shape == x.shape and out.dtype == x.dtype and kinds.shape == (b,)
    assert torch.isfinite(out).all()
    lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
    assert (out.amin(dim=(0, 2, 3)) >= lo).all() and (out.amax(dim=(0, 2, 3)) <= hi).all()
    # Every transform on its own as well.
    partners = x.flip(0)
    for t in default_transforms():
        assert t(x, partners, gen(seed)).shape == x.shape, t


def test_jigsaw_permutes_patches_and_keeps_the_remainder():
    x = torch.rand(3, 2, 10, 13)
    out = Jigsaw(grid=4)(x, x, gen())
    # Patches are 2x3 over the top-left 8x12 region; the rest stays.
    assert torch.equal(out[..., 8:, :], x[..., 8:, :]) and torch.equal(out[..., :, 12:], x[..., :, 12:])

    def patches(t):
        return sorted(
            tuple(t[:, i * 2 : (i + 1) * 2, j * 3 : (j + 1) * 3].flatten().tolist()) for i in range(4) for j in range(4)
        )

    for i in range(3):
        assert patches(out[i]) == patches(x[i])
        assert not torch.equal(out[i], x[i])


def test_jigsaw_is_never_the_identity_on_two_patches():
    x = torch.rand(64, 1, 2, 1)  # two one-pixel patches: a random order is the identity half the time
    out = Jigsaw(grid=2)(x, x, gen())
    assert torch.equal(out, x.flip(2))


def test_patch_mix_cells_against_explicit_boundaries():
    x, p = torch.zeros(4, 1, 11, 7), torch.ones(4, 1, 11, 7)
    out = PatchMix(grid=3, fraction=0.5)(x, p, gen())
    for img in out[:, 0]:
        taken = 0
        for ci in range(3):
            for cj in range(3):
                rows = [r for r in range(11) if r * 3 // 11 == ci]
                cols = [c for c in range(7) if c * 3 // 7 == cj]
                cell = img[rows][:, cols]
                assert cell.min() == cell.max()  # one source per cell
                taken += int(cell[0, 0].item())
        assert taken == round(0.5 * 9)


def test_rotate_is_a_rotation_or_an_overlay():
    x = torch.rand(16, 3, 9, 9)
    out = Rotate(overlay=0.5)(x, x, gen())
    seen_overlay = seen_plain = False
    for i in range(16):
        rots = [torch.rot90(x[i], k, dims=(1, 2)) for k in (1, 2, 3)]
        plain = any(torch.equal(out[i], r) for r in rots)
        overlay = any(torch.allclose(out[i], (x[i] + r) / 2) for r in rots)
        assert plain or overlay
        seen_plain |= plain
        seen_overlay |= overlay
    assert seen_plain and seen_overlay


def test_rotate_non_square():
    x = torch.rand(2, 1, 6, 10)
    assert torch.equal(Rotate(angles=(180,), overlay=0)(x, x, gen()), x.flip(2, 3))
    out = Rotate(angles=(90,), overlay=0)(x, x, gen())
    assert out.shape == x.shape and out.min() >= x.min() and out.max() <= x.max()


def test_blur_equals_circular_gaussian_convolution_float64():
    h, w, frac = 9, 7, 0.3
    x = torch.rand(1, 1, h, w, dtype=torch.float64)
    out = Blur(sigma=frac)(x, x, gen())
    sigma = frac * min(h, w)

    def wrapped(d, n):
        return sum(math.exp(-((d + k * n) ** 2) / (2 * sigma**2)) for k in range(-6, 7))

    ky = [wrapped(d, h) for d in range(h)]
    kx = [wrapped(d, w) for d in range(w)]
    norm = sum(ky) * sum(kx)
    xs = x[0, 0].tolist()
    ref = torch.tensor(
        [
            [
                sum(xs[a][b] * ky[(i - a) % h] * kx[(j - b) % w] for a in range(h) for b in range(w)) / norm
                for j in range(w)
            ]
            for i in range(h)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out[0, 0], ref, rtol=1e-8, atol=1e-8)


def test_noise_std_follows_the_channel_range():
    x = torch.cat([torch.rand(4, 1, 64, 64), 10 * torch.rand(4, 1, 64, 64)], dim=1)
    diff = Noise(std=0.3)(x, x, gen()) - x
    assert diff[:, 0].std().item() == pytest.approx(0.3, rel=0.05)
    assert diff[:, 1].std().item() == pytest.approx(3.0, rel=0.05)


def test_fourier_phase_mix_keeps_amplitude_and_amplitude_mix_keeps_phase():
    x, p = torch.rand(3, 3, 16, 16, dtype=torch.float64), torch.rand(3, 3, 16, 16, dtype=torch.float64)
    spec = torch.fft.rfft2
    out = FourierMix("phase", 0.5)(x, p, gen())
    # Columns 0 and W/2 must be Hermitian along H and are projected back by irfft2; the rest is exact.
    torch.testing.assert_close(spec(out).abs()[..., 1:-1], spec(x).abs()[..., 1:-1])
    assert not torch.allclose(out, x, atol=1e-3)
    swap = FourierMix("amplitude", 1.0)(x, p, gen())
    torch.testing.assert_close(spec(swap).abs()[..., 1:-1], spec(p).abs()[..., 1:-1])
    torch.testing.assert_close(torch.angle(spec(swap))[..., 1:-1], torch.angle(spec(x))[..., 1:-1])


def test_partners_are_of_another_class_when_possible():
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    for seed in range(5):
        p = pick_partners(y, 6, gen(seed), torch.device("cpu"))
        assert (y[p] != y).all()
    same = pick_partners(torch.zeros(4, dtype=torch.long), 4, gen(), torch.device("cpu"))
    assert (same != torch.arange(4)).all()
    assert pick_partners(None, 1, gen(), torch.device("cpu")).tolist() == [0]


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(3, 20), st.integers(2, 20), st.integers(0, 2**31 - 1))
def test_mixing_transforms_change_an_image_without_another_to_mix_with(copies, h, w, seed):
    # a batch of one image (or copies of one image) used to be its own partner: PatchMix and
    # FourierMix handed back the ID image unchanged, labelled OOD. (A 2x2 image has a real
    # spectrum: no phase blend can change it, whatever the partner.)
    x = torch.rand(1, 3, h, w, generator=gen(seed)).repeat(copies, 1, 1, 1)
    for name in ("patch_mix", "fourier"):
        out = PseudoOOD([name], seed=seed)(x, torch.zeros(copies, dtype=torch.long))
        assert all(not torch.allclose(o, x[0], atol=1e-6) for o in out), name


def test_an_image_without_a_partner_is_paired_with_its_180_degree_rotation():
    x = torch.rand(1, 2, 5, 7, generator=gen())
    torch.testing.assert_close(partner_images(x, None, gen()), torch.rot90(x, 2, dims=(2, 3)))
    batch = torch.cat([x, x, torch.rand(1, 2, 5, 7, generator=gen(1))])  # two copies and another image
    partners = partner_images(batch, None, gen(3))
    for i in range(3):
        assert not torch.equal(partners[i], batch[i])
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(partner_images(batch[[0, 2]], y[:2], gen()), batch[[2, 0]])  # others kept


def test_weights_choose_the_transforms():
    x = torch.rand(50, 1, 8, 8)
    _, kinds = PseudoOOD(["jigsaw", "blur", "noise"], weights=[0, 1, 0]).sample(x)
    assert (kinds == 1).all()
    _, kinds = PseudoOOD(["jigsaw", "blur"], weights=[1, 3], seed=2).sample(torch.rand(2000, 1, 4, 4))
    assert (kinds == 1).float().mean().item() == pytest.approx(0.75, abs=0.04)


def test_custom_callable_plugs_in():
    def invert(images, partners, g):
        return images.max() - images + images.min()

    x = torch.rand(3, 1, 5, 5)
    out = PseudoOOD([invert])(x)
    torch.testing.assert_close(out, x.max() - x + x.min())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown pseudo-OOD transform"):
        PseudoOOD(["swirl"])
    with pytest.raises(ValueError, match="empty"):
        PseudoOOD([])
    with pytest.raises(TypeError, match="callable"):
        PseudoOOD([42])
    with pytest.raises(ValueError, match="weights"):
        PseudoOOD(["jigsaw"], weights=[-1])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        PseudoOOD()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        PseudoOOD()(torch.rand(3, 1, 8, 8), torch.tensor([0, 1]))
    for bad in (
        lambda: Jigsaw(1),
        lambda: PatchMix(fraction=1.0),
        lambda: Rotate(angles=(45,)),
        lambda: Blur(sigma=(0.2, 0.1)),
        lambda: Noise(std=-1),
        lambda: FourierMix("colour"),
    ):
        with pytest.raises(ValueError):
            bad()
    assert set(TRANSFORMS) == {"jigsaw", "patch_mix", "rotate", "blur", "noise", "fourier"}


@pytest.mark.parametrize("channels", [1, 3])
def test_save_example_grid_writes_a_png(tmp_path, channels):
    pytest.importorskip("matplotlib")
    sampler = PseudoOOD(seed=0)
    before = sampler.state_dict()
    x = torch.rand(5, channels, 17, 23)
    path = save_example_grid(
        x,
        tmp_path / "sub" / "grid.png",
        labels=torch.arange(5) % 2,
        sampler=sampler,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        title="pseudo-OOD",
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sampler.state_dict() == before
