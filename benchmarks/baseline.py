"""An older revision of adampx, importable beside the current one, for ``step_time.py --baseline``.

:func:`import_revision` extracts ``src/adampx`` at a git revision of this repository (the
one this script lies in) with ``git archive``, every file of it (the C kernel and any other
package data too), into a temporary directory as a package named ``adampx_baseline``, and
imports it. Its Python sources are rewritten so that the package imports itself, not the
current ``adampx``: every ``adampx`` name in the code (``import adampx``,
``from adampx.x import y``, ``adampx.SGDP(...)``) and every string literal that is a module
path of it (``resources.files("adampx")``, ``"adampx.backends.cpu_kernel"``) becomes
``adampx_baseline``. Comments, docstrings and other strings are left as they are, so that
messages still read as the revision wrote them. (A side effect of the rule on strings: a
revision that names its kernel cache directory ``"adampx"`` keeps its builds under
``adampx_baseline`` instead, unless ``ADAMPX_KERNEL_CACHE`` is set.)
"""

from __future__ import annotations

import atexit
import importlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tokenize
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "adampx"
SOURCE = f"src/{PACKAGE}"
BASELINE = "adampx_baseline"


class Baseline(NamedTuple):
    """An imported revision: the module, the revision as given, its commit, where it lies."""

    module: ModuleType
    rev: str
    commit: str
    path: Path


def rewrite_source(source: str, old: str = PACKAGE, new: str = BASELINE) -> str:
    """``source`` with its absolute references to the package ``old`` made to ``new``.

    Rewritten: the name ``old`` in code (not as an attribute, ``x.old``), and string
    literals whose whole text is ``old`` or a dotted path under it. Untouched: comments,
    docstrings and every other string.
    """
    module_path = re.compile(rf"({re.escape(old)})(\.[A-Za-z_]\w*)*")
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, int, str]] = []  # (row, start col, end col, new text)
    previous = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.string == old:
            if not (
                previous is not None and previous.type == tokenize.OP and previous.string == "."
            ):
                edits.append((token.start[0], token.start[1], token.end[1], new))
        elif token.type == tokenize.STRING and token.start[0] == token.end[0]:
            match = re.fullmatch(r"([rRbBuU]{0,2})(['\"])(.*)\2", token.string, re.DOTALL)
            if (
                match
                and "b" not in match.group(1).lower()
                and module_path.fullmatch(match.group(3))
            ):
                prefix, quote, text = match.groups()
                text = new + text[len(old) :]
                edits.append(
                    (token.start[0], token.start[1], token.end[1], prefix + quote + text + quote)
                )
        if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            previous = token
    for row, start, end, text in sorted(edits, reverse=True):  # right to left within a line
        line = lines[row - 1]
        lines[row - 1] = line[:start] + text + line[end:]
    return "".join(lines)


def _git(*args: str) -> bytes:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"git {' '.join(args)} failed in {ROOT}: {done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout


def extract_revision(rev: str, into: Path, name: str = BASELINE) -> tuple[str, Path]:
    """Write ``src/adampx`` at ``rev`` to ``into/name``, its imports rewritten; return the
    commit and the package's directory."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
    archive = _git("archive", "--format=tar", f"{commit}:{SOURCE}")
    package = into / name
    package.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(package, filter="data")
        else:  # Python < 3.10.12: the archive is git's own, of this repository
            tar.extractall(package)
    if not (package / "__init__.py").is_file():
        raise RuntimeError(f"{rev} ({commit[:12]}) has no package at {SOURCE}")
    for path in package.rglob("*.py"):
        path.write_text(rewrite_source(path.read_text(encoding="utf-8")), encoding="utf-8")
    return commit, package


def import_revision(rev: str, name: str = BASELINE) -> Baseline:
    """Import ``src/adampx`` at git revision ``rev`` as the package ``name`` (see the module
    doc). The files live in a temporary directory, removed when the process exits."""
    if name in sys.modules:
        raise RuntimeError(f"{name} is already imported; one baseline per process")
    tmp = Path(tempfile.mkdtemp(prefix="adampx-baseline-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    commit, package = extract_revision(rev, tmp, name)
    sys.path.insert(0, str(tmp))
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    return Baseline(module, rev, commit, package)
