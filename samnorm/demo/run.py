"""The demo's arms: fine-tuning through :func:`samnorm.train.recipe.finetune`, evaluation, theory quantities."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from samnorm.demo.backbone import check_cache, pretrain, progress_bar
from samnorm.demo.config import ARMS, SELECTION, DemoConfig
from samnorm.demo.data import DemoData, accuracy, chunks, load_data
from samnorm.runs import ensure_folder, result_set
from samnorm.train.recipe import FinetuneConfig
from samnorm.train.recipe import finetune as recipe_finetune
from samnorm.utils.io import atomic_write

__all__ = ["ID_NAME", "DemoReport", "arm_config", "evaluate", "finetune_copy", "run_demo", "theory_quantities"]

ID_NAME = "MNIST"  # the ID set's name in tables and plots


def arm_config(config: DemoConfig, arm: str, **overrides: Any) -> FinetuneConfig:
    """The :class:`~samnorm.train.recipe.FinetuneConfig` of ``arm`` under ``config`` (``overrides`` replace fields).

    SAM-ON is ``"sam-on"`` (``"asam-on"`` with ``adaptive_sam_on``), full SAM ``"sam"`` (``"asam"``),
    SGD ``"sgd"``; every arm shares lr, schedule, batch, loss and pseudo-OOD settings.

    Example:
        >>> arm_config(DemoConfig(), "sam_on").optimizer, arm_config(DemoConfig(), "sgd", lr=0.01).lr
        ('asam-on', 0.01)
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}: choose from {list(ARMS)}")
    optimizer = {
        "sgd": "sgd",
        "sam_on": "asam-on" if config.adaptive_sam_on else "sam-on",
        "sam": "asam" if config.adaptive_sam else "sam",
    }[arm]
    rho = {"sam_on": config.rho_sam_on, "sam": config.rho_sam, "sgd": None}[arm]
    # DemoConfig.__post_init__ fills the backbone's defaults into these (typed optional to mean "default")
    assert config.lr is not None and config.ood_loss is not None
    base = FinetuneConfig(
        optimizer=optimizer,
        rho=rho,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        epochs=config.epochs,
        batch_size=config.batch_size,
        ood_loss=config.ood_loss,
        ood_weight=config.ood_weight,
        ood_ratio=config.ood_ratio,
        transforms=list(config.transforms),
        m_in=config.m_in,
        m_out=config.m_out,
    )
    return dataclasses.replace(base, **overrides)


def finetune_copy(pretrained: nn.Module, train: tuple[Tensor, Tensor], recipe: FinetuneConfig, seed: int) -> nn.Module:
    """:func:`samnorm.train.recipe.finetune` on a copy of ``pretrained`` with ``seed``; returned in eval mode.

    The seed fixes the batch order and the pseudo-OOD images, so arms run with the same seed see the
    same data (the pairing of the demo's and the ablation's differences).

    Example:
        >>> tuned = finetune_copy(model, data.train, arm_config(DemoConfig(), "sgd"), seed=0)  # doctest: +SKIP
    """
    model = copy.deepcopy(pretrained)
    recipe_finetune(model, train, recipe, seed=seed, progress=False, log=lambda _: None)
    return model.eval()


def _scorers(model: nn.Module, names: Sequence[str]) -> dict[str, Any]:
    from samnorm.ood import make_scorer

    # RankFeat's best BiT variant averages "remove at block 4" and "at block 3 then block 4";
    # a ViT edits the tokens after its last block.
    kwargs: dict[str, dict[str, Any]] = {
        "ODIN": {"temperature": 1000.0, "epsilon": 0.0},
        "RankFeat": {"blocks": (-1,) if hasattr(model, "prepare_tokens") else (-2, -1)},
    }
    return {name: make_scorer(name, model, **kwargs.get(name, {})) for name in names}


def evaluate(model: nn.Module, data: DemoData, scorers: Sequence[str]) -> tuple[dict[str, Any], Any]:
    """ID test accuracy and every scorer's metrics per OOD set and on average; also the raw results.

    Example:
        >>> figures, results = evaluate(model, data, ["MSP"])  # doctest: +SKIP
        >>> figures["metrics"]["MSP"]["average"]["FPR95"]       # doctest: +SKIP
    """
    from samnorm.ood import evaluate as ood_evaluate

    x, y = data.test
    results = ood_evaluate(
        model,
        chunks(x, y),
        {name: chunks(v) for name, v in data.ood.items()},
        _scorers(model, scorers),
        fit_data=chunks(*data.train),
        id_name=ID_NAME,
    )
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for scorer in results.metrics:
        metrics[scorer] = {name: m.as_dict() for name, m in results.metrics[scorer].items()}
        metrics[scorer]["average"] = results.average(scorer)
    return {"id_accuracy": accuracy(model, x, y), "metrics": metrics}, results


