"""A griffe extension for the API reference: adampx's docstrings, written as reST, as Markdown.

The docstrings use Google sections (which mkdocstrings parses) but reST for everything
inline. Without this extension ``:func:`force``` would show as that literal text, a simple
table would turn into a heading and ``text::`` would keep its two colons. Before any
docstring is parsed, this rewrites, in every docstring of the package:

- a role (``:func:``, ``:class:``, ``:mod:``, ``:meth:``, ``:attr:``, ``:data:``,
  ``:exc:``, ``:obj:``; ``~`` shows the last name only) into a cross-reference. A name
  that resolves in the package becomes an optional reference to its canonical path: a link
  where that object is rendered, plain code where it is not (internal modules). A name of
  another package (``torch``, the standard library) becomes plain code. A name that does
  not resolve at all becomes a required reference, so ``mkdocs build --strict`` fails on it
  wherever it is rendered: a broken reference never passes silently;
- a simple table (``=====  =====`` borders) into a Markdown table, or a definition list
  when it has two columns and no header;
- ``::`` ending a paragraph that introduces a literal block into ``:``.

Registered in ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import html
import importlib.util
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|attr|data|exc|obj|const):`(~?)([^`]+)`")
BORDER = re.compile(r"^( *)(=+)( +=+)+ *$")


def _markdown_table(lines: list[str]) -> list[str]:
    """One reST simple table (its lines, borders included) as a Markdown table."""
    border = lines[0]
    starts = [m.start() for m in re.finditer(r"=+", border)]
    borders = [i for i, line in enumerate(lines) if BORDER.match(line)]
    header_end = borders[1] if len(borders) == 3 else None
    rows: list[list[str]] = []
    header: list[str] | None = None
    for i, line in enumerate(lines):
        if i in borders:
            if i == header_end and rows:
                header = rows.pop()
            continue
        cells = [
            line[start : starts[k + 1] if k + 1 < len(starts) else None].strip()
            for k, start in enumerate(starts)
        ]
        if rows and not cells[0]:  # a continuation line of the row above
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    if header is None and len(starts) == 2:  # term and description: a definition list
        return [line for term, text in rows for line in (term, f":   {text}", "")]
    if header is None:
        header = [""] * len(starts)

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [row(header), "|" + "---|" * len(starts), *(row(r) for r in rows)]


def _tables(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if BORDER.match(lines[i]):
            end = i + 1
            borders = 1
            while end < len(lines) and lines[end].strip():
                if BORDER.match(lines[end]):
                    borders += 1
                end += 1
            if borders >= 2:
                out.extend(_markdown_table(lines[i:end]))
                i = end
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def _literal_colons(text: str) -> str:
    # ``text::`` followed by a blank line: reST's "literal block follows". Markdown shows the
    # indented block as code already; only one colon is meant.
    return re.sub(r"(\S)::\n\n", r"\1:\n\n", text)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class RstToMarkdown(griffe.Extension):
    """Rewrite reST roles, simple tables and ``::`` in the package's docstrings."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite every docstring of ``pkg`` once its whole tree is loaded."""
        self._collection = loader.modules_collection
        self._package = pkg.name
        self._visit(pkg)

    def _visit(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            text = _literal_colons(_tables(obj.docstring.value))
            obj.docstring.value = ROLE.sub(lambda m: self._role(obj, m), text)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member)  # type: ignore[arg-type]

    def _find(self, path: str) -> str | None:
        """The canonical path of the object at ``path``, or None."""
        try:
            found = self._collection[path]
            return found.final_target.path if found.is_alias else found.path
        except Exception:  # not loaded, not a member, an alias that does not resolve
            return None

    def _absolute(self, obj: griffe.Object, target: str) -> str:
        """``target`` as a full path, as seen from ``obj``'s scope."""
        if target.startswith("."):  # a relative module, as in ``from .x import``
            base = obj.module if obj.module.is_init_module else obj.module.parent
            name = target.lstrip(".")
            for _ in range(len(target) - len(name) - 1):
                base = base.parent if base is not None else None
            return f"{base.path}.{name}" if base is not None else name
        head, _, rest = target.partition(".")
        try:
            path = obj.resolve(head)
        except Exception:
            return target
        return f"{path}.{rest}" if rest else path

    def _role(self, obj: griffe.Object, match: re.Match[str]) -> str:
        _, tilde, target = match.groups()
        target = target.strip()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        path = self._absolute(obj, target)
        canonical = self._find(path) or self._find(target)
        if canonical is not None:
            return (
                f'<autoref identifier="{html.escape(canonical)}" optional>'
                f"<code>{html.escape(shown)}</code></autoref>"
            )
        root = path.split(".", 1)[0]
        if root != self._package and _importable(root):
            return f"`{shown}`"  # another package's name: no inventory to link it to
        return f"[`{shown}`][{target}]"  # unresolved: strict builds fail where it is rendered
