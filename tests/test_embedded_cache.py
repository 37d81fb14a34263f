"""The embedded corpus's cache: found again by its source files' fingerprint, without parsing the
standard library, and collected again when those files or the cached corpus change."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

import pgolf.data.embedded as embedded
from pgolf.data.config import EmbeddedDataConfig
from pgolf.data.source import ensure_embedded


def test_module_files_are_the_files_the_rules_name():
    """`_module_files` prunes skipped folders instead of walking them; it must list exactly what the
    rule (no skipped top-level folder, no test or tests folder) keeps of every .py file, in order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    expected = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if not (rel[0] in embedded._SKIP_TOP or "tests" in rel or "test" in rel):
            expected.append(path)
    assert len(expected) > 200 and embedded._module_files(stdlib) == expected


def _write_modules(stdlib: Path, n: int) -> None:
    words = "the parser reads each module and keeps the docstrings that are long enough to be prose"
    for i in range(n):
        doc = f"Module {i}: " + " ".join([words] * 6)
        (stdlib / f"mod_{i}.py").write_text(f'"""{doc}"""\n\n\ndef f():\n    """{doc} again."""\n')
    (stdlib / "test").mkdir()
    (stdlib / "test" / "test_x.py").write_text('"""' + "skipped " * 80 + '"""\n')


@pytest.fixture
def small_stdlib(tmp_path, monkeypatch) -> Path:
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    _write_modules(stdlib, 60)
    paths = {**sysconfig.get_paths(), "stdlib": str(stdlib)}
    monkeypatch.setattr(embedded.sysconfig, "get_paths", lambda: paths)
    return stdlib


def test_a_built_corpus_is_found_by_fingerprint_and_rebuilt_when_its_sources_change(
    small_stdlib, tmp_path, monkeypatch
):
    cfg = EmbeddedDataConfig(cache_dir=str(tmp_path / "cache"), vocab_size=700, val_docs=5)
    collected = []
    real_collect = embedded.collect_documents

    def counting_collect(*args, **kwargs):
        collected.append(1)
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(embedded, "collect_documents", counting_collect)
    folder = ensure_embedded(cfg, log=lambda _: None)
    assert (folder / "DONE.json").is_file() and len(collected) == 1
    assert ensure_embedded(cfg) == folder and len(collected) == 1  # found without collecting

    # A removed build is noticed, although its fingerprint is known: collected and built again.
    (folder / "DONE.json").unlink()
    assert ensure_embedded(cfg, log=lambda _: None) == folder and len(collected) == 2
    assert (folder / "DONE.json").is_file()

    # A changed source file changes the fingerprint: the documents are collected again and, their
    # text having changed, make another corpus.
    (small_stdlib / "mod_3.py").write_text('"""' + "a changed module docstring " * 30 + '"""\n')
    other = ensure_embedded(cfg, log=lambda _: None)
    assert len(collected) == 3 and other != folder
    assert other.name.split("-")[1] == embedded.corpus_key(real_collect())
    assert ensure_embedded(cfg) == other and len(collected) == 3


def test_the_fingerprint_follows_the_files_it_covers(small_stdlib):
    before = embedded.source_fingerprint()
    (small_stdlib / "test" / "test_x.py").write_text("# a skipped folder's file changes nothing\n")
    assert embedded.source_fingerprint() == before
    (small_stdlib / "mod_0.py").write_text((small_stdlib / "mod_0.py").read_text() + "\n")
    assert embedded.source_fingerprint() != before


def test_a_read_only_cache_still_serves_the_run(small_stdlib, tmp_path, monkeypatch):
    """The fingerprint is a shortcut: a built cache whose folder cannot be written (shared,
    read-only) is found by collecting the documents, as before. (Permissions do not stop root, so
    the write itself is made to fail.)"""
    import pgolf.data.source as source

    cfg = EmbeddedDataConfig(cache_dir=str(tmp_path / "cache"), vocab_size=700, val_docs=5)
    folder = ensure_embedded(cfg, log=lambda _: None)
    for known in (tmp_path / "cache" / "embedded-sources").iterdir():
        known.unlink()

    def refuse(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(source, "write_json_atomic", refuse)
    assert ensure_embedded(cfg) == folder
    assert not any((tmp_path / "cache" / "embedded-sources").iterdir())
