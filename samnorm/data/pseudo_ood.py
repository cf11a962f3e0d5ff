"""Pseudo-OOD images made on the fly from a batch of ID images (no real outlier data needed).

:class:`PseudoOOD` turns every image of an ID batch into an OOD-like image with one transform drawn
per image from a pluggable list, on the batch's device, from its own seeded ``torch.Generator`` (so
the sampler is deterministic, checkpointable, and does not disturb the global RNG).

The default transforms and why (each keeps low-level ID statistics, so the model cannot separate
them from ID data by colour or texture alone, while removing the evidence of any one class):

* :class:`Jigsaw` (4x4 patches shuffled): local texture kept, global shape destroyed.
* :class:`PatchMix` (half of a 4x4 grid taken from an image of *another class*): two classes' evidence
  in one image, so neither class should be predicted confidently.
* :class:`Rotate` (90/180/270 degrees, half of them overlaid on the unrotated image): oriented
  content (scenes, animals) upside down or sideways, or two orientations at once.
* :class:`Blur` (Gaussian, sigma 6-12% of the shorter side): removes the detail that separates
  classes, keeps colours and layout.
* :class:`Noise` (Gaussian, 25-50% of the channel's value range): buries the evidence in noise.
* :class:`FourierMix` (amplitude kept, phase blended half-way with another class's image): natural
  amplitude spectrum, but a structure that belongs to neither image.

Every transform receives ``(images, partners, generator)`` where ``partners[i]`` is an image of a
different class (when labels say so) and returns images of the same shape; any callable with that
signature plugs in. An image with no other image to pair with (a batch of one, or copies of one
image) is paired with itself rotated by 180 degrees (:func:`partner_images`), so PatchMix and
FourierMix never hand back the ID image unchanged. Outputs are clamped to each channel's value range
in the input batch, so images stay in ``[0, 1]`` (or in whatever normalised range they came in).

Example:
    >>> import torch
    >>> sampler = PseudoOOD(seed=0)
    >>> x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 4
    >>> ood = sampler(x, y)
    >>> ood.shape, bool(ood.min() >= x.min()), bool(ood.max() <= x.max())
    (torch.Size([8, 3, 32, 32]), True, True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TRANSFORMS",
    "Blur",
    "FourierMix",
    "Jigsaw",
    "Noise",
    "PatchMix",
    "PseudoOOD",
    "Rotate",
    "default_transforms",
    "partner_images",
    "pick_partners",
    "save_example_grid",
]

Transform = Callable[[Tensor, Tensor, torch.Generator], Tensor]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _check_range(name: str, value: float | tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
    a, b = (float(value), float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must be a number or a (low, high) pair within [{lo}, {hi}], got {value!r}")
    return a, b


def _fft_dtype(x: Tensor) -> Tensor:
    """``x`` in a dtype the FFT supports at full precision (float32, or float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _grid_cells(size: int, grid: int, device: torch.device) -> Tensor:
    """Cell index (0..grid-1) of each of ``size`` pixels; cells differ by at most one pixel."""
    return torch.div(torch.arange(size, device=device) * grid, size, rounding_mode="floor")


class Jigsaw:
    """Shuffle a ``grid`` x ``grid`` arrangement of patches (never the identity order).

    When the size is not divisible by the grid, the patches tile the top-left ``grid*(H//grid)`` x
    ``grid*(W//grid)`` region and the thin remainder strips stay in place; images smaller than the
    grid use one-pixel patches.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> out = Jigsaw(grid=2)(x, x, g)
        >>> sorted(out.flatten().tolist()) == sorted(x.flatten().tolist()), torch.equal(out, x)
        (True, False)
    """

    name = "jigsaw"

    def __init__(self, grid: int = 4) -> None:
        if not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        self.grid = grid

    def __call__(self, x: Tensor, partner: Tensor, g: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        gh, gw = min(self.grid, h), min(self.grid, w)
        if gh * gw < 2:
            return x.clone()
        ph, pw = h // gh, w // gw
        region = x[..., : gh * ph, : gw * pw]
        patches = region.reshape(n, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c, ph, pw)
        perm = torch.argsort(torch.rand(n, gh * gw, generator=g, device=x.device), dim=1)
        identity = (perm == torch.arange(gh * gw, device=x.device)).all(dim=1)
        perm[identity] = perm[identity].roll(1, dims=1)  # a shuffle that changes nothing is no OOD image
        shuffled = patches[torch.arange(n, device=x.device)[:, None], perm]
        shuffled = shuffled.reshape(n, gh, gw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * ph, gw * pw)
        out = x.clone()
        out[..., : gh * ph, : gw * pw] = shuffled
        return out

    def __repr__(self) -> str:
        return f"Jigsaw(grid={self.grid})"


class PatchMix:
    """Replace a ``fraction`` of the cells of a ``grid`` x ``grid`` layout by the partner's cells.

    Cells follow integer boundaries (sizes differ by at most a pixel), so any ``H x W`` works; at least
    one cell comes from each image.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> out = PatchMix(grid=2, fraction=0.5)(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), g)
        >>> float(out.mean())
        0.5
    """

    name = "patch_mix"

    def __init__(self, grid: int = 4, fraction: float = 0.5) -> None:
        if not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        self.grid, self.fraction = grid, fraction

    def __call__(self, x: Tensor, partner: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        gh, gw = min(self.grid, h), min(self.grid, w)
        cells = gh * gw
        if cells < 2:
            return x.clone()
        k = min(max(round(self.fraction * cells), 1), cells - 1)
        ranks = torch.argsort(torch.rand(n, cells, generator=g, device=x.device), dim=1).argsort(dim=1)
        from_partner = ranks < k  # (n, cells): exactly k cells per image
        cell = _grid_cells(h, gh, x.device)[:, None] * gw + _grid_cells(w, gw, x.device)[None, :]
        mask = from_partner[:, cell].unsqueeze(1)  # (n, 1, h, w)
        return torch.where(mask, partner, x)

    def __repr__(self) -> str:
        return f"PatchMix(grid={self.grid}, fraction={self.fraction})"


class Rotate:
    """Rotate by a multiple of 90 degrees drawn from ``angles``; overlay on the original with ``overlay``.

    An overlaid image is ``(x + rotated) / 2``. For a non-square image, 90/270 degree rotations are
    resized back to ``H x W`` (bilinear, so values stay within the input range).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> Rotate(angles=(180,), overlay=0.0)(x, x, g).flatten().tolist()
        [3.0, 2.0, 1.0, 0.0]
    """

    name = "rotate"

    def __init__(self, angles: Sequence[int] = (90, 180, 270), overlay: float = 0.5) -> None:
        angles = tuple(int(a) for a in angles)
        if not angles or any(a % 90 or a % 360 == 0 for a in angles):
            raise ValueError(f"angles must be non-empty multiples of 90 other than 0 (mod 360), got {angles}")
        if not 0 <= overlay <= 1:
            raise ValueError(f"overlay must be a probability in [0, 1], got {overlay}")
        self.angles, self.overlay = angles, overlay

    def __call__(self, x: Tensor, partner: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        turns = torch.tensor([a // 90 % 4 for a in self.angles], device=x.device)
        pick = turns[torch.randint(len(self.angles), (n,), generator=g, device=x.device)]
        blend = torch.rand(n, generator=g, device=x.device) < self.overlay
        out = torch.empty_like(x)
        for k in (1, 2, 3):
            idx = (pick == k).nonzero().flatten()
            if idx.numel():
                r = torch.rot90(x[idx], k, dims=(2, 3))
                if r.shape[-2:] != (h, w):
                    r = F.interpolate(r, size=(h, w), mode="bilinear", align_corners=False)
                out[idx] = r
        return torch.where(blend[:, None, None, None], (x + out) / 2, out)

    def __repr__(self) -> str:
        return f"Rotate(angles={self.angles}, overlay={self.overlay})"


class Blur:
    """Gaussian blur with sigma drawn per image as a fraction of the shorter side.

    Applied in the Fourier domain (a wrapped Gaussian: positive weights summing to one, so the output
    is an average of input values), which costs the same for any sigma.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(2, 3, 16, 20)
        >>> out = Blur()(x, x, g)
        >>> out.shape == x.shape and bool(out.std() < x.std())
        True
    """

    name = "blur"

    def __init__(self, sigma: float | tuple[float, float] = (0.06, 0.12)) -> None:
        self.sigma = _check_range("sigma", sigma, 1e-6, 10.0)

    def __call__(self, x: Tensor, partner: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        sigma = _uniform(n, *self.sigma, g, x.device) * min(h, w)
        fy = torch.fft.fftfreq(h, device=x.device)[:, None]
        fx = torch.fft.rfftfreq(w, device=x.device)[None, :]
        transfer = torch.exp(-2 * math.pi**2 * sigma[:, None, None, None] ** 2 * (fy**2 + fx**2))
        spectrum = torch.fft.rfft2(_fft_dtype(x))
        return torch.fft.irfft2(spectrum * transfer, s=(h, w)).to(x.dtype)

    def __repr__(self) -> str:
        return f"Blur(sigma={self.sigma})"


class Noise:
    """Additive Gaussian noise; its std is drawn per image as a fraction of each channel's value range.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(2, 1, 8, 8)
        >>> bool((Noise()(x, x, g) - x).abs().mean() > 0.05)
        True
    """

    name = "noise"

    def __init__(self, std: float | tuple[float, float] = (0.25, 0.5)) -> None:
        self.std = _check_range("std", std, 0.0, 10.0)

    def __call__(self, x: Tensor, partner: Tensor, g: torch.Generator) -> Tensor:
        n = x.shape[0]
        span = (x.amax(dim=(0, 2, 3), keepdim=True) - x.amin(dim=(0, 2, 3), keepdim=True)).clamp_min(1e-6)
        std = _uniform(n, *self.std, g, x.device)[:, None, None, None] * span
        return x + std * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"Noise(std={self.std})"


class FourierMix:
    """Mix the Fourier phase (default) or amplitude of each image with its partner's.

    ``component="phase"``: keep the image's amplitude spectrum and move its phase a fraction ``alpha``
    toward the partner's (a normalised blend of unit phasors); at 0.5 the structure belongs to neither
    image. ``component="amplitude"``: keep the phase and blend the amplitudes (a style swap; the
    content stays recognisable, so it is a *near*-OOD variant and not in the defaults).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(2, 3, 8, 8)
        >>> torch.allclose(FourierMix(alpha=1e-9)(x, x.flip(0), g), x, atol=1e-5)
        True
    """

    name = "fourier"

    def __init__(self, component: str = "phase", alpha: float = 0.5) -> None:
        if component not in ("phase", "amplitude"):
            raise ValueError(f"component must be 'phase' or 'amplitude', got {component!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.component, self.alpha = component, alpha

    def __call__(self, x: Tensor, partner: Tensor, g: torch.Generator) -> Tensor:
        h, w = x.shape[-2:]
        a, b = torch.fft.rfft2(_fft_dtype(x)), torch.fft.rfft2(_fft_dtype(partner))
        amp_a, amp_b = a.abs(), b.abs()
        unit_a = torch.where(amp_a > 0, a / amp_a.clamp_min(1e-12), torch.ones_like(a))
        if self.component == "amplitude":
            mixed = ((1 - self.alpha) * amp_a + self.alpha * amp_b) * unit_a
        else:
            unit_b = torch.where(amp_b > 0, b / amp_b.clamp_min(1e-12), torch.ones_like(b))
            blend = (1 - self.alpha) * unit_a + self.alpha * unit_b
            size = blend.abs()
            # Opposite phases cancel: keep the image's own phase there.
            phase = torch.where(size > 1e-6, blend / size.clamp_min(1e-12), unit_a)
            mixed = amp_a * phase
        return torch.fft.irfft2(mixed, s=(h, w)).to(x.dtype)

    def __repr__(self) -> str:
        return f"FourierMix(component={self.component!r}, alpha={self.alpha})"


TRANSFORMS: dict[str, type] = {t.name: t for t in (Jigsaw, PatchMix, Rotate, Blur, Noise, FourierMix)}
"""The built-in transform classes by name: ``PseudoOOD(transforms=["blur", ...])`` builds each with its defaults."""


def default_transforms() -> list[Transform]:
    """The default transform list (see the module docstring for the reasons).

    Example:
        >>> [t.name for t in default_transforms()]
        ['jigsaw', 'patch_mix', 'rotate', 'blur', 'noise', 'fourier']
    """
    return [
        Jigsaw(4),
        PatchMix(4, 0.5),
        Rotate((90, 180, 270), 0.5),
        Blur((0.06, 0.12)),
        Noise((0.25, 0.5)),
        FourierMix("phase", 0.5),
    ]


def pick_partners(labels: Tensor | None, n: int, g: torch.Generator, device: torch.device) -> Tensor:
    """For each of ``n`` images, the index of a random other image, of another class when there is one.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> p = pick_partners(y, 4, g, torch.device("cpu"))
        >>> bool((y[p] != y).all())
        True
    """
    scores = torch.rand(n, n, generator=g, device=device)
    others = ~torch.eye(n, dtype=torch.bool, device=device)
    if labels is not None:
        labels = labels.to(device)
        other_class = labels[:, None] != labels[None, :]
        # Rows without any other class fall back to any other image.
        others = torch.where(other_class.any(dim=1, keepdim=True), other_class, others)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.where(others, scores, torch.full_like(scores, -1.0)).argmax(dim=1)


def partner_images(images: Tensor, labels: Tensor | None, g: torch.Generator) -> Tensor:
    """The partner image of each image: :func:`pick_partners`, except that an image equal to its
    partner (the only image of its batch, or one of several copies) gets itself rotated by 180
    degrees instead, so that mixing with the partner changes it (unless the image is symmetric
    under that rotation, like a constant image, which nothing within its value range can change).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> partner_images(x, None, g).flatten().tolist()
        [3.0, 2.0, 1.0, 0.0]
    """
    partners = images[pick_partners(labels, images.shape[0], g, images.device)]
    own = (partners == images).flatten(1).all(dim=1)
    if bool(own.any()):
        partners[own] = images[own].flip(-2, -1)
    return partners


def _channel_range(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)


class PseudoOOD:
    """Seeded on-the-fly pseudo-OOD sampler: one transform per image, drawn with ``weights``.

    Args:
        transforms: callables ``(images, partners, generator) -> images`` (default:
            :func:`default_transforms`); names from :data:`TRANSFORMS` are accepted too.
        weights: relative frequency of each transform (default: equal).
        seed: seeds one ``torch.Generator`` per device; the global RNG is never touched.

    Example:
        >>> x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> a = PseudoOOD(["jigsaw", "rotate"], seed=3)(x, y)
        >>> torch.equal(a, PseudoOOD(["jigsaw", "rotate"], seed=3)(x, y))
        True
    """

    def __init__(
        self,
        transforms: Sequence[Transform | str] | None = None,
        weights: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        items = default_transforms() if transforms is None else list(transforms)
        if not items:
            raise ValueError("transforms is empty: give at least one transform (or None for the defaults)")
        self.transforms: list[Transform] = []
        for t in items:
            if isinstance(t, str):
                if t not in TRANSFORMS:
                    raise ValueError(f"unknown pseudo-OOD transform {t!r}: choose from {sorted(TRANSFORMS)}")
                t = TRANSFORMS[t]()
            if not callable(t):
                raise TypeError(f"a transform must be callable (images, partners, generator), got {type(t).__name__}")
            self.transforms.append(t)
        w = [1.0] * len(self.transforms) if weights is None else [float(v) for v in weights]
        if len(w) != len(self.transforms) or any(v < 0 or not math.isfinite(v) for v in w) or sum(w) <= 0:
            raise ValueError(
                f"weights must be {len(self.transforms)} finite non-negative numbers with a positive sum, "
                f"got {weights!r}"
            )
        self.weights = w
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}

    @property
    def names(self) -> list[str]:
        """Display name of each transform."""
        return [getattr(t, "name", type(t).__name__) for t in self.transforms]

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The sampler's generator for ``device`` (created from the seed on first use)."""
        key = str(torch.device(device))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=key).manual_seed(self.seed)
        return self._generators[key]

    def sample(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pseudo-OOD images for ``images`` (B, C, H, W) and the index of the transform used for each."""
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float (B, C, H, W) tensor, got "
                f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
            )
        n = images.shape[0]
        if labels is not None and (labels.dim() != 1 or labels.shape[0] != n):
            raise ValueError(f"labels must be a 1-d tensor of {n} class indices, got shape {tuple(labels.shape)}")
        g = self.generator(images.device)
        weights = torch.tensor(self.weights, device=images.device)
        kinds = torch.multinomial(weights, n, replacement=True, generator=g) if n else weights.new_zeros(0).long()
        partners = partner_images(images, labels, g) if n else images
        out = torch.empty_like(images)
        with torch.no_grad():
            for k, transform in enumerate(self.transforms):
                idx = (kinds == k).nonzero().flatten()
                if idx.numel():
                    out[idx] = transform(images[idx], partners[idx], g).to(images.dtype)
            lo, hi = _channel_range(images)
            out = torch.maximum(torch.minimum(out, hi), lo) if n else out
        return out, kinds

    def __call__(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.sample(images, labels)[0]

    def state_dict(self) -> dict[str, Any]:
        """Seed and generator states (per device), for exact resumption."""
        return {"seed": self.seed, "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (generators for devices absent here are recreated lazily)."""
        self.seed = int(state["seed"])
        self._generators = {}
        for key, value in state["generators"].items():
            self.generator(key).set_state(value)

    def __repr__(self) -> str:
        return f"PseudoOOD(transforms={self.transforms}, weights={self.weights}, seed={self.seed})"


def _display(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    elif x.min() < 0 or x.max() > 1:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x.clamp(0, 1)


def save_example_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    labels: Tensor | None = None,
    sampler: PseudoOOD | None = None,
    max_images: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    title: str | None = None,
) -> str:
    """Save a PNG grid: the ID images in the first row, then one row per transform of ``sampler``.

    Like the appendix's figures 1-2. ``mean``/``std`` undo a normalisation for display. The sampler's
    own generator state is left untouched (the grid uses ``seed``). Needs matplotlib (lazy import).

    Example:
        >>> import tempfile, os
        >>> out = save_example_grid(torch.rand(4, 3, 32, 32), os.path.join(tempfile.mkdtemp(), "g.png"))
        >>> out.endswith("g.png") and os.path.getsize(out) > 0
        True
    """

    sampler = sampler or PseudoOOD()
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty (B, C, H, W) tensor")
    x = images[:max_images]
    y = None if labels is None else labels[: x.shape[0]]
    g = torch.Generator(device=x.device).manual_seed(seed)
    partners = partner_images(x, y, g)
    lo, hi = _channel_range(x)
    rows = [("ID", x)]
    with torch.no_grad():
        for name, t in zip(sampler.names, sampler.transforms, strict=True):
            rows.append((name, torch.maximum(torch.minimum(t(x, partners, g), hi), lo)))
    from samnorm.viz.figures import plot_image_grid  # matplotlib without pyplot: no global backend switch

    shown = torch.cat([_display(batch, mean, std) for _, batch in rows])
    if shown.shape[1] != 3:  # one channel, or a channel count with no colour meaning: the mean
        shown = shown.mean(1, keepdim=True)
    n_cols = x.shape[0]
    titles = [name if c == 0 else "" for name, _ in rows for c in range(n_cols)]
    path = os.fspath(path)
    plot_image_grid(shown, titles=titles, ncols=n_cols, title=title, cell_inches=1.4, path=path)
    return path
