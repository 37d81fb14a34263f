"""The self-extracting train_gpt.py wrapper: valid Python, exact payload, real on-disk size."""

from __future__ import annotations

import ast
import base64
import io
import json
import lzma
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pgolf
from pgolf.pack import build_wrapper, imported_modules, minify_source, write_wrapper

ROOT = Path(pgolf.__file__).resolve().parent.parent
CONFIG = {"model": {"name": "baseline", "num_layers": 9}, "seed": 1337, "note": 'caf\u00e9 {braces} "quotes"'}


def _payload(text: str) -> bytes:
    """The string literal passed to base64.b85decode in the wrapper, found through the AST."""
    tree = ast.parse(text)
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "b85decode"
    ]
    assert len(calls) == 1
    (arg,) = calls[0].args
    assert isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    return arg.value.encode("ascii")


def _unpack(text: str) -> dict[str, bytes]:
    raw = lzma.decompress(base64.b85decode(_payload(text)))
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        assert z.testzip() is None
        return {name: z.read(name) for name in z.namelist()}


def _modules(*rels: str) -> dict[str, Path]:
    return {rel: ROOT / rel for rel in rels}


def test_wrapper_payload_round_trip():
    modules = _modules("pgolf/__init__.py", "pgolf/pack.py", "pgolf/data/shards.py", "pgolf/quant/int8.py")
    text = build_wrapper(modules, CONFIG)
    ast.parse(text)
    compile(text, "train_gpt.py", "exec")
    assert text.isascii()
    files = _unpack(text)
    assert set(files) == set(modules) | {"config.json"}
    for rel, path in modules.items():
        assert files[rel] == minify_source(path.read_text()).encode(), rel
    assert json.loads(files["config.json"]) == CONFIG
    # compressed: the wrapper is smaller than the source it carries
    assert len(text.encode("utf-8")) < sum(p.stat().st_size for p in modules.values())


def test_wrapper_is_deterministic():
    modules = _modules("pgolf/__init__.py", "pgolf/pack.py")
    assert build_wrapper(modules, CONFIG) == build_wrapper(dict(modules), CONFIG)
    assert build_wrapper(modules, CONFIG) == build_wrapper(modules, dict(reversed(list(CONFIG.items()))))
    assert build_wrapper(modules, CONFIG) != build_wrapper(modules, {**CONFIG, "seed": 1})


def test_wrapper_runs_the_packed_code(tmp_path):
    """Executing the wrapper extracts the zip and imports pgolf from it, not from the installed package."""
    fake_train = tmp_path / "src" / "train.py"
    fake_train.parent.mkdir()
    fake_train.write_text(
        "import json, pathlib, sys\n"
        "def run_packed(config_path):\n"
        "    cfg = json.loads(pathlib.Path(config_path).read_text())\n"
        "    print(json.dumps({'cfg': cfg, 'train_file': __file__, 'root': sys.path[0]}))\n"
    )
    modules = {"pgolf/__init__.py": ROOT / "pgolf/__init__.py", "pgolf/train.py": fake_train}
    script = tmp_path / "run" / "train_gpt.py"
    script.parent.mkdir()
    script.write_text(build_wrapper(modules, CONFIG), encoding="utf-8")
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=script.parent, capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cfg"] == CONFIG
    assert Path(out["train_file"]).resolve() == (Path(out["root"]) / "pgolf" / "train.py").resolve()
    assert Path(out["root"]).name.startswith("pgolf_")
    assert Path(out["root"]).parent == tmp_path / "tmp"


def test_write_wrapper_returns_on_disk_size(tmp_path):
    import pgolf.data.shards  # noqa: F401  (make sure some submodules are loaded)
    import pgolf.quant.int8  # noqa: F401

    path = tmp_path / "train_gpt.py"
    size, raw = write_wrapper(path, CONFIG)
    data = path.read_bytes()
    assert size == len(data) == path.stat().st_size
    assert not (tmp_path / "train_gpt.py.tmp").exists()
    text = data.decode("utf-8")
    ast.parse(text)
    files = _unpack(text)
    modules = imported_modules()
    assert raw == sum(p.stat().st_size for p in modules.values())
    assert set(files) == set(modules) | {"config.json"}
    for rel in (
        "pgolf/__init__.py",
        "pgolf/pack.py",
        "pgolf/data/__init__.py",
        "pgolf/data/shards.py",
        "pgolf/quant/int8.py",
    ):
        assert files[rel] == minify_source((ROOT / rel).read_text()).encode(), rel
    assert json.loads(files["config.json"]) == CONFIG


def test_imported_modules_include_package_inits():
    mods = imported_modules()
    assert all(rel.startswith("pgolf/") and rel.endswith(".py") for rel in mods)
    for rel in mods:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            assert "/".join(parts[:i]) + "/__init__.py" in mods, rel
    assert list(mods) == sorted(mods)


@pytest.mark.parametrize("n_bytes", [0, 1, 4096])
def test_payload_characters_are_safe_in_a_string_literal(tmp_path, n_bytes):
    # base85 never emits a quote or a backslash, whatever the bytes
    blob = tmp_path / "blob.py"
    data = bytes(range(256)) * (n_bytes // 256) + b'"\\' * (n_bytes % 7)
    blob.write_text(f"DATA = {data!r}\nTEXT = {data.decode('latin-1')!r}\n")
    text = build_wrapper({"pgolf/blob.py": blob}, {})
    unpacked = _unpack(text)["pgolf/blob.py"].decode()
    namespace: dict = {}
    exec(unpacked, namespace)
    assert namespace["DATA"] == data and namespace["TEXT"] == data.decode("latin-1")


def _without_docstrings(tree: ast.AST) -> str:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@pytest.mark.parametrize(
    "rel", ["pgolf/trainer.py", "pgolf/models/gpt.py", "pgolf/quant/mixed.py", "pgolf/config.py"]
)
def test_minified_source_is_the_same_program(rel):
    """Shipped code drops comments, docstrings and layout only: the statement trees are identical."""
    source = (ROOT / rel).read_text()
    small = minify_source(source)
    assert len(small) < len(source)
    assert "#" not in "".join(line.split("'")[0].split('"')[0] for line in small.splitlines())
    assert _without_docstrings(ast.parse(small)) == _without_docstrings(ast.parse(source))


def test_minify_keeps_the_docstring_a_module_reads():
    source = '"""Usage: tool <x>"""\nHELP = __doc__\ndef f():\n    """gone"""\n'
    namespace: dict = {}
    exec(minify_source(source), namespace)
    assert namespace["HELP"] == "Usage: tool <x>" and namespace["f"].__doc__ is None


def test_parent_only_modules_are_not_shipped():
    """The Hydra parent's modules never reach the worker, so they must not count as code bytes."""
    import pgolf.callbacks  # noqa: F401
    import pgolf.report  # noqa: F401
    import pgolf.slots  # noqa: F401
    from pgolf.pack import imported_modules

    shipped = imported_modules()
    assert "pgolf/trainer.py" in shipped or "pgolf/pack.py" in shipped
    for rel in shipped:
        assert not rel.startswith(
            ("pgolf/report/", "pgolf/callbacks.py", "pgolf/slots.py", "pgolf/run.py")
        ), rel
