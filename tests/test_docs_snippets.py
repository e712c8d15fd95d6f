"""Every Python snippet in README.md and docs/ runs as written, and prints what the page shows.

The convention, for whoever writes a page:

- README.md and docs/*.md: every ```` ```python ```` block runs. docs/*.rst: every
  ``.. code-block:: python`` block runs (``::`` literal blocks and other languages do not).
- A page's blocks run in order, in one namespace, on the CPU, in a fresh temporary folder,
  so a later block may use the names an earlier one defined.
- A block meant only as an illustration (it cannot run here, e.g. it imports the old
  ``foresight`` package) is marked, on the line before it, with ``.. snippet: skip`` (rst)
  or ``<!-- snippet: skip -->`` (Markdown). Both are comments: readers do not see them.
- A ``text`` block marked ``.. snippet: output`` (rst) or ``<!-- snippet: output -->``
  (Markdown) is what the page's last Python block before it prints. It must match line by
  line, except timings, which vary from run to run: a number followed by ``s)``/`` s)``, and
  the last column of a table whose header's last column is ``s``.

New pages and blocks are picked up without changing this file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import quiet

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.rst")),
    *sorted((ROOT / "docs").glob("*.md")),
]

_RST_DIRECTIVE = re.compile(r"^(\s*)\.\. code-block::\s*(\w+)\s*$")
_RST_MARK = re.compile(r"^\s*\.\. snippet:\s*(\w+)\s*$")
_MD_FENCE = re.compile(r"^(\s*)```\s*(\w*)\s*$")
_MD_MARK = re.compile(r"^\s*<!--\s*snippet:\s*(\w+)\s*-->\s*$")


@dataclass
class Block:
    """A code block of a page: its language, text, first line and marker (if any)."""

    lang: str
    code: str
    line: int
    mark: str | None


def _mark_before(lines: list[str], i: int, pattern: re.Pattern) -> str | None:
    """The marker on the nearest non-blank line before line ``i``, if it is one."""
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    found = pattern.match(lines[j]) if j >= 0 else None
    return found.group(1) if found else None


def _rst_blocks(lines: list[str]) -> list[Block]:
    blocks = []
    for i, line in enumerate(lines):
        found = _RST_DIRECTIVE.match(line)
        if not found:
            continue
        indent = len(found.group(1))
        j = i + 1
        # directive options (":linenos:") and the blank line before the body
        while j < len(lines) and (
            not lines[j].strip()
            or lines[j].strip().startswith(":")
            and len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            j += 1
        body = []
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            body.append(lines[j])
            j += 1
        code = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        blocks.append(Block(found.group(2), code, i + 1, _mark_before(lines, i, _RST_MARK)))
    return blocks


def _md_blocks(lines: list[str]) -> list[Block]:
    blocks = []
    i = 0
    while i < len(lines):
        found = _MD_FENCE.match(lines[i])
        if not found:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        code = textwrap.dedent("\n".join(lines[i + 1 : j])).strip("\n") + "\n"
        blocks.append(
            Block(found.group(2) or "text", code, i + 1, _mark_before(lines, i, _MD_MARK))
        )
        i = j + 1
    return blocks


def page_blocks(page: Path) -> list[Block]:
    """The code blocks of a page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = _md_blocks(lines) if page.suffix == ".md" else _rst_blocks(lines)
    for block in blocks:
        if block.mark not in (None, "skip", "output"):
            raise ValueError(
                f"{page.name}:{block.line}: unknown snippet marker {block.mark!r}; "
                "use skip or output"
            )
    return blocks


_TIMING = re.compile(r"\d+(?:\.\d+)?(?= ?s\))")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def mask_timings(text: str) -> list[str]:
    """The lines of ``text``, stripped, with the timings replaced by ``<t>``."""
    out = []
    timed_table = False
    for line in text.strip("\n").splitlines():
        line = _TIMING.sub("<t>", line.rstrip())
        words = line.split()
        if words and words[-1] == "s" and len(words) > 2:
            timed_table = True  # a header whose last column is seconds
        elif timed_table and words and _NUMBER.match(words[-1]):
            line = line[: line.rfind(words[-1])] + "<t>"
        out.append(line.rstrip())
    return out


