"""``samnorm diagnose``: the appendix's figures and a JSON summary for your own model and folders.

::

    samnorm diagnose --checkpoint finetuned.pth --baseline pretrained.pth \\
        --id data/val --ood textures=data/dtd --ood sun=data/SUN --scorers msp,energy --output diag/

writes, under ``--output``:

- ``summary.json``: per quantity (FC gradient norm, max logit, each scorer) and OOD set: AUROC,
  overlap coefficient, mean/std and histograms, for the checkpoint and the baseline; the theory
  estimates with ``--theory``; the options and the counts of images read and skipped;
- ``values.npz``: every raw per-image value (``<model>/<set>/<quantity>``);
- ``summary.png`` (one page), ``<quantity>.png`` (ID vs OOD, before | after) and
  ``grad_norm_max_logit_<ood>.png`` (appendix figures 8-14, one per OOD set).

:func:`write_report` does the writing from plain result dicts, so scripts (and ``samnorm demo``) make
the same files from values they computed themselves.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

from samnorm.cli.common import (
    UsageError,
    add_model_args,
    build_model,
    fit_folder,
    image_transform,
    named_dir,
    names,
    read_recorded,
)
from samnorm.runs import RunSpec, result_set, worker_ignores_signals

__all__ = ["add_parser", "run", "write_report"]

_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")  # file names from user-given set and scorer names


def _slugs(names: list[str]) -> dict[str, str]:
    """File-name-safe forms of ``names``, distinct: where two names would share one (``a/b`` and
    ``a_b``), each name that had to be changed gets a short hash of the original.

    Example:
        >>> s = _slugs(["a_b", "a/b", "flat grey"])
        >>> s["a_b"], s["flat grey"], s["a/b"].startswith("a_b-")
        ('a_b', 'flat_grey', True)
    """
    plain = {n: _SLUG.sub("_", n).strip("._") or "set" for n in names}
    taken = list(plain.values())
    return {
        n: s
        if s == n or taken.count(s) == 1
        else f"{s}-{hashlib.sha256(n.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
        for n, s in plain.items()
    }


def add_parser(subparsers: Any) -> None:
    """Register ``samnorm diagnose`` on the ``samnorm`` sub-parser collection (``func=run``).

    The model options (``--model``, ``--checkpoint``, ``--model-arg``, ``--img-size``, ``--device``,
    ``--batch-size``, ``--workers``, ``--trust-checkpoint``) are those of ``samnorm evaluate``.

    Example:
        >>> from samnorm.cli import build_parser
        >>> args = build_parser().parse_args(
        ...     ["diagnose", "--checkpoint", "c.pth", "--id", "val", "--ood", "t=dtd", "--output", "out"])
        >>> args.ood, args.func.__name__
        ([('t', 'dtd')], 'run')
    """
    p = subparsers.add_parser(
        "diagnose",
        help="plots and a JSON summary of score, gradient-norm and max-logit distributions (ID vs OOD)",
        description=(
            "Compute, for the ID folder and each OOD folder, the per-image FC-layer gradient norm, the "
            "maximum logit and the chosen scorers' scores, for the checkpoint and optionally the baseline "
            "(the model before fine-tuning); write figures like the paper's appendix and a JSON summary."
        ),
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="weights of the model before fine-tuning (same model options), for before/after figures",
    )
    p.add_argument("--id", required=True, dest="id_dir", help="ID test folder (class sub-folders or flat)")
    p.add_argument("--id-name", default="ID", help="name of the ID set in figures and JSON (default: ID)")
    p.add_argument(
        "--ood",
        action="append",
        type=named_dir,
        required=True,
        metavar="NAME=DIR",
        help="OOD folder, repeatable; images anywhere below DIR",
    )
    p.add_argument(
        "--scorers",
        default="msp,energy",
        help="comma-separated samnorm.ood scorers (msp, energy, odin, react, gradnorm, rankfeat, "
        "rankweight, mahalanobis, knn, vim; the max logit is always computed); '' for none "
        "(default: msp,energy)",
    )
    p.add_argument(
        "--fit",
        default=None,
        dest="fit_dir",
        help="ID *training* folder, for scorers that need ID statistics (react, mahalanobis, ...)",
    )
    p.add_argument(
        "--target",
        choices=("pred", "label", "uniform"),
        default="pred",
        help="cross-entropy target of the FC gradient norm: predicted class (eq. 13, default), the "
        "ID folder's label, or uniform (as GradNorm)",
    )
    p.add_argument(
        "--grad-norm-p",
        type=float,
        default=2.0,
        help="entry-wise norm of the FC gradient: 2 = Frobenius (default), 1 = GradNorm's L1",
    )
    p.add_argument(
        "--max-images", type=int, default=None, help="a seeded random subset of at most this many images per folder"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-images subsets")
    p.add_argument(
        "--theory",
        type=int,
        default=0,
        metavar="N",
        help="estimate L, M and the eq. 12 terms on N ID images (0: skip; costly on big models)",
    )
    p.add_argument("--h", type=float, default=1e-3, help="learning rate h of the eq. 12 terms (with --theory)")
    p.add_argument("--rho", type=float, default=0.5, help="SAM radius rho of the eq. 12 terms (with --theory)")
    p.add_argument("--theory-iters", type=int, default=20, help="power iterations for L (with --theory)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG figures (default 100)")
    p.add_argument("--output", required=True, help="output directory")
    add_model_args(p)
    p.set_defaults(func=run, run_spec=RunSpec("output", {"--id": "id_dir", "--ood": "ood", "--fit": "fit_dir"}))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``samnorm diagnose``; bad input raises ``ValueError``/``OSError`` with one clear
    line, which ``samnorm`` prints as ``samnorm diagnose: error: ...`` with exit status 2.

    Example:
        >>> from samnorm.cli import main
        >>> main(["diagnose", "--checkpoint", "c.pth", "--id", "val", "--ood", "t=dtd",
        ...       "--output", "o"])  # doctest: +SKIP
        0
    """
    summary = _diagnose(args)
    print(f"wrote {', '.join(summary['files'])} to {args.output}", file=sys.stderr)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    # types and ranges: samnorm's check_args ran before; weights: --checkpoint or --random-init (build_model)
    ood_names = [name for name, _ in args.ood]
    if len(set(ood_names)) != len(ood_names) or args.id_name in ood_names:
        raise UsageError(f"OOD set names must be distinct and differ from --id-name {args.id_name!r}: {ood_names}")
    for path in [args.id_dir, *(d for _, d in args.ood), *([args.fit_dir] if args.fit_dir else [])]:
        if not os.path.isdir(path):
            raise UsageError(f"image folder {path!r} does not exist (or is not a directory)")


