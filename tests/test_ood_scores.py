"""Logit scores against float64 formulas and against pytorch-ood (which returns their negatives)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pytorch_ood.detector import ODIN, EnergyBased, MaxLogit, MaxSoftmax

from samnorm.ood import scores as S

logit_arrays = arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(1, 7)),
    elements=st.floats(-60, 60, allow_nan=False),
)
temperatures = st.sampled_from([0.5, 1.0, 3.0, 1000.0])


def _ref_logsumexp(row, t):
    return math.log(math.fsum(math.exp(v / t) for v in row))


@settings(max_examples=60, deadline=None)
@given(logit_arrays, temperatures)
def test_scores_match_float64_formulas(z, t):
    logits = torch.from_numpy(z)
    want_msp = [max(math.exp(v / t) for v in row) / math.exp(_ref_logsumexp(row, t)) for row in z]
    want_energy = [t * _ref_logsumexp(row, t) for row in z]
    np.testing.assert_allclose(S.msp(logits, t).numpy(), want_msp, rtol=1e-12)
    np.testing.assert_allclose(S.energy(logits, t).numpy(), want_energy, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(S.max_logit(logits).numpy(), z.max(axis=1))
    # pytorch-ood returns outlier scores: the negatives
    torch.testing.assert_close(S.msp(logits, t), -MaxSoftmax.score(logits, t))
    torch.testing.assert_close(S.energy(logits, t), -EnergyBased.score(logits, t))
    torch.testing.assert_close(S.max_logit(logits), -MaxLogit.score(logits))


def test_scores_are_stable_for_huge_float32_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [3e38, 3e38, -3e38]], dtype=torch.float32)
    energy = S.energy(logits)
    assert torch.isfinite(energy).all()
    assert energy[0].item() == pytest.approx(1e4)
    assert energy[1].item() == pytest.approx(3e38 + math.log(2), rel=1e-6)
    torch.testing.assert_close(S.msp(logits), torch.tensor([1.0, 0.5]))


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)
    ).eval()


def test_odin_perturbation_matches_a_per_sample_autograd_loop():
    net, x = _net(), torch.rand(6, 3, 6, 6)
    std, eps, t = (0.2, 0.3, 0.25), 0.01, 1000.0
    want = []
    for xi in x:  # the paper's code: batch size 1, loss = CE at temperature T with the prediction
        xi = xi[None].clone().requires_grad_(True)
        out = net(xi) / t
        torch.nn.functional.cross_entropy(out, out.argmax(1)).backward()
        step = torch.sign(xi.grad) / torch.tensor(std).view(1, 3, 1, 1)
        want.append(torch.softmax(net(xi.detach() - eps * step) / t, 1).max())
    got = S.odin(net, x, temperature=t, epsilon=eps, input_std=std)
    torch.testing.assert_close(got, torch.stack(want).detach())
    # and pytorch-ood's ODIN (an outlier score) on the same model and data
    peer = ODIN(net, eps=eps, temperature=t, norm_std=list(std))
    torch.testing.assert_close(got, -peer.predict(x))
    # the step raises the MSP at T, and epsilon=0 is plain temperature-scaled MSP
    assert (got >= S.odin(net, x, temperature=t) - 1e-7).all()
    torch.testing.assert_close(S.odin(net, x, temperature=t), S.msp(net(x), t).detach())
    torch.testing.assert_close(S.odin(net(x).detach(), temperature=t), S.msp(net(x), t).detach())


def test_odin_works_under_inference_mode_and_is_batch_size_invariant():
    net, x = _net(), torch.rand(5, 3, 6, 6)
    full = S.odin(net, x, epsilon=0.005)
    with torch.inference_mode():
        halves = torch.cat([S.odin(net, x[:2], epsilon=0.005), S.odin(net, x[2:], epsilon=0.005)])
    torch.testing.assert_close(full, halves)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: S.msp(torch.ones(3)), ValueError, "batch, classes"),
        (lambda: S.energy(torch.ones(2, 0)), ValueError, "at least one class"),
        (lambda: S.max_logit(torch.ones(2, 2, dtype=torch.long)), TypeError, "floating"),
        (lambda: S.msp([[1.0]]), TypeError, "torch.Tensor"),
        (lambda: S.energy(torch.ones(1, 2), temperature=0), ValueError, "temperature"),
        (lambda: S.odin(_net(), torch.rand(1, 3, 6, 6), epsilon=-1), ValueError, "epsilon"),
        (lambda: S.odin(torch.ones(1, 3), epsilon=0.1), ValueError, "cannot perturb"),
        (lambda: S.odin(_net(), [[1.0]]), TypeError, "floating-point"),
        (lambda: S.odin("model", torch.ones(1, 3)), TypeError, "logits or a model"),
        (lambda: S.odin(_net(), torch.rand(1, 3, 6, 6), epsilon=0.1, input_std=[1, 2]), ValueError, "per channel"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_temperature_that_overflows_the_scores_warns():
    from samnorm.ood import energy, msp

    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    for score in (msp, energy):
        with pytest.warns(RuntimeWarning, match="temperature 1e-40 makes 2 of 2 scores non-finite"):
            score(logits, temperature=1e-40)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msp(logits, temperature=1000.0), energy(logits, temperature=1e-3)
