"""The evaluation harness: one shared forward per batch, raw scores kept, tables that name the convention."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from helpers import images, tiny_resnetv2
from torch.utils.data import DataLoader, TensorDataset

from samnorm import ood

pytest.importorskip("timm")  # tiny_resnetv2


def _loader(x, batch_size=8):
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch_size)


@pytest.fixture(scope="module")
def setup():
    model = tiny_resnetv2()
    id_x, far_x = images(16, 64, seed=1), torch.rand(12, 3, 64, 64)
    near_x = images(10, 64, seed=2) * 0.9
    train = (images(24, 64, seed=3), torch.arange(24) % 10)
    return model, id_x, {"far": far_x, "near": near_x}, train


def _count_trunk_passes(model):
    calls = []
    handle = model.stages[0].register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_scores_metrics_and_shared_forward(setup):
    model, id_x, ood_x, train = setup
    react = ood.ReAct(model).fit(train)
    scorers = {
        "MSP": "msp",
        "MaxLogit": "max_logit",
        "Energy": ood.Energy(model),
        "ReAct": react,
        "GradNorm": "gradnorm",
        "ODIN": "odin",
    }
    calls, handle = _count_trunk_passes(model)
    model.train()
    try:
        res = ood.evaluate(model, _loader(id_x), {k: _loader(v) for k, v in ood_x.items()}, scorers)
    finally:
        handle.remove()
    assert model.training  # mode restored
    model.eval()
    n_batches = 2 + 2 + 2  # ID 16, far 12, near 10 at batch size 8
    check = 2  # the adapter's one-time check of its split: model(x[:2]) and the split's own pass
    assert len(calls) == check + n_batches  # one trunk pass per batch for all six scorers
    assert res.images_per_second > 0
    for name in scorers:
        scorer = scorers[name] if isinstance(scorers[name], ood.Scorer) else ood.make_scorer(scorers[name], model)
        for set_name, x in [("ID", id_x), *ood_x.items()]:
            np.testing.assert_allclose(
                res.scores[name][set_name], scorer.score(x).double().numpy(), rtol=1e-5, atol=1e-6
            )
        for set_name in ood_x:
            want = ood.ood_metrics(res.scores[name]["ID"], res.scores[name][set_name])
            assert res.metrics[name][set_name] == want
        average = res.average(name)
        assert average["AUROC"] == pytest.approx(np.mean([res.metrics[name][s].auroc for s in ood_x]))


def test_own_pass_scorers_and_fitting_on_fit_data(setup):
    model, id_x, ood_x, train = setup
    calls, handle = _count_trunk_passes(model)
    try:
        res = ood.evaluate(
            model, _loader(id_x), {"far": _loader(ood_x["far"])}, ["energy", "rankfeat", "mahalanobis"], fit_data=train
        )
    finally:
        handle.remove()
    fit_batches, check = 1, 2  # the scorers named by string share evaluate's adapter: one check
    assert len(calls) == check + fit_batches + 2 * (2 + 2)  # shared pass + RankFeat's pass per batch
    np.testing.assert_allclose(
        res.scores["RankFeat"]["far"], ood.RankFeat(model).score(ood_x["far"]).double().numpy(), rtol=1e-5
    )
    with pytest.raises(ood.NotFittedError, match="fit_data"):
        ood.evaluate(model, _loader(id_x), {"far": _loader(ood_x["far"])}, ["knn"])


def test_tables_name_the_convention_and_can_be_recomputed(setup, tmp_path):
    model, id_x, ood_x, _ = setup
    res = ood.evaluate(
        model,
        _loader(id_x),
        {k: _loader(v) for k, v in ood_x.items()},
        ["msp", "energy"],
        convention="pytorch_ood",
        tpr=0.9,
    )
    md = res.to_markdown()
    assert ood.CONVENTIONS["pytorch_ood"].describe() in md and "FPR90 ↓" in md
    assert md.count("**Average**") == 2 and md.count("| MSP |") == 3
    path = tmp_path / "table.csv"
    text = res.to_csv(str(path))
    assert path.read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["ood_set"] for r in rows] == ["far", "near", "Average"] * 2
    assert {r["convention"] for r in rows} == {"pytorch_ood"}
    msp_far = res.metrics["MSP"]["far"]
    assert res.table[0] == {"scorer": "MSP", "ood_set": "far", **msp_far.as_dict()}
    assert res.table[2]["ood_set"] == "Average" and res.table[2]["AUROC"] == res.average("MSP")["AUROC"]
    assert float(rows[0]["AUROC"]) == msp_far.auroc and float(rows[0]["FPR90"]) == msp_far.fpr
    other = res.with_convention("rankfeat", tpr=0.95)
    assert other.convention.name == "rankfeat" and other.columns[0] == "FPR95"
    assert other.metrics["MSP"]["far"].auroc == msp_far.auroc  # AUROC is convention-free
    assert other.metrics["MSP"]["far"] == ood.ood_metrics(
        res.scores["MSP"]["ID"], res.scores["MSP"]["far"], convention="rankfeat"
    )
    assert f"{msp_far.auroc * 100:.2f}" in md


def test_bad_arguments_raise_clear_errors(setup):
    model, id_x, ood_x, _ = setup
    ids, far = _loader(id_x), {"far": _loader(ood_x["far"])}
    with pytest.raises(ValueError, match="non-empty dict"):
        ood.evaluate(model, ids, {}, ["msp"])
    with pytest.raises(ValueError, match="named 'ID'"):
        ood.evaluate(model, ids, {"ID": _loader(id_x)}, ["msp"])
    with pytest.raises(ValueError, match="two scorers"):
        ood.evaluate(model, ids, far, [ood.RankFeat(model), ood.RankFeat(model, method="power")])
    with pytest.raises(ValueError, match="another model"):
        ood.evaluate(model, ids, far, [ood.MSP(tiny_resnetv2())])
    with pytest.raises(ValueError, match="no samples"):
        ood.evaluate(model, ids, {"empty": []}, ["msp"])
    with pytest.raises(ValueError, match="unknown scorer"):
        ood.evaluate(model, ids, far, ["entropy"])
    with pytest.raises(TypeError, match="name or a Scorer"):
        ood.evaluate(model, ids, far, [3])


@pytest.mark.parametrize("bad", [{"tpr": 95.0}, {"tpr": float("nan")}, {"convention": "openood_v2"}])
def test_tpr_and_convention_are_checked_before_any_forward_pass(setup, bad):
    # a percent instead of a fraction used to fail only after fitting and scoring every set
    model, id_x, ood_x, train = setup
    calls, handle = _count_trunk_passes(model)
    try:
        with pytest.raises(ValueError, match=r"tpr must be a fraction|unknown convention"):
            ood.evaluate(model, _loader(id_x), {"far": _loader(ood_x["far"])}, ["msp", "react"], fit_data=train, **bad)
    finally:
        handle.remove()
    assert calls == []
