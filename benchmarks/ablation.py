"""Ablation of the SFT recipe on the demo's data: what does sharpness-aware fine-tuning buy, and when?

One command runs every fine-tuning run, resumably, and prints the Markdown tables of
benchmarks/RESULTS.md (section "Ablation"):

    nice -n 10 python benchmarks/ablation.py --workers 2

Design (issue 13). Backbones: the demo's ResNetV2 family (BiT-style, GroupNorm), one per pretraining
seed (``--backbones``), each pretrained by :func:`samnorm.demo.pretrain` (cached). For every backbone,
fine-tuning seed (``--seeds``), learning rate (``--lrs``) and pseudo-OOD term (off: no pseudo-OOD images;
on: one pseudo-OOD image per ID image, uniform-target loss with weight 0.25), the arms (``--optimizers``
with the term on, ``--off-optimizers`` with it off; among SGD, SAM-ON, ASAM-ON, full SAM and the cheaper
schedules of :mod:`samnorm.variants` on SAM-ON: ``onepass-on`` (momentum direction, one pass per step),
``interval-on`` and ``looksam-on`` (a SAM step every 4 steps), each with SAM-ON's rho sweep) fine-tune one
epoch through :func:`samnorm.recipe.finetune` from the same weights with the same seed, hence the same
batches and pseudo-OOD images (paired runs). Two phases:

1. selection: on the ``--select-seeds`` (default: seed 0), every SAM arm runs at every rho of
   ``--rhos``; rho per (arm, lr, OOD term) is chosen on validation data alone (below), as the mean over
   the backbones and selection seeds, among rhos that keep validation accuracy within 1 point of the
   pretrained models';
2. measurement: the other seeds run each SAM arm at its chosen rho only.

Each run is scored on

- validation data: the ID validation digits vs a held-out real OOD set (no test table has it); the
  criterion is the mean FPR95 of MSP and Energy there. The test OOD sets only measure;
- test data: ID test digits vs the demo's four OOD sets (textures, photos, faces, noise): average FPR95
  and AUROC of MSP, Energy, MaxLogit, RankFeat, ID accuracy, and the appendix's quantities (mean
  FC-gradient norm and max logit on ID test and on the pooled OOD sets).

Reported: per cell, arm minus SGD paired over (backbone, seed), mean and 95% Student-t interval (and a
percentile-bootstrap interval in the JSON); for the cheaper schedules also variant minus SAM-ON (what
the cheaper step gives up). Results go to ``--out`` (one JSON per backbone, rewritten
after every run, so an interrupted run resumes where it stopped) and the tables to ``--out/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

SCORERS = ("MSP", "Energy", "MaxLogit", "RankFeat")
OPTIMIZERS = {"sgd": "SGD", "sam-on": "SAM-ON", "asam-on": "ASAM-ON", "sam": "full SAM",
              "onepass-on": "OnePass SAM-ON", "interval-on": "Interval SAM-ON (k=4)", "looksam-on": "LookSAM-ON (k=4)"}
# the cheaper schedules of samnorm.variants on SAM-ON: arm -> (variant, k); momentum direction for OnePass
VARIANT_ARMS = {"onepass-on": ("onepass", None), "interval-on": ("interval", 4), "looksam-on": ("looksam", 4)}
DEFAULT_RHOS = {"sam-on": (0.1, 0.5, 1.0), "asam-on": (0.1, 1.0), "sam": (0.02, 0.1),
                **{arm: (0.1, 0.5, 1.0) for arm in VARIANT_ARMS}}
OOD_WEIGHT = 0.25


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _rhos(text: str) -> dict[str, tuple[float, ...]]:
    out = dict(DEFAULT_RHOS)  # arms not named keep their default sweep
    for part in text.split(";"):
        name, _, values = part.partition("=")
        if name.strip() not in DEFAULT_RHOS or not values:
            raise argparse.ArgumentTypeError(f"expected OPT=r1,r2;... with OPT in {list(DEFAULT_RHOS)}, got {part!r}")
        out[name.strip()] = _floats(values)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/ablation_runs", help="folder of the per-backbone JSON and ablation.md")
    p.add_argument("--backbones", type=_ints, default=(0, 1), help="pretraining seeds (default 0,1)")
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2, 3, 4), help="fine-tuning seeds (default 0-4)")
    p.add_argument("--lrs", type=_floats, default=(0.01, 0.1), help="fine-tuning learning rates (default 0.01,0.1)")
    p.add_argument("--ood", default="off,on", help="pseudo-OOD term settings, subset of off,on")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="arms with the pseudo-OOD term on, "
                   f"subset of {','.join(OPTIMIZERS)}")
    p.add_argument("--off-optimizers", default="sgd,sam-on", help="arms with the pseudo-OOD term off")
    p.add_argument("--select-seeds", type=_ints, default=(0,), help="seeds of the rho sweep (default 0)")
    p.add_argument("--rhos", type=_rhos, default=DEFAULT_RHOS,
                   help="rho sweep per SAM arm, e.g. 'sam-on=0.1,0.5;asam-on=0.1,1;sam=0.02,0.1'")
    p.add_argument("--widths", type=_ints, default=(16, 32, 64, 128), help="ResNetV2 stage widths")
    p.add_argument("--n-test", type=int, default=500, help="ID test digits scored")
    p.add_argument("--n-ood", type=int, default=200, help="images per OOD set (test and validation)")
    p.add_argument("--workers", type=int, default=1, help="processes, one backbone each (1 thread each)")
    p.add_argument("--cache-dir", default=None, help="pretrained-weights cache (default: samnorm's)")
    p.add_argument("--report-only", action="store_true", help="only tabulate the runs already in --out")
    return p


# ----------------------------------------------------------------------------------------- runs
def _demo_config(args: argparse.Namespace, backbone: int) -> Any:
    from samnorm.demo import DemoConfig

    return DemoConfig(pretrain_seed=backbone, widths=tuple(args.widths), stem_width=args.widths[0] // 2,
                      n_test=args.n_test, n_ood=args.n_ood, scorers=SCORERS, cache_dir=args.cache_dir,
                      progress=False, plots=False, quiet=True)


def _arms(args: argparse.Namespace, ood: str) -> list[str]:
    return (args.optimizers if ood == "on" else args.off_optimizers).split(",")


def _cells(args: argparse.Namespace) -> list[tuple[str, float]]:
    return [(ood, lr) for ood in args.ood.split(",") for lr in args.lrs]


def _grid(args: argparse.Namespace, chosen: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The runs of one backbone: the rho sweep on the selection seeds (``chosen`` None), else the other
    seeds at the chosen rho; seeds outermost so that a cut-short run leaves whole seeds."""
    seeds = args.select_seeds if chosen is None else [s for s in args.seeds if s not in args.select_seeds]
    runs = []
    for seed in seeds:
        for ood, lr in _cells(args):
            for opt in _arms(args, ood):
                if opt == "sgd":
                    rhos: tuple[Any, ...] = (None,)
                else:
                    rhos = args.rhos[opt] if chosen is None else (chosen[_cell_key(ood, lr, opt)],)
                for rho in rhos:
                    runs.append({"seed": seed, "ood": ood, "lr": lr, "optimizer": opt, "rho": rho})
    return runs


