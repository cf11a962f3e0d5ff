"""Model adapter and scorers against plain-loop / float64 references and against pytorch-ood.

Tiny models: a 4-stage timm ResNetV2 (BiT layout: StdConv2d + GroupNormAct, 1x1-conv head), a
2-block timm ViT, and a 2-block samnorm T2T-ViT.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import images, tiny_resnetv2
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from samnorm import ood
from samnorm.ood.detectors.react import _Reservoir

timm = pytest.importorskip("timm")
pood = pytest.importorskip("pytorch_ood.detector")


# ---------------------------------------------------------------------------- tiny models
def tiny_vit(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=num_classes).eval()


def tiny_t2t() -> nn.Module:
    from samnorm.models.t2t_vit import T2TViT

    torch.manual_seed(0)
    return T2TViT(img_size=32, embed_dim=48, depth=2, num_heads=4, num_classes=10).eval()


MODELS = {"resnetv2": (tiny_resnetv2, 64), "vit": (tiny_vit, 32), "t2t": (tiny_t2t, 32)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_x(request):
    build, size = MODELS[request.param]
    return build(), images(12, size)


@pytest.fixture(scope="module")
def resnet():
    return tiny_resnetv2()


# ---------------------------------------------------------------------------- adapter
def test_adapter_reproduces_every_supported_model(model_and_x):
    model, x = model_and_x
    adapter = ood.ModelAdapter.from_model(model)
    adapter.verify(x)
    feats, logits = adapter.features_and_logits(x)
    assert feats.shape == (12, adapter.num_features) and logits.shape == (12, adapter.num_classes)
    torch.testing.assert_close(adapter.head(feats), model(x), rtol=1e-4, atol=1e-5)
    # pool(blocks(embed(x))) is the pre-logits feature of the model's own forward_head
    torch.testing.assert_close(feats, model.forward_head(model.forward_features(x), pre_logits=True))


def test_adapter_on_torchvision_resnet_and_fc_weight_is_a_differentiable_view():
    tv = pytest.importorskip("torchvision")
    net = tv.models.resnet18(num_classes=7).eval()
    adapter = ood.ModelAdapter.from_model(net)
    adapter.verify(images(2, 32))
    assert adapter.name == "resnet" and adapter.fc is net.fc
    conv_adapter = ood.ModelAdapter.from_model(tiny_resnetv2())
    assert isinstance(conv_adapter.fc, nn.Conv2d) and conv_adapter.fc_weight.shape == (10, 128)
    conv_adapter.head(torch.ones(1, 128)).sum().backward()
    assert conv_adapter.fc.weight.grad is not None


def test_custom_adapter_is_checked_and_unknown_models_are_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    good = ood.ModelAdapter(net, embed=nn.Flatten(), blocks=[net[1:3]], pool=lambda h: h, fc=net[3])
    good.verify(torch.rand(2, 3, 2, 2))
    wrong = ood.ModelAdapter(net, embed=nn.Flatten(), blocks=[net[1]], pool=lambda h: h, fc=net[3])
    with pytest.raises(ValueError, match="does not reproduce"):
        wrong.verify(torch.rand(2, 3, 2, 2))
    with pytest.raises(TypeError, match="cannot split"):
        ood.ModelAdapter.from_model(net)
    with pytest.raises(TypeError, match=r"nn.Linear or a 1x1"):
        ood.ModelAdapter(net, embed=nn.Flatten(), blocks=[net[1]], pool=lambda h: h, fc=nn.Identity())
    with pytest.raises(ValueError, match="block index"):
        good.block_index(1)


def test_adapter_looks_through_data_parallel_and_compile_wrappers(resnet):
    assert ood.ModelAdapter.from_model(nn.DataParallel(resnet)).model is resnet
    assert ood.ModelAdapter.from_model(torch.compile(resnet)).model is resnet


# ---------------------------------------------------------------------------- logit scorers
def test_logit_scorers_match_formulas_and_pytorch_ood(model_and_x):
    model, x = model_and_x
    with torch.no_grad():
        logits = model(x)
    pairs = [
        (ood.MSP(model), ood.scores.msp(logits), pood.MaxSoftmax(model)),
        (ood.MaxLogit(model), ood.scores.max_logit(logits), pood.MaxLogit(model)),
        (ood.Energy(model), ood.scores.energy(logits), pood.EnergyBased(model)),
        (ood.ODIN(model), ood.scores.msp(logits, 1000.0), pood.ODIN(model, eps=0.0)),
    ]
    for scorer, want, peer in pairs:
        got = scorer.score(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, -peer.predict(x).detach(), rtol=1e-4, atol=1e-5)


def test_odin_scorer_with_perturbation_matches_the_function(resnet):
    x = images(4, 64)
    got = ood.ODIN(resnet, temperature=1000.0, epsilon=0.002).score(x)
    torch.testing.assert_close(got, ood.odin(resnet, x, temperature=1000.0, epsilon=0.002))
    with pytest.raises(TypeError, match="score\\(inputs\\)"):
        ood.ODIN(resnet, epsilon=0.002).score_outputs(torch.ones(1, 128), torch.ones(1, 10))


# ---------------------------------------------------------------------------- GradNorm
def _gradnorm_loop(model, fc_weight, x, temperature=1.0):
    """The paper's code: batch size 1, loss = CE to the uniform distribution, L1 of dL/dW."""
    out = []
    for xi in x:
        model.zero_grad()
        logits = model(xi[None]) / temperature
        (-torch.log_softmax(logits, dim=1).mean()).backward()
        out.append(fc_weight.grad.abs().sum().item())
    return torch.tensor(out)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_closed_form_matches_per_sample_autograd(model_and_x, temperature):
    model, x = model_and_x
    adapter = ood.ModelAdapter.from_model(model)
    scorer = ood.GradNorm(model, temperature=temperature)
    want = _gradnorm_loop(model, adapter.fc.weight, x[:4], temperature)
    torch.testing.assert_close(scorer.score(x[:4]), want, rtol=1e-4, atol=1e-6)
    # batch-size invariance
    whole = scorer.score(x)
    torch.testing.assert_close(
        torch.cat([scorer.score(x[i : i + 5]) for i in range(0, 12, 5)]), whole, rtol=1e-5, atol=1e-6
    )


