"""Benchmarks of the OOD toolkit, each against a baseline run side by side (same group).

Run: ``python -m pytest benchmarks/bench_ood.py --benchmark-only -q`` (add
``--benchmark-json=out.json`` for the figures). Threads: ``SAMNORM_BENCH_THREADS`` (default 1,
so figures do not depend on a shared machine's load).

- metrics: all four metrics on 10^6 ID + 10^6 OOD float32 scores, samnorm vs scikit-learn;
- rankfeat: rank-1 removal on BiT-size block-4 maps (32 x 2048 x 15 x 15) by full SVD, by
  samnorm's seeded power iteration (20 steps), and by the official alternating power iteration;
  ``extra_info`` holds the score and AUROC differences to the SVD;
- harness: ``evaluate`` with five scorers sharing one forward pass (MSP, MaxLogit, Energy, ReAct,
  GradNorm) on a BiT ResNetv2-50 (random weights, 96 px) vs bare forward passes over the same
  loaders.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from samnorm import ood

torch.set_num_threads(int(os.environ.get("SAMNORM_BENCH_THREADS", "1")))

N_SCORES = 10**6


# ---------------------------------------------------------------------------- metrics
@pytest.fixture(scope="module")
def score_sets():
    rng = np.random.default_rng(0)
    # float32 like real scorer outputs: ~2e6 draws of float32 give many exact ties
    id_scores = rng.normal(1.0, 1.0, N_SCORES).astype(np.float32)
    ood_scores = rng.normal(0.0, 1.0, N_SCORES).astype(np.float32)
    labels = np.r_[np.ones(N_SCORES, np.int8), np.zeros(N_SCORES, np.int8)]
    return id_scores, ood_scores, labels, np.r_[id_scores, ood_scores]


def _sklearn_all(labels, scores):
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    return {
        "FPR95": float(fpr[np.argmax(tpr >= 0.95)]),
        "AUROC": float(skm.roc_auc_score(labels, scores)),
        "AUPR-In": float(skm.average_precision_score(labels, scores)),
        "AUPR-Out": float(skm.average_precision_score(1 - labels, -scores)),
    }


@pytest.mark.parametrize("impl", ["samnorm", "sklearn"])
def test_all_metrics(benchmark, score_sets, impl):
    id_scores, ood_scores, labels, scores = score_sets
    benchmark.group = "metrics: FPR95 + AUROC + AUPR-In + AUPR-Out, 1e6 ID + 1e6 OOD"
    if impl == "samnorm":
        got = benchmark.pedantic(lambda: ood.ood_metrics(id_scores, ood_scores).as_dict(), rounds=5)
        want = _sklearn_all(labels, scores)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-9)
    else:
        benchmark.pedantic(lambda: _sklearn_all(labels, scores), rounds=5)


@pytest.mark.parametrize("impl", ["samnorm", "sklearn"])
def test_auroc(benchmark, score_sets, impl):
    id_scores, ood_scores, labels, scores = score_sets
    benchmark.group = "metrics: AUROC alone, 1e6 ID + 1e6 OOD"
    if impl == "samnorm":
        benchmark.pedantic(lambda: ood.auroc(id_scores, ood_scores), rounds=5)
    else:
        benchmark.pedantic(lambda: skm.roc_auc_score(labels, scores), rounds=5)


# ---------------------------------------------------------------------------- RankFeat
def _official_power_removal(x, iters=20):
    """RankFeat repository's ``power_iteration`` (alternating u/v updates), made deterministic."""
    a = x.flatten(2)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(1, 1, a.shape[1], generator=gen).repeat(a.shape[0], 1, 1)
    v = torch.randn(1, a.shape[2], 1, generator=gen).repeat(a.shape[0], 1, 1)
    for _ in range(iters):
        v = torch.nn.functional.normalize(u.bmm(a), dim=2, eps=1e-10).transpose(1, 2)
        u = torch.nn.functional.normalize(a.bmm(v).transpose(1, 2), dim=2, eps=1e-10)
    sigma = u.bmm(a.bmm(v))
    return (a - sigma * u.transpose(1, 2).bmm(v.transpose(1, 2))).view_as(x)


REMOVALS = {
    "svd": lambda x: ood.remove_rank1(x, "svd"),
    "power": lambda x: ood.remove_rank1(x, "power", iters=20),
    "power_official": _official_power_removal,
}


