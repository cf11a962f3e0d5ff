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
epoch through :func:`samnorm.train.recipe.finetune` from the same weights with the same seed, hence the same
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

Studies (issue 20; ``--study``, same design, same JSON files, runs shared between studies by key):

- ``arms`` (above). ``--family t2t_vit`` runs it on the demo's T2T-ViT (LayerNorm) at the demo's size,
  its files under ``benchmarks/ablation_runs/t2t_vit``; with more than one lr, each arm's lr is also
  chosen on validation (selection seeds, at its chosen rho) and compared at that lr with SGD at its own;
- ``cli``: the recipe of ``samnorm finetune`` with the defaults of samnorm 0.1.0, the ones measured here
  (:class:`~samnorm.train.recipe.FinetuneConfig` with :data:`~samnorm.train.recipe.DEFAULTS_0_1_0`: weight decay 0, 0.5
  pseudo-OOD images per ID image, all six transforms, uniform loss at weight 0.5; the defaults chosen from
  these studies, section 8.4 of RESULTS.md, came later) at lr 1e-3 (the default), 0.01 and 0.1; arms SGD,
  SAM-ON at the default rho (``cli-default``) and SAM-ON at the rho chosen on validation; also reported:
  every run minus the CLI's default (SAM-ON, lr 1e-3);
