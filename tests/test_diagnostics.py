"""samnorm.diagnostics.quantities: each quantity against a direct per-sample float64 computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from torch import nn

from samnorm.diagnostics import (
    collect,
    collect_sets,
    fc_grad_norm,
    histograms,
    overlap_coefficient,
    per_sample_quantities,
    summarize,
)

torch.set_num_threads(1)


def _autograd_fc_norms(h, fc, target, labels, p, include_bias, temperature):
    """Reference: one backward per sample through the head, float64, norm of the flattened gradient."""
    norms = []
    for i in range(h.shape[0]):
        fc.zero_grad()
        z = fc(h[i : i + 1]) / temperature
        logq = torch.log_softmax(z, dim=1)
        if isinstance(target, torch.Tensor) and target.dim() == 2:
            loss = -(target[i : i + 1] * logq).sum()
        elif target == "uniform":
            loss = -logq.mean()
        else:
            y = labels[i : i + 1] if target == "label" else z.argmax(1)
            loss = F.nll_loss(logq, y)
        loss.backward()
        parts = [fc.weight.grad.flatten()]
        if include_bias and fc.bias is not None:
            parts.append(fc.bias.grad.flatten())
        norms.append(torch.linalg.vector_norm(torch.cat(parts), ord=p))
    return torch.stack(norms)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    dim=st.integers(1, 7),
    classes=st.integers(1, 6),
    target=st.sampled_from(["label", "pred", "uniform", "soft"]),
    p=st.sampled_from([1.0, 2.0, 3.0, math.inf]),
    include_bias=st.booleans(),
    has_bias=st.booleans(),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_fc_grad_norm_matches_per_sample_autograd(
    batch, dim, classes, target, p, include_bias, has_bias, temperature, seed
):
    gen = torch.Generator().manual_seed(seed)
    fc = nn.Linear(dim, classes, bias=has_bias).double()
    with torch.no_grad():
        fc.weight.copy_(torch.randn(classes, dim, generator=gen, dtype=torch.float64))
        if has_bias:
            fc.bias.copy_(torch.randn(classes, generator=gen, dtype=torch.float64))
    h = 3 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    if target == "soft":
        target = torch.softmax(torch.randn(batch, classes, generator=gen, dtype=torch.float64), 1)
    got = fc_grad_norm(h, fc, target=target, labels=labels, p=p, include_bias=include_bias, temperature=temperature)
    want = _autograd_fc_norms(h, fc, target, labels, p, include_bias, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradnorm_settings_reproduce_the_original_batch_size_one_recipe():
    # GradNorm (Huang et al. 2021): KL(uniform || softmax), L1 norm of the weight gradient only.
    torch.manual_seed(0)
    fc = nn.Linear(8, 5).double()
    h = torch.randn(4, 8, dtype=torch.float64)
    want = []
    for i in range(4):
        fc.zero_grad()
        targets = torch.ones(1, 5, dtype=torch.float64) / 5
        torch.mean(torch.sum(-targets * torch.log_softmax(fc(h[i : i + 1]), -1), -1)).backward()
        want.append(fc.weight.grad.abs().sum())
    got = fc_grad_norm(h, fc, target="uniform", p=1, include_bias=False)
    torch.testing.assert_close(got, torch.stack(want))


def test_conv1x1_head_and_index_target_agree_with_linear_and_label():
    torch.manual_seed(1)
    fc = nn.Linear(6, 4)
    conv = nn.Conv2d(6, 4, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(fc.weight[:, :, None, None])
        conv.bias.copy_(fc.bias)
    h, y = torch.randn(5, 6), torch.tensor([0, 3, 1, 2, 0])
    by_label = fc_grad_norm(h, fc, target="label", labels=y)
    torch.testing.assert_close(fc_grad_norm(h, conv, target="label", labels=y), by_label)
    torch.testing.assert_close(fc_grad_norm(h, fc, target=y), by_label)


def test_low_precision_heads_are_measured_in_float32():
    torch.manual_seed(2)
    fc = nn.Linear(6, 4).bfloat16()
    h = torch.randn(5, 6).bfloat16()
    got = fc_grad_norm(h, fc, target="uniform", p=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fc_grad_norm(h.float(), fc.float(), target="uniform", p=1))


def test_fc_grad_norm_rejects_bad_input():
    fc = nn.Linear(3, 2)
    h = torch.randn(4, 3)
    with pytest.raises(ValueError, match="needs labels"):
        fc_grad_norm(h, fc, target="label")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        fc_grad_norm(h, fc, target="label", labels=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="D=5"):
        fc_grad_norm(torch.randn(4, 5), fc)
    with pytest.raises(ValueError, match="p must be"):
        fc_grad_norm(h, fc, p=0.5)
    with pytest.raises(ValueError, match="target must be"):
        fc_grad_norm(h, fc, target="softmax")
    with pytest.raises(ValueError, match="temperature"):
        fc_grad_norm(h, fc, temperature=0.0)
    with pytest.raises(TypeError, match="1x1"):
        fc_grad_norm(h, nn.Conv2d(3, 2, 3))
    with pytest.raises(TypeError, match="linear layer"):
        fc_grad_norm(h, nn.ReLU())


def _overlap_loop(a, b, bins):
    """Reference: membership by explicit comparisons with the edges, last bin closed on the right."""
    edges = np.linspace(min(min(a), min(b)), max(max(a), max(b)), bins + 1)
    if edges[0] == edges[-1]:
        return 1.0

    def frac(xs, k):
        inside = [x for x in xs if edges[k] <= x < edges[k + 1] or (k == bins - 1 and x == edges[-1])]
        return len(inside) / len(xs)

    return sum(min(frac(a, k), frac(b, k)) for k in range(bins))


finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=30), st.lists(finite, min_size=1, max_size=30), st.integers(1, 12))
def test_overlap_coefficient_matches_loop_and_is_symmetric(a, b, bins):
    got = overlap_coefficient(a, b, bins=bins)
    assert got == pytest.approx(_overlap_loop(a, b, bins), abs=1e-12)
    assert got == pytest.approx(overlap_coefficient(b, a, bins=bins), abs=1e-12)
    assert 0.0 <= got <= 1.0 + 1e-12
    assert overlap_coefficient(a, a, bins=bins) == pytest.approx(1.0)


def test_overlap_coefficient_estimates_the_normal_overlap():
    # two unit-variance normals d apart overlap by 2 * Phi(-d / 2)
    rng = np.random.default_rng(0)
    d = 1.5
    a, b = rng.normal(0, 1, 200_000), rng.normal(d, 1, 200_000)
    want = 2 * 0.5 * math.erfc(d / 2 / math.sqrt(2))
    assert overlap_coefficient(a, b, bins=100) == pytest.approx(want, abs=0.01)
    assert overlap_coefficient([0.0, 1.0], [5.0, 6.0], bins=10) == 0.0


def test_overlap_and_histograms_reject_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        overlap_coefficient([0.0, float("nan")], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        overlap_coefficient([], [1.0])
    with pytest.raises(ValueError, match="bins"):
        histograms({"a": [1.0]}, bins=0)


def test_histograms_share_edges_and_count_everything():
    rng = np.random.default_rng(1)
    values = {"ID": rng.normal(size=50), "far": rng.normal(5, 1, size=30)}
    h = histograms(values, bins=7)
    edges = np.asarray(h["edges"])
    assert edges.size == 8 and edges[0] == min(v.min() for v in values.values())
    for name, v in values.items():
        assert h["counts"][name] == np.histogram(v, edges)[0].tolist()
        assert sum(h["counts"][name]) == v.size


def test_summarize_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    results = {
        "ID": {"s": rng.integers(0, 5, 40).astype(float)},
        "a": {"s": rng.integers(0, 4, 30).astype(float)},
        "b": {"s": rng.integers(1, 6, 20).astype(float)},
    }
    summary = summarize(results, id_name="ID", bins=5)
    for name in ("a", "b"):
        entry = summary["s"]["sets"][name]
        y = np.r_[np.ones(40), np.zeros(results[name]["s"].size)]
        want = roc_auc_score(y, np.r_[results["ID"]["s"], results[name]["s"]])
        assert entry["auroc"] == pytest.approx(want, abs=1e-12)
        assert entry["overlap"] == overlap_coefficient(results["ID"]["s"], results[name]["s"])
        assert entry["mean"] == pytest.approx(results[name]["s"].mean())
    assert summary["s"]["sets"]["ID"]["n"] == 40
    assert len(summary["s"]["histogram"]["edges"]) == 6
    with pytest.raises(ValueError, match="id_name"):
        summarize(results, id_name="missing")
    with pytest.raises(ValueError, match="no quantity"):
        summarize({"ID": {"s": [1.0], "t": [2.0]}, "a": {"s": [0.0]}})


class _TinyAdapter:
    """Duck-typed feature/head split: features_and_logits and fc, as samnorm.ood.ModelAdapter offers."""

    def __init__(self, body: nn.Module, fc: nn.Linear):
        self.body, self.fc = body, fc

    def features_and_logits(self, x):
        feats = self.body(x)
        return feats, self.fc(feats)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh()).double()
    return _TinyAdapter(body, nn.Linear(6, 3).double())


def test_per_sample_quantities_match_full_model_autograd_and_scorers():
    adapter = _tiny_model()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    energy = lambda inp: torch.logsumexp(adapter.features_and_logits(inp)[1], 1)  # noqa: E731

    class Msp:
        def score(self, inp):
            return torch.softmax(adapter.features_and_logits(inp)[1], 1).amax(1)

    q = per_sample_quantities(adapter, x, labels=y, target="label", scorers={"energy": energy, "msp": Msp()})
    # reference: one backward per sample through the whole model, gradient of the FC layer only
    want = []
    for i in range(5):
        adapter.fc.zero_grad()
        F.cross_entropy(adapter.features_and_logits(x[i : i + 1])[1], y[i : i + 1]).backward()
        want.append(torch.cat([adapter.fc.weight.grad.flatten(), adapter.fc.bias.grad]).norm())
    torch.testing.assert_close(q["grad_norm"], torch.stack(want).float())
    logits = adapter.features_and_logits(x)[1]
    torch.testing.assert_close(q["max_logit"], logits.amax(1).float())
    torch.testing.assert_close(q["energy"], torch.logsumexp(logits, 1).detach().float())
    assert set(q) == {"grad_norm", "max_logit", "energy", "msp"}
    with pytest.raises(ValueError, match="clash"):
        per_sample_quantities(adapter, x, scorers={"max_logit": energy})
    with pytest.raises(ValueError, match="expected \\(5,\\)"):
        per_sample_quantities(adapter, x, scorers={"bad": lambda inp: torch.zeros(2)})


def test_collect_concatenates_batches_and_respects_max_samples():
    adapter = _tiny_model(1)
    data = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    labels = torch.arange(10) % 3
    loader = [(data[i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)]
    full = collect(adapter, loader, target="label")
    whole = per_sample_quantities(adapter, data, labels=labels, target="label")
    for name in ("grad_norm", "max_logit"):
        np.testing.assert_allclose(full[name], whole[name].numpy(), rtol=1e-6)
    assert collect(adapter, loader, max_samples=6)["max_logit"].shape == (6,)
    assert collect(adapter, [data[:3]])["grad_norm"].shape == (3,)  # bare image batches are fine
    with pytest.raises(ValueError, match="no samples"):
        collect(adapter, [])
    with pytest.raises(TypeError, match="image tensors"):
        collect(adapter, [[1, 2]])


def test_collect_sets_uses_predictions_for_ood_when_target_is_label():
    adapter = _tiny_model(2)
    id_loader = [(torch.randn(6, 3, 2, 2, dtype=torch.float64), torch.arange(6) % 3)]
    # an ImageFolder of OOD images has arbitrary "labels" (here out of range): they must not be used
    ood_loader = [(torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.full((4,), 99))]
    results = collect_sets(adapter, id_loader, {"noise": ood_loader}, target="label")
    assert set(results) == {"ID", "noise"}
    pred = collect(adapter, ood_loader, target="pred")
    np.testing.assert_array_equal(results["noise"]["grad_norm"], pred["grad_norm"])
    with pytest.raises(ValueError, match="clashes"):
        collect_sets(adapter, id_loader, {"ID": ood_loader})
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        collect(adapter, ood_loader, target="label")


class _TinyResNet(nn.Module):
    """torchvision-ResNet-shaped (conv1, bn1, relu, maxpool, layer1-4, avgpool, fc), for ModelAdapter."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(2)
        block = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())  # noqa: E731
        self.layer1, self.layer2, self.layer3, self.layer4 = block(), block(), block(), block()
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(torch.flatten(self.avgpool(h), 1))