def _snippet_pages() -> list[Path]:
    """Pages with at least one Python block to run."""
    return [
        p for p in PAGES if any(b.lang == "python" and b.mark != "skip" for b in page_blocks(p))
    ]


@pytest.fixture
def state_restored():
    """Pages register builders for their own layer types and configure logging: undo both
    after each page, so later tests see the library as it was."""
    from foresight_sparse import connectivity

    saved = dict(connectivity.REGISTRY)
    root, ours = logging.getLogger(), logging.getLogger("foresight_sparse")
    handlers, level = list(root.handlers), ours.level
    yield
    connectivity.REGISTRY.clear()
    connectivity.REGISTRY.update(saved)
    root.handlers[:] = handlers
    ours.setLevel(level)


@pytest.mark.parametrize("page", _snippet_pages(), ids=lambda p: p.name)
def test_page_snippets_run_and_print_what_the_page_shows(
    page, tmp_path, monkeypatch, state_restored
):
    import torchvision  # noqa: F401  (the pages' snippets use it; a test dependency)

    monkeypatch.chdir(tmp_path)  # files the snippets write land here
    namespace: dict = {"__name__": "__snippet__"}
    printed: str | None = None
    ran = 0
    for block in page_blocks(page):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        if block.mark == "skip":
            continue
        if block.lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    # a page's networks have pools and norms: their skipped-layer
                    # warning goes to stderr, which the pages do not show
                    quiet(exec, compile(block.code, where, "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(
                        f"the snippet at {where} failed: {type(exc).__name__}: {exc}"
                    ) from exc
            printed = out.getvalue()
            ran += 1
        elif block.mark == "output":
            assert printed is not None, f"{where}: an output block with no Python block before it"
            assert mask_timings(printed) == mask_timings(block.code), (
                f"{where}: the snippet before it printed\n{printed}"
            )
    assert ran


# --------------------------------------------------------------------------- the checker itself


def test_parser_finds_the_blocks_and_markers(tmp_path):
    rst = tmp_path / "page.rst"
    rst.write_text(
        textwrap.dedent("""\
        Title
        =====

        .. code-block:: python

           x = 1
           if x:
               print("a")

        .. snippet: output

        .. code-block:: text

           a

        .. snippet: skip

        .. code-block:: python
           :caption: not run

           import foresight
        """),
        encoding="utf-8",
    )
    blocks = page_blocks(rst)
    assert [(b.lang, b.mark, b.line) for b in blocks] == [
        ("python", None, 4),
        ("text", "output", 12),
        ("python", "skip", 18),
    ]
    assert blocks[0].code == 'x = 1\nif x:\n    print("a")\n'
    assert blocks[2].code == "import foresight\n"

    md = tmp_path / "page.md"
    md.write_text(
        "```python\nprint(1)\n```\n\n<!-- snippet: output -->\n```text\n1\n```\n", encoding="utf-8"
    )
    assert [(b.lang, b.code, b.mark) for b in page_blocks(md)] == [
        ("python", "print(1)\n", None),
        ("text", "1\n", "output"),
    ]


def test_timings_are_masked_and_nothing_else():
    shown = (
        "layer   type   EI   engine   s\n"
        "fc      Linear 1.2790 implicit 0.009\n"
        "network: EI 9.719269 bits  (4096000 entries, 0.60 s)\n"
    )
    run = (
        "layer   type   EI   engine   s\n"
        "fc      Linear 1.2790 implicit 1.234\n"
        "network: EI 9.719269 bits  (4096000 entries, 12.31 s)\n"
    )
    assert mask_timings(shown) == mask_timings(run)
    assert mask_timings(shown) != mask_timings(run.replace("1.2790", "1.2791"))
    assert mask_timings(shown) != mask_timings(run.replace("9.719269", "9.719268"))


def test_the_known_pages_have_runnable_snippets():
    names = {p.name for p in _snippet_pages()}
    assert {"README.md", "quickstart.rst", "index.rst"} <= names
    quick = page_blocks(ROOT / "docs" / "quickstart.rst")
    assert sum(b.lang == "python" and b.mark is None for b in quick) >= 6
    assert any(b.mark == "output" for b in quick)
    assert os.path.isfile(ROOT / "README.md")
