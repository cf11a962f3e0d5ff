"""The front page and the guides stay true: the README's test command is the one CI runs, and every
relative link of README.md and docs/**/*.md (and every snippet the site includes) reaches a file, and
its #anchor a heading of that file. Read from disk only: no network, no docs build."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`+[^`\n]*`+")
_LINK = re.compile(r"\]\(([^)\s]+)")  # [text](target) and ![alt](target), a title after the target allowed
_SNIPPET = re.compile(r'^--8<-- "([^"]+)"', flags=re.MULTILINE)  # pymdownx.snippets, paths from the root


def readme_test_command() -> str:
    """The command after ``&&`` on the set-up block's line that runs pytest (its comment dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Set-up: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    (line,) = [line for line in setup.splitlines() if "pytest" in line]
    return line.split("#", 1)[0].split("&&", 1)[1].strip()


def ci_test_command() -> str:
    """The one pytest line of .ci/run, without its leading environment assignments."""
    lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if "pytest" in line]
    (line,) = [line for line in lines if not line.lstrip().startswith("#")]
    words = shlex.split(line)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)
    return shlex.join(words)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs' toc both write it (for the headings these pages use)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1).replace("`", "")) for m in re.finditer(r"^#+ (.*)$", text, flags=re.MULTILINE)}


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of ``page`` whose file (or #anchor in a Markdown file) does not exist."""
    text = _CODE.sub(lambda m: m.group(0).strip("`"), _FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    broken += [f"snippet {s}: no such file" for s in _SNIPPET.findall(text) if not (root / s).exists()]
    return broken


def test_readme_test_command_is_what_ci_runs():
    assert readme_test_command() == ci_test_command() == "python -m pytest -q"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_reach_a_file(page):
    assert broken_links(page) == []


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "guide.md").write_text("# Guide\n\n## Two-line usage\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](guide.md#two-line-usage) [web](https://example.org/x.md) ![img](missing.png)\n"
        "[bad anchor](guide.md#nowhere) [`code`](gone.md) [self](#page)\n"
        "```python\nx = d[k](1)  # code is not a link\n```\n# Page\n"
        '--8<-- "nope/RESULTS.md"\n',
        encoding="utf-8",
    )
    assert broken_links(page, root=tmp_path) == [
        f"missing.png: no file {tmp_path / 'missing.png'}",
        "guide.md#nowhere: no heading #nowhere in guide.md",
        f"gone.md: no file {tmp_path / 'gone.md'}",
        "snippet nope/RESULTS.md: no such file",
    ]


def test_slug_drops_punctuation_as_github_and_mkdocs_do():
    assert slug("Distributed training: DDP and FSDP2") == "distributed-training-ddp-and-fsdp2"
    assert slug("OOD detection toolkit (samnorm.ood)") == "ood-detection-toolkit-samnormood"