def test_collect_through_model_adapter_matches_autograd_and_restores_mode():
    torch.manual_seed(4)
    model = _TinyResNet().double().train()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    got = collect(model, [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(2))], target="uniform", p=1, include_bias=False)
    assert model.training
    model.eval()
    want = []
    for i in range(6):  # GradNorm's original loop: batch size 1, L1 norm of the FC weight gradient
        model.zero_grad()
        (-torch.log_softmax(model(x[i : i + 1]), 1).mean()).backward()
        want.append(model.fc.weight.grad.abs().sum().item())
    np.testing.assert_allclose(got["grad_norm"], want, rtol=1e-6)
    np.testing.assert_allclose(got["max_logit"], model(x).amax(1).detach().numpy(), rtol=1e-6)


def test_gradnorm_settings_agree_with_the_ood_toolkits_scorer():
    from samnorm.ood.detectors import make_scorer

    torch.manual_seed(5)
    model = _TinyResNet().double().eval()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    scorers = {name: make_scorer(name, model) for name in ("gradnorm", "energy")}
    got = collect(model, [x], scorers=scorers, target="uniform", p=1, include_bias=False)
    np.testing.assert_allclose(got["grad_norm"], got["gradnorm"], rtol=1e-6)
    np.testing.assert_allclose(got["energy"], torch.logsumexp(model(x), 1).detach().numpy(), rtol=1e-6)


