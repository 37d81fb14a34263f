"""The embedded offline corpus: English prose that ships with every CPython install.

Documents are (1) the topic pages of the Python reference manual bundled for `help()` in
`pydoc_data.topics`, and (2) for each standard-library module, its module, class and function
docstrings of at least 200 characters, read from source with `ast` (nothing is imported). About
1.7 MB of human-written English (≈80 topic pages + ≈500 module documents on CPython 3.11),
available on any machine without a download. The text depends on the Python version, so the
cache key includes a hash of the documents.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import sys
import sysconfig
from pathlib import Path

MIN_DOC_CHARS = 400
_SKIP_TOP = {"test", "idlelib", "site-packages", "lib2to3", "dist-packages", "turtledemo", "tkinter"}


def _module_files(stdlib: Path) -> list[Path]:
    """The standard library's .py files that hold documents, in Path order: every folder but the
    skipped top-level ones and any named test or tests. Skipped folders are never entered, so
    site-packages (torch alone is thousands of files) costs nothing."""
    files = []
    for root, dirs, names in os.walk(stdlib):
        top = root == str(stdlib)
        dirs[:] = [d for d in dirs if d not in ("test", "tests") and not (top and d in _SKIP_TOP)]
        files += [Path(root, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _module_documents(stdlib: Path) -> list[str]:
    docs = []
    for path in _module_files(stdlib):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    parts.append(doc.strip())
        text = "\n\n".join(parts)
        if len(text) >= MIN_DOC_CHARS:
            docs.append(text)
    return docs


def _topic_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds drop pydoc_data
        return []
    return [topics[k].strip() for k in sorted(topics) if len(topics[k]) >= MIN_DOC_CHARS]


def collect_documents(seed: int = 1337) -> list[str]:
    """All documents in a fixed shuffled order (the first N become validation)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = _topic_documents() + _module_documents(stdlib)
    if len(docs) < 50:
        raise RuntimeError(
            f"found only {len(docs)} documents in this Python's standard library ({stdlib}); the embedded "
            "corpus needs a full CPython install. Use data=shards with your own data instead."
        )
    random.Random(seed).shuffle(docs)
    return docs


def source_fingerprint() -> str:
    """A cheap stand-in for `corpus_key(collect_documents())`, to find a corpus built before without
    parsing the standard library again (seconds on a slow CPU, on every run): this module's own
    source (the extraction rules), the Python version and, for each file the documents come from,
    its path, size and modification time. Equal fingerprints mean the same files as they were; a
    cache maps each fingerprint to the corpus key that collecting them gave."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"\0{sys.version}\0{stdlib}".encode())
    try:
        from pydoc_data import topics

        files = [Path(topics.__file__)]
    except ImportError:
        files = []
    for path in files + _module_files(stdlib):
        st = path.stat()
        h.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def corpus_key(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]
