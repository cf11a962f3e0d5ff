"""Scorers of ID feature statistics: Mahalanobis (class means, tied covariance), KNN (nearest ID
features) and ViM (residual outside the principal ID subspace)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from samnorm.ood import scores as S
from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.detectors.base import OutputScorer, Passes

__all__ = ["KNN", "Mahalanobis", "ViM"]


class Mahalanobis(OutputScorer):
    """Mahalanobis distance to the closest class mean with a tied covariance (Lee et al.,
    NeurIPS 2018; without input pre-processing or feature ensembles).

    ``fit`` needs labels; it streams class means and the pooled within-class scatter in float64
    (no feature bank, numerically stable pairwise updates). The covariance gets
    ``jitter * trace / D`` on its diagonal (relative, so scale-free) and is factorised by
    Cholesky. Score: ``-min_c (h - mu_c)^T Sigma^-1 (h - mu_c)``. Classes absent from the fit
    data are ignored.

    Example:
        >>> Mahalanobis(model).fit(train_loader).score(images)  # doctest: +SKIP
    """

    name = "Mahalanobis"
    needs_fit = True
    needs_labels = True

    def __init__(self, model: nn.Module | ModelAdapter, jitter: float = 1e-6) -> None:
        super().__init__(model)
        if not jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.jitter = float(jitter)

    def _fit(self, passes: Passes) -> None:
        k, d = self.adapter.num_classes, self.adapter.num_features
        # class means, class counts and the pooled within-class scatter: float64, on the features' device
        stats: tuple[Tensor, Tensor, Tensor] | None = None
        for feats, _, labels in passes():
            assert labels is not None  # needs_labels: the base refuses data without them
            f, y = feats.double(), labels.to(feats.device).long()
            if y.numel() == 0:
                continue
            if y.min() < 0 or y.max() >= k:
                raise ValueError(f"labels must be class indices in [0, {k}), got {y.min()}..{y.max()}")
            if stats is None:
                stats = f.new_zeros(k, d), f.new_zeros(k), f.new_zeros(d, d)
            means, counts, scatter = stats  # updated in place
            # Chan et al.'s pairwise update: scatter around the batch's class means, plus the
            # shift between batch and running means; E[hh^T] - mu mu^T would cancel
            # catastrophically when features vary little around a large mean
            cls, inv, cnt = torch.unique(y, return_inverse=True, return_counts=True)
            cnt = cnt.double()
            batch_means = f.new_zeros(len(cls), d).index_add_(0, inv, f) / cnt[:, None]
            centred = f - batch_means[inv]
            delta = batch_means - means[cls]
            total = counts[cls] + cnt
            scatter += centred.T @ centred + (delta * (counts[cls] * cnt / total)[:, None]).T @ delta
            means[cls] += delta * (cnt / total)[:, None]
            counts[cls] = total
        if stats is None or stats[1].sum() < 2:
            raise ValueError("Mahalanobis.fit needs at least 2 labelled samples")
        means, counts, scatter = stats
        present = counts > 0
        means = means[present]
        cov = scatter / counts.sum()
        cov += torch.eye(d, dtype=torch.float64, device=cov.device) * (self.jitter * cov.trace() / d)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info != 0:
            raise ValueError(f"the covariance is not positive definite; raise jitter (now {self.jitter})")
        self.classes = torch.nonzero(present).reshape(-1)
        self.means, self.chol = means, chol
        # whitened class means: distances become squared Euclidean norms
        self.white_means = torch.linalg.solve_triangular(chol, means.T, upper=False).T

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        chol, m = self.chol.to(features.device), self.white_means.to(features.device)
        z = torch.linalg.solve_triangular(chol, features.double().T, upper=False).T
        dist = (z * z).sum(1, keepdim=True) - 2.0 * z @ m.T + (m * m).sum(1)
        return -dist.amin(dim=1)

    def _params(self) -> dict[str, Any]:
        return {"jitter": self.jitter}


class KNN(OutputScorer):
    """Deep k-nearest neighbours (Sun et al., ICML 2022): minus the distance from the normalised
    feature to its k-th nearest normalised ID training feature.

    The bank keeps a seeded random ``fraction`` of the fit samples (the paper uses 1% of
    ImageNet), optionally in ``bank_dtype`` (e.g. ``torch.float16``) and on ``bank_device``
    (e.g. ``"cpu"`` for a GPU model: only chunks are then copied to the GPU while scoring).
    Search is exact and chunked: ``chunk_size`` bank rows at a time, keeping a running top-k;
    the k-th distance is then recomputed in float64.

    Example:
        >>> KNN(model, k=50).fit(train_loader).score(images)  # doctest: +SKIP
    """

    name = "KNN"
    needs_fit = True

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        k: int = 50,
        fraction: float = 1.0,
        chunk_size: int = 16384,
        bank_dtype: torch.dtype | None = None,
        bank_device: str | torch.device | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.k, self.fraction, self.chunk_size = k, float(fraction), int(chunk_size)
        self.bank_dtype, self.seed = bank_dtype, seed
        self.bank_device = None if bank_device is None else torch.device(bank_device)

    @staticmethod
    def _normalize(features: Tensor) -> Tensor:
        return features / torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(1e-12)

    def _fit(self, passes: Passes) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        parts = []
        for feats, _, _ in passes():
            z = self._normalize(feats.float())
            if self.fraction < 1.0:
                z = z[(torch.rand(z.shape[0], generator=gen) < self.fraction).to(z.device)]
            parts.append(z.to(self.bank_device or z.device, self.bank_dtype or z.dtype))
        bank = torch.cat(parts) if parts else torch.empty(0)
        if bank.shape[0] < self.k:
            raise ValueError(f"k={self.k} exceeds the {bank.shape[0]} samples kept in the bank")
        self.bank = bank

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        q = self._normalize(features.float())
        bank = self.bank  # may live elsewhere (bank_device): only chunks travel
        best = q.new_full((q.shape[0], 0), -2.0)
        best_idx = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for start in range(0, bank.shape[0], self.chunk_size):
            sims = q @ bank[start : start + self.chunk_size].to(q.device, q.dtype).T
            idx = torch.arange(start, start + sims.shape[1], device=q.device).expand_as(sims)
            best, pos = torch.cat([best, sims], 1).topk(min(self.k, best.shape[1] + sims.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx], 1).gather(1, pos)
        kth = bank[best_idx[:, -1].to(bank.device)].to(q.device, torch.float64)
        return -torch.linalg.vector_norm(q.double() - kth, dim=1)

    def _params(self) -> dict[str, Any]:
        return {"k": self.k, "fraction": self.fraction}


class ViM(OutputScorer):
    """Virtual-logit matching (Wang et al., CVPR 2022): Energy minus ``alpha`` times the norm of
    the feature's residual outside the ``dim``-dimensional principal space of ID features.

    Features are centred at ``u = -pinv(W) b``; the principal space is spanned by the top ``dim``
    eigenvectors of the second moment of ``h - u`` (the paper's
    ``EmpiricalCovariance(assume_centered=True)``); ``alpha`` = mean max logit / mean residual
    norm on the fit data. ``dim`` defaults to the paper's choices: 1000 for D >= 2048, 512 for
    D >= 768, else D // 2. ``fit`` reads the data twice (statistics, then ``alpha``), streaming
    in float64.

    Example:
        >>> ViM(model).fit(train_loader).score(images)  # doctest: +SKIP
    """

    name = "ViM"
    needs_fit = True
    fit_passes = 2

    def __init__(self, model: nn.Module | ModelAdapter, dim: int | None = None) -> None:
        super().__init__(model)
        d = self.adapter.num_features
        if dim is None:
            dim = 1000 if d >= 2048 else 512 if d >= 768 else d // 2
        if not isinstance(dim, int) or not 0 < dim < d:
            raise ValueError(f"dim must be an int in (0, {d}) for {d}-dimensional features, got {dim!r}")
        self.dim = dim
        w, b = self.adapter.fc_weight.detach().double().cpu(), self.adapter.fc_bias
        # the origin where all logits are zero; without a bias it is 0
        self.origin = torch.zeros(d, dtype=torch.float64)
        if b is not None:
            self.origin = -(torch.linalg.pinv(w) @ b.detach().double().cpu())

    def _fit(self, passes: Passes) -> None:
        second, n = None, 0  # float64, on the device of the features
        for feats, _, _ in passes():
            x = feats.double() - self.origin.to(feats.device)
            if second is None:
                second = x.T @ x
            else:
                second += x.T @ x
            n += x.shape[0]
        if second is None or n == 0:
            raise ValueError("ViM.fit got no samples")
        d = self.adapter.num_features
        _, vecs = torch.linalg.eigh(second / n)  # ascending eigenvalues
        self.residual = vecs[:, : d - self.dim].contiguous()
        max_logit = norm = 0.0
        for feats, logits, _ in passes():
            max_logit += float(logits.double().amax(dim=1).sum())
            norm += float(self._residual_norm(feats).sum())
        if norm == 0.0:
            raise ValueError("the ID features have no residual outside the principal space; lower dim")
        self.alpha = max_logit / norm

    def _residual_norm(self, features: Tensor) -> Tensor:
        origin, residual = self.origin.to(features.device), self.residual.to(features.device)
        return torch.linalg.vector_norm((features.double() - origin) @ residual, dim=1)

    def _from_outputs(self, features: Tensor, logits: Tensor) -> Tensor:
        return S.energy(logits.double()) - self.alpha * self._residual_norm(features)

    def _params(self) -> dict[str, Any]:
        return {"dim": self.dim}
