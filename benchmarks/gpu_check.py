"""One-shot GPU check of samnorm's CUDA paths, with timings (run on a machine with a GPU).

    python benchmarks/gpu_check.py --out results.json           # on CUDA
    python benchmarks/gpu_check.py --device cpu --quick         # dry run of the same code

Checks: (1) the grouped path equals the per-tensor path on CUDA; (2) no host-device sync inside
``first_step`` / ``second_step`` / ``restore`` (``torch.cuda.set_sync_debug_mode("error")``);
(3) fp16 autocast with a GradScaler: an inf in either pass skips the step and the scaler backs
off. Times: perturb+restore against the per-parameter loop (SAM-ON and plain SAM on
resnetv2_50x1_bit), and a training step (SAM-ON with the norm-only first pass, SAM-ON with a full
first backward) against a plain SGD step. Every ratio is measured in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samnorm
from samnorm import SAM


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, reps: int, warmup: int = 3) -> float:
    """Median wall time in ms (synchronised before and after each repetition)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def loop_perturb_restore(params, rho=0.05):
    """The common per-parameter formulation of public SAM code (the baseline)."""
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        scale = rho / (norm + 1e-12)
        es = []
        for p in params:
            e = p.grad * scale
            p.add_(e)
            es.append(e)
        for p, e in zip(params, es):
            p.sub_(e)


def small_net(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).to(device)


def check_foreach_equals_single(device):
    x = torch.randn(8, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    outs = {}
    for foreach in (None, False):
        for adaptive in (False, True):
            model = small_net(device)
            opt = SAM(
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                model,
                rho=0.5,
                adaptive=adaptive,
                foreach=foreach,
            )
            for _ in range(3):
                opt.first_step(nn.functional.cross_entropy(model(x), y))
                with opt.second_pass(model):
                    nn.functional.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
            outs[(foreach, adaptive)] = [p.detach().clone() for p in model.parameters()]
    diff = max(float((a - b).abs().max()) for ad in (False, True) for a, b in zip(outs[(None, ad)], outs[(False, ad)]))
    return {"foreach_vs_single_max_abs_diff": diff, "ok": diff < 1e-5}


def check_no_sync(device):
    if device != "cuda":
        return {"skipped": "no CUDA"}
    model = small_net(device)
    x = torch.randn(8, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    results = {}
    for name, perturb in (("sam_on", model), ("plain_sam", None)):
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), perturb, rho=0.5)
        loss = nn.functional.cross_entropy(model(x), y)  # forward/backward outside the check
        try:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            opt.first_step(loss)
            opt.restore()
            torch.cuda.set_sync_debug_mode(0)
            nn.functional.cross_entropy(model(x), y).backward()
            torch.cuda.set_sync_debug_mode("error")
            opt.first_step(zero_grad=True)  # the .grad path
            torch.cuda.set_sync_debug_mode(0)
            nn.functional.cross_entropy(model(x), y).backward()
            torch.cuda.set_sync_debug_mode("error")
            opt.second_step(zero_grad=True)
            results[name] = "no sync"
        except RuntimeError as err:  # the debug mode raises on a synchronising call
            results[name] = f"SYNC: {err}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    results["ok"] = all(v == "no sync" for k, v in results.items())
    return results


def check_amp(device):
    if device != "cuda":
        return {"skipped": "no CUDA"}
    out = {}
    for inject in (None, "first", "second"):
        model = small_net(device)
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.5)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14)
        x = torch.randn(8, 3, 16, 16, device=device)
        y = torch.randint(0, 10, (8,), device=device)
        before = copy.deepcopy(model.state_dict())
        handle = model[1].weight.register_hook(lambda g: g * float("inf")) if inject == "first" else None
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.first_step(scaler.scale(loss))
        if handle:
            handle.remove()
        handle = model[0].weight.register_hook(lambda g: g * float("inf")) if inject == "second" else None
        with torch.autocast("cuda", dtype=torch.float16), opt.second_pass(model):
            loss2 = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss2).backward()
        if handle:
            handle.remove()
        opt.second_step(scaler=scaler, zero_grad=True)
        scaler.update()
        changed = any(
            not torch.equal(v, before[k])
            for k, v in model.state_dict().items()
            if v.is_floating_point() and "running" not in k
        )
        out[str(inject)] = {"params_changed": changed, "scale_after": scaler.get_scale()}
    out["ok"] = (
        out["None"]["params_changed"]
        and not out["first"]["params_changed"]
        and not out["second"]["params_changed"]
        and out["first"]["scale_after"] == 2.0**13
        and out["second"]["scale_after"] == 2.0**13
    )
    return out


def bench_perturb(device, quick):
    import timm

    model = timm.create_model("resnetv2_50x1_bit", pretrained=False).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    out = {}
    for name, perturb in (("sam_on", model), ("plain_sam", None)):
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), perturb)
        params = opt.perturbed_parameters()
        reps = 5 if quick else 50

        def ours():
            opt.first_step()
            opt.restore()

        t_ours = timeit(ours, device, reps)
        t_loop = timeit(lambda: loop_perturb_restore(params), device, reps)
        out[name] = {"samnorm_ms": t_ours, "loop_ms": t_loop, "speedup": t_loop / t_ours, "tensors": len(params)}
    return out


def bench_train(device, quick):
    import timm

    size, batch = (64, 2) if quick else (224, 64)
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    base = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    sam = SAM(base, model, rho=0.5)
    out = {}
    for amp in (False, True):
        ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

        def sgd():
            base.zero_grad()
            with ctx():
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            base.step()

        def sam_loss():
            with ctx():
                loss = nn.functional.cross_entropy(model(x), y)
            sam.first_step(loss)
            with ctx(), sam.second_pass(model):
                loss2 = nn.functional.cross_entropy(model(x), y)
            loss2.backward()
            sam.second_step(zero_grad=True)

        def sam_full():
            with ctx():
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            sam.first_step(zero_grad=True)
            with ctx(), sam.second_pass(model):
                loss2 = nn.functional.cross_entropy(model(x), y)
            loss2.backward()
            sam.second_step(zero_grad=True)

        reps = 3 if quick else 20
        t = {
            k: timeit(f, device, reps)
            for k, f in (("sgd", sgd), ("sam_on_loss", sam_loss), ("sam_on_full_backward", sam_full))
        }
        out["bf16" if amp else "fp32"] = {
            **{f"{k}_ms": v for k, v in t.items()},
            "sam_on_loss_vs_sgd": t["sam_on_loss"] / t["sgd"],
            "sam_on_full_backward_vs_sgd": t["sam_on_full_backward"] / t["sgd"],
            "batch": batch,
            "size": size,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = args.device
    torch.backends.cudnn.benchmark = True
    res = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "samnorm": samnorm.__version__,
    }
    for name, fn in (
        ("foreach_equals_single", check_foreach_equals_single),
        ("no_sync", check_no_sync),
        ("amp_grad_scaler", check_amp),
    ):
        res[name] = fn(dev)
        print(name, json.dumps(res[name]), flush=True)
    for name, fn in (("perturb_restore", bench_perturb), ("train_step", bench_train)):
        res[name] = fn(dev, args.quick)
        print(name, json.dumps(res[name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