def _loader(dataset: Any, args: argparse.Namespace) -> Any:
    import torch
    from torch.utils.data import DataLoader, Subset

    if args.max_images is not None and len(dataset) > args.max_images:
        # a random subset, not the first N files: those would all come from the first classes
        gen = torch.Generator().manual_seed(args.seed)
        dataset = Subset(dataset, torch.randperm(len(dataset), generator=gen)[: args.max_images].tolist())
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        worker_init_fn=worker_ignores_signals,
    )


def _skipped(loader: Any) -> int:
    dataset = loader.dataset
    return getattr(dataset, "dataset", dataset).skipped


def _model(args: argparse.Namespace, checkpoint: str) -> tuple[Any, dict[str, Any]]:
    """A model built like ``samnorm evaluate`` does, and the metadata its checkpoint records."""
    stage_args = argparse.Namespace(**{**vars(args), "checkpoint": checkpoint})
    raw = read_recorded(checkpoint, args.trust_checkpoint)
    model, _, kwargs = build_model(stage_args, raw)
    return model, {"kwargs": kwargs, **(raw or {}).get("metadata", {})}


def _diagnose(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from samnorm.data.folders import ImageFolder
    from samnorm.diagnostics.quantities import collect_sets
    from samnorm.ood.detectors import make_scorer

    _check_args(args)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = _model(args, args.checkpoint)
    models = {"after": model}
    if args.baseline is not None:
        models["before"] = _model(args, args.baseline)[0]
    # the fine-tuning checkpoint's recorded transform and class order, as `samnorm evaluate` uses them
    transform = image_transform(args, model, meta["kwargs"], meta.get("transform"))
    classes = meta.get("classes")
    id_loader = _loader(ImageFolder(args.id_dir, transform, classes=classes), args)
    ood_loaders = {name: _loader(ImageFolder(path, transform, flat=True), args) for name, path in args.ood}
    scorer_names = names(args.scorers)
    fit_loader = _loader(fit_folder(args.fit_dir, transform, classes, scorer_names), args) if args.fit_dir else None
    results, theory = {}, {}
    for stage, model in models.items():
        model.to(device).eval()
        scorers = {}
        for name in scorer_names:
            scorer = make_scorer(name, model)
            if scorer.name == "MaxLogit":  # the same values as the built-in max_logit quantity
                continue
            if not scorer.is_fitted:
                if fit_loader is None:
                    raise ValueError(f"scorer {name!r} needs ID statistics: pass --fit <ID training folder>")
                scorer.fit(fit_loader)
            scorers[scorer.name] = scorer
        results[stage] = collect_sets(
            model,
            id_loader,
            ood_loaders,
            id_name=args.id_name,
            scorers=scorers,
            target=args.target,
            p=args.grad_norm_p,
            device=device,
        )
        if args.theory:
            theory[stage] = _theory(model, id_loader, args, device)
        model.to("cpu")
    info = {
        "checkpoint": args.checkpoint,
        "baseline": args.baseline,
        "id": args.id_dir,
        "ood": dict(args.ood),
        "target": args.target,
        "grad_norm_p": args.grad_norm_p,
        "skipped_images": {
            args.id_name: _skipped(id_loader),
            **{n: _skipped(loader) for n, loader in ood_loaders.items()},
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    return write_report(
        results["after"],
        args.output,
        id_name=args.id_name,
        before=results.get("before"),
        theory=theory or None,
        meta=info,
        dpi=args.dpi,
    )


def _theory(model: Any, loader: Any, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """L, M, ||grad f||^2 and the eq. 12 terms at these weights, on the first ``args.theory`` ID images."""
    import torch

    from samnorm.diagnostics.theory import Eq12Bound, estimate_smoothness, per_sample_grad_sq_norms

    batches, count = [], 0
    for images, _ in loader:
        batches.append(images[: args.theory - count])
        count += batches[-1].shape[0]
        if count >= args.theory:
            break
    x = torch.cat(batches).to(device)
    L = estimate_smoothness(model, x, target="pred", chunk_size=args.batch_size, iters=args.theory_iters)
    sq_norms = per_sample_grad_sq_norms(model, x, target="pred", method="loop")
    labels = model(x).argmax(1)
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    bound = Eq12Bound(
        h=args.h,
        rho=args.rho,
        L=L.value,
        M=float(sq_norms.max()),
        grad_sq_norm=float(sum(g.pow(2).sum() for g in grads)),
    )
    return {
        "images": int(x.shape[0]),
        "power_iterations": L.iterations,
        "converged": L.converged,
        "eq12": bound.to_dict(),
    }


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    id_name: str = "ID",
    before: Mapping[str, Mapping[str, Any]] | None = None,
    theory: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    dpi: int = 100,
) -> dict[str, Any]:
    """Write ``summary.json``, ``values.npz`` and the figures for ``results[set][quantity] -> values``.

    ``before`` (same layout) adds the model before fine-tuning to every figure and to the JSON;
    ``theory`` and ``meta`` are stored in the JSON as given (JSON-ready values). Returns the summary
    dict, whose ``"files"`` lists what was written. The files replace those of the previous report in
    ``out_dir`` as a set, ``manifest.json`` last (:func:`samnorm.runs.result_set`): a failed write
    leaves the previous report whole, and figures of the previous report that this one lacks are removed.

    Example:
        >>> import numpy as np, tempfile
        >>> r = {"ID": {"max_logit": np.array([3.0, 4.0, 5.0])}, "noise": {"max_logit": np.array([1.0, 3.5])}}
        >>> s = write_report(r, tempfile.mkdtemp())
        >>> s["after"]["max_logit"]["sets"]["noise"]["auroc"]
        0.8333333333333334
    """
    import numpy as np

    from samnorm.diagnostics.quantities import summarize
    from samnorm.utils.io import atomic_write, remove_stale_temps
    from samnorm.viz import plots

    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    for name in ("summary.json", "values.npz"):  # temporary files of writers killed mid-save
        remove_stale_temps(os.path.join(out, name))
    stages = {"after": results, **({"before": before} if before is not None else {})}
    quantities = list(results[id_name]) if id_name in results else []
    summary: dict[str, Any] = {
        "id_name": id_name,
        "ood_names": [n for n in results if n != id_name],
        "convention": "AUROC with ID positive; higher value = more in-distribution",
        **{stage: summarize(res, id_name=id_name, quantities=quantities) for stage, res in stages.items()},
    }
    files = []

    def path(name: str) -> str:
        files.append(name)
        return os.path.join(out, name)

    with result_set(out, "diagnose"):  # every figure replaces the previous run's together (runs.result_set)
        slugs, ood_slugs = _slugs(quantities), _slugs(summary["ood_names"])
        for quantity in quantities:
            pick = {stage: {s: v[quantity] for s, v in res.items()} for stage, res in stages.items()}
            target = path(f"{slugs[quantity]}.png")
            if before is not None:
                plots.plot_before_after(
                    pick["before"], pick["after"], id_name=id_name, quantity=quantity, dpi=dpi, path=target
                )
            else:
                plots.plot_distributions(pick["after"], id_name=id_name, quantity=quantity, dpi=dpi, path=target)
        if {"grad_norm", "max_logit"} <= set(quantities):
            for ood in summary["ood_names"]:
                plots.plot_grad_norm_max_logit(
                    results,
                    id_name=id_name,
                    before=before,
                    ood_names=[ood],
                    dpi=dpi,
                    path=path(f"grad_norm_max_logit_{ood_slugs[ood]}.png"),
                )
        plots.plot_summary(results, id_name=id_name, before=before, dpi=dpi, path=path("summary.png"))
        arrays = {
            f"{stage}/{s}/{q}": np.asarray(v, dtype=np.float64)
            for stage, res in stages.items()
            for s, values in res.items()
            for q, v in values.items()
        }
        buffer = io.BytesIO()
        # numpy's stub lets **kwds fill allow_pickle: bool; these keys hold '/', so none is that name
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        atomic_write(path("values.npz"), buffer.getvalue())
        if theory is not None:
            summary["theory"] = dict(theory)
        if meta is not None:
            summary["meta"] = dict(meta)
        summary["files"] = [*files, "summary.json"]
        atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    return summary
