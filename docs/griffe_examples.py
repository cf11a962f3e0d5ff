"""Griffe extension: read the package's ``Example:`` sections as Google-style ``Examples:`` sections.

The docstrings head their doctests ``Example:``, which the Google parser takes for an admonition and
renders as prose (``d["a"]["b"]`` then reads as a Markdown link). As ``Examples:`` they render as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:`` before the docstrings are parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", obj.docstring.value, flags=re.MULTILINE)
