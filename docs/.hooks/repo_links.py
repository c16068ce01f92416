# ruff: noqa: INP001 - an MkDocs hook file, loaded by path, not a package
"""An MkDocs hook: links from a page to files outside docs/ point at the repository.

A page may link to ``../../examples/quickstart.py``: that file is not part of the site,
so the link is rewritten to the file on the repository (``repo_url``/blob/main/...).
A link to a file that does not exist is left alone, so ``mkdocs build --strict`` still
reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

_LINK = re.compile(r"\]\((?P<target>(?:\.\./)+[^)#\s]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:  # noqa: ARG001 - MkDocs passes these by name
    """Rewrite links that leave docs/ into links to the repository."""
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent
    repo = str(config.get("repo_url") or "").rstrip("/")
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = posixpath.normpath(posixpath.join("docs", page_dir, match["target"]))
        path = (root / target).resolve()
        inside_docs = path == docs_dir or docs_dir in path.parents
        if not repo or inside_docs or root not in path.parents or not path.exists():
            return match.group(0)
        kind = "tree" if path.is_dir() else "blob"
        return f"]({repo}/{kind}/main/{target}{match['anchor'] or ''})"

    return _LINK.sub(rewrite, markdown)