def _write_folders(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "id" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / "id" / c / f"{i}.png")
    (root / "ood").mkdir()
    for i in range(4):
        Image.fromarray(np.full((30, 30), 60 * i, dtype=np.uint8)).save(root / "ood" / f"{i}.png")
    (root / "ood" / "broken.png").write_bytes(b"not an image")


def _checkpoint(path, seed):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    kwargs = {"img_size": 32, "num_classes": 3}
    torch.save({"model_name": "test_vit", "model_kwargs": kwargs, "model": model.state_dict()}, path)


def test_diagnose_command_writes_figures_and_json(tmp_path, capsys):
    import json

    from samnorm.cli import main

    _write_folders(tmp_path)
    _checkpoint(tmp_path / "after.pth", 0)
    _checkpoint(tmp_path / "before.pth", 1)
    out = tmp_path / "out"
    argv = [
        "diagnose",
        "--checkpoint",
        str(tmp_path / "after.pth"),
        "--baseline",
        str(tmp_path / "before.pth"),
        "--id",
        str(tmp_path / "id"),
        "--ood",
        f"flat grey={tmp_path / 'ood'}",
        "--scorers",
        "energy,max_logit",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--max-images",
        "8",
        "--theory",
        "3",
        "--theory-iters",
        "3",
        "--dpi",
        "30",
        "--output",
        str(out),
    ]
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ood_names"] == ["flat grey"] and set(summary["theory"]) == {"after", "before"}
    assert summary["theory"]["after"]["images"] == 3
    assert summary["meta"]["skipped_images"]["flat grey"] == 1
    for stage in ("after", "before"):
        assert set(summary[stage]) == {"grad_norm", "max_logit", "Energy"}  # MaxLogit is max_logit
        assert summary[stage]["Energy"]["sets"]["ID"]["n"] == 8  # the --max-images subset
    values = np.load(out / "values.npz")
    energy = {s: values[f"after/{s}/Energy"] for s in ("ID", "flat grey")}
    assert summary["after"]["Energy"]["sets"]["flat grey"]["auroc"] == pytest.approx(
        roc_auc_score(np.r_[np.ones(8), np.zeros(5)], np.r_[energy["ID"], energy["flat grey"]])
    )
    for name in ("summary.png", "Energy.png", "grad_norm_max_logit_flat_grey.png"):
        assert (out / name).stat().st_size > 0 and name in summary["files"]
    # bad input: one clear line, exit status 2
    capsys.readouterr()
    assert main([*argv[:5], "--id", str(tmp_path / "missing"), "--ood", f"x={tmp_path / 'ood'}", "--output", "o"]) == 2
    assert "samnorm diagnose: error: image folder" in capsys.readouterr().err
    assert main([*argv, "--scorers", "mahalanobis"]) == 2
    assert "--fit" in capsys.readouterr().err


def test_diagnose_gives_every_ood_set_its_own_files(tmp_path):
    from samnorm.diagnostics.cli import write_report

    r = {
        "ID": {"grad_norm": np.array([1.0, 2.0]), "max_logit": np.array([3.0, 4.0])},
        "a/b": {"grad_norm": np.array([0.5, 0.6]), "max_logit": np.array([1.0, 1.5])},
        "a_b": {"grad_norm": np.array([0.7, 0.2]), "max_logit": np.array([2.0, 0.5])},
    }
    files = write_report(r, tmp_path, dpi=20)["files"]
    pair = [f for f in files if f.startswith("grad_norm_max_logit_")]
    assert len(pair) == 2 and len(set(pair)) == 2 and all((tmp_path / f).exists() for f in pair)
