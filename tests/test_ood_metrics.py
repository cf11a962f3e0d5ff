"""samnorm.ood.metrics against scikit-learn, pytorch-ood and the RankFeat reference code."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_ood.metrics import functional as pood

from samnorm.ood import metrics as M

SETTINGS = settings(max_examples=100, deadline=None)

# scores from a handful of values (heavy ties, also across ID and OOD) or arbitrary floats
tied = st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=40)
free = st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=40)
score_lists = st.one_of(tied, free)
tprs = st.one_of(st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.95, 1.0]), st.floats(0.0, 1.0))


def _labelled(id_scores, ood_scores):
    scores = np.r_[np.asarray(id_scores, float), np.asarray(ood_scores, float)]
    is_id = np.r_[np.ones(len(id_scores), int), np.zeros(len(ood_scores), int)]
    return scores, is_id


def _sk_fpr_first(y_true, scores, tpr):
    fpr, tpr_curve, _ = skm.roc_curve(y_true, scores, drop_intermediate=False)
    return fpr[np.argmax(tpr_curve >= tpr)]


def _sk_trapezoid(y_true, scores):
    precision, recall, _ = skm.precision_recall_curve(y_true, scores)
    return skm.auc(recall, precision)


def _rankfeat_fpr(labels, examples, recall_level):
    """``fpr_and_fdr_at_recall`` of the GradNorm/RankFeat code, transcribed (pos_label=1)."""
    y_true = labels == 1
    desc = np.argsort(examples, kind="mergesort")[::-1]
    y_score, y_true = examples[desc], y_true[desc]
    distinct = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return fps[cutoff] / np.sum(np.logical_not(y_true))


@SETTINGS
@given(score_lists, score_lists, tprs)
def test_defaults_agree_with_sklearn(id_scores, ood_scores, tpr):
    scores, is_id = _labelled(id_scores, ood_scores)
    assert M.auroc(id_scores, ood_scores) == pytest.approx(skm.roc_auc_score(is_id, scores), abs=1e-9)
    assert M.fpr_at_tpr(id_scores, ood_scores, tpr) == pytest.approx(_sk_fpr_first(is_id, scores, tpr), abs=1e-9)
    assert M.aupr_in(id_scores, ood_scores) == pytest.approx(skm.average_precision_score(is_id, scores), abs=1e-9)
    assert M.aupr_out(id_scores, ood_scores) == pytest.approx(skm.average_precision_score(1 - is_id, -scores), abs=1e-9)


@SETTINGS
@given(score_lists, score_lists, tprs)
def test_other_conventions_agree_with_their_references(id_scores, ood_scores, tpr):
    scores, is_id = _labelled(id_scores, ood_scores)
    # OOD positive: ROC of the outlier score -score with OOD as class 1
    assert M.fpr_at_tpr(id_scores, ood_scores, tpr, positive="ood") == pytest.approx(
        _sk_fpr_first(1 - is_id, -scores, tpr), abs=1e-9
    )
    assert M.fpr_at_tpr(id_scores, ood_scores, tpr, point="closest") == pytest.approx(
        _rankfeat_fpr(is_id, scores, tpr), abs=1e-12
    )
    assert M.aupr_in(id_scores, ood_scores, method="trapezoid") == pytest.approx(_sk_trapezoid(is_id, scores), abs=1e-9)
    assert M.aupr_out(id_scores, ood_scores, method="trapezoid") == pytest.approx(
        _sk_trapezoid(1 - is_id, -scores), abs=1e-9
    )


@SETTINGS
@given(score_lists, score_lists, tprs)
def test_pytorch_ood_convention_matches_pytorch_ood(id_scores, ood_scores, tpr):
    scores, is_id = _labelled(id_scores, ood_scores)
    # pytorch-ood: outlier scores (higher = OOD), labels < 0 mark OOD
    outlier = torch.tensor(-scores)
    labels = torch.tensor(np.where(is_id == 1, 0, -1))
    got = M.ood_metrics(id_scores, ood_scores, tpr=tpr, convention="pytorch_ood")
    assert got.auroc == pytest.approx(float(pood.auroc(outlier, labels)), abs=1e-9)
    assert got.fpr == pytest.approx(float(pood.fpr_at_tpr(outlier, labels, tpr)), abs=1e-9)
    assert got.aupr_in == pytest.approx(float(pood.aupr(outlier, labels, "id")), abs=1e-9)
    assert got.aupr_out == pytest.approx(float(pood.aupr(outlier, labels, "ood")), abs=1e-9)


@SETTINGS
@given(score_lists, score_lists, st.sampled_from(sorted(M.CONVENTIONS)))
def test_ood_metrics_matches_single_functions(id_scores, ood_scores, name):
    conv = M.CONVENTIONS[name]
    got = M.ood_metrics(id_scores, ood_scores, convention=name, tpr=0.9)
    assert got.convention is conv and got.fpr_name == "FPR90"
    assert (got.n_id, got.n_ood) == (len(id_scores), len(ood_scores))
    assert got.fpr == M.fpr_at_tpr(
        id_scores, ood_scores, 0.9, positive=conv.positive, point=conv.point, drop_intermediate=conv.drop_intermediate
    )
    assert got.auroc == M.auroc(id_scores, ood_scores)
    assert got.aupr_in == M.aupr_in(id_scores, ood_scores, method=conv.aupr)
    assert got.aupr_out == M.aupr_out(id_scores, ood_scores, method=conv.aupr)
    assert list(got.as_dict()) == ["FPR90", "AUROC", "AUPR-In", "AUPR-Out"]


@SETTINGS
@given(score_lists, score_lists)
def test_swapping_and_negating_is_a_symmetry(id_scores, ood_scores):
    neg_id, neg_ood = [-s for s in ood_scores], [-s for s in id_scores]
    assert M.auroc(id_scores, ood_scores) == pytest.approx(M.auroc(neg_id, neg_ood), abs=1e-12)
    assert M.aupr_in(id_scores, ood_scores) == pytest.approx(M.aupr_out(neg_id, neg_ood), abs=1e-12)
    assert M.fpr_at_tpr(id_scores, ood_scores, positive="ood") == pytest.approx(
        M.fpr_at_tpr(neg_id, neg_ood, positive="id"), abs=1e-12
    )


def test_known_values_and_the_three_fpr95_variants_differ():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 400)
    first = M.fpr_at_tpr(id_scores, ood_scores)
    ood_pos = M.fpr_at_tpr(id_scores, ood_scores, positive="ood")
    assert first != ood_pos
    # perfect separation, and complete overlap
    assert M.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and M.fpr_at_tpr([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert M.auroc([1.0, 1.0], [1.0]) == 0.5 and M.fpr_at_tpr([1.0], [1.0, 1.0]) == 1.0
    assert M.aupr_in([1.0, 1.0], [1.0, 1.0]) == 0.5


def test_tensors_of_any_real_dtype_and_inf_when_allowed():
    id_t = torch.tensor([3.0, 2.0, float("inf")], dtype=torch.float16, requires_grad=True)
    ood_t = torch.tensor([1, 2, -(10**6)])
    assert M.auroc(id_t, ood_t, allow_inf=True) == pytest.approx(
        M.auroc([3.0, 2.0, np.inf], [1.0, 2.0, -1e6], allow_inf=True)
    )
    assert M.auroc(np.array([1, 2], np.int8), np.array([True, False])) == 0.875  # one tie


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([], ValueError, "empty"),
        ([1.0, float("nan")], ValueError, "NaN"),
        (np.ones((3, 1)), ValueError, "1-D"),
        (torch.ones(2, 2), ValueError, "1-D"),
        (np.array(["a", "b"]), TypeError, "real numbers"),
        (torch.ones(3, dtype=torch.complex64), TypeError, "real-valued"),
    ],
)
def test_bad_scores_raise_clear_errors(bad, error, match):
    for call in (M.auroc, M.fpr_at_tpr, M.aupr_in, M.aupr_out, M.ood_metrics):
        with pytest.raises(error, match=match):
            call(bad, [1.0, 2.0])
        with pytest.raises(error, match=match):
            call([1.0, 2.0], bad)


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_tpr([1.0], [0.0], 95)
    with pytest.raises(ValueError, match="positive"):
        M.fpr_at_tpr([1.0], [0.0], positive="in")
    with pytest.raises(ValueError, match="point"):
        M.fpr_at_tpr([1.0], [0.0], point="nearest")
    with pytest.raises(ValueError, match="method"):
        M.aupr_in([1.0], [0.0], method="auc")
    with pytest.raises(ValueError, match="unknown convention"):
        M.ood_metrics([1.0], [0.0], convention="openood_v2")
    with pytest.raises(ValueError, match="aupr"):
        M.Convention("x", aupr="roc")
    with pytest.raises(ValueError, match="point='first'"):
        M.Convention("x", point="closest", drop_intermediate=True)
    with pytest.raises(TypeError, match="True or False"):
        M.fpr_at_tpr([1.0], [0.0], drop_intermediate="yes")


def test_conventions_name_themselves():
    text = M.CONVENTIONS["rankfeat"].describe()
    assert "rankfeat" in text and "closest" in text and "average precision" in text
    assert "OOD positive" in M.CONVENTIONS["openood"].describe()


def _openood_fpr(y_true, scores, tpr):
    """OpenOOD's FPR: ``roc_curve`` with its defaults (drop_intermediate=True), first TPR >= tpr."""
    fpr, tpr_curve, _ = skm.roc_curve(y_true, scores)
    return fpr[np.argmax(tpr_curve >= tpr)]