- ``term``: the pseudo-OOD term of the ``arms`` study ("on") taken apart at lr 0.1: each transform alone
  (``only=T``), leave-one-out (``drop=T``), the ratio (``ratio=R``), the loss (``loss=L``, energy margin
  with the demo's margins) and its weight (``weight=W``), joined by ``+``; SGD and SAM-ON; also reported:
  each cell minus the full term, arm by arm.
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

from samnorm.demo.config import PSEUDO_OOD_TRANSFORMS  # torch-free

SCORERS = ("MSP", "Energy", "MaxLogit", "RankFeat")
OPTIMIZERS = {
    "sgd": "SGD",
    "sam-on": "SAM-ON",
    "asam-on": "ASAM-ON",
    "sam": "full SAM",
    "onepass-on": "OnePass SAM-ON",
    "interval-on": "Interval SAM-ON (k=4)",
    "looksam-on": "LookSAM-ON (k=4)",
    "cli-default": "SAM-ON at the CLI's rho",
}
# the cheaper schedules of samnorm.variants on SAM-ON: arm -> (variant, k); momentum direction for OnePass
VARIANT_ARMS = {"onepass-on": ("onepass", None), "interval-on": ("interval", 4), "looksam-on": ("looksam", 4)}
DEFAULT_RHOS = {
    "sam-on": (0.1, 0.5, 1.0),
    "asam-on": (0.1, 1.0),
    "sam": (0.02, 0.1),
    **{arm: (0.1, 0.5, 1.0) for arm in VARIANT_ARMS},
}  # arms not here run at one rho (None)
OOD_WEIGHT = 0.25
#: Stage widths per backbone family: the ResNetV2 at half the demo's width (issue 13), the T2T-ViT at
#: the demo's size (embedding 96).
FAMILY_WIDTHS = {"resnetv2": (16, 32, 64, 128), "t2t_vit": (32, 64, 128, 256)}
#: The pseudo-OOD term taken apart: the full term ("on") first, the reference of every other cell.
TERM_DECOMPOSITION = (
    "on",
    *(f"only={t}" for t in PSEUDO_OOD_TRANSFORMS),
    "ratio=0.25",
    "ratio=0.5",
    "loss=energy",
    "loss=maxlogit",
    "weight=0.5",
    "loss=energy+weight=0.1",
    "loss=maxlogit+weight=0.5",
    *(f"drop={t}" for t in PSEUDO_OOD_TRANSFORMS),
)
#: Per study: pseudo-OOD terms, arms with the term (off: ``--off-optimizers``), learning rates (None: per family).
STUDIES: dict[str, dict[str, Any]] = {
    "arms": {"terms": ("off", "on"), "optimizers": tuple(o for o in OPTIMIZERS if o != "cli-default"), "lrs": None},
    "cli": {"terms": ("cli",), "optimizers": ("sgd", "cli-default", "sam-on"), "lrs": (0.001, 0.01, 0.1)},
    "term": {"terms": TERM_DECOMPOSITION, "optimizers": ("sgd", "sam-on"), "lrs": (0.1,)},
}
ARMS_LRS = {"resnetv2": (0.01, 0.1), "t2t_vit": (0.01, 0.03, 0.1)}


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


def parse_term(term: str) -> dict[str, str]:
    """The settings of a pseudo-OOD term: ``off``, ``on``, ``cli`` (none) or ``key=value`` parts joined by ``+``
    (``only``/``drop``: a transform; ``ratio`` in (0, 1]; ``loss``: uniform, energy, maxlogit; ``weight`` >= 0).

    Example:
        >>> parse_term("loss=energy+weight=0.1")
        {'loss': 'energy', 'weight': '0.1'}
    """
    if term in ("off", "on", "cli"):
        return {}
    settings: dict[str, str] = {}
    for part in term.split("+"):
        key, sep, value = part.partition("=")
        if not sep or key not in ("only", "drop", "ratio", "loss", "weight") or key in settings:
            raise ValueError(
                f"bad pseudo-OOD term {term!r}: expected off, on, cli or key=value parts joined by '+' "
                "with keys only, drop, ratio, loss, weight (each once)"
            )
        settings[key] = value
    bad = [v for k, v in settings.items() if k in ("only", "drop") and v not in PSEUDO_OOD_TRANSFORMS]
    if bad or ("only" in settings and "drop" in settings):
        raise ValueError(f"bad pseudo-OOD term {term!r}: only/drop take one of {list(PSEUDO_OOD_TRANSFORMS)}, not both")
    if settings.get("loss", "uniform") not in ("uniform", "energy", "maxlogit"):
        raise ValueError(f"bad pseudo-OOD term {term!r}: loss must be uniform, energy or maxlogit")
    if not 0 < float(settings.get("ratio", 1)) <= 1 or not float(settings.get("weight", 0)) >= 0:
        raise ValueError(f"bad pseudo-OOD term {term!r}: ratio must be in (0, 1] and weight >= 0")
    return settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=tuple(STUDIES), default="arms", help="which comparison (module docstring)")
    p.add_argument("--family", choices=tuple(FAMILY_WIDTHS), default="resnetv2", help="backbone family")
    p.add_argument(
        "--out",
        default=None,
        help="folder of the per-backbone JSON and the tables (default: "
        "benchmarks/ablation_runs, its t2t_vit sub-folder for --family t2t_vit)",
    )
    p.add_argument("--backbones", type=_ints, default=(0, 1), help="pretraining seeds (default 0,1)")
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2, 3, 4), help="fine-tuning seeds (default 0-4)")
    p.add_argument(
        "--lrs",
        type=_floats,
        default=None,
        help="fine-tuning learning rates (default per study: "
        "arms 0.01,0.1 (T2T-ViT 0.01,0.03,0.1), cli 0.001,0.01,0.1, term 0.1)",
    )
    p.add_argument(
        "--terms",
        "--ood",
        dest="terms",
        default=None,
        help="pseudo-OOD terms, comma-separated (see parse_term; default per study)",
    )
    p.add_argument(
        "--optimizers",
        default=None,
        help=f"arms with the pseudo-OOD term on, subset of {','.join(OPTIMIZERS)} (default per study)",
    )
    p.add_argument("--off-optimizers", default="sgd,sam-on", help="arms with the pseudo-OOD term off")
    p.add_argument("--select-seeds", type=_ints, default=(0,), help="seeds of the rho sweep (default 0)")
    p.add_argument(
        "--rhos",
        type=_rhos,
        default=DEFAULT_RHOS,
        help="rho sweep per SAM arm, e.g. 'sam-on=0.1,0.5;asam-on=0.1,1;sam=0.02,0.1'",
    )
    p.add_argument(
        "--widths",
        type=_ints,
        default=None,
        help="stage widths (default per family: ResNetV2 16,32,64,128, T2T-ViT 32,64,128,256)",
    )
    p.add_argument("--n-test", type=int, default=500, help="ID test digits scored")
    p.add_argument("--n-ood", type=int, default=200, help="images per OOD set (test and validation)")
    p.add_argument("--workers", type=int, default=1, help="processes, one backbone each (1 thread each)")
    p.add_argument("--cache-dir", default=None, help="pretrained-weights cache (default: samnorm's)")
    p.add_argument("--report-only", action="store_true", help="only tabulate the runs already in --out")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-study and per-family defaults left at None; raises ValueError on a bad grid."""
    study = STUDIES[args.study]
    args.out = args.out or ("benchmarks/ablation_runs" + ("" if args.family == "resnetv2" else f"/{args.family}"))
    args.widths = args.widths or FAMILY_WIDTHS[args.family]
    args.lrs = args.lrs or study["lrs"] or ARMS_LRS[args.family]
    args.terms = args.terms or ",".join(study["terms"])
    args.optimizers = args.optimizers or ",".join(study["optimizers"])
    for term in args.terms.split(","):
        parse_term(term)
    arms = [args.optimizers.split(","), args.off_optimizers.split(",")]
    unknown = set(arms[0] + arms[1]) - set(OPTIMIZERS)
    if unknown or any("sgd" not in a for a in arms):
        raise ValueError(f"bad --optimizers/--off-optimizers ({sorted(unknown)}); SGD is the reference and must be run")
    return args


# ----------------------------------------------------------------------------------------- runs
def _demo_config(args: argparse.Namespace, backbone: int) -> Any:
    from samnorm.demo import DemoConfig

    return DemoConfig(
        backbone=args.family,
        pretrain_seed=backbone,
        widths=tuple(args.widths),
        stem_width=args.widths[0] // 2,
        n_test=args.n_test,
        n_ood=args.n_ood,
        scorers=SCORERS,
        cache_dir=args.cache_dir,
        progress=False,
        plots=False,
        quiet=True,
    )


def _arms(args: argparse.Namespace, term: str) -> list[str]:
    return (args.optimizers if term != "off" else args.off_optimizers).split(",")


def _cells(args: argparse.Namespace) -> list[tuple[str, float]]:
    return [(term, lr) for term in args.terms.split(",") for lr in args.lrs]


def _sweep(args: argparse.Namespace, opt: str) -> tuple[Any, ...]:
    """The rhos an arm is tried at on the selection seeds; (None,): one run at the arm's own rho."""
    return args.rhos[opt] if opt in DEFAULT_RHOS else (None,)


