"""Each loss term against its formula, evaluated with plain Python floats (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from samnorm.ood import energy as energy_score
from samnorm.train import losses
from samnorm.train.losses import SFTLoss, energy_margin, free_energy, max_logit_gap, uniform_ce

logit_arrays = st.integers(1, 6).flatmap(
    lambda b: st.integers(1, 7).flatmap(
        lambda k: arrays("float64", (b, k), elements=st.floats(-40, 40, allow_nan=False, width=64))
    )
)


def lse(row) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def ref_uniform(rows) -> float:
    return sum(-sum(v - lse(r) for v in r) / len(r) for r in rows) / len(rows)


def ref_energy(row, t=1.0) -> float:
    return -t * lse([v / t for v in row])


def ref_margin(rows_in, rows_out, m_in, m_out, t) -> float:
    a = sum(max(0.0, ref_energy(r, t) - m_in) ** 2 for r in rows_in) / len(rows_in)
    b = sum(max(0.0, m_out - ref_energy(r, t)) ** 2 for r in rows_out) / len(rows_out)
    return a + b


def ref_gap(rows) -> float:
    return sum(max(r) - sum(r) / len(r) for r in rows) / len(rows)


@settings(max_examples=40, deadline=None)
@given(logit_arrays)
def test_uniform_and_gap_against_formula(a):
    x, rows = torch.from_numpy(a), a.tolist()
    assert uniform_ce(x).item() == pytest.approx(ref_uniform(rows), rel=1e-9, abs=1e-9)
    assert max_logit_gap(x).item() == pytest.approx(ref_gap(rows), rel=1e-9, abs=1e-9)
    assert uniform_ce(x).item() >= math.log(a.shape[1]) - 1e-9 and max_logit_gap(x).item() >= -1e-12


@settings(max_examples=40, deadline=None)
@given(logit_arrays, logit_arrays, st.floats(-30, -1), st.floats(0.1, 20), st.sampled_from([1.0, 0.5, 3.0]))
def test_energy_margin_against_formula(a, b, m_in, gap, t):
    if a.shape[1] != b.shape[1]:
        b = b[:, :1].repeat(a.shape[1], axis=1)
    m_out = m_in + gap
    got = energy_margin(torch.from_numpy(a), torch.from_numpy(b), m_in, m_out, t).item()
    assert got == pytest.approx(ref_margin(a.tolist(), b.tolist(), m_in, m_out, t), rel=1e-9, abs=1e-9)
    for row, e in zip(a.tolist(), free_energy(torch.from_numpy(a), t).tolist()):
        assert e == pytest.approx(ref_energy(row, t), rel=1e-12, abs=1e-12)


def test_uniform_gradient_is_softmax_minus_uniform():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    uniform_ce(x).backward()
    expected = (torch.softmax(x.detach(), 1) - 1 / 5) / 3
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("kind, weight", [("uniform", 0.5), ("energy", 0.1), ("maxlogit", 0.5)])
def test_sft_loss_total_and_defaults(kind, weight):
    torch.manual_seed(0)
    li, lo = torch.randn(6, 4, dtype=torch.float64) * 3, torch.randn(6, 4, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    fn = SFTLoss(kind, m_in=-6.0, m_out=-1.0)
    assert fn.ood_weight == weight
    terms = fn(li, y, lo)
    ce_ref = sum(lse(r) - r[c] for r, c in zip(li.tolist(), y.tolist())) / 6
    ood_ref = {
        "uniform": ref_uniform(lo.tolist()),
        "energy": ref_margin(li.tolist(), lo.tolist(), -6.0, -1.0, 1.0),
        "maxlogit": ref_gap(lo.tolist()),
    }[kind]
    assert terms.ce.item() == pytest.approx(ce_ref, rel=1e-10)
    assert terms.ood.item() == pytest.approx(ood_ref, rel=1e-10)
    assert terms.total.item() == pytest.approx(ce_ref + weight * ood_ref, rel=1e-10)
    assert terms.total.requires_grad is False  # inputs carry no grad here
    no_ood = fn(li, y)
    assert no_ood.total.item() == pytest.approx(ce_ref) and no_ood.ood.item() == 0


def test_total_backpropagates_to_both_inputs():
    li = torch.randn(4, 3, requires_grad=True)
    lo = torch.randn(4, 3, requires_grad=True)
    SFTLoss(ood_weight=2.0)(li, torch.tensor([0, 1, 2, 0]), lo).total.backward()
    assert li.grad.abs().sum() > 0 and lo.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown ood_loss"):
        SFTLoss("oe")
    with pytest.raises(ValueError, match="m_in"):
        SFTLoss("energy", m_in=-1.0, m_out=-5.0)
    with pytest.raises(ValueError, match=">= 0"):
        SFTLoss(ood_weight=-1.0)
    with pytest.raises(ValueError, match="same model"):
        SFTLoss()(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        uniform_ce(torch.randn(3))
    with pytest.raises(ValueError, match="temperature"):
        free_energy(torch.randn(2, 3), temperature=0.0)


def test_free_energy_is_minus_the_energy_score_and_the_old_name_warns():
    logits = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(free_energy(logits, 2.0), -energy_score(logits, 2.0))
    with pytest.warns(DeprecationWarning, match="free_energy"):
        old = losses.energy(logits, 2.0)
    assert torch.equal(old, free_energy(logits, 2.0))