@SETTINGS
@given(score_lists, score_lists, tprs)
def test_openood_conventions_read_the_fpr_on_roc_curves_default_curve(id_scores, ood_scores, tpr):
    # under ties, roc_curve's default drops collinear points and the first point reaching tpr
    # may be one of them: OpenOOD then reads a later point (see the tied example below)
    scores, is_id = _labelled(id_scores, ood_scores)
    v15 = M.ood_metrics(id_scores, ood_scores, tpr=tpr, convention="openood_v1.5")
    main = M.ood_metrics(id_scores, ood_scores, tpr=tpr, convention="openood")
    assert v15.fpr == pytest.approx(_openood_fpr(is_id, scores, tpr), abs=1e-12)  # v1.5 tag: ID positive
    assert main.fpr == pytest.approx(_openood_fpr(1 - is_id, -scores, tpr), abs=1e-12)  # main: OOD positive
    assert main.auroc == pytest.approx(skm.roc_auc_score(is_id, scores), abs=1e-9)


def test_dropping_intermediate_points_changes_the_fpr_only_under_ties():
    tied_id, tied_ood = [2.0, 1.0, 0.0], [2.0, 1.0, 2.0, 0.0]
    assert M.fpr_at_tpr(tied_id, tied_ood, 0.5) == 0.75
    assert M.ood_metrics(tied_id, tied_ood, tpr=0.5, convention="openood_v1.5").fpr == 1.0
    rng = np.random.default_rng(1)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)
    for tpr in (0.5, 0.9, 0.95):
        assert M.fpr_at_tpr(id_scores, ood_scores, tpr, drop_intermediate=True) == M.fpr_at_tpr(
            id_scores, ood_scores, tpr
        )


def test_metrics_reject_inf_unless_allowed():
    from sklearn.metrics import roc_auc_score

    from samnorm.ood import auroc, ood_metrics

    inf = float("inf")
    with pytest.raises(ValueError, match=r"infinite scores .* allow_inf=True"):
        auroc([inf, inf], [inf])  # used to give 0.5 silently
    with pytest.raises(ValueError, match="ood_scores contains 1 infinite"):
        ood_metrics([1.0, 2.0], [0.0, -inf])
    with pytest.raises(ValueError):  # scikit-learn agrees that these are not scores
        roc_auc_score([1, 1, 0], [inf, 1.0, 0.0])
    # allowed: +-inf rank above / below every finite score, like the largest / smallest finite floats
    big = np.finfo(np.float64).max
    assert auroc([inf, 1.0], [0.0, -inf], allow_inf=True) == auroc([big, 1.0], [0.0, -big]) == 1.0
    assert auroc([inf, 0.0], [inf, 1.0], allow_inf=True) == pytest.approx(
        roc_auc_score([1, 1, 0, 0], [big, 0.0, big, 1.0])
    )