def test_gradnorm_matches_pytorch_ood(resnet):
    x = images(4, 64)
    peer = pood.GradNorm(resnet, param_filter=lambda name: name == "head.fc.weight")
    torch.testing.assert_close(ood.GradNorm(resnet).score(x), -peer.predict(x), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- ReAct
def test_react_threshold_scores_and_pytorch_ood(resnet):
    x, y = images(24, 64), torch.arange(24) % 10
    adapter = ood.ModelAdapter.from_model(resnet)
    scorer = ood.ReAct(resnet, percentile=90).fit((x, y), batch_size=7)
    with torch.no_grad():
        feats = adapter.features(x)
    assert scorer.threshold == pytest.approx(float(np.percentile(feats.numpy(), 90)))
    test = images(6, 64, seed=1)
    with torch.no_grad():
        want = ood.energy(adapter.head(adapter.features(test).clamp(max=scorer.threshold)))
    torch.testing.assert_close(scorer.score(test), want)
    peer = pood.ReAct(backbone=adapter.features, head=adapter.head, percentile=0.9).fit([(x, y)])
    assert peer.threshold == pytest.approx(scorer.threshold)
    torch.testing.assert_close(scorer.score(test), -peer.predict(test), rtol=1e-5, atol=1e-5)
    # a given threshold needs no fit
    assert ood.ReAct(resnet, threshold=1.0).score(test).shape == (6,)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 500), st.integers(1, 400))
def test_reservoir_is_exact_below_capacity_and_a_uniform_subset_above(total, capacity, batch):
    values = torch.arange(total, dtype=torch.float64)
    res = _Reservoir(capacity, seed=0)
    for start in range(0, total, batch):
        res.add(values[start : start + batch])
    sample = res.sample()
    assert sample.numel() == min(total, capacity)
    assert torch.unique(sample).numel() == sample.numel()  # without replacement
    if total <= capacity:
        torch.testing.assert_close(sample.sort().values, values)


def test_reservoir_sample_is_unbiased():
    res = _Reservoir(2000, seed=3)
    for chunk in torch.arange(100_000, dtype=torch.float64).split(3000):
        res.add(chunk)
    # mean of a uniform sample of 2000 from 0..99999: sd ~ 28867 / sqrt(2000) ~ 645
    assert abs(res.sample().mean().item() - 49_999.5) < 4 * 645