def _cell_key(ood: str, lr: float, opt: str) -> str:
    return f"{ood}|{lr:g}|{opt}"


def _key(run: dict[str, Any]) -> str:
    return f"{run['ood']}|{run['lr']:g}|{run['optimizer']}|{run['rho']}|{run['seed']}"


def _figures(model: Any, test: Any, val: Any, val_ood: dict[str, Any]) -> dict[str, Any]:
    from samnorm.demo.run import evaluate, theory_quantities
    from samnorm.demo.select import validation_metrics

    figures, _ = evaluate(model, test, SCORERS)
    return {"id_accuracy": figures["id_accuracy"],
            "test": {s: figures["metrics"][s]["average"] for s in SCORERS},
            "theory": theory_quantities(model, test),
            "val": validation_metrics(model, val, val_ood)}


def recipe_of(run: dict[str, Any], config: Any) -> Any:
    """The :class:`~samnorm.recipe.FinetuneConfig` of one run (a variant arm: SAM-ON with its schedule)."""
    from samnorm.recipe import FinetuneConfig

    variant, k = VARIANT_ARMS.get(run["optimizer"], (None, None))
    return FinetuneConfig(optimizer="sam-on" if variant else run["optimizer"], variant=variant, variant_k=k,
                          rho=run["rho"], lr=run["lr"], momentum=0.9, weight_decay=config.weight_decay, epochs=1,
                          batch_size=config.batch_size, ood_ratio=1.0 if run["ood"] == "on" else 0.0,
                          ood_weight=OOD_WEIGHT, transforms=list(config.transforms))


