"""MkDocs hooks: the docstring check and the files the guides show from outside docs/.

mkdocstrings renders what has a docstring and silently leaves the rest out, so a public name without
one would vanish from the reference. ``on_pre_build`` fails the build instead: every name in the
``__all__`` of every module the reference renders (``::: module`` in docs/api/*.md) must have a
docstring, and so must the public methods its classes define (an override of a documented base
method, such as ``forward``, inherits its docstring). ``python docs/hooks.py`` runs the check without
building; ``python docs/hooks.py --list`` lists every undocumented name.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "docs" / "api"
# The names of today's tree without a docstring (constants, the T2T-ViT factories, ...): the list may
# only shrink. A name documented since is an error too, so the list never holds a stale entry.
KNOWN_UNDOCUMENTED = ROOT / "docs" / "undocumented.txt"
# Files outside docs/ that the guides link to, served at the same path as in the repository.
EXTERNAL_FILES = ("examples/figures/*.png",)
DOCS = ROOT / "docs"
# A Markdown link or image target: ](target) or ](target "title")
_LINK = re.compile(r"\]\(([^)\s]+)")


def rendered_modules() -> list[str]:
    """The modules the API reference renders, in page order."""
    found: list[str] = []
    for page in sorted(API_DIR.glob("*.md")):
        found += re.findall(r"^::: ([\w.]+)\s*$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return found


def _inherits_doc(method: griffe.Object | griffe.Alias) -> bool:
    """Whether the method overrides a documented one of a base class (``forward`` of an ``nn.Module``)."""
    owner = importlib.import_module(method.module.path)
    for part in method.parent.path.removeprefix(method.module.path + ".").split("."):
        owner = getattr(owner, part)
    return any(
        getattr(base, method.name, None) is not None and inspect.getdoc(getattr(base, method.name))
        for base in owner.__mro__[1:]
    )


def _needs_doc(obj: griffe.Object | griffe.Alias) -> Iterator[griffe.Object | griffe.Alias]:
    """The object and the public methods and properties its class body defines (not the overrides)."""
    yield obj
    if obj.is_class:
        for name, member in obj.members.items():
            if not name.startswith("_") and not member.is_alias and member.is_function and not _inherits_doc(member):
                yield member


def undocumented(modules: list[str]) -> list[str]:
    """Where the public names (``__all__`` of ``modules``) and their methods lacking a docstring are defined."""
    loader = griffe.GriffeLoader(search_paths=[str(ROOT)])
    loader.load("samnorm")
    loader.resolve_aliases(implicit=False, external=False)
    collection = loader.modules_collection
    missing: set[str] = set()
    for modname in modules:
        module = collection.get_member(modname)
        if not module.docstring:
            missing.add(modname)
        # __all__ as the interpreter computes it (some are built from a mapping griffe cannot evaluate).
        runtime = importlib.import_module(modname)
        for name in runtime.__all__:
            if name == "__version__":
                continue
            if name in module.members:
                obj = module.get_member(name)
            else:  # a lazy export (PEP 562 __getattr__): the submodule that defines it
                obj = next(
                    sub.members[name]
                    for sub in module.modules.values()
                    if name in sub.members and not sub.members[name].is_alias
                )
            if obj.is_alias:
                obj = obj.final_target
            missing.update(o.path for o in _needs_doc(obj) if not (o.docstring and o.docstring.value.strip()))
    return sorted(missing)


def check() -> list[str]:
    """The build's verdict: one line per undocumented name not in KNOWN_UNDOCUMENTED, and per stale entry."""
    missing = set(undocumented(rendered_modules()))
    known = {line.split("#")[0].strip() for line in KNOWN_UNDOCUMENTED.read_text(encoding="utf-8").splitlines()}
    known.discard("")
    return [f"no docstring: {name}" for name in sorted(missing - known)] + [
        f"documented now (or gone), remove it from {KNOWN_UNDOCUMENTED.name}: {name}"
        for name in sorted(known - missing)
    ]


def on_pre_build(config: object) -> None:
    from mkdocs.exceptions import PluginError

    problems = check()
    if problems:
        raise PluginError("the docstring check failed:\n  " + "\n  ".join(problems))


def on_files(files, config):  # type: ignore[no-untyped-def]  # mkdocs' hook signature
    from mkdocs.structure.files import File

    for pattern in EXTERNAL_FILES:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File(str(path.relative_to(ROOT)), str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def _site_link(page_dir: Path, target: str) -> str:
    """``target`` as the site serves it: a link that leaves docs/ for an external file (written so that it
    works on GitHub, e.g. ``../../examples/figures/a.png`` from docs/guides/) to the file's served copy."""
    path = (page_dir / target).resolve()
    if DOCS in path.parents or not any(path.match(str(ROOT / p)) for p in EXTERNAL_FILES):
        return target
    return os.path.relpath(DOCS / path.relative_to(ROOT), page_dir)


def on_page_markdown(markdown, page, config, files):  # type: ignore[no-untyped-def]  # mkdocs' hook signature
    page_dir = (DOCS / page.file.src_uri).parent
    return _LINK.sub(lambda m: "](" + _site_link(page_dir, m.group(1)), markdown)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] == ["--list"]:
        print("\n".join(undocumented(rendered_modules())))
        sys.exit(0)
    problems = check()
    print("\n".join(problems) or "every public name has a docstring (or is listed as known)")
    sys.exit(1 if problems else 0)
