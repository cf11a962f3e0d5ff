"""Split README.md into docs/guides/*.md and docs/index.md, and write docs/README-split.md.

Run from the repository root (``python docs/split_readme.py``) to re-sync the guides with the README
until the README becomes the front page; then delete this script. A renamed README heading stops it
with a StopIteration: update the title here.
"""

import re
from pathlib import Path

lines = Path("README.md").read_text(encoding="utf-8").splitlines()
# (start, level, title) of each heading outside code fences
heads, fence = [], False
for i, line in enumerate(lines):
    if line.startswith("```"):
        fence = not fence
    elif not fence and (m := re.match(r"^(#+) (.*)$", line)):
        heads.append((i, len(m.group(1)), m.group(2)))


def body(title):
    """The section's lines without its heading, up to the next heading of any level."""
    k = next(k for k, h in enumerate(heads) if h[2] == title)
    end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
    return lines[heads[k][0] + 1 : end], heads[k][1]


def section(title, own_level, with_sub=True):
    """The section with its subsections, headings shifted so the section sits at own_level."""
    k = next(k for k, h in enumerate(heads) if h[2] == title)
    lvl = heads[k][1]
    end = len(lines)
    for h in heads[k + 1 :]:
        if h[1] <= lvl or not with_sub:
            end = h[0]
            break
    out, fence = [], False
    for line in lines[heads[k][0] : end]:
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^(#+) (.*)$", line)):
            line = "#" * (len(m.group(1)) - lvl + own_level) + " " + m.group(2)
        out.append(line)
    return out


split = []  # (README heading, guide)


def take(title, guide, level, with_sub=True):
    split.append((title, guide))
    return section(title, level, with_sub)


def fix(text):
    text = text.replace("(#cheaper-steps)", "(variants.md)")
    text = text.replace("](examples/figures/", "](../examples/figures/")
    text = text.replace("`benchmarks/RESULTS.md`", "[`benchmarks/RESULTS.md`](results.md)")
    return text


guides = {}
guides["quickstart.md"] = [
    "# Quick start",
    "",
    *take("Set-up: two commands", "quickstart.md", 2),
    "",
    *take("Two-line usage", "quickstart.md", 2, with_sub=False),
    "Next: [choosing what to perturb](selection.md), [training-loop recipes](training-loop.md),",
    "[cheaper steps](variants.md), [your trainer](trainers.md).",
    "",
]
guides["selection.md"] = take("Selecting what to perturb", "selection.md", 1)
recipes = take("Training-loop recipes", "training-loop.md", 1)
# the DDP paragraph goes to the distributed guide
a = next(i for i, line in enumerate(recipes) if line.startswith("**DistributedDataParallel.**"))
b = next(i for i in range(a, len(recipes)) if recipes[i] == "")
ddp = recipes[a:b]
recipes[a:b] = ["**DistributedDataParallel.** See [Distributed training](distributed.md)."]
guides["training-loop.md"] = recipes
split.append(("Training-loop recipes: the **DistributedDataParallel.** paragraph", "distributed.md"))
guides["distributed.md"] = [
    "# Distributed training",
    "",
    "## A plain training loop",
    "",
    *ddp,
    "",
    "## Trainers",
    "",
    "Each integration runs the window's non-final backward passes under `no_sync`; see the DDP column of",
    "the table and its note in [Trainers](trainers.md).",
    "",
    "## The CLI",
    "",
    "`torchrun --nproc_per_node 8 -m samnorm finetune ...` runs the same command under DDP; the evaluation",
    "shards and merges exactly ([The CLI](cli.md)).",
    "",
]
guides["variants.md"] = [*take("Cheaper steps", "variants.md", 1), "", *take("Performance", "variants.md", 2)]
guides["trainers.md"] = take("Use it with your trainer", "trainers.md", 1)
guides["ood.md"] = take("OOD detection toolkit (`samnorm.ood`)", "ood.md", 1)
guides["cli.md"] = take("Fine-tune and evaluate on your own folders (`samnorm` CLI)", "cli.md", 1)
guides["promises.md"] = take("What samnorm promises about your data and runs", "promises.md", 1)
guides["diagnostics.md"] = take("Diagnostics: see why fine-tuning works on your data", "diagnostics.md", 1)
guides["demo.md"] = take(
    "The demo: the method on real offline data, one command, under 2 minutes on a CPU", "demo.md", 1
)
guides["development.md"] = take("Development", "development.md", 1)
guides["results.md"] = ['--8<-- "benchmarks/RESULTS.md"']

for name, text in guides.items():
    Path("docs/guides", name).write_text(fix("\n".join(text)).rstrip() + "\n", encoding="utf-8")

intro = lines[2 : heads[1][0]]
licence = section("Licence", 2)
index = (
    ["# samnorm", ""]
    + intro
    + ["## Guides", ""]
    + [
        f"- [{t}](guides/{f})"
        for t, f in [
            ("Quick start", "quickstart.md"),
            ("Choosing what to perturb", "selection.md"),
            ("Training-loop recipes", "training-loop.md"),
            ("Variants and their cost", "variants.md"),
            ("Trainers", "trainers.md"),
            ("Distributed training", "distributed.md"),
            ("OOD toolkit", "ood.md"),
            ("The CLI", "cli.md"),
            ("Promises about data and runs", "promises.md"),
            ("Diagnostics", "diagnostics.md"),
            ("The demo and the ablation", "demo.md"),
            ("Development", "development.md"),
        ]
    ]
    + ["", "The [API reference](api/samnorm.md) is generated from the docstrings.", ""]
    + licence
)
split.append(("samnorm (the intro paragraphs) and Licence", "index.md (copied: the README keeps them)"))
Path("docs/index.md").write_text("\n".join(index).rstrip() + "\n", encoding="utf-8")

note = [
    "# Which README section became which page (not part of the site)",
    "",
    "The guides were moved out of README.md as of main at the start of issue 19 by splitting it at its",
    "headings (each section's heading levels shifted so it sits at the guide's level). The README itself",
    "was left alone (others edited its sections in parallel): when the README becomes the front page,",
    "re-sync each guide from the README section named here (`python docs/split_readme.py` redoes the",
    "whole split), then cut that section from the README.",
    "",
    "Edits made while moving: `(#cheaper-steps)` became `(variants.md)`; image paths",
    "`examples/figures/...` became `../examples/figures/...` (docs/hooks.py serves them);",
    "`` `benchmarks/RESULTS.md` `` became a link to results.md (which includes that file); the",
    "**DistributedDataParallel.** paragraph of the training-loop recipes moved to distributed.md, which",
    "adds two short pointers (trainers, CLI); quickstart.md ends with a line of links.",
    "",
    "| README heading | page |",
    "|---|---|",
]
note.insert(
    note.index("| README heading | page |"),
    "A section's ### subsections go with it (the demo's \"What the ablation shows\" to demo.md, the OOD",
)
note.insert(
    note.index("| README heading | page |"),
    'toolkit\'s four to ood.md) except those of "Two-line usage", each listed below.',
)
note.insert(note.index("| README heading | page |"), "")
note += [f"| {t} | docs/{'guides/' if not g.startswith('index') else ''}{g} |" for t, g in split]
note += [
    "",
    "`docs/guides/results.md` includes `benchmarks/RESULTS.md` (a snippet) and `docs/changelog.md`",
    "includes `CHANGELOG.md`, so neither is copied.",
    "",
]
Path("docs/README-split.md").write_text("\n".join(note), encoding="utf-8")