def run_backbone(args: argparse.Namespace, backbone: int, chosen: dict[str, Any] | None = None) -> str:
    """Every missing run of one backbone and phase (``chosen`` None: the rho sweep); returns its JSON path."""
    import torch

    from samnorm.demo.data import load_data
    from samnorm.demo.backbone import pretrain
    from samnorm.demo.run import finetune_copy
    from samnorm.io import atomic_write

    torch.set_num_threads(1)
    config = _demo_config(args, backbone)
    path = Path(args.out) / f"backbone{backbone}.json"
    state = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    test = load_data(config)
    val = load_data(config, heldout=True)
    val_ood = {"heldout": val.ood["heldout"]}
    model, info = pretrain(config, test)
    if "pretrained" not in state:
        state["pretrained"] = {**_figures(model, test, val.val, val_ood), "pretrain": info}
    for run in _grid(args, chosen):
        key = _key(run)
        if key in state["runs"]:
            continue
        recipe = recipe_of(run, config)
        start = time.perf_counter()
        tuned = finetune_copy(model, test.train, recipe, run["seed"])
        seconds = time.perf_counter() - start
        state["runs"][key] = {**run, **_figures(tuned, test, val.val, val_ood), "seconds": seconds}
        atomic_write(path, json.dumps(state, indent=1))
        print(f"backbone {backbone} {key}: {seconds:.1f} s", file=sys.stderr, flush=True)
    atomic_write(path, json.dumps(state, indent=1))
    return str(path)


# --------------------------------------------------------------------------------------- report
def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:+.1f}"


def _interval(d: dict[str, float]) -> str:
    """``mean [low, high]`` in percentage points."""
    if math.isnan(d["low"]):
        return f"{_pct(d['mean'])}"
    return f"{_pct(d['mean'])} [{_pct(d['low'])}, {_pct(d['high'])}]"


