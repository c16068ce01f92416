# ruff: noqa: INP001 - a griffe extension, loaded by path from mkdocs.yml, not a package
"""A griffe extension: the reST bits of pgbus's docstrings, as Markdown for mkdocstrings.

The docstrings are written for Sphinx-style tooling (``:class:`~pgbus.Bus```,
``.. versionadded:: 0.1.0``, literal blocks after ``::``). mkdocstrings' "sphinx"
parser reads the ``:param:`` fields but leaves these as they are; this extension turns
roles into (optional) cross-references, ``versionadded`` into a line of
text, and ``::`` blocks into fenced code, before the docstrings are parsed.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|attr|data|mod|exc|obj):`(?P<target>[^`]+)`")
_VERSION = re.compile(
    r"^(?P<indent>\s*)\.\. (?P<kind>versionadded|versionchanged|deprecated):: (?P<rest>.*)$",
    re.MULTILINE,
)
_FIELD = re.compile(r"^:(?:param|parameter|arg|type|returns?|rtype|raises?|ivar|var)\b")
_WORDS = {
    "versionadded": "Added in",
    "versionchanged": "Changed in",
    "deprecated": "Deprecated since",
}


def _ref(text: str, target: str) -> str:
    """A cross-reference that renders as plain code when its target is not documented."""
    return f'<autoref identifier="{target}" optional><code>{text}</code></autoref>'


def _role(match: re.Match[str]) -> str:
    target = match["target"]
    if "<" in target and target.endswith(">"):  # :class:`text <target>`
        text, _, target = target[:-1].partition("<")
        return _ref(text.strip(), target.strip())
    short = target.startswith("~")
    target = target.lstrip("~.")
    text = target.rsplit(".", 1)[-1] if short else target
    if match["role"] in ("func", "meth"):
        text += "()"
    if target.startswith("pgbus_"):  # a hook, named without its module
        target = f"pgbus.hookspecs.{target}"
    if not target.startswith("pgbus"):
        return f"`{text}`"
    return _ref(text, target)


def _literal_blocks(text: str) -> str:
    """``Text::`` followed by an indented block becomes ``Text:`` and a fenced block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        stripped = line.rstrip()[:-2].rstrip()
        out.append(stripped + ":" if stripped.strip() else "")
        base = len(line) - len(line.lstrip())
        j = i + 1
        block: list[str] = []
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base
        ):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
            j -= 1
        code = textwrap.dedent("\n".join(block)).strip("\n")
        pad = " " * base
        out += [
            "",
            f"{pad}```python",
            *(pad + c if c else "" for c in code.split("\n")),
            f"{pad}```",
        ]
        i = j
    return "\n".join(out)


def convert(text: str) -> str:
    """The docstring ``text`` with its reST roles, directives and literal blocks as Markdown."""
    text = _literal_blocks(text)
    text = _ROLE.sub(_role, text)
    notes = [f"*{_WORDS[m['kind']]} {m['rest'].strip()}.*" for m in _VERSION.finditer(text)]
    text = _VERSION.sub("", text).rstrip()
    if not notes:
        return text
    # before the :param:/:returns: fields, which would otherwise swallow the note
    lines = text.split("\n")
    at = next((i for i, line in enumerate(lines) if _FIELD.match(line)), len(lines))
    return "\n".join([*lines[:at], "", *notes, "", *lines[at:]]).rstrip()


class RstToMarkdown(griffe.Extension):
    """Convert each docstring once, when griffe has loaded its object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002 - griffe passes more by name
        """Convert ``obj``'s docstring."""
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