# ---------------------------------------------------------------------------- RankFeat
def _rankfeat_reference(adapter, x, blocks):
    """The official BiT code path: SVD removal at each block, continue, average logits, Energy."""
    with torch.no_grad():
        logits = []
        for b in blocks:
            h = adapter.run_blocks(adapter.embed(x), 0, b + 1)
            m = h.flatten(2)
            u, s, v = torch.linalg.svd(m, full_matrices=False)
            m = m - s[:, 0:1].unsqueeze(2) * u[:, :, 0:1].bmm(v[:, 0:1, :])
            logits.append(adapter.head(adapter.pool(adapter.run_blocks(m.view_as(h), b + 1))))
        return torch.logsumexp(sum(logits) / len(logits), dim=1)


@pytest.mark.parametrize("blocks", [-1, -2, (-2, -1)])
def test_rankfeat_matches_the_reference_and_power_iteration_matches_svd(model_and_x, blocks):
    model, x = model_and_x
    adapter = ood.ModelAdapter.from_model(model)
    indices = sorted({adapter.block_index(b) for b in ([blocks] if isinstance(blocks, int) else blocks)})
    svd = ood.RankFeat(model, blocks=blocks).score(x)
    torch.testing.assert_close(svd, _rankfeat_reference(adapter, x, indices), rtol=1e-5, atol=1e-5)
    # Power iteration's direction error shrinks like r^(2k), r = s2/s1. The precondition below
    # makes r^40 < 1e-8 at the paper's 20 steps, so what is left is float32 rounding of the Gram
    # matrix; Energy is 1-Lipschitz in the logits (max norm), hence the 1e-4 tolerance.
    with torch.no_grad():
        for b in indices:
            sv = torch.linalg.svdvals(adapter.run_blocks(adapter.embed(x), 0, b + 1).flatten(2))
            assert (sv[:, 1] / sv[:, 0]).max() < 0.65
    power = ood.RankFeat(model, blocks=blocks, method="power", iters=20)
    torch.testing.assert_close(power.score(x), svd, rtol=1e-4, atol=1e-4)
    # seeded: deterministic and independent of the batch size
    torch.testing.assert_close(torch.cat([power.score(x[:5]), power.score(x[5:])]), power.score(x))