def _grid(args: argparse.Namespace, chosen: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The runs of one backbone: the rho sweep on the selection seeds (``chosen`` None), else the other
    seeds at the chosen rho; seeds outermost so that a cut-short run leaves whole seeds."""
    seeds = args.select_seeds if chosen is None else [s for s in args.seeds if s not in args.select_seeds]
    runs = []
    for seed in seeds:
        for term, lr in _cells(args):
            for opt in _arms(args, term):
                rhos = _sweep(args, opt) if chosen is None else (chosen.get(_cell_key(term, lr, opt)),)
                for rho in rhos:
                    runs.append({"seed": seed, "ood": term, "lr": lr, "optimizer": opt, "rho": rho})
    return runs


def _cell_key(term: str, lr: float, opt: str) -> str:
    return f"{term}|{lr:g}|{opt}"


def _key(run: dict[str, Any]) -> str:
    return f"{run['ood']}|{run['lr']:g}|{run['optimizer']}|{run['rho']}|{run['seed']}"


def _figures(model: Any, test: Any, val: Any, val_ood: dict[str, Any]) -> dict[str, Any]:
    from samnorm.demo.run import evaluate, theory_quantities
    from samnorm.demo.tuning import validation_metrics

    figures, _ = evaluate(model, test, SCORERS)
    return {
        "id_accuracy": figures["id_accuracy"],
        "test": {s: figures["metrics"][s]["average"] for s in SCORERS},
        "theory": theory_quantities(model, test),
        "val": validation_metrics(model, val, val_ood),
    }


def recipe_of(run: dict[str, Any], config: Any) -> Any:
    """The :class:`~samnorm.train.recipe.FinetuneConfig` of one run (a variant arm: SAM-ON with its schedule).

    The term ``cli`` keeps every field but the arm's optimizer, rho and the lr at ``samnorm finetune``'s
    default of 0.1.0, the one these runs measured (pinned: :data:`~samnorm.train.recipe.DEFAULTS_0_1_0`, so the
    recorded runs stay reproducible); the others are the demo's fine-tuning with the pseudo-OOD term of
    :func:`parse_term`.
    """
    from samnorm.train.recipe import DEFAULTS_0_1_0, FinetuneConfig

    variant, k = VARIANT_ARMS.get(run["optimizer"], (None, None))
    optimizer = {"cli-default": FinetuneConfig.optimizer}.get(run["optimizer"], run["optimizer"])
    arm = {
        "optimizer": "sam-on" if variant else optimizer,
        "variant": variant,
        "variant_k": k,
        "rho": run["rho"],
        "lr": run["lr"],
    }
    if run["ood"] == "cli":
        return FinetuneConfig(
            **arm,
            transforms=list(DEFAULTS_0_1_0["transforms"]),
            ood_weight=DEFAULTS_0_1_0["ood_weight"][FinetuneConfig.ood_loss],
        )
    term = parse_term(run["ood"])
    transforms = [t for t in config.transforms if term.get("only", t) == t and term.get("drop") != t]
    ratio = 0.0 if run["ood"] == "off" else float(term.get("ratio", 1))
    return FinetuneConfig(
        **arm,
        momentum=0.9,
        weight_decay=config.weight_decay,
        epochs=1,
        batch_size=config.batch_size,
        ood_ratio=ratio,
        ood_loss=term.get("loss", "uniform"),
        ood_weight=float(term.get("weight", OOD_WEIGHT)),
        m_in=config.m_in,
        m_out=config.m_out,
        transforms=transforms,
    )


def dumps_state(state: dict[str, Any]) -> str:
    """A backbone's JSON with one run per line: compact, and a resumed invocation's diff shows its new runs only.

    Example:
        >>> dumps_state({"pretrained": {"a": 1}, "runs": {"k1": {"x": 0.5}, "k2": {"x": 1}}}).splitlines()[2]
        '"k1": {"x":0.5},'
    """

    def one(key: str, value: Any) -> str:
        return f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}"

    head = [one(k, v) for k, v in state.items() if k != "runs"]
    runs = [one(k, v) for k, v in state["runs"].items()]
    return "{" + ",\n".join([*head, '"runs": {\n' + ",\n".join(runs) + "\n}"]) + "}\n"


def run_backbone(args: argparse.Namespace, backbone: int, chosen: dict[str, Any] | None = None) -> str:
    """Every missing run of one backbone and phase (``chosen`` None: the rho sweep); returns its JSON path."""
    import torch

    from samnorm.demo.backbone import cache_path, pretrain
    from samnorm.demo.data import load_data
    from samnorm.demo.run import finetune_copy
    from samnorm.utils.io import atomic_write

    torch.set_num_threads(1)
    config = _demo_config(args, backbone)
    path = Path(args.out) / f"backbone{backbone}.json"
    state = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    if "pretrained" in state and Path(state["pretrained"]["pretrain"]["path"]).name != cache_path(config).name:
        raise ValueError(
            f"{path} holds runs of another pretrained backbone than --family {args.family} "
            f"--widths {args.widths} makes (they would not pair): pass the --out, --family and "
            "--widths those runs were made with"
        )
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
        atomic_write(path, dumps_state(state))
        print(f"backbone {backbone} {key}: {seconds:.1f} s", file=sys.stderr, flush=True)
    atomic_write(path, dumps_state(state))
    return str(path)


# --------------------------------------------------------------------------------------- report
def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:+.1f}"


def _interval(d: dict[str, float]) -> str:
    """``mean [low, high]`` in percentage points."""
    if math.isnan(d["low"]):
        return f"{_pct(d['mean'])}"
    return f"{_pct(d['mean'])} [{_pct(d['low'])}, {_pct(d['high'])}]"


def _selection_runs(states: dict[int, dict[str, Any]], args: argparse.Namespace, run: dict[str, Any]) -> list[Any]:
    """The selection seeds' runs of one setting, on every backbone (empty unless all are there)."""
    got = [
        states[b]["runs"][k]
        for b in sorted(states)
        for seed in args.select_seeds
        if (k := _key({**run, "seed": seed})) in states[b]["runs"]
    ]
    return got if len(got) == len(states) * len(args.select_seeds) else []


def choose_rhos(states: dict[int, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """rho per (OOD term, lr, SAM arm) from the selection seeds' validation criterion alone; with several
    lrs, also the lr per (term, arm) at its chosen rho (``lr``), by the same criterion."""
    import numpy as np

    pre_acc = float(np.mean([states[b]["pretrained"]["val"]["accuracy"] for b in sorted(states)]))

    def best(sweep: dict[Any, dict[str, float]]) -> Any:
        eligible = {r: v for r, v in sweep.items() if v["val_accuracy"] >= pre_acc - 0.01} or sweep
        return min(eligible, key=lambda r: eligible[r]["criterion"])

    chosen: dict[str, Any] = {}
    sweeps: dict[str, Any] = {}
    for term, lr in _cells(args):
        for opt in _arms(args, term):
            sweep = {}
            for rho in _sweep(args, opt):
                if got := _selection_runs(states, args, {"ood": term, "lr": lr, "optimizer": opt, "rho": rho}):
                    sweep[rho] = {
                        "criterion": float(np.mean([r["val"]["criterion"] for r in got])),
                        "val_accuracy": float(np.mean([r["val"]["accuracy"] for r in got])),
                    }
            if len(sweep) < len(_sweep(args, opt)):
                raise RuntimeError(f"the rho sweep of {opt} ({term}, lr {lr:g}) is incomplete: run the selection phase")
            sweeps[_cell_key(term, lr, opt)] = sweep
            if opt in DEFAULT_RHOS:
                chosen[_cell_key(term, lr, opt)] = best(sweep)
    lr_choice: dict[str, Any] = {}
    if len(args.lrs) > 1:
        for term in args.terms.split(","):
            for opt in _arms(args, term):
                at = {lr: sweeps[_cell_key(term, lr, opt)][chosen.get(_cell_key(term, lr, opt))] for lr in args.lrs}
                lr_choice[f"{term}|{opt}"] = {"lr": best(at), "at_chosen_rho": at}
    return {"chosen": chosen, "sweeps": sweeps, "lr": lr_choice, "pretrained_val_accuracy": pre_acc}


def _reference(args: argparse.Namespace, term: str, lr: float, opt: str) -> tuple[str, float, str] | None:
    """What the ``vs_reference`` comparison of a run set subtracts: the full term (term study, same arm and
    lr), the CLI's default run (cli study); None for the reference itself and in the arms study."""
    from samnorm.train.recipe import FinetuneConfig

    ref = {"term": ("on", lr, opt), "cli": ("cli", FinetuneConfig.lr, "cli-default")}.get(args.study)
    return None if ref is None or ref == (term, lr, opt) else ref


def analyse(states: dict[int, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Paired differences arm − SGD per cell, scorer and quantity, each SAM arm at its chosen rho; for
    the cheaper variants also variant − SAM-ON (``vs_sam_on``); in the term and cli studies also the run
    set minus its reference (``vs_reference``, :func:`_reference`); with several lrs, a cell per term of
    every arm at its validation-chosen lr against SGD at its own."""
    import numpy as np

    from samnorm.demo.stats import bootstrap_interval, paired

    backbones = sorted(states)
    selection = choose_rhos(states, args)

    def runs_of(term: str, lr: float, opt: str) -> dict[tuple[int, int], dict[str, Any]]:
        rho = selection["chosen"].get(_cell_key(term, lr, opt))
        found = {}
        for b in backbones:
            for seed in args.seeds:
                key = _key({"ood": term, "lr": lr, "optimizer": opt, "rho": rho, "seed": seed})
                if key in states[b]["runs"]:
                    found[(b, seed)] = states[b]["runs"][key]
        return found

    def diff(get: Any, runs: dict[Any, Any], ref: dict[Any, Any]) -> dict[str, Any]:
        both = sorted(set(runs) & set(ref))
        a = [get(runs[p]) for p in both]
        b = [get(ref[p]) for p in both]
        d = paired(a, b)
        d["bootstrap"] = bootstrap_interval(np.subtract(a, b))
        d["arm_mean"] = float(np.mean(a))
        d["n"] = len(both)
        return d

    def versus(runs: dict[Any, Any], ref: dict[Any, Any]) -> dict[str, Any]:
        return {
            "FPR95": {s: diff(lambda r, s=s: r["test"][s]["FPR95"], runs, ref) for s in SCORERS},
            "id_accuracy": diff(lambda r: r["id_accuracy"], runs, ref),
            "val_criterion": diff(lambda r: r["val"]["criterion"], runs, ref),
        }

    def entry_of(term: str, lr: float, opt: str, sgd: dict[Any, Any], extras: bool = True) -> dict[str, Any] | None:
        chosen = runs_of(term, lr, opt)
        if not set(chosen) & set(sgd):
            return None
        e: dict[str, Any] = {
            "rho": selection["chosen"].get(_cell_key(term, lr, opt)),
            "lr": lr,
            "n": len(set(chosen) & set(sgd)),
            "sweep": selection["sweeps"][_cell_key(term, lr, opt)],
            **versus(chosen, sgd),
        }
        e["AUROC"] = {s: diff(lambda r, s=s: r["test"][s]["AUROC"], chosen, sgd) for s in SCORERS}
        e["theory"] = {
            f"{where} {q}": diff(lambda r, w=where, q=q: r["theory"][w][q], chosen, sgd)
            for where in ("id", "ood")
            for q in ("grad_norm", "max_logit")
        }
        if extras and opt in VARIANT_ARMS and "sam-on" in _arms(args, term):  # what the cheaper schedule gives up
            e["vs_sam_on"] = versus(chosen, runs_of(term, lr, "sam-on"))
        ref = _reference(args, term, lr, opt) if extras else None
        if ref is not None and _cell_key(*ref) in selection["sweeps"] and (against := runs_of(*ref)):
            e["vs_reference"] = {"of": list(ref), **versus(chosen, against)}
        return e

    cells: dict[str, Any] = {}
    for term, lr in _cells(args):
        sgd = runs_of(term, lr, "sgd")
        arms = {opt: e for opt in _arms(args, term) if (e := entry_of(term, lr, opt, sgd)) is not None}
        if arms:
            cells[f"OOD term {term}, lr {lr:g}"] = {"arms": arms}
    for term in args.terms.split(",") if selection["lr"] else ():  # every arm at its validation-chosen lr
        lr_of = {opt: selection["lr"][f"{term}|{opt}"]["lr"] for opt in _arms(args, term)}
        sgd = runs_of(term, lr_of["sgd"], "sgd")
        arms = {opt: e for opt in _arms(args, term) if (e := entry_of(term, lr_of[opt], opt, sgd, False)) is not None}
        if arms:
            cells[f"OOD term {term}, lr chosen on validation"] = {"arms": arms, "lr_chosen": True}
    pretrained = {
        "FPR95": {s: float(np.mean([states[b]["pretrained"]["test"][s]["FPR95"] for b in backbones])) for s in SCORERS},
        "id_accuracy": float(np.mean([states[b]["pretrained"]["id_accuracy"] for b in backbones])),
        "theory": {
            f"{w} {q}": float(np.mean([states[b]["pretrained"]["theory"][w][q] for b in backbones]))
            for w in ("id", "ood")
            for q in ("grad_norm", "max_logit")
        },
        "per_backbone": {
            b: {
                "val_accuracy": states[b]["pretrained"]["val"]["accuracy"],
                "FPR95": {s: states[b]["pretrained"]["test"][s]["FPR95"] for s in SCORERS},
            }
            for b in backbones
        },
    }
    return {"cells": cells, "pretrained": pretrained, "selection": selection}


def _label(opt: str, e: dict[str, Any], cell: dict[str, Any]) -> str:
    """``arm (rho)``; ``arm (lr, rho)`` in a cell whose lrs were chosen on validation."""
    parts = [f"lr {e['lr']:g}"] if cell.get("lr_chosen") else []
    parts += [] if e["rho"] is None else [f"rho {e['rho']:g}" if parts else f"{e['rho']:g}"]
    return OPTIMIZERS[opt] + (f" ({', '.join(parts)})" if parts else "")


def _comparison(title: str, rows: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """A table of paired differences ``rows`` = [(cell, label, versus dict)]: FPR95 per scorer, ID acc., val."""
    lines = [
        "",
        title,
        "",
        "| cell | arm | n | " + " | ".join(SCORERS) + " | ID acc. | val. criterion |",
        "|---|---|---:|" + "---:|" * (len(SCORERS) + 2),
    ]
    for name, label, v in rows:
        row = [_interval(v["FPR95"][s]) for s in SCORERS] + [_interval(v["id_accuracy"]), _interval(v["val_criterion"])]
        lines.append(f"| {name} | {label} | {v['id_accuracy']['n']} | " + " | ".join(row) + " |")
    return lines


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    pre = result["pretrained"]
    lines = [
        "Pretrained backbones (test, mean of the backbones): FPR95 "
        + ", ".join(f"{s} {100 * v:.1f}" for s, v in pre["FPR95"].items())
        + f"; ID accuracy {100 * pre['id_accuracy']:.1f}; per backbone: "
        + "; ".join(
            f"seed {b}: MSP {100 * v['FPR95']['MSP']:.1f}, Energy {100 * v['FPR95']['Energy']:.1f}"
            for b, v in pre["per_backbone"].items()
        )
        + ".",
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
            if opt == "sgd":
                row = [f"{100 * e['FPR95'][s]['arm_mean']:.1f}" for s in SCORERS]
                row += [f"{100 * e['id_accuracy']['arm_mean']:.1f}", f"{100 * e['val_criterion']['arm_mean']:.1f}"]
            else:
                row = [_interval(e["FPR95"][s]) for s in SCORERS]
                row += [_interval(e["id_accuracy"]), _interval(e["val_criterion"])]
            lines.append(f"| {name} | {_label(opt, e, cell)} | {e['n']} | " + " | ".join(row) + " |")
    variant_rows = [
        (name, opt, e) for name, cell in result["cells"].items() for opt, e in cell["arms"].items() if "vs_sam_on" in e
    ]
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
            lines.append(
                f"| {name} | {OPTIMIZERS[opt]} ({e['rho']:g}) | {v['id_accuracy']['n']} | " + " | ".join(row) + " |"
            )
    reference_rows = [
        (name, _label(opt, e, cell), e["vs_reference"])
        for name, cell in result["cells"].items()
        for opt, e in cell["arms"].items()
        if "vs_reference" in e
    ]
    if reference_rows:
        term, lr, _ = reference_rows[0][2]["of"]
        what = {
            "term": "the same arm with the full term (cell 'on', same lr)",
            "cli": f"SAM-ON at the CLI's defaults (cell '{term}', lr {lr:g}, arm cli-default)",
        }[args.study]
        lines += _comparison(
            f"**Against the reference: test FPR95, run − {what}** (percentage points; negative = "
            "better than the reference), mean and 95% paired-t interval:",
            reference_rows,
        )
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
                extra = (
                    ""
                    if opt == "sgd"
                    else (
                        f" ({d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}])" if not math.isnan(d["low"]) else ""
                    )
                )
                cells.append(f"{d['arm_mean']:.2f}{extra}")
            lines.append(f"| {name} | {_label(opt, e, cell)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "rho sweeps (validation criterion, mean FPR95 of MSP and Energy on the held-out set, %; "
        "validation accuracy %):",
        "",
    ]
    for name, cell in result["cells"].items():
        parts = []
        for opt, e in cell["arms"].items():
            if opt in DEFAULT_RHOS and not cell.get("lr_chosen"):
                parts.append(
                    OPTIMIZERS[opt]
                    + " "
                    + ", ".join(
                        f"{r:g}: {100 * v['criterion']:.1f} / {100 * v['val_accuracy']:.1f}"
                        for r, v in e["sweep"].items()
                    )
                )
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    if result["selection"]["lr"]:
        lines += [
            "",
            "lr per arm chosen on validation (criterion / validation accuracy %, selection seeds, each lr "
            "at its chosen rho):",
            "",
        ]
        for key, c in result["selection"]["lr"].items():
            term, opt = key.split("|")
            lines.append(
                f"- term {term}, {OPTIMIZERS[opt]}: lr {c['lr']:g} ("
                + ", ".join(
                    f"{lr:g}: {100 * v['criterion']:.1f} / {100 * v['val_accuracy']:.1f}"
                    for lr, v in c["at_chosen_rho"].items()
                )
                + ")"
            )
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
    try:
        resolve(args)
    except ValueError as err:
        print(f"ablation: {err}", file=sys.stderr)
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
    from samnorm.utils.io import atomic_write

    name = "ablation" if args.study == "arms" else f"ablation_{args.study}"
    atomic_write(os.path.join(args.out, f"{name}.md"), text)
    # one line: the summary is derived (--report-only remakes it), its size need not grow the repository
    atomic_write(os.path.join(args.out, f"{name}_summary.json"), json.dumps(result, separators=(",", ":"), default=str))
    print(text)
    print(f"wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
