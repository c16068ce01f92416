"""Every ```python block in docs/ compiles and runs against a real PostgreSQL.

The blocks of one page run in order in one namespace (like a reader following along),
with ``$PGBUS_DSN`` pointing at the test database and the page's own temp directory as
the working directory. A block may use top-level ``await``. Markers, as an HTML comment
on the line right before the fence (invisible in the rendered site):

* ``<!-- docs-test: skip -->``: a fragment that cannot run on its own; it is still
  compiled, so it cannot hold a syntax error.
* ``<!-- docs-test: file NAME -->``: write the block to ``NAME`` in the working directory
  instead of running it (a module a later block imports). A file named ``test_*.py`` is
  then run with pytest (asyncio auto mode, the ``pgbus_*`` fixtures), which must pass.

A block that only includes a file (``--8<-- "examples/x.py"``) checks that the file
exists; the examples themselves are run by tests/test_examples.py.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<what>skip|file)\s*(?P<arg>[^\s]*)\s*-->")
_SNIPPET = re.compile(r'^\s*-{1,2}8<-{1,2}\s+"(?P<path>[^"]+)"\s*$')


@dataclasses.dataclass
class Block:
    page: Path
    line: int
    code: str
    skip: bool = False
    file: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The python blocks of ``page``, with the marker on the line before each."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match or not match["lang"]:
            i += 1
            continue
        indent, lang, start = len(match["indent"]), match["lang"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{{indent}}}```\s*$", lines[i]):
            body.append(lines[i][indent:])
            i += 1
        i += 1
        if lang not in ("python", "py"):
            continue
        marker = _MARKER.search(lines[start - 1]) if start else None
        found.append(
            Block(
                page,
                start + 1,
                "\n".join(body) + "\n",
                skip=bool(marker and marker["what"] == "skip"),
                file=marker["arg"] if marker and marker["what"] == "file" else None,
            )
        )
    return found


PAGES = sorted(DOCS.rglob("*.md"))
ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def _snippets(block: Block) -> list[str] | None:
    lines = [line for line in block.code.splitlines() if line.strip()]
    paths = [m["path"] for line in lines if (m := _SNIPPET.match(line))]
    return paths if paths and len(paths) == len(lines) else None


def _compile(block: Block) -> object:
    return compile(
        block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.where for b in ALL_BLOCKS])
def test_block_compiles(block: Block) -> None:
    """Every python block in the docs is valid Python, fragments included."""
    if _snippets(block) is None:
        _compile(block)


def test_docs_have_python_blocks() -> None:
    """The extraction finds the docs' code samples (a broken parser would test nothing)."""
    assert len(ALL_BLOCKS) >= 10


def test_marker_parsing(tmp_path: Path) -> None:
    """Markers before a fence apply to that block only; other languages are ignored."""
    page = tmp_path / "p.md"
    page.write_text(
        "<!-- docs-test: skip -->\n```python\nx(\n```\n\n"
        "<!-- docs-test: file mod.py -->\n```python\nA = 1\n```\n"
        "```console\n$ ls\n```\n"
        "  ```py\n  y = 2\n  ```\n"
    )
    found = blocks(page)
    assert [(b.skip, b.file, b.code) for b in found] == [
        (True, None, "x(\n"),
        (False, "mod.py", "A = 1\n"),
        (False, None, "y = 2\n"),
    ]


def _pytest(block: Block, workdir: Path) -> None:
    installed = any(ep.name == "pgbus" for ep in importlib.metadata.entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "pgbus.pytest_plugin"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin,
         "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function",
         "-W", "error", block.file],
        cwd=workdir,
        env={**os.environ, "PGBUS_TEST_DSN": os.environ["PGBUS_DSN"]},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{block.where}: pytest failed:\n{result.stdout}"


def _run_page(page: Path, workdir: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in blocks(page):
        if (paths := _snippets(block)) is not None:
            for path in paths:
                assert (ROOT / path).is_file(), f"{block.where}: no file {path}"
            continue
        code = _compile(block)
        if block.skip:
            continue
        if block.file:
            (workdir / block.file).write_text(block.code)
            if re.fullmatch(r"test_\w*\.py", block.file):
                _pytest(block, workdir)
            continue
        try:
            result = eval(code, namespace)  # noqa: S307 - running the docs is the point
            if inspect.iscoroutine(result):
                asyncio.run(result)
        except BaseException as exc:
            raise AssertionError(f"{block.where}: {exc!r}") from exc


#: Pages about a plugin distribution under plugins/, which the core suite runs without
#: (CI installs them after it): each page is skipped unless these modules import, and
#: then it runs like any other page.
NEEDS_MODULES = {
    "plugins/faststream.md": ("faststream_pgbus",),
    "plugins/opentelemetry.md": ("pgbus_opentelemetry", "opentelemetry.sdk"),
    "plugins/prometheus.md": ("pgbus_prometheus",),
    "plugins/relay.md": ("pgbus_relay", "nats"),
    "plugins/signing.md": ("pgbus_signing",),
}

PAGES_WITH_CODE = [
    pytest.param(page, id=str(page.relative_to(DOCS)))
    for page in PAGES
    if any(not b.skip and _snippets(b) is None for b in blocks(page))
]


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_runs(
    page: Path, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The python blocks of a page run, in order, against a real database."""
    for module in NEEDS_MODULES.get(page.relative_to(DOCS).as_posix(), ()):
        pytest.importorskip(module, reason=f"{module} is not installed")
    monkeypatch.setenv("PGBUS_DSN", pg_dsn)
    monkeypatch.setenv("PGBUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = set(sys.modules)
    try:
        _run_page(page, tmp_path)
    finally:
        for name in set(sys.modules) - modules:  # modules the page wrote and imported
            module = sys.modules[name]
            if str(tmp_path) in str(getattr(module, "__file__", "") or ""):
                del sys.modules[name]


def test_pages_with_top_level_await_say_where_it_runs() -> None:
    """A page whose snippets use top-level await says they run in `python -m asyncio`."""
    top_level = re.compile(r"^(await |async with |async for )", re.MULTILINE)
    unexplained = [
        page.relative_to(ROOT)
        for page in sorted(DOCS.rglob("*.md"))
        if any(top_level.search(b.code) for b in blocks(page))
        and "python -m asyncio" not in page.read_text()
    ]
    assert unexplained == []