def choose_rhos(states: dict[int, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """rho per (OOD term, lr, SAM arm) from the selection seeds' validation criterion alone."""
    import numpy as np

    backbones = sorted(states)
    pre_acc = float(np.mean([states[b]["pretrained"]["val"]["accuracy"] for b in backbones]))
    chosen: dict[str, Any] = {}
    sweeps: dict[str, Any] = {}
    for ood, lr in _cells(args):
        for opt in _arms(args, ood):
            if opt == "sgd":
                continue
            sweep = {}
            for rho in args.rhos[opt]:
                got = [states[b]["runs"][k] for b in backbones for seed in args.select_seeds
                       if (k := _key({"ood": ood, "lr": lr, "optimizer": opt, "rho": rho, "seed": seed}))
                       in states[b]["runs"]]
                if len(got) == len(backbones) * len(args.select_seeds):
                    sweep[rho] = {"criterion": float(np.mean([r["val"]["criterion"] for r in got])),
                                  "val_accuracy": float(np.mean([r["val"]["accuracy"] for r in got]))}
            if len(sweep) < len(args.rhos[opt]):
                raise RuntimeError(f"the rho sweep of {opt} ({ood}, lr {lr:g}) is incomplete: run the selection phase")
            eligible = {r: v for r, v in sweep.items() if v["val_accuracy"] >= pre_acc - 0.01} or sweep
            chosen[_cell_key(ood, lr, opt)] = min(eligible, key=lambda r: eligible[r]["criterion"])
            sweeps[_cell_key(ood, lr, opt)] = sweep
    return {"chosen": chosen, "sweeps": sweeps, "pretrained_val_accuracy": pre_acc}


def analyse(states: dict[int, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Paired differences arm − SGD per cell, scorer and quantity, each SAM arm at its chosen rho; for
    the cheaper variants also variant − SAM-ON (``vs_sam_on``)."""
    import numpy as np

    from samnorm.demo.stats import bootstrap_interval, paired

    backbones = sorted(states)
    selection = choose_rhos(states, args)
    cells: dict[str, Any] = {}
    for ood, lr in _cells(args):
        cell_name = f"OOD term {ood}, lr {lr:g}"

        def runs_of(opt: str, rho: Any) -> dict[tuple[int, int], dict[str, Any]]:
            found = {}
            for b in backbones:
                for seed in args.seeds:
                    key = _key({"ood": ood, "lr": lr, "optimizer": opt, "rho": rho, "seed": seed})
                    if key in states[b]["runs"]:
                        found[(b, seed)] = states[b]["runs"][key]
            return found

        sgd = runs_of("sgd", None)
        cell: dict[str, Any] = {"arms": {}}
        for opt in _arms(args, ood):
            rho = None if opt == "sgd" else selection["chosen"][_cell_key(ood, lr, opt)]
            chosen = runs_of(opt, rho)
            pairs = sorted(set(chosen) & set(sgd))
            if not pairs:
                continue
            entry: dict[str, Any] = {"rho": rho, "n": len(pairs),
                                     "sweep": selection["sweeps"].get(_cell_key(ood, lr, opt), {})}

            def diff(get: Any, ref: dict[tuple[int, int], dict[str, Any]] = sgd) -> dict[str, Any]:
                both = [p for p in pairs if p in ref]
                a = [get(chosen[p]) for p in both]
                b = [get(ref[p]) for p in both]
                d = paired(a, b)
                d["bootstrap"] = bootstrap_interval(np.subtract(a, b))
                d["arm_mean"] = float(np.mean(a))
                d["n"] = len(both)
                return d

            entry["FPR95"] = {s: diff(lambda r, s=s: r["test"][s]["FPR95"]) for s in SCORERS}
            entry["AUROC"] = {s: diff(lambda r, s=s: r["test"][s]["AUROC"]) for s in SCORERS}
            entry["id_accuracy"] = diff(lambda r: r["id_accuracy"])
            entry["val_criterion"] = diff(lambda r: r["val"]["criterion"])
            entry["theory"] = {f"{where} {q}": diff(lambda r, w=where, q=q: r["theory"][w][q])
                               for where in ("id", "ood") for q in ("grad_norm", "max_logit")}
            if opt in VARIANT_ARMS and "sam-on" in _arms(args, ood):  # what the cheaper schedule gives up
                sam_on = runs_of("sam-on", selection["chosen"][_cell_key(ood, lr, "sam-on")])
                entry["vs_sam_on"] = {"FPR95": {s: diff(lambda r, s=s: r["test"][s]["FPR95"], sam_on) for s in SCORERS},
                                      "id_accuracy": diff(lambda r: r["id_accuracy"], sam_on)}
            cell["arms"][opt] = entry
        if cell["arms"]:
            cells[cell_name] = cell
    pretrained = {
        "FPR95": {s: float(np.mean([states[b]["pretrained"]["test"][s]["FPR95"] for b in backbones])) for s in SCORERS},
        "id_accuracy": float(np.mean([states[b]["pretrained"]["id_accuracy"] for b in backbones])),
        "theory": {f"{w} {q}": float(np.mean([states[b]["pretrained"]["theory"][w][q] for b in backbones]))
                   for w in ("id", "ood") for q in ("grad_norm", "max_logit")},
        "per_backbone": {b: {"val_accuracy": states[b]["pretrained"]["val"]["accuracy"],
                             "FPR95": {s: states[b]["pretrained"]["test"][s]["FPR95"] for s in SCORERS}}
                         for b in backbones},
    }
    return {"cells": cells, "pretrained": pretrained, "selection": selection}


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    pre = result["pretrained"]
    lines = [
        "Pretrained backbones (test, mean of the backbones): FPR95 "
        + ", ".join(f"{s} {100 * v:.1f}" for s, v in pre["FPR95"].items())
        + f"; ID accuracy {100 * pre['id_accuracy']:.1f}; per backbone: "
        + "; ".join(f"seed {b}: MSP {100 * v['FPR95']['MSP']:.1f}, Energy {100 * v['FPR95']['Energy']:.1f}"
                    for b, v in pre["per_backbone"].items()) + ".",
        "",
        "**Test FPR95, arm − SGD (percentage points; negative = the arm detects OOD better)**, mean and 95% "
        "paired-t interval over (backbone, seed) pairs; SGD column: its mean FPR95 (%); rho chosen on "
        "validation data:",
        "",
        "| cell | arm (rho) | n | " + " | ".join(SCORERS) + " | ID acc. | val. criterion |",
        "|---|---|---:|" + "---:|" * (len(SCORERS) + 2),
    ]
    for name, cell in result["cells"].items():
        for opt, e in cell["arms"].items():
            label = OPTIMIZERS[opt] + ("" if e["rho"] is None else f" ({e['rho']:g})")
            if opt == "sgd":
                row = [f"{100 * e['FPR95'][s]['arm_mean']:.1f}" for s in SCORERS]
                row += [f"{100 * e['id_accuracy']['arm_mean']:.1f}", f"{100 * e['val_criterion']['arm_mean']:.1f}"]
            else:
                row = [_interval(e["FPR95"][s]) for s in SCORERS]
                row += [_interval(e["id_accuracy"]), _interval(e["val_criterion"])]
            lines.append(f"| {name} | {label} | {e['n']} | " + " | ".join(row) + " |")
    variant_rows = [(name, opt, e) for name, cell in result["cells"].items() for opt, e in cell["arms"].items()
                    if "vs_sam_on" in e]
    if variant_rows:
        lines += [
            "",
            "**The cheaper schedules against SAM-ON: test FPR95, variant − SAM-ON** (percentage points; positive = "
            "the variant loses part of SAM-ON's gain), mean and 95% paired-t interval, each at its own chosen rho:",
            "",
            "| cell | variant (rho) | n | " + " | ".join(SCORERS) + " | ID acc. |",
            "|---|---|---:|" + "---:|" * (len(SCORERS) + 1),
        ]
        for name, opt, e in variant_rows:
            v = e["vs_sam_on"]
            row = [_interval(v["FPR95"][s]) for s in SCORERS] + [_interval(v["id_accuracy"])]
            lines.append(f"| {name} | {OPTIMIZERS[opt]} ({e['rho']:g}) | {v['id_accuracy']['n']} | " + " | ".join(row) + " |")
    lines += [
        "",
        "**The appendix's quantities** (test; means over runs; pretrained: "
        + ", ".join(f"{k} {v:.2f}" for k, v in pre["theory"].items())
        + "). Columns: the arm's mean after fine-tuning, and arm − SGD with its 95% paired-t interval:",
        "",
        "| cell | arm | ID grad-norm | OOD grad-norm | ID max logit | OOD max logit |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, cell in result["cells"].items():
        for opt, e in cell["arms"].items():
            cells = []
            for q in ("id grad_norm", "ood grad_norm", "id max_logit", "ood max_logit"):
                d = e["theory"][q]
                extra = "" if opt == "sgd" else (
                    f" ({d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}])" if not math.isnan(d["low"]) else "")
                cells.append(f"{d['arm_mean']:.2f}{extra}")
            lines.append(f"| {name} | {OPTIMIZERS[opt]} | " + " | ".join(cells) + " |")
    lines += ["", "rho sweeps (validation criterion, mean FPR95 of MSP and Energy on the held-out set, %; "
              "validation accuracy %):", ""]
    for name, cell in result["cells"].items():
        parts = []
        for opt, e in cell["arms"].items():
            if opt != "sgd":
                parts.append(OPTIMIZERS[opt] + " " + ", ".join(
                    f"{r:g}: {100 * v['criterion']:.1f} / {100 * v['val_accuracy']:.1f}" for r, v in e["sweep"].items()))
        lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _phase(args: argparse.Namespace, chosen: dict[str, Any] | None) -> None:
    n = len(args.backbones)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(run_backbone, [args] * n, args.backbones, [chosen] * n))
    else:
        for b in args.backbones:
            run_backbone(args, b, chosen)


def _states(args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    paths = {b: Path(args.out) / f"backbone{b}.json" for b in args.backbones}
    return {b: json.loads(p.read_text()) for b, p in paths.items() if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    arms = [args.optimizers.split(","), args.off_optimizers.split(",")]
    unknown = set(arms[0] + arms[1]) - set(OPTIMIZERS) or set(args.ood.split(",")) - {"off", "on"}
    if unknown or any("sgd" not in a for a in arms):
        print(f"ablation: bad --optimizers/--ood ({sorted(unknown)}); SGD is the reference and must be run",
              file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.report_only:
        _phase(args, None)  # the rho sweep on the selection seeds
        _phase(args, choose_rhos(_states(args), args)["chosen"])  # the other seeds at the chosen rho
    states = _states(args)
    if not states:
        print("ablation: no runs to report", file=sys.stderr)
        return 1
    result = analyse(states, args)
    text = markdown(result, args)
    from samnorm.io import atomic_write

    atomic_write(os.path.join(args.out, "ablation.md"), text)
    atomic_write(os.path.join(args.out, "ablation_summary.json"), json.dumps(result, indent=1, default=str))
    print(text)
    print(f"wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