def test_rankfeat_matches_pytorch_ood_on_block4(resnet):
    x = images(6, 64)
    a = ood.ModelAdapter.from_model(resnet)
    peer = pood.RankFeat(backbone=lambda t: a.run_blocks(a.embed(t)), head=lambda h: a.head(a.pool(h)))
    torch.testing.assert_close(ood.RankFeat(resnet).score(x), -peer.predict(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(2, 24), st.integers(2, 24), st.sampled_from([0.1, 0.5]), st.booleans())
def test_rank1_power_iteration_converges_to_svd(batch, m, n, ratio, wide):
    """Matrices with singular values 1, ratio, ratio^2...: after k steps the error is ~ratio^(2k)."""
    gen = torch.Generator().manual_seed(m * 100 + n)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(batch, m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(batch, n, k, generator=gen, dtype=torch.float64))
    s = ratio ** torch.arange(k, dtype=torch.float64)
    a = (u * s) @ v.transpose(1, 2)
    exact = s[0] * u[:, :, :1] @ v[:, :, :1].transpose(1, 2)
    torch.testing.assert_close(ood.rank1(a, "svd"), exact, atol=1e-10, rtol=0)
    iters = math.ceil(math.log(1e-12) / (2 * math.log(ratio))) + 5
    torch.testing.assert_close(ood.rank1(a, "power", iters=iters, tol=0.0), exact, atol=1e-9, rtol=0)
    # early stop at tol=1e-6: the remaining error is ~tol * r^2 / (1 - r^2) <= 1e-6 for r <= 0.5
    torch.testing.assert_close(ood.rank1(a.float(), "power", iters=iters), exact.float(), atol=1e-5, rtol=0)


def test_power_iteration_is_independent_of_batch_and_chunking(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(6, 40, 9, generator=gen)
    whole = ood.rank1(a, "power")
    torch.testing.assert_close(torch.cat([ood.rank1(a[:1], "power"), ood.rank1(a[1:], "power")]), whole)
    monkeypatch.setattr("samnorm.ood.svd._CPU_CHUNK_BYTES", 1)  # one matrix per chunk
    torch.testing.assert_close(ood.rank1(a, "power"), whole)
    torch.testing.assert_close(ood.rank1(a.transpose(1, 2), "power"), whole.transpose(1, 2))


@pytest.mark.parametrize("method", ["svd", "power"])
def test_rank1_removal_keeps_gradients_when_asked(method):
    x = torch.rand(3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    edited = ood.remove_rank1(x, method)
    edited.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(edited, ood.remove_rank1(x, method))


def test_rankfeat_bad_arguments():
    model = tiny_resnetv2()
    with pytest.raises(ValueError, match="method"):
        ood.RankFeat(model, method="lanczos")
    with pytest.raises(ValueError, match="iters"):
        ood.RankFeat(model, method="power", iters=0)
    with pytest.raises(ValueError, match="tol"):
        ood.RankFeat(model, method="power", tol=-1.0)
    with pytest.raises(ValueError, match="twice"):
        ood.RankFeat(model, blocks=(3, -1))
    with pytest.raises(ValueError, match="block index"):
        ood.RankFeat(model, blocks=4)
    with pytest.raises(ValueError, match="feature map"):
        ood.remove_rank1(torch.ones(2, 3))


# ---------------------------------------------------------------------------- RankWeight
@pytest.mark.parametrize(
    "build, size, layer", [(tiny_resnetv2, 64, "stages.3.blocks.0.conv3"), (tiny_vit, 32, "blocks.1.mlp.fc2")]
)
def test_rankweight_edits_one_layer_of_a_copy(build, size, layer):
    model, x = build(), images(5, size)
    before = copy.deepcopy(model.state_dict())
    scorer = ood.RankWeight(model)
    assert scorer.layer == layer
    for key, value in model.state_dict().items():  # the original is untouched
        torch.testing.assert_close(value, before[key])
    w_old = model.get_submodule(layer).weight.detach().double().flatten(1)
    w_new = scorer.model.get_submodule(layer).weight.detach().double().flatten(1)
    s_old, s_new = torch.linalg.svdvals(w_old), torch.linalg.svdvals(w_new)
    torch.testing.assert_close(s_new[0], s_old[1], rtol=1e-5, atol=1e-6)  # only s1 was removed
    torch.testing.assert_close(s_new[1:-1], s_old[2:], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(scorer.score(x), ood.energy(scorer.model(x)))


def test_rankweight_with_react_needs_fit():
    model = tiny_resnetv2()
    scorer = ood.RankWeight(model, then=ood.ReAct)
    with pytest.raises(ood.NotFittedError, match="fit"):
        scorer.score(images(2, 64))
    scorer.fit((images(8, 64), torch.arange(8)))
    assert scorer.is_fitted and scorer.score(images(2, 64)).shape == (2,)
    with pytest.raises(ValueError, match="not a module"):
        ood.RankWeight(model, layer="stages.9")


# ---------------------------------------------------------------------------- feature statistics
@pytest.fixture(scope="module")
def feature_data():
    """Penultimate features of a tiny ResNetV2 on 3 x 100 ID images, labels, and test features.

    Uniform-noise images make the 128-D features well conditioned (covariance condition ~1e3)."""
    model = tiny_resnetv2(num_classes=3)
    adapter = ood.ModelAdapter.from_model(model)
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    x = torch.rand(300, 3, 32, 32, generator=gen) + 0.3 * labels.view(-1, 1, 1, 1)
    with torch.no_grad():
        train, test = adapter.features(x), adapter.features(images(10, 32, seed=5))
    return model, x, labels, train, test


def test_mahalanobis_matches_float64_reference_and_pytorch_ood(feature_data):
    model, x, labels, train, test = feature_data
    scorer = ood.Mahalanobis(model, jitter=1e-9).fit((x, labels), batch_size=17)
    f, t = train.double().numpy(), test.double().numpy()
    means = np.stack([f[labels.numpy() == c].mean(0) for c in range(3)])
    centred = f - means[labels.numpy()]
    cov = centred.T @ centred / len(f)
    cov += np.eye(len(cov)) * 1e-9 * np.trace(cov) / len(cov)
    prec = np.linalg.inv(cov)
    dist = np.stack([np.einsum("bi,ij,bj->b", t - mu, prec, t - mu) for mu in means], 1)
    got = scorer.score(images(10, 32, seed=5))
    np.testing.assert_allclose(got.numpy(), -dist.min(1), rtol=1e-6)
    # fitting from features in other chunk sizes gives the same statistics
    again = ood.Mahalanobis(model, jitter=1e-9).fit_features(train, labels, batch_size=50)
    torch.testing.assert_close(again.score_outputs(test, test), got)
    # pytorch-ood: unnormalised scatter + 1e-6 I, outlier score 0.5 * min distance
    peer = pood.Mahalanobis(None).fit_features(train, labels)  # float32 inside
    np.testing.assert_allclose(got.numpy(), -2 * len(f) * peer.predict_features(test).double().numpy(), rtol=1e-3)


def test_mahalanobis_needs_labels_and_ignores_absent_classes(feature_data):
    model, x, labels, train, _test = feature_data
    with pytest.raises(ValueError, match="labels"):
        ood.Mahalanobis(model).fit(x)
    with pytest.raises(ValueError, match="class indices"):
        ood.Mahalanobis(model).fit_features(train, labels + 5)
    only_two = ood.Mahalanobis(model).fit_features(train[labels < 2], labels[labels < 2])
    assert only_two.classes.tolist() == [0, 1]


def test_knn_matches_brute_force_and_pytorch_ood(feature_data):
    model, x, labels, train, test = feature_data
    norm = lambda z: z / z.norm(dim=1, keepdim=True)  # noqa: E731
    want = -torch.cdist(norm(test.double()), norm(train.double())).sort(dim=1).values[:, 9]
    for chunk in (7, 1000):
        scorer = ood.KNN(model, k=10, chunk_size=chunk).fit_features(train)
        torch.testing.assert_close(scorer.score_outputs(test, test), want, rtol=1e-6, atol=1e-6)
    scorer = ood.KNN(model, k=10).fit((x, labels), batch_size=33)
    peer = pood.KNN(None, k=10).fit_features(train, labels)
    torch.testing.assert_close(
        scorer.score(images(10, 32, seed=5)), -peer.predict_features(test).double(), rtol=1e-5, atol=1e-5
    )


def test_knn_subsampled_bank_and_errors(feature_data):
    model, _x, _labels, train, test = feature_data
    half = ood.KNN(model, k=5, fraction=0.5, seed=1).fit_features(train)
    assert 100 < half.bank.shape[0] < 200 and half.bank.dtype == torch.float32
    small = ood.KNN(model, k=5, bank_dtype=torch.float16, bank_device="cpu").fit_features(train)
    assert small.bank.dtype == torch.float16 and small.bank.device.type == "cpu"
    full = ood.KNN(model, k=5).fit_features(train)
    torch.testing.assert_close(small.score_outputs(test, test), full.score_outputs(test, test), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="exceeds"):
        ood.KNN(model, k=500).fit_features(train)
    with pytest.raises(ValueError, match="fraction"):
        ood.KNN(model, fraction=0.0)


def _vim_reference(train, test, w, b, dim):
    """The ViM paper's code (numpy, float64)."""
    u = -np.linalg.pinv(w) @ b
    x = train - u
    eig_vals, eig_vecs = np.linalg.eigh(x.T @ x / len(x))
    ns = eig_vecs[:, np.argsort(eig_vals * -1)[dim:]]
    vlogit_train = np.linalg.norm((train - u) @ ns, axis=-1)
    alpha = (train @ w.T + b).max(-1).mean() / vlogit_train.mean()
    logits = test @ w.T + b
    energy = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return energy - alpha * np.linalg.norm((test - u) @ ns, axis=-1)


def test_vim_matches_the_paper_code_and_pytorch_ood(feature_data):
    model, x, labels, train, test = feature_data
    adapter = ood.ModelAdapter.from_model(model)
    w, b = adapter.fc_weight.detach(), adapter.fc_bias.detach()
    scorer = ood.ViM(model, dim=40).fit((x, labels), batch_size=25)
    want = _vim_reference(train.double().numpy(), test.double().numpy(), w.double().numpy(), b.double().numpy(), 40)
    got = scorer.score(images(10, 32, seed=5))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    peer = pood.ViM(None, d=40, w=w, b=b).fit_features(train, labels)
    np.testing.assert_allclose(got.numpy(), -peer.predict_features(test).numpy(), rtol=1e-3, atol=1e-3)
    assert ood.ViM(model).dim == 64  # D // 2 below 768 features
    with pytest.raises(TypeError, match="one-shot"):
        ood.ViM(model, dim=40).fit(iter([(x, labels)]))
    with pytest.raises(ValueError, match="dim"):
        ood.ViM(model, dim=128)


# ---------------------------------------------------------------------------- common behaviour
@pytest.mark.parametrize("name", sorted(ood.SCORERS))
def test_every_scorer_has_the_same_shape(name, resnet):
    x, y = images(10, 64), torch.arange(10) % 2
    kwargs = {"knn": {"k": 3}}.get(name, {})
    scorer = ood.make_scorer(name, resnet, **kwargs)
    if scorer.needs_fit:
        with pytest.raises(ood.NotFittedError, match="fit"):
            scorer.score(x)
    resnet.train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert scorer.fit(loader) is scorer and scorer.is_fitted
    assert resnet.training  # restored
    scores = scorer.score_loader(loader)
    assert scores.shape == (10,) and scores.device.type == "cpu" and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, scorer.score(x).to(scores.dtype), rtol=1e-4, atol=1e-5)
    if scorer.uses_outputs:
        adapter = ood.ModelAdapter.from_model(resnet.eval())
        with torch.no_grad():
            torch.testing.assert_close(scorer.score_outputs(*adapter.features_and_logits(x)), scorer.score(x))
    resnet.eval()


def test_make_scorer_names_and_errors(resnet):
    assert isinstance(ood.make_scorer("max_logit", resnet), ood.MaxLogit)
    assert isinstance(ood.make_scorer("Rank-Feat", resnet, method="power"), ood.RankFeat)
    with pytest.raises(ValueError, match="unknown scorer"):
        ood.make_scorer("entropy", resnet)
    with pytest.raises(TypeError, match="DataLoader"):
        ood.Mahalanobis(resnet).fit(5)
    with pytest.raises(ValueError, match="D=3"):
        ood.KNN(resnet).fit_features(torch.ones(4, 3))
    # a misspelt option names the valid ones (it was a bare "unexpected keyword argument")
    with pytest.raises(ValueError, match="RankFeat has no option 'block'; its options: blocks, method"):
        ood.make_scorer("rankfeat", resnet, block=-1)
    assert ood.scorer_class("Rank_Feat") is ood.RankFeat


# ---------------------------------------------------------------------------- review regressions
@pytest.mark.parametrize("name", ["nf_resnet26", "gernet_s", "fastvit_t8", "convnext_atto"])
def test_stem_stage_families_with_a_tail_after_the_stages_score_their_own_logits(name):
    # NFNet (final_conv, final_act), ByobNet and FastViT (final_conv) have layers between the last
    # stage and the head: skipping them gave wrong scores or bare shape errors
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = images(2, 64)
    with torch.no_grad():
        want = ood.energy(model(x))
    adapter = ood.ModelAdapter.from_model(model)
    torch.testing.assert_close(ood.Energy(adapter).score(x), want, rtol=1e-5, atol=1e-5)
    assert adapter.verified  # checked on the first batch


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("deit_tiny_distilled_patch16_224", r"it overrides \[.*'forward_head'.*\] of timm.*VisionTransformer,"),
        ("eva02_tiny_patch14_224", "its class is not one whose forward pass is known"),
    ],
)
def test_unknown_classes_are_refused_by_name(name, why):
    # DeiT-distilled (a VisionTransformer subclass) has a second head (head_dist); Eva's blocks need
    # rotary embeddings: a ViT look-alike split ignores the one and crashes on the other
    model = timm.create_model(name, num_classes=5, img_size=32, patch_size=8, depth=1).eval()
    refusal = rf"{type(model).__name__} into features and head: {why}.* Build ModelAdapter\("
    with pytest.raises(TypeError, match=refusal):
        ood.ModelAdapter.from_model(model)


def test_subclasses_inherit_the_split_unless_they_override_a_method():
    base = type(tiny_resnetv2())

    class Renamed(base):  # the same forward pass: split like its base, and checked on the first batch
        pass

    class Shifted(base):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x, pre_logits) + (0 if pre_logits else 1.0)

    model = tiny_resnetv2()
    model.__class__ = Renamed
    adapter = ood.ModelAdapter.from_model(model)
    assert adapter.name == "resnetv2"
    adapter.verify(images(2, 32))
    model.__class__ = Shifted
    refusal = r"Shifted into features and head: it overrides \['forward_head'\] of timm.models.resnetv2.ResNetV2"
    with pytest.raises(TypeError, match=refusal):
        ood.ModelAdapter.from_model(model)