@pytest.fixture(scope="module")
def feature_maps():
    """Synthetic block-4 maps, 4 batches of 32 ID and 4 of 32 OOD (2048 x 15 x 15).

    Each map is ``g a b^T + h c d^T + noise`` with non-negative channel profiles ``a, c``, a
    smooth spatial profile ``b`` and ``h / g`` in [0.2, 0.7]: a dominant but not overwhelming
    top singular value (s2 / s1 between about 0.15 and 0.45, recorded as ``gap_ratio_*``), the
    regime where power iteration is slowest to converge. OOD maps get a larger ``g``. The head
    is a fixed random 1000 x 2048 linear layer after global average pooling.
    """
    gen = torch.Generator().manual_seed(0)

    def maps(lo, hi, n=32):
        a, c = (torch.randn(n, 2048, 1, generator=gen).abs() for _ in range(2))
        b = 1.0 + 0.3 * torch.randn(n, 1, 225, generator=gen)
        d = torch.randn(n, 1, 225, generator=gen)
        g = lo + (hi - lo) * torch.rand(n, 1, 1, generator=gen)
        h = g * (0.2 + 0.5 * torch.rand(n, 1, 1, generator=gen))
        noise = 0.02 * torch.randn(n, 2048, 225, generator=gen)
        return ((g * a @ b + h * c @ d) / 15 + noise).view(n, 2048, 15, 15)

    head = torch.nn.Linear(2048, 1000)
    torch.nn.init.normal_(head.weight, std=0.05, generator=gen)
    torch.nn.init.zeros_(head.bias)
    return [maps(0.5, 1.5) for _ in range(4)], [maps(1.0, 2.0) for _ in range(4)], head


def _energy_after(removal, batch, head):
    with torch.no_grad():
        return ood.energy(head(removal(batch).mean(dim=(2, 3))))


@pytest.mark.parametrize("impl", sorted(REMOVALS))
def test_rankfeat_removal(benchmark, feature_maps, impl):
    id_maps, ood_maps, head = feature_maps
    benchmark.group = "rankfeat: rank-1 removal, 32 x 2048 x 15 x 15"
    benchmark.pedantic(REMOVALS[impl], args=(id_maps[0],), rounds=5)
    if impl != "svd":
        scores = {
            m: [torch.cat([_energy_after(REMOVALS[m], b, head) for b in s]) for s in (id_maps, ood_maps)]
            for m in ("svd", impl)
        }
        ratios = torch.cat(
            [(sv[:, 1] / sv[:, 0]) for sv in (torch.linalg.svdvals(m.flatten(2)) for m in id_maps + ood_maps)]
        )
        benchmark.extra_info.update(
            gap_ratio_median=float(ratios.median()),
            gap_ratio_max=float(ratios.max()),
            max_abs_score_diff=float(max((a - b).abs().max() for a, b in zip(scores["svd"], scores[impl]))),
            auroc_svd=ood.auroc(*scores["svd"]),
            auroc_diff=abs(ood.auroc(*scores["svd"]) - ood.auroc(*scores[impl])),
        )
        assert benchmark.extra_info["auroc_diff"] < 0.002


# ---------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def harness_setup():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50x1_bit", num_classes=100).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(32, 3, 96, 96, generator=gen), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    train = (torch.rand(32, 3, 96, 96, generator=gen), torch.arange(32) % 100)
    react = ood.ReAct(model).fit(train)
    return model, batches, react


@pytest.mark.parametrize("impl", ["evaluate", "forward_only"])
def test_harness_throughput(benchmark, harness_setup, impl):
    model, batches, react = harness_setup
    benchmark.group = "harness: 2 x 64 images 96 px, BiT ResNetv2-50, 5 scorers"
    n_images = 2 * sum(len(x) for x, _ in batches)
    if impl == "evaluate":
        scorers = ["msp", "max_logit", "energy", react, "gradnorm"]
        run = lambda: ood.evaluate(model, batches, {"ood": batches}, scorers)  # noqa: E731
    else:

        def run():
            with torch.no_grad():
                for _ in range(2):
                    for x, _ in batches:
                        model(x)

    benchmark.pedantic(run, rounds=4)
    benchmark.extra_info["images_per_second"] = n_images / benchmark.stats.stats.min
