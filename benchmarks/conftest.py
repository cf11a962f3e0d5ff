"""Benchmarks report ratios against a baseline measured in the same run.

Each benchmark sets ``benchmark.extra_info["pairs"] = [(name, role), ...]`` with role "candidate" or
"baseline" (a baseline may serve several pairs); at the end the median of each candidate is divided by its
baseline's and printed, and written to ``benchmarks/.ratios.json`` for RESULTS.md.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

_medians: dict[str, dict[str, float]] = {}


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # pragma: no cover - hook
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    for bench in session.benchmarks:
        for name, role in bench.extra_info.get("pairs", []) if bench.stats is not None else []:
            _medians.setdefault(name, {})[role] = bench.stats.median
    if not _medians:
        return
    rows = []
    for name, d in sorted(_medians.items()):
        if "candidate" in d and "baseline" in d:
            rows.append(
                {
                    "pair": name,
                    "candidate_ms": d["candidate"] * 1e3,
                    "baseline_ms": d["baseline"] * 1e3,
                    "ratio": d["candidate"] / d["baseline"],
                }
            )
    tr = terminalreporter
    tr.section("samnorm ratios (candidate median / baseline median; < 1 is faster)")
    for r in rows:
        tr.write_line(f"{r['pair']:<55} {r['candidate_ms']:10.3f} ms / {r['baseline_ms']:10.3f} ms = {r['ratio']:.3f}")
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    out = Path(__file__).with_name(".ratios.json")
    old = json.loads(out.read_text()) if out.exists() else {}
    old.update({r["pair"]: {**r, "machine": machine} for r in rows})
    out.write_text(json.dumps(old, indent=1))
