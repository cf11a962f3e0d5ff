"""Training-step cost of SAM(-ON) and its cheaper variants relative to SGD, in one interleaved run.

Every candidate trains the same model (shared weights, its own optimizer state) on the same batch.
The candidates take turns one step at a time, round-robin (the order rotates every turn); a
round is ``--block`` steps of each (a multiple of every interval ``k``, so each round holds the
same share of SAM steps), and the first round is warm-up. Each step is timed by the wall clock and
by the process's CPU time; with one intra-op thread the CPU time counts this process's work only,
so it moves far less than the wall clock when other jobs share the machine. Reported per candidate
and clock: the median time of a step and its interquartile range over rounds, the ratio of medians
to SGD, and the median and IQR of the per-round ratio (time / SGD's time in the same round), which
cancels slow drifts of the machine. SGD's own spread says how far to trust any ratio.

Run (CPU, as in benchmarks/RESULTS.md):
    python benchmarks/bench_step_cost.py --out step_cost.json
    python benchmarks/bench_step_cost.py --rounds 3 --out /tmp/quick.json     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import samnorm
from samnorm.sam.variants import IntervalSAM, LookSAM, OnePassSAM
from samnorm.utils.io import atomic_write

Step = Callable[[], None]

# name -> (what it is, builder); the builder gets (model, x, y) and returns one training step
CANDIDATES: dict[str, str] = {
    "sgd": "SGD (momentum 0.9), one forward/backward",
    "sam_on_loss": "SAM-ON, first_step(loss): first backward over the norm parameters only",
    "sam_on_grad": "SAM-ON, .grad path: full first backward, first_step()",
    "sam_full": "plain SAM (every parameter perturbed), .grad path",
    "interval4": "IntervalSAM k=4 (SAM-ON, loss path): a SAM-ON step every 4th step",
    "looksam4": "LookSAM k=4 alpha=0.7 (SAM-ON, loss path)",
    "onepass_momentum": "OnePassSAM direction=momentum (SAM-ON): one forward/backward",
    "onepass_grad": "OnePassSAM direction=grad (SAM-ON): one forward/backward",
}


def build_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], rho: float = 0.5, lr: float = 1e-3
) -> dict[str, Step]:
    """One step function per candidate name; each owns its optimizer over the shared ``model``."""
    loss_fn = nn.CrossEntropyLoss()

    def sgd(opt):
        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return step

    def loss_path(opt):  # SAM's two-step form; variants skip the second pass on plain steps
        def step():
            with opt.first_pass(model):
                loss = loss_fn(model(x), y)
            opt.first_step(loss)
            if getattr(opt, "is_sam_step", True):
                with opt.second_pass(model):
                    loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)

        return step

    def grad_path(opt):
        def step():
            with opt.first_pass(model):
                loss_fn(model(x), y).backward()
            opt.first_step(zero_grad=True)
            with opt.second_pass(model):
                loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)

        return step

    def one_pass(opt):
        def step():
            opt.first_step()
            with opt.second_pass(model):
                loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)

        return step

    def base():
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    makers: dict[str, Callable[[], Step]] = {
        "sgd": lambda: sgd(base()),
        "sam_on_loss": lambda: loss_path(samnorm.SAM(base(), model, rho=rho)),
        "sam_on_grad": lambda: grad_path(samnorm.SAM(base(), model, rho=rho)),
        "sam_full": lambda: grad_path(samnorm.SAM(base(), None, rho=rho, model=model)),
        "interval4": lambda: loss_path(IntervalSAM(base(), model, k=4, rho=rho)),
        "looksam4": lambda: loss_path(LookSAM(base(), model, k=4, alpha=0.7, rho=rho)),
        "onepass_momentum": lambda: one_pass(OnePassSAM(base(), model, rho=rho)),
        "onepass_grad": lambda: one_pass(OnePassSAM(base(), model, rho=rho, direction="grad")),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"unknown candidate(s) {unknown}; choose from {list(makers)}")
    if "sgd" not in names:
        raise ValueError("the candidates must include 'sgd': every figure is a ratio to it")
    return {n: makers[n]() for n in names}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(
    steps: dict[str, Step], rounds: int, block: int, warmup: int = 1, progress: bool = False
) -> dict[str, Any]:
    """Per round, ``block`` steps of every candidate, interleaved step by step (candidate order
    rotating); the per-step wall and process-CPU seconds of each candidate in each round."""
    if rounds < 1 or block < 1 or block % 4:
        raise ValueError("rounds must be >= 1 and block a positive multiple of 4 (the interval k)")
    names = list(steps)
    times = {clock: {n: [] for n in names} for clock in CLOCKS}
    for r in range(warmup + rounds):
        spent = {clock: dict.fromkeys(names, 0.0) for clock in CLOCKS}
        for j in range(block):
            shift = (r * block + j) % len(names)
            for name in names[shift:] + names[:shift]:
                before = {clock: f() for clock, f in CLOCKS.items()}
                steps[name]()
                for clock, f in CLOCKS.items():
                    spent[clock][name] += f() - before[clock]
        if r >= warmup:
            for clock in CLOCKS:
                for name in names:
                    times[clock][name].append(spent[clock][name] / block)
        if progress:
            print(f"round {r + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    return {name: {clock: _summary(times[clock][name], times[clock]["sgd"]) for clock in CLOCKS} for name in names}


def _summary(ts: list[float], sgd: list[float]) -> dict[str, Any]:
    q1, med, q3 = _quartiles(ts)
    p1, pmed, p3 = _quartiles([t / s for t, s in zip(ts, sgd)])
    return {
        "step_ms": [round(1e3 * t, 3) for t in ts],
        "median_ms": 1e3 * med,
        "iqr_ms": [1e3 * q1, 1e3 * q3],
        "ratio_of_medians": med / statistics.median(sgd),
        "paired_ratio_median": pmed,
        "paired_ratio_iqr": [p1, p3],
    }


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the raw times and the ratios")
    ap.add_argument("--model", default="resnetv2_50x1_bit", help="timm model name (random init)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=4, help="steps per timed block (a multiple of 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = ap.parse_args(argv)

    import timm  # only the benchmark needs it

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, model.num_classes, (args.batch,))
    steps = build_steps(model, x, y, args.candidates)
    load_before = _load()
    results = interleaved(steps, args.rounds, args.block, progress=True)
    report = {
        "command": " ".join(["python benchmarks/bench_step_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "rounds": args.rounds,
        "block": args.block,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "loadavg_before": load_before,
        "loadavg_after": _load(),
        "candidates": {n: {"what": CANDIDATES[n], **results[n]} for n in args.candidates},
    }
    atomic_write(args.out, json.dumps(report, indent=1))
    print(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    """The markdown table of RESULTS.md: wall-clock and process-CPU time, relative to SGD."""
    rows = [
        "| step | wall ms, median (IQR) | wall / SGD per round, median (IQR) | "
        "CPU ms, median (IQR) | CPU / SGD per round, median (IQR) |",
        "|---|---|---|---|---|",
    ]
    for name, c in report["candidates"].items():
        cells = []
        for clock in CLOCKS:
            s = c[clock]
            cells.append(f"{s['median_ms']:.0f} ({s['iqr_ms'][0]:.0f}-{s['iqr_ms'][1]:.0f})")
            cells.append(
                f"{s['paired_ratio_median']:.2f}x ({s['paired_ratio_iqr'][0]:.2f}-{s['paired_ratio_iqr'][1]:.2f})"
            )
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