def theory_quantities(model: nn.Module, data: DemoData) -> dict[str, dict[str, float]]:
    """Means of the appendix's quantities on ID test and on the pooled OOD sets.

    ``grad_norm``: per-sample Frobenius norm of the cross-entropy gradient w.r.t. the last linear
    layer, with the predicted class as target (eq. 13); ``max_logit``: the largest logit.

    Example:
        >>> theory_quantities(model, data)["ood"]["max_logit"]  # doctest: +SKIP
    """
    from samnorm.diagnostics import per_sample_quantities

    def means(x: Tensor) -> dict[str, float]:
        parts = [per_sample_quantities(model, b) for b in chunks(x)]
        return {k: float(torch.cat([p[k] for p in parts]).double().mean()) for k in ("grad_norm", "max_logit")}

    model.eval()
    return {"id": means(data.test[0]), "ood": means(torch.cat(list(data.ood.values())))}


@dataclass
class DemoReport:
    """What :func:`run_demo` measured: ``data`` (every figure, JSON-ready), ``markdown``, ``files``.

    Example:
        >>> report = run_demo(DemoConfig(seeds=(0,)))                   # doctest: +SKIP
        >>> report.data["differences"]["sam_on"]["MSP"]["FPR95"]["mean"]  # doctest: +SKIP
    """

    data: dict[str, Any]
    markdown: str
    files: dict[str, str] = field(default_factory=dict)


def _machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )


def _describe(model: nn.Module, config: DemoConfig) -> str:
    import samnorm

    params = sum(p.numel() for p in model.parameters())
    norm = samnorm.norm_layers(model).numel()
    if config.backbone == "t2t_vit":
        depth = len(list(model.get_submodule("blocks").children()))
        kind = f"T2T-ViT (embed {model.num_features}, depth {depth})"
    else:
        kind = (
            f"ResNetV2 with GroupNorm and StdConv2d (BiT family), widths {list(config.widths)}, "
            f"blocks {list(config.depths)}"
        )
    return f"{kind}, {params / 1e3:.0f}k parameters of which {norm / 1e3:.1f}k in normalization layers"


def run_demo(config: DemoConfig | None = None) -> DemoReport:
    """Run the whole demo (see :mod:`samnorm.demo`) and write ``report.md``, ``report.json`` and plots.

    Example:
        >>> report = run_demo(DemoConfig(out_dir="samnorm_demo"))  # doctest: +SKIP
        >>> sorted(report.data["arms"])                             # doctest: +SKIP
        ['sam', 'sam_on', 'sgd']
    """
    from samnorm.demo.report import markdown, plots
    from samnorm.demo.stats import differences, mean_std

    config = config if config is not None else DemoConfig()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(ensure_folder(config.out_dir, "--out (DemoConfig.out_dir)"))
    check_cache(config)  # before the data are made, not after the pretraining
    data = load_data(config)
    timings["data"] = time.perf_counter() - start
    model, info = pretrain(config, data)
    timings["pretrain"] = info["seconds"]

    t = time.perf_counter()
    pre_figures, pre_results = evaluate(model, data, config.scorers)
    pre_figures["theory"] = theory_quantities(model, data)
    timings["evaluate"] = time.perf_counter() - t
    timings["finetune"] = 0.0
    arms: dict[str, Any] = {}
    first_results: dict[str, tuple[int, Any]] = {}
    with progress_bar(len(config.arms) * len(config.seeds), "fine-tune and score", config.progress) as bar:
        for arm in config.arms:
            recipe = arm_config(config, arm)
            runs = {}
            for seed in config.seeds:
                bar.set_postfix(arm=ARMS[arm], seed=seed, refresh=True)
                t = time.perf_counter()
                tuned = finetune_copy(model, data.train, recipe, seed)
                timings["finetune"] += time.perf_counter() - t
                t = time.perf_counter()
                figures, results = evaluate(tuned, data, config.scorers)
                figures["theory"] = theory_quantities(tuned, data)
                timings["evaluate"] += time.perf_counter() - t
                runs[str(seed)] = figures
                first_results.setdefault(arm, (seed, results))
                bar.update()
            mean, std = mean_std(list(runs.values()))
            arms[arm] = {"recipe": dataclasses.asdict(recipe), "seeds": runs, "mean": mean, "std": std}

    report: dict[str, Any] = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        "backbone": _describe(model, config),
        "ood_sets": list(data.ood),
        "sizes": {"train": len(data.train[0]), "test": len(data.test[0]), **{k: len(v) for k, v in data.ood.items()}},
        "convention": pre_results.caption(),
        "pretrained": {**pre_figures, "cache": info},
        "arms": arms,
        "selection": SELECTION,
    }
    report["differences"] = differences(report)

    files: dict[str, str] = {}
    with result_set(out, "demo"):  # plots and reports replace the previous ones together (runs.result_set)
        if config.plots:
            t = time.perf_counter()
            for i, path in enumerate(plots(out, pre_results, first_results, config.plot_scorers)):
                files[f"plot_{i}"] = path
            timings["plots"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        report["timings"] = timings
        report["machine"] = _machine()
        short = markdown(report, per_set=False)
        full = markdown(report, per_set=True)
        files["markdown"] = str(out / "report.md")
        files["json"] = str(out / "report.json")
        report["files"] = files
        atomic_write(files["markdown"], full)
        atomic_write(files["json"], json.dumps(report, indent=2, ensure_ascii=False))
    if not config.quiet:
        print(short)
        print(f"Full report (per OOD set): {files['markdown']}; every figure: {files['json']}")
    return DemoReport(report, full, files)
