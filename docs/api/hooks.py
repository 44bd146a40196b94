"""mkdocs hook: every public name has a docstring and an entry in the API reference.

The public names are ``adampx.__all__`` and the ``__all__`` of every module that an API page
renders (a ``::: module`` block). After the build, each must have a docstring and be rendered
on some page of the site, under its own path or, for a re-export such as ``adampx.AdamP``,
under its canonical path (``adampx.adamp.AdamP``); mkdocstrings leaves an object without a
docstring out silently, so a missing docstring shows up here as well. Each failure is a
warning, which ``mkdocs build --strict`` (CI) turns into a failed build.

Registered in ``mkdocs.yml`` (``hooks``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.public_api")

BLOCK = re.compile(r"^:::[ \t]+([\w.]+)", re.M)  # a mkdocstrings block: ``::: adampx.tools``
ANCHOR = re.compile(r'\bid="([\w.]+)"')  # the heading of a rendered object


def _lookup(collection: griffe.ModulesCollection, path: str) -> Any:
    try:
        obj = collection[path]
        return obj.final_target if obj.is_alias else obj
    except Exception:  # not an object of the package (a plain heading's id)
        return None


def _canonical(collection: griffe.ModulesCollection, path: str) -> str | None:
    obj = _lookup(collection, path)
    return None if obj is None else obj.path


def problems(docs_dir: Path, site_dir: Path, src_dir: Path) -> list[str]:
    """What is undocumented or unrendered, one line each (empty when all is well)."""
    loader = griffe.GriffeLoader(search_paths=[str(src_dir)])
    package = loader.load("adampx")
    loader.resolve_aliases(external=False)
    collection = loader.modules_collection

    blocks = {b for page in sorted(docs_dir.rglob("*.md")) for b in BLOCK.findall(page.read_text())}
    rendered_modules = (b for b in blocks if getattr(_lookup(collection, b), "is_module", False))
    modules = ["adampx", *sorted(set(rendered_modules) - {"adampx"})]
    rendered = set()
    for page in site_dir.rglob("*.html"):
        for anchor in ANCHOR.findall(page.read_text(encoding="utf-8")):
            if (path := _canonical(collection, anchor)) is not None:
                rendered.add(path)

    found = []
    for name in modules:
        module = package if name == "adampx" else collection[name]
        exports = module.exports
        if exports is None:
            found.append(f"{name} is rendered but has no __all__")
            continue
        for export in sorted(str(e) for e in exports):
            path = f"{name}.{export}"
            try:
                obj = module[export]
                target = obj.final_target if obj.is_alias else obj
            except Exception:
                found.append(f"{path} is in __all__ but cannot be found")
                continue
            if target.docstring is None or not target.docstring.value.strip():
                found.append(f"{path} has no docstring")
            if target.path not in rendered:
                found.append(f"{path} is not rendered on any page (add it to a docs/api/ page)")
    return found


def on_post_build(config: Any, **kwargs: Any) -> None:
    """Warn once per public name that lacks a docstring or an API entry."""
    root = Path(config.config_file_path).parent
    for problem in problems(Path(config.docs_dir), Path(config.site_dir), root / "src"):
        log.warning("public API: %s", problem)