def test_registered_splits_are_found_along_the_mro_most_specific_first():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(self.body(x.flatten(1)))

    class Child(Net):
        pass

    class Scaled(Net):
        def forward(self, x):
            return 2 * super().forward(x)

    def split(name, scale=1.0):
        def factory(model):
            return ood.ModelAdapter(
                model, embed=nn.Flatten(), blocks=[model.body], pool=lambda h: h * scale, fc=model.fc, name=name
            )

        return factory

    with pytest.raises(TypeError, match=r"cannot split .*Net into features and head: its class is not one"):
        ood.ModelAdapter.from_model(Net())
    assert ood.ModelAdapter.register(Net)(split("net")) is not None
    x = torch.rand(4, 6)
    for cls in (Net, Child):
        adapter = ood.ModelAdapter.from_model(cls().eval())
        assert adapter.name == "net"
        adapter.verify(x)
    with pytest.raises(TypeError, match=r"overrides \['forward'\]"):
        ood.ModelAdapter.from_model(Scaled())
    # a subclass registered itself wins over its base (the nearest class of the MRO)
    ood.ModelAdapter.register(Scaled)(split("scaled", scale=None))
    with pytest.raises(ValueError, match="already has a registered split"):
        ood.ModelAdapter.register(Scaled)
    with pytest.raises(TypeError, match=r"nn.Module classes or their qualified names"):
        ood.ModelAdapter.register(int)
    with pytest.raises(TypeError, match="decorates a function"):
        ood.ModelAdapter.register(Child)(3)
    assert ood.ModelAdapter.from_model(Scaled()).name == "scaled"


