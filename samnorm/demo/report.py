"""The demo's report: Markdown tables of every arm with paired differences and intervals, and plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from samnorm.demo.config import ARMS, SELECTION

__all__ = ["markdown", "plots"]

_ID_NAME = "MNIST"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _cell(mean: float, std: float, n: int) -> str:
    return _pct(mean) if n < 2 else f"{_pct(mean)} ± {_pct(std)}"


def _signed(v: float) -> str:
    return ("+" if v > 0 else "−" if v < 0 else "±") + _pct(abs(v))


def interval_text(d: Mapping[str, float]) -> str:
    """``+1.2 [−0.3, +2.7]`` (percentage points) from a :func:`samnorm.demo.stats.t_interval` dict.

    Example:
        >>> interval_text({"mean": 0.012, "low": -0.003, "high": 0.027})
        '+1.2 [−0.3, +2.7]'
    """
    if math.isnan(d["low"]):
        return _signed(d["mean"])
    return f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def _table(report: Mapping[str, Any], where: str) -> list[str]:
    """FPR95 and AUROC tables for one OOD set (or ``"average"``), with the paired differences vs SGD."""
    arms = list(report["arms"])
    n = len(report["config"]["seeds"])
    lines: list[str] = []
    versus = [a for a in arms if a != "sgd"] if "sgd" in arms and where == "average" else []
    for metric, arrow in (("FPR95", "lower is better"), ("AUROC", "higher is better")):
        head = ["Scorer", "pretrained", *(ARMS[a] for a in arms), *(f"{ARMS[a]} − SGD" for a in versus)]
        lines += [
            f"**{metric} (%)**, {arrow}:",
            "",
            "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * (len(head) - 1),
        ]
        for scorer in report["pretrained"]["metrics"]:
            row = [scorer, _pct(report["pretrained"]["metrics"][scorer][where][metric])]
            for arm in arms:
                res = report["arms"][arm]["mean"]["metrics"][scorer][where][metric]
                std = report["arms"][arm]["std"]["metrics"][scorer][where][metric]
                row.append(_cell(res, std, n))
            row += [interval_text(report["differences"][a]["vs_sgd"][scorer][metric]) for a in versus]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _recipe_line(report: Mapping[str, Any]) -> str:
    recipes = {arm: res["recipe"] for arm, res in report["arms"].items()}
    r = next(iter(recipes.values()))
    loss = {
        "uniform": "uniform-target cross-entropy",
        "energy": f"energy margin (m_in {r['m_in']}, m_out {r['m_out']})",
        "maxlogit": "max-logit gap",
    }[r["ood_loss"]]
    ascent = "; ".join(
        f"{ARMS[arm]}: {rec['optimizer']} rho {rec['rho']:g}" for arm, rec in recipes.items() if arm != "sgd"
    )
    pseudo = (
        (
            f"{r['ood_ratio']:g} pseudo-OOD image(s) per ID image ({', '.join(r['transforms'])}), loss = "
            f"cross-entropy + {r['ood_weight']:g} x {loss}"
        )
        if r["ood_ratio"] > 0
        else "no pseudo-OOD images"
    )
    return (
        f"Recipe (samnorm.train.recipe.finetune, shared by all arms): SGD momentum {r['momentum']:g}, lr {r['lr']:g} "
        f"with cosine decay, weight decay {r['weight_decay']:g}, batch {r['batch_size']}, {pseudo}"
        + (f"; {ascent}." if ascent else ".")
    )


def _summary(report: Mapping[str, Any]) -> list[str]:
    """One sentence per arm: which average FPR95 differences vs SGD have an interval excluding 0."""
    lines = []
    for arm, cmp in report["differences"].items():
        if "vs_sgd" not in cmp:
            continue
        better: list[str] = []
        worse: list[str] = []
        for scorer, metrics in cmp["vs_sgd"].items():
            if scorer == "id_accuracy":
                continue
            d = metrics["FPR95"]
            (better if d["high"] < 0 else worse if d["low"] > 0 else []).append(scorer)
        rest = [s for s in cmp["vs_sgd"] if s != "id_accuracy" and s not in better + worse]
        acc = interval_text(cmp["vs_sgd"]["id_accuracy"])
        if math.isnan(cmp["vs_sgd"]["id_accuracy"]["low"]):
            lines.append(f"- {ARMS[arm]} − SGD: one seed, no interval (run --seeds 2 or more).")
            continue
        lines.append(
            f"- {ARMS[arm]} − SGD, average FPR95: interval below 0 (better) for "
            f"{', '.join(better) or 'no scorer'}; above 0 (worse) for {', '.join(worse) or 'no scorer'}; "
            f"containing 0 for {', '.join(rest) or 'no scorer'}. ID accuracy {acc} points."
        )
    return lines


def markdown(report: Mapping[str, Any], per_set: bool) -> str:
    """The report as Markdown: the average over OOD sets (and each set when ``per_set``)."""
    cfg = report["config"]
    arms = list(report["arms"])
    n = len(cfg["seeds"])
    sets = ", ".join(report["ood_sets"])
    lines = [
        f"## samnorm demo: MNIST digits (ID) vs {sets} (OOD)",
        "",
        f"Backbone: {report['backbone']}, pretraining seed {cfg['pretrain_seed']}. Fine-tuning: {cfg['epochs']} "
        f"epoch(s) from the same pretrained weights, seeds {', '.join(map(str, cfg['seeds']))} (mean ± sample std "
        f"over seeds). {report['convention']}",
        "",
        _recipe_line(report),
        "",
        "Differences: arm − SGD, paired seed by seed (same batches and pseudo-OOD images), mean and 95% "
        "Student-t interval over the seeds, in percentage points. An interval that contains 0 means the seeds "
        "do not separate the two arms.",
        "",
        "**ID accuracy (%)**: pretrained "
        + _pct(report["pretrained"]["id_accuracy"])
        + "; "
        + "; ".join(
            f"{ARMS[a]} {_cell(report['arms'][a]['mean']['id_accuracy'], report['arms'][a]['std']['id_accuracy'], n)}"
            for a in arms
        )
        + ".",
        "",
        f"### Average over the {len(report['ood_sets'])} OOD sets",
        "",
        *_table(report, "average"),
        *_summary(report),
        "",
    ]
    theory = report["pretrained"].get("theory")
    if theory:
        lines += [
            "**The appendix's quantities** (means on ID test / pooled OOD; FC-gradient norm with the "
            "predicted class as target, eq. 13): pretrained grad-norm "
            f"{theory['id']['grad_norm']:.2f} / {theory['ood']['grad_norm']:.2f}, max logit "
            f"{theory['id']['max_logit']:.2f} / {theory['ood']['max_logit']:.2f}; "
            + "; ".join(
                f"{ARMS[a]} grad-norm {m['theory']['id']['grad_norm']:.2f} / {m['theory']['ood']['grad_norm']:.2f}, "
                f"max logit {m['theory']['id']['max_logit']:.2f} / {m['theory']['ood']['max_logit']:.2f}"
                for a, m in ((a, report["arms"][a]["mean"]) for a in arms)
            )
            + ".",
            "",
        ]
    if per_set:
        for name in report["ood_sets"]:
            lines += [f"### OOD set: {name}", "", *_table(report, name)]
        lines += ["### How the defaults were chosen", "", SELECTION, ""]
    lines.append(f"Wall time {report['timings']['total']:.0f} s ({report['machine']}).")
    return "\n".join(lines) + "\n"


def plots(out: Path, before: Any, after: Mapping[str, tuple[int, Any]], scorers: Sequence[str]) -> list[str]:
    """Score distributions, pretrained vs each arm's first seed, one PNG per (scorer, arm)."""
    from samnorm.viz.plots import plot_before_after

    written = []
    for arm, (seed, results) in after.items():
        for scorer in scorers:
            path = Path(out) / f"scores_{scorer.lower()}_{arm}.png"
            plot_before_after(
                before.scores[scorer],
                results.scores[scorer],
                id_name=_ID_NAME,
                quantity=scorer,
                stage_names=("pretrained", f"after {ARMS[arm]} fine-tuning (seed {seed})"),
                path=path,
            )
            written.append(str(path))
    return written
