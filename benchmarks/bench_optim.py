"""SAM perturb/restore and full training steps against their baselines, side by side.

Run: ``python -m pytest benchmarks/bench_optim.py --benchmark-only`` (add ``-k cuda`` on a GPU), and
``python benchmarks/bench_optim.py [rounds]`` for the interleaved flat / plain-foreach / per-tensor /
loop comparison of perturb+restore (benchmarks/RESULTS.md, section 1).
The baseline "per-parameter loop" is the common formulation of public SAM code: per-tensor norms
stacked into a global norm, ``e = g * scale`` per tensor, ``p.add_(e)``, and ``p.sub_(e)`` to undo.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samnorm

timm = pytest.importorskip("timm")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _loop_perturb_restore(params, rho=0.05):
    grads = [p.grad for p in params]
    with torch.no_grad():
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
        scale = rho / (norm + 1e-12)
        es = []
        for p, g in zip(params, grads):
            e = g * scale
            p.add_(e)
            es.append(e)
        for p, e in zip(params, es):
            p.sub_(e)


def _model(device, name="resnetv2_50x1_bit"):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["sam_on", "plain_sam"])
@pytest.mark.parametrize("impl", ["samnorm", "loop"])
def test_perturb_restore(benchmark, device, which, impl):
    model = _model(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    sam = samnorm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), model if which == "sam_on" else None)
    params = sam.perturbed_parameters()

    def run():
        if impl == "samnorm":
            sam.first_step()
            sam.restore()
        else:
            _loop_perturb_restore(params)
        _sync(device)

    benchmark.extra_info["pairs"] = [
        (f"perturb+restore {which} resnetv2_50 {device}", "candidate" if impl == "samnorm" else "baseline")
    ]
    benchmark.pedantic(run, rounds=30 if which == "sam_on" else 8, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", ["sgd", "sam_on_loss", "sam_on_full_backward"])
def test_training_step(benchmark, device, step):
    size, batch = (128, 4) if device == "cpu" else (224, 64)
    model = _model(device, "resnetv2_50x1_bit")
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sam = samnorm.SAM(base, model, rho=0.5)

    def sgd():
        base.zero_grad()
        loss_fn(model(x), y).backward()
        base.step()
        _sync(device)

    def sam_loss():  # first pass differentiates the norm parameters only
        sam.first_step(loss_fn(model(x), y))
        loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)
        _sync(device)

    def sam_full():  # the usual formulation: a full backward in the first pass
        loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)
        _sync(device)

    fn = {"sgd": sgd, "sam_on_loss": sam_loss, "sam_on_full_backward": sam_full}[step]
    pair = f"train step {{}} vs sgd resnetv2_50 {device}"
    benchmark.extra_info["pairs"] = (
        [(pair.format(s), "baseline") for s in ("sam_on_loss", "sam_on_full_backward")]
        if step == "sgd"
        else [(pair.format(step), "candidate")]
    )
    benchmark.pedantic(fn, rounds=12 if device == "cpu" else 20, warmup_rounds=2, iterations=1)


# ------------------------------------------------------------------ flat vs foreach vs loop
# ``python benchmarks/bench_optim.py``: perturb+restore only, every implementation timed in turn
# within each round (the order shuffled per round), 1 intra-op thread, so that load from other jobs
# on a shared machine hits all of them alike. "flat" is samnorm's SAM before issue 12 (persistent
# flat buffers for tensors up to 2^16 elements, per-tensor ops for larger ones), loaded from git.

FLAT_COMMIT = "6733a81"  # main before the flat buffers were dropped


def _flat_sam_class():
    import subprocess
    import sys
    import types
    from pathlib import Path

    code = subprocess.run(
        ["git", "show", f"{FLAT_COMMIT}:samnorm/optim.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    ).stdout
    module = types.ModuleType("samnorm.optim_flat")
    module.__package__ = "samnorm"
    sys.modules[module.__name__] = module
    exec(compile(code, "optim_flat.py", "exec"), module.__dict__)
    return module.SAM


def _implementations(model, which):
    """perturb+restore callables over the same parameters and gradients. "flat" and "plain
    foreach" are samnorm's grouped path with and without its flat buffers (the size limit set to 0,
    so every tensor takes the ``_foreach`` kernels); "before issue 12" is the previous SAM."""
    import samnorm.sam.functional as optim

    perturb = model if which == "sam_on" else None
    sams = {
        "flat": samnorm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), perturb),
        "plain foreach": samnorm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), perturb),
        "per-tensor (foreach=False)": samnorm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), perturb, foreach=False),
        "SAM before issue 12": _flat_sam_class()(torch.optim.SGD(model.parameters(), lr=0.1), perturb),
    }
    params = sams["flat"].perturbed_parameters()
    limit = optim._FLAT_MAX_NUMEL

    def via(name):
        sam = sams[name]

        def run():
            optim._FLAT_MAX_NUMEL = 0 if name == "plain foreach" else limit
            try:
                sam.first_step()
                sam.restore()
            finally:
                optim._FLAT_MAX_NUMEL = limit

        return run

    impls = {name: via(name) for name in sams}
    impls["per-parameter loop"] = lambda: _loop_perturb_restore(params)
    return len(params), impls


def _interleaved(rounds: int, reps: dict[str, int]) -> list[dict]:
    import os
    import random
    import statistics
    import time

    torch.set_num_threads(1)
    rng = random.Random(0)
    rows = []
    for which in ("sam_on", "plain_sam"):
        model = _model("cpu")
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        n, impls = _implementations(model, which)
        times: dict[str, list[float]] = {k: [] for k in impls}
        for fn in impls.values():  # warm-up: allocate the persistent buffers
            fn()
            fn()
        for _ in range(rounds):
            order = list(impls)
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                for _ in range(reps[which]):
                    impls[name]()
                times[name].append((time.perf_counter() - t0) / reps[which] * 1e3)
        base = statistics.median(times["per-parameter loop"])
        for name, ts in times.items():
            q1, med, q3 = statistics.quantiles(ts, n=4)
            # per-round ratio to flat (same round, so the same load), then its median
            over_flat = statistics.median(t / f for t, f in zip(ts, times["flat"]))
            rows.append(
                {
                    "selection": which,
                    "tensors": n,
                    "impl": name,
                    "median_ms": med,
                    "iqr_ms": q3 - q1,
                    "loop_over_impl": base / med,
                    "over_flat": over_flat,
                }
            )
    rows.append({"load": os.getloadavg()})
    return rows


if __name__ == "__main__":
    import json
    import subprocess
    import sys

    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    result = _interleaved(rounds, {"sam_on": 20, "plain_sam": 1})
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    for row in result:
        if "impl" in row:
            print(
                f"{row['selection']:9s} {row['tensors']:4d} {row['impl']:28s} median {row['median_ms']:8.3f} ms  "
                f"IQR {row['iqr_ms']:7.3f} ms  loop/impl {row['loop_over_impl']:.2f}x  "
                f"impl/flat {row['over_flat']:.2f}x"
            )
    print(json.dumps(result))