class _LookAlikeResNet(nn.Module):
    """torchvision ResNet attributes, but a forward that adds a bias the split cannot see."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(2)
        self.layer1, self.layer2, self.layer3, self.layer4 = (nn.Conv2d(4, 4, 1) for _ in range(4))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(torch.flatten(self.avgpool(h), 1)) + 1.0


def test_a_wrong_split_is_caught_on_the_first_batch_once():
    model = _LookAlikeResNet().eval()
    for scorer in (ood.Energy(model), ood.RankFeat(model), ood.ReAct(model)):
        with pytest.raises(ValueError, match=r"does not reproduce .*_LookAlikeResNet"):
            scorer.fit(images(4, 8)) if scorer.needs_fit else scorer.score(images(4, 8))
    with pytest.raises(ValueError, match="does not reproduce"):
        ood.evaluate(model, [images(4, 8)], {"x": [images(4, 8)]}, ["msp"])
    # a split that breaks the head's shapes: a clear ValueError, not a bare RuntimeError
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    broken = ood.ModelAdapter(net, embed=nn.Flatten(), blocks=[net[1:3]], pool=lambda h: h[:, :5], fc=net[3])
    with pytest.raises(ValueError, match=r"fails on .*Sequential"):
        ood.MSP(broken).score(torch.rand(3, 3, 2, 2))
    # a right split is checked once: later batches cost one pass
    good = ood.ModelAdapter(net, embed=nn.Flatten(), blocks=[net[1:3]], pool=lambda h: h, fc=net[3])
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    scorer = ood.Energy(good)
    scorer.score(torch.rand(5, 3, 2, 2))
    assert good.verified and len(calls) == 1  # model(x[:2]) once; the split does not call net itself
    scorer.score(torch.rand(5, 3, 2, 2))
    assert len(calls) == 1
    # opting out skips the check (for a forward that does not return the logits)
    silent = ood.ModelAdapter(net, embed=nn.Flatten(), blocks=[net[1]], pool=lambda h: h, fc=net[3], auto_verify=False)
    assert ood.Energy(silent).score(torch.rand(2, 3, 2, 2)).shape == (2,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_models_take_float32_inputs_and_give_float32_scores(resnet, dtype):
    model = copy.deepcopy(resnet).to(dtype)
    x, y = images(6, 64), torch.arange(6) % 3  # float32 batches, as a loader yields them
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.no_grad():
        logits = model(x.to(dtype))
    adapter = ood.ModelAdapter.from_model(model)
    with torch.no_grad():
        feats = adapter.features(x.to(dtype))
    wide = feats.to(want_dtype)
    references = {
        "msp": ood.msp(logits.to(want_dtype)),
        "maxlogit": logits.to(want_dtype).amax(1),
        "energy": torch.logsumexp(logits.to(want_dtype), 1),
        "gradnorm": (torch.softmax(logits.to(want_dtype), 1) - 0.1).abs().sum(1) * wide.abs().sum(1),
    }
    for name in ("msp", "maxlogit", "energy", "odin", "gradnorm", "rankfeat", "react", "knn"):
        scorer = ood.make_scorer(name, model, **({"k": 2} if name == "knn" else {}))
        scorer.fit((x, y))
        got = scorer.score(x)
        assert got.dtype in (want_dtype, torch.float64) and torch.isfinite(got).all(), name
        if name in references:
            torch.testing.assert_close(got, references[name].to(want_dtype), rtol=1e-5, atol=1e-5)
    # ReAct: threshold from the float64 percentile of the model's own activations; logits of the
    # clipped features computed in float32 (a bf16 head would round them to 3 digits)
    react = ood.ReAct(model, percentile=80).fit((x, y))
    assert react.threshold == pytest.approx(float(np.percentile(feats.double().numpy(), 80)))
    w, b = adapter.fc_weight.to(want_dtype), adapter.fc_bias.to(want_dtype)
    clipped = torch.nn.functional.linear(wide.clamp(max=react.threshold), w, b)
    torch.testing.assert_close(react.score(x), torch.logsumexp(clipped, 1), rtol=1e-5, atol=1e-5)


def test_half_precision_msp_is_not_rounded_into_ties():
    logits = torch.tensor([[8.0, 0.0], [8.01, 0.0], [8.02, 0.0]], dtype=torch.float16)
    got = ood.msp(logits)
    assert got.dtype == torch.float32 and got.unique().numel() == 3  # fp16 MSPs were all 0.9995
    torch.testing.assert_close(got, ood.msp(logits.double()).float())
    assert ood.energy(logits).dtype == ood.max_logit(logits.bfloat16()).dtype == torch.float32
    assert ood.energy(logits.double()).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["svd", "power"])
def test_rank1_removal_of_half_precision_features_runs_in_float32(dtype, method):
    x = images(3, 6).to(dtype)  # (3, 3, 6, 6): a dominant direction, as block outputs have
    got = ood.remove_rank1(x, method)
    assert got.dtype == dtype and got.shape == x.shape
    want = ood.remove_rank1(x.double(), "svd")
    # one rounding of the float32 result to the half type (entries ~ x's spread, ~0.1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=4 * torch.finfo(dtype).eps * 0.2)


def test_rank1_power_iteration_ignores_autocast():
    x = images(4, 8)
    want = ood.remove_rank1(x.double(), "svd").float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the products in bfloat16
        got = ood.remove_rank1(x, "power")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_rankfeat_scores_a_bfloat16_model_like_its_float32_copy(resnet):
    x = images(4, 64)
    low = ood.RankFeat(copy.deepcopy(resnet).bfloat16()).score(x)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ood.RankFeat(resnet).score(x), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------- base and registry
def test_scorer_base_is_abstract_and_needs_fit_requires_a_fit():
    with pytest.raises(TypeError, match="abstract"):
        ood.Scorer(nn.Linear(2, 2))  # no _score_inputs
    with pytest.raises(TypeError, match="_fit"):

        class Fitted(ood.OutputScorer):
            needs_fit = True

            def _from_outputs(self, features, logits):
                return logits.sum(1)


def test_every_registered_name_is_canonical_and_found_in_any_spelling():
    for _key, cls in ood.SCORERS.items():
        assert ood.canonical_name(cls.name) == cls.name
        for spelling in (cls.name.upper(), cls.name.lower(), "_".join(cls.name), "-".join(cls.name)):
            assert ood.scorer_class(spelling) is cls
    with pytest.raises(ValueError, match="choose from"):
        ood.canonical_name("energyy")
    with pytest.raises(TypeError, match="string"):
        ood.scorer_class(None)


def test_rankweight_is_a_scorer_of_its_edited_copy(resnet):
    model, x = resnet, images(4, 32)
    scorer = ood.RankWeight(model)
    assert isinstance(scorer, ood.Scorer) and scorer.model is scorer.inner.model is not model
    assert scorer.is_fitted and repr(scorer).startswith("RankWeight(layer=")
    torch.testing.assert_close(scorer.score(x), scorer.inner.score(x))


def test_needs_labels_is_enforced_by_the_base_and_implies_needs_fit(feature_data):
    model, x, _labels, train, _ = feature_data
    assert [c.name for c in ood.SCORERS.values() if c.needs_labels] == ["Mahalanobis"]
    for data in (x, [x[:50], x[50:]]):  # images without labels: refused before any statistic is read
        with pytest.raises(ValueError, match=r"Mahalanobis.fit needs class labels"):
            ood.Mahalanobis(model).fit(data)
    with pytest.raises(ValueError, match=r"Mahalanobis.fit needs class labels"):
        ood.Mahalanobis(model).fit_features(train)
    with pytest.raises(TypeError, match="needs_labels = True but not needs_fit"):

        class Labelled(ood.OutputScorer):
            needs_labels = True

            def _from_outputs(self, features, logits):
                return logits.sum(1)
