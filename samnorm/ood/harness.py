"""Evaluation harness: score ID and OOD sets with several scorers and tabulate the metrics."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from samnorm.ood.adapter import ModelAdapter
from samnorm.ood.detectors import NotFittedError, Scorer, make_scorer
from samnorm.ood.metrics import Convention, OODMetrics, check_tpr, ood_metrics, resolve_convention
from samnorm.utils.io import atomic_write
from samnorm.utils.nn import eval_mode, split_batch

__all__ = ["OODResults", "evaluate"]

ScorerSpec = str | Scorer
AVERAGE = "Average"


@dataclass
class OODResults:
    """Raw scores and metrics of :func:`evaluate`.

    ``scores[scorer][set]`` are the raw float64 scores of every set (the ID set under
    ``id_name``), kept for histograms; ``metrics[scorer][ood_set]`` the :class:`OODMetrics` of
    ID vs that set. :meth:`to_markdown` / :meth:`to_csv` render the table (per OOD set plus the
    average over OOD sets) and name the convention; :meth:`with_convention` recomputes it under
    another one from the kept scores.

    Example:
        >>> res = evaluate(model, id_loader, {"textures": tex_loader}, ["msp", "energy"])  # doctest: +SKIP
        >>> print(res.to_markdown())                                                      # doctest: +SKIP
    """

    scores: dict[str, dict[str, np.ndarray]]
    id_name: str
    ood_names: list[str]
    tpr: float = 0.95
    convention: Convention = field(default_factory=lambda: resolve_convention("samnorm"))
    images_per_second: float = float("nan")
    metrics: dict[str, dict[str, OODMetrics]] = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = {
            scorer: {
                name: ood_metrics(sets[self.id_name], sets[name], tpr=self.tpr, convention=self.convention)
                for name in self.ood_names
            }
            for scorer, sets in self.scores.items()
        }

    @property
    def columns(self) -> list[str]:
        """Metric column names, e.g. ``["FPR95", "AUROC", "AUPR-In", "AUPR-Out"]``."""
        return list(next(iter(next(iter(self.metrics.values())).values())).as_dict())

    def average(self, scorer: str) -> dict[str, float]:
        """Mean of each metric over the OOD sets for one scorer."""
        per_set = [m.as_dict() for m in self.metrics[scorer].values()]
        return {col: float(np.mean([row[col] for row in per_set])) for col in self.columns}

    @property
    def table(self) -> list[dict[str, Any]]:
        """Rows ``{"scorer", "ood_set", "FPR95", "AUROC", "AUPR-In", "AUPR-Out"}`` (fractions):
        one per (scorer, OOD set), then the scorer's ``"Average"`` over the OOD sets."""
        out = []
        for scorer, per_set in self.metrics.items():
            for name, m in per_set.items():
                out.append({"scorer": scorer, "ood_set": name, **m.as_dict()})
            out.append({"scorer": scorer, "ood_set": AVERAGE, **self.average(scorer)})
        return out

    def with_convention(self, convention: str | Convention, tpr: float | None = None) -> OODResults:
        """The same scores, with the metrics recomputed under another convention (or TPR)."""
        return OODResults(
            self.scores,
            self.id_name,
            list(self.ood_names),
            self.tpr if tpr is None else tpr,
            resolve_convention(convention),
            self.images_per_second,
        )

    def caption(self) -> str:
        """The line that says which convention the table uses."""
        return (
            f"ID set: {self.id_name}. Convention {self.convention.describe()}; "
            f"TPR = {self.tpr:g}; higher score = more in-distribution."
        )

    def to_markdown(self, *, percent: bool = True, digits: int = 2) -> str:
        """A markdown table (values in % by default) preceded by its convention caption."""
        cols = self.columns
        arrows = {c: "↓" if c.startswith("FPR") else "↑" for c in cols}
        scale = 100.0 if percent else 1.0
        lines = [
            self.caption() + (" Values in %." if percent else ""),
            "",
            "| Scorer | OOD set | " + " | ".join(f"{c} {arrows[c]}" for c in cols) + " |",
            "|---|---|" + "---:|" * len(cols),
        ]
        for row in self.table:
            name = f"**{row['ood_set']}**" if row["ood_set"] == AVERAGE else row["ood_set"]
            values = " | ".join(f"{row[c] * scale:.{digits}f}" for c in cols)
            lines.append(f"| {row['scorer']} | {name} | {values} |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | None = None) -> str:
        """CSV text (metrics as fractions, a ``convention`` column); also written to ``path``."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["scorer", "ood_set", *self.columns, "convention"], lineterminator="\n")
        writer.writeheader()
        for row in self.table:
            writer.writerow({**row, "convention": self.convention.name})
        text = buffer.getvalue()
        if path is not None:
            atomic_write(path, text)
        return text


def _build_scorers(
    scorers: Sequence[ScorerSpec] | Mapping[str, ScorerSpec], adapter: ModelAdapter
) -> dict[str, Scorer]:
    items = list(scorers.items()) if isinstance(scorers, Mapping) else [(None, s) for s in scorers]
    if not items:
        raise ValueError("scorers is empty: name at least one, e.g. ['msp', 'energy']")
    built: dict[str, Scorer] = {}
    for key, spec in items:
        if isinstance(spec, str):
            scorer = make_scorer(spec, adapter)
        elif isinstance(spec, Scorer):
            scorer = spec
        else:
            raise TypeError(f"a scorer must be a name or a Scorer, got {type(spec).__name__}")
        name = key if key is not None else scorer.name
        if name in built:
            raise ValueError(f"two scorers are named {name!r}; pass a dict {{name: scorer}} instead")
        if scorer.uses_outputs and scorer.adapter.model is not adapter.model:
            raise ValueError(f"scorer {name!r} was built for another model than the one evaluated")
        built[name] = scorer
    return built


def evaluate(
    model: nn.Module | ModelAdapter,
    id_loader: Iterable[Any],
    ood_loaders: Mapping[str, Iterable[Any]],
    scorers: Sequence[ScorerSpec] | Mapping[str, ScorerSpec] = ("MSP", "MaxLogit", "Energy"),
    *,
    fit_data: Any = None,
    tpr: float = 0.95,
    convention: str | Convention = "samnorm",
    id_name: str = "ID",
) -> OODResults:
    """Score the ID test set and every OOD set with every scorer; FPR, AUROC, AUPR-In/Out.

    ``scorers`` are names (``"msp"``, ``"max_logit"``, ``"energy"``, ``"odin"``, ``"react"``,
    ``"gradnorm"``, ``"rankfeat"``, ``"rankweight"``, ``"mahalanobis"``, ``"knn"``, ``"vim"``,
    built with their defaults) or :class:`Scorer` instances, as a list or a ``{name: scorer}``
    dict. Scorers that need ID statistics and are not fitted yet are fitted on ``fit_data`` (ID
    *training* data). Each batch goes through the network once for all scorers that score from
    the plain features and logits (MSP, MaxLogit, Energy, ODIN without perturbation, ReAct,
    GradNorm, Mahalanobis, KNN, ViM); RankFeat, RankWeight and perturbed ODIN run their own
    passes. Loaders yield ``(images, labels)`` or images; inputs go to the model's device and
    parameter dtype (:meth:`ModelAdapter.prepare`, which also checks the model's split once).
    ``tpr`` and ``convention`` are checked before anything runs. The model is in eval mode
    during the evaluation and restored afterwards.

    Example:
        >>> res = evaluate(model, id_test, {"textures": tex, "noise": noise},
        ...                ["msp", "energy", "react"], fit_data=id_train)  # doctest: +SKIP
        >>> res.average("Energy")["AUROC"]                                 # doctest: +SKIP
        0.87
    """
    # every argument is checked before the first forward pass: a typo must not cost a full scoring
    conv, tpr = resolve_convention(convention), check_tpr(tpr)
    adapter = ModelAdapter.from_model(model)
    if not isinstance(ood_loaders, Mapping) or not ood_loaders:
        raise ValueError("ood_loaders must be a non-empty dict {name: loader}")
    if id_name in ood_loaders:
        raise ValueError(f"an OOD set is named {id_name!r} like the ID set; rename it or pass id_name=")
    built = _build_scorers(scorers, adapter)
    for name, scorer in built.items():
        if not scorer.is_fitted:
            if fit_data is None:
                raise NotFittedError(f"scorer {name!r} needs ID statistics: pass fit_data=<ID train loader>")
            scorer.fit(fit_data)
    shared = {n: s for n, s in built.items() if s.uses_outputs}
    own = {n: s for n, s in built.items() if not s.uses_outputs}
    parts: dict[str, dict[str, list[torch.Tensor]]] = {n: {} for n in built}
    n_images, start = 0, time.perf_counter()
    with eval_mode(adapter.model):
        for set_name, loader in [(id_name, id_loader), *ood_loaders.items()]:
            for name in built:
                parts[name][set_name] = []
            for batch in loader:
                x = adapter.prepare(split_batch(batch)[0])
                n_images += x.shape[0]
                if shared:
                    with torch.no_grad():
                        feats, logits = adapter.features_and_logits(x)
                    for name, scorer in shared.items():
                        parts[name][set_name].append(scorer.score_outputs(feats, logits).detach().cpu())
                for name, scorer in own.items():
                    parts[name][set_name].append(scorer.score(x).detach().cpu())
            if not parts[next(iter(built))][set_name]:
                raise ValueError(f"the loader of {set_name!r} yielded no samples")
    elapsed = time.perf_counter() - start
    scores = {
        name: {s: torch.cat(chunks).double().numpy() for s, chunks in sets.items()} for name, sets in parts.items()
    }
    return OODResults(scores, id_name, list(ood_loaders), tpr, conv, n_images / elapsed)
