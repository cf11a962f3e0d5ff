"""samnorm.diagnostics.theory: L and M against exact values, eq. 12 / 15 against real SAM-ON steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import samnorm
from samnorm.diagnostics import (
    Eq12Bound,
    estimate_M,
    estimate_smoothness,
    hessian_spectral_norm,
    per_sample_grad_sq_norms,
    sam_on_bound_check,
)

torch.set_num_threads(1)
DT = torch.float64


def _symmetric(eigenvalues, seed):
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T


class Quadratic(nn.Module):
    """Per-sample loss f_i(w) = 1/2 w^T A w - b_i^T w with w = (w_norm, w_rest); the batch is the b_i.

    The mean loss is a quadratic with Hessian A: L = max |eig(A)| exactly, and grad f_i = A w - b_i.
    """

    def __init__(self, A, w0, n_norm):
        super().__init__()
        self.register_buffer("A", A)
        self.w_norm = nn.Parameter(w0[:n_norm].clone())
        self.w_rest = nn.Parameter(w0[n_norm:].clone())

    def forward(self, b):
        w = torch.cat([self.w_norm, self.w_rest])
        return 0.5 * w @ self.A @ w - b @ w


def _identity(outputs, labels):
    return outputs


eigs = st.lists(st.floats(-4, 4, allow_nan=False).filter(lambda v: abs(v) > 1e-3), min_size=2, max_size=6)


@st.composite
def gapped_spectra(draw):
    """A spectrum whose largest |eigenvalue| beats the others by >= 5% (power iteration's rate)."""
    top = draw(st.floats(0.5, 4.0)) * draw(st.sampled_from([1.0, -1.0]))
    rest = draw(st.lists(st.floats(-0.95, 0.95), min_size=1, max_size=5))
    return [top, *(abs(top) * r for r in rest)]


@settings(max_examples=25, deadline=None)
@given(eigenvalues=gapped_spectra(), seed=st.integers(0, 2**16))
def test_power_iteration_finds_the_spectral_norm_of_a_quadratic(eigenvalues, seed):
    A = _symmetric(eigenvalues, seed)
    w1 = torch.zeros(1, dtype=DT, requires_grad=True)
    w2 = torch.zeros(len(eigenvalues) - 1, dtype=DT, requires_grad=True)
    b = torch.randn(len(eigenvalues), dtype=DT)

    def f():
        w = torch.cat([w1, w2])
        return 0.5 * w @ A @ w - b @ w

    result = hessian_spectral_norm(f, [w1, w2], iters=2000, tol=1e-10, seed=seed)
    exact = torch.linalg.eigvalsh(A).abs().max().item()
    # ||H v|| never exceeds the spectral norm; at convergence (tol 1e-10) it is within ~1e-5 of it
    assert result.converged
    assert result.value <= exact * (1 + 1e-12)
    assert result.value == pytest.approx(exact, rel=1e-4)
    assert result.rayleigh == pytest.approx(eigenvalues[0], rel=1e-4)  # the sign of the top eigenvalue


def test_power_iteration_with_tied_top_eigenvalues_of_opposite_sign():
    # +2 and -2: v never settles, but ||H v|| is exactly 2 once the 0.5 component has decayed
    A = _symmetric([2.0, -2.0, 0.5], 1)
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    result = hessian_spectral_norm(lambda: 0.5 * w @ A @ w, [w], iters=200, tol=1e-12)
    assert result.converged and result.value == pytest.approx(2.0, rel=1e-10)


def test_power_iteration_pieces_sum_and_edge_cases():
    A = _symmetric([3.0, -1.0, 0.5], 0)
    w = torch.randn(3, dtype=DT, requires_grad=True)
    whole = hessian_spectral_norm(lambda: 0.5 * w @ A @ w, [w], tol=1e-12, iters=2000)
    halves = hessian_spectral_norm([lambda: 0.25 * w @ A @ w] * 2, [w], tol=1e-12, iters=2000)
    assert halves.value == pytest.approx(whole.value, rel=1e-10) and whole.value == pytest.approx(3.0)
    assert whole.rayleigh == pytest.approx(3.0)  # the dominant eigenvalue is positive
    linear = hessian_spectral_norm(lambda: (w * 2).sum(), [w])
    assert linear.value == 0.0 and linear.converged
    with pytest.raises(ValueError, match="empty"):
        hessian_spectral_norm(lambda: w.sum(), [])
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_spectral_norm(lambda: w.sum(), [torch.zeros(2)])
    with pytest.raises(TypeError, match="closure"):
        hessian_spectral_norm([], [w])


def _softmax_regression(dim, classes, bias, seed):
    torch.manual_seed(seed)
    return nn.Linear(dim, classes, bias=bias).double()


def _full_hessian_norm(model, x, y):
    """Independent reference: the full Hessian by torch.autograd.functional, then eigvalsh."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(flat):
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            parts[name] = flat[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return F.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        H = torch.autograd.functional.hessian(loss, flat0)
    return torch.linalg.eigvalsh(H).abs().max().item()


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 12),
    dim=st.integers(1, 5),
    classes=st.integers(2, 4),
    bias=st.booleans(),
    radius=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**16),
)
def test_softmax_regression_L_and_M_against_exact_values_and_bounds(n, dim, classes, bias, radius, seed):
    model = _softmax_regression(dim, classes, bias, seed)
    x = torch.randn(n, dim, dtype=DT)
    x = radius * x / x.norm(dim=1, keepdim=True).clamp(min=1.0)  # ||x_i|| <= radius
    y = torch.randint(0, classes, (n,))
    L = estimate_smoothness(model, x, y, target="label", iters=3000, tol=1e-11).value
    assert pytest.approx(_full_hessian_norm(model, x, y), rel=1e-3, abs=1e-9) == L
    # rigorous: H = mean_i (diag(p_i) - p_i p_i^T) (x) z_i z_i^T with z_i = (x_i, 1) and ||diag(p) - pp^T|| <= 1/2
    z_sq = x.norm(dim=1) ** 2 + (1.0 if bias else 0.0)
    assert 0.5 * z_sq.max().item() * (1 + 1e-9) >= L
    # M: per-sample gradient (p_i - e_{y_i}) z_i^T has squared norm ||p_i - e_{y_i}||^2 ||z_i||^2 <= 2 ||z_i||^2
    p = torch.softmax(model(x), 1).detach()
    exact = ((p - F.one_hot(y, classes)) ** 2).sum(1) * z_sq
    for method in ("vmap", "loop"):
        got = per_sample_grad_sq_norms(model, x, y, target="label", method=method, chunk_size=5)
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
    M = estimate_M(model, x, y, target="label")
    assert pytest.approx(exact.max().item()) == M and 2 * z_sq.max().item() >= M


def test_vmap_and_loop_agree_on_a_network_with_norm_layers_and_a_param_subset():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,))
    norm_params = list(model[1].parameters())
    for target in ("label", "pred", "uniform"):
        for params in (None, norm_params, samnorm.select.norm_layers(model)):
            vm = per_sample_grad_sq_norms(model, x, y, target=target, params=params, chunk_size=3)
            lp = per_sample_grad_sq_norms(model, x, y, target=target, params=params, method="loop")
            torch.testing.assert_close(vm, lp)
    # chunking the Hessian-vector products does not change L
    full = estimate_smoothness(model, x, y, iters=300, tol=1e-12)
    chunked = estimate_smoothness(model, x, y, chunk_size=2, iters=300, tol=1e-12)
    assert chunked.value == pytest.approx(full.value, rel=1e-9)
    with pytest.raises(ValueError, match="method"):
        per_sample_grad_sq_norms(model, x, y, method="jacobian")
    with pytest.raises(ValueError, match="needs labels"):
        estimate_M(model, x)
    with pytest.raises(ValueError, match="parameters of model"):
        per_sample_grad_sq_norms(model, x, y, params=[nn.Parameter(torch.zeros(2, dtype=DT))])


def test_eq12_terms_follow_the_formula():
    b = Eq12Bound(h=0.2, rho=0.3, L=4.0, M=2.5, grad_sq_norm=7.0)
    assert b.descent == pytest.approx(-0.5 * 0.2 * 7.0)
    assert b.noise == pytest.approx(4.0 * 0.2**2 * 2.5)
    assert b.perturbation == pytest.approx(0.5 * 0.2 * 16.0 * 0.09 * (1 + 0.8))
    assert b.total == pytest.approx(b.descent + b.noise + b.perturbation)
    assert b.step_size_ok and not Eq12Bound(h=0.3, rho=0, L=4.0, M=0, grad_sq_norm=0).step_size_ok
    assert b.energy_bound(-0.5) == pytest.approx(b.total - 0.5)
    assert b.to_dict()["total"] == b.total
    with pytest.raises(ValueError, match="rho"):
        Eq12Bound(h=0.1, rho=-1.0, L=1.0, M=0.0, grad_sq_norm=0.0)
    with pytest.raises(ValueError, match="h"):
        Eq12Bound(h=0.0, rho=0.1, L=1.0, M=0.0, grad_sq_norm=0.0)
    with pytest.raises(ValueError, match="L"):
        Eq12Bound(h=0.1, rho=0.1, L=math.nan, M=0.0, grad_sq_norm=0.0)


def _appendix_step(A, bs, w, n_norm, h, rho):
    """Eq. 4-5 in float64 by hand: ascend the norm block only, then descend everything at w'.

    Deliberately not tests/reference_sam.py: the appendix's quadratic is written over one flat vector
    w with a closed-form gradient (A w - b), a second independent derivation to check its bound with."""
    grad = A @ w - bs.mean(0)
    g_norm = grad[:n_norm]
    w_half = w.clone()
    if g_norm.norm() > 0:
        w_half[:n_norm] += rho * g_norm / g_norm.norm()
    return w - h * (A @ w_half - bs.mean(0))


@settings(max_examples=15, deadline=None)
@given(
    eigenvalues=eigs,
    seed=st.integers(0, 2**16),
    h_frac=st.floats(0.05, 1.0),
    rho=st.floats(0.0, 1.0),
    n_samples=st.integers(1, 5),
)
def test_sam_on_steps_on_quadratics_respect_eq12(eigenvalues, seed, h_frac, rho, n_samples):
    n = len(eigenvalues)
    A = _symmetric(eigenvalues, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w0, bs = torch.randn(n, generator=gen, dtype=DT), torch.randn(n_samples, n, generator=gen, dtype=DT)
    L = torch.linalg.eigvalsh(A).abs().max().item()
    h = h_frac / L
    n_norm = 1 + seed % (n - 1)
    model = Quadratic(A, w0, n_norm)
    reports = sam_on_bound_check(model, bs, h=h, rho=rho, steps=2, perturb=[model.w_norm], criterion=_identity, L=L)
    w = w0
    for r in reports:
        # M estimated exactly: max_i ||A w - b_i||^2
        assert pytest.approx(((A @ w - bs) ** 2).sum(1).max().item(), rel=1e-9) == r.bound.M
        assert r.bound.grad_sq_norm == pytest.approx(((A @ w - bs.mean(0)) ** 2).sum().item(), rel=1e-9)
        w_next = _appendix_step(A, bs, w, n_norm, h, rho)
        f = lambda v: (0.5 * v @ A @ v - bs.mean(0) @ v).item()  # noqa: E731
        assert r.loss_after == pytest.approx(f(w_next), rel=1e-7, abs=1e-9)  # samnorm.SAM is eq. 4-5
        assert r.holds, r.to_dict()
        assert r.energy_change == {}  # a quadratic has no logits
        w = w_next


class TinyNet(nn.Module):
    """Softmax classifier with one LayerNorm: SAM-ON perturbs the LayerNorm only."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.body(x))))


def test_sam_on_check_on_a_classifier_reports_eq15_consistently():
    torch.manual_seed(3)
    model = TinyNet().double().train()
    x, ood = torch.randn(16, 5, dtype=DT), 3 * torch.randn(8, 5, dtype=DT)
    L = estimate_smoothness(model, x, target="pred").value
    reports = sam_on_bound_check(model, x, h=0.5 / L, rho=0.05, steps=3, extra_inputs={"ood": ood})
    assert model.training  # mode restored
    for r in reports:
        assert set(r.energy_change) == {"train", "ood"}
        # with target="pred", Delta(energy) - Delta(max logit) <= Delta f holds exactly (eq. 13 -> 15)
        assert r.energy_change["train"] - r.max_logit_change["train"] <= r.loss_change + r.slack
        assert r.energy_bound("ood") == pytest.approx(r.bound.total + r.max_logit_change["ood"])
        assert r.to_dict()["energy"]["train"]["holds"] == r.energy_holds("train")
    with pytest.warns(UserWarning, match="h\\*L"):
        sam_on_bound_check(model, x, h=2.0 / L, rho=0.05, steps=1, L=L, M=1.0)
    with pytest.raises(ValueError, match="train"):
        sam_on_bound_check(model, x, h=0.1, rho=0.05, extra_inputs={"train": ood})
    with pytest.raises(ValueError, match="steps"):
        sam_on_bound_check(model, x, h=0.1, rho=0.05, steps=0)


class _Attention(nn.Module):
    """Uses F.scaled_dot_product_attention, whose fused CPU/GPU kernels have no double backward."""

    def __init__(self):
        super().__init__()
        self.qkv, self.norm, self.head = nn.Linear(4, 12), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return self.head(self.norm(F.scaled_dot_product_attention(q, k, v)[:, 0].mean(1)))


def test_L_and_M_through_scaled_dot_product_attention():
    torch.manual_seed(6)
    model, x = _Attention().double(), torch.randn(5, 6, 4, dtype=DT)
    y = model(x).argmax(1)
    L = estimate_smoothness(model, x, target="pred", iters=500, tol=1e-10).value
    assert pytest.approx(_full_hessian_norm(model, x, y), rel=1e-4) == L
    vmap = per_sample_grad_sq_norms(model, x, target="pred")
    torch.testing.assert_close(vmap, per_sample_grad_sq_norms(model, x, target="pred", method="loop"))
