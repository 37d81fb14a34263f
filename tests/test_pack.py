"""The self-extracting train_gpt.py wrapper: valid Python, exact payload, real on-disk size, and a
minifier that changes layout and dead text only."""

from __future__ import annotations

import ast
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pgolf
from pgolf.parent.pack import (
    ALPHABET,
    KEEP_MESSAGES,
    build_wrapper,
    codec_for,
    decode,
    encode,
    imported_modules,
    minify_source,
    shipped_sources,
    unpack,
    write_wrapper,
)

ROOT = Path(pgolf.__file__).resolve().parent.parent
CONFIG = {
    "model": {"name": "baseline", "num_layers": 9},
    "seed": 1337,
    "note": 'caf\u00e9 {braces} "quotes" \\0',
}


def _modules(*rels: str) -> dict[str, Path]:
    return {rel: ROOT / rel for rel in rels}


def test_wrapper_payload_round_trip():
    modules = _modules(
        "pgolf/__init__.py", "pgolf/parent/pack.py", "pgolf/data/shards.py", "pgolf/quant/int8.py"
    )
    text = build_wrapper(modules, CONFIG)
    ast.parse(text)
    compile(text, "train_gpt.py", "exec")
    assert text.isascii() and "\0" not in text and "\r" not in text
    files = unpack(text)
    assert set(files) == set(modules) | {"config.json"}
    sources = shipped_sources(modules, CONFIG)
    for rel, path in modules.items():
        assert files[rel] == sources[rel].encode(), rel
        # minified, less what the tree shaker dropped (nothing of a module that has no definitions)
        if "def " not in path.read_text():
            assert files[rel] == minify_source(path.read_text(), rel.startswith(KEEP_MESSAGES)).encode()
    assert json.loads(files["config.json"]) == CONFIG
    # compressed: the wrapper is smaller than the source it carries
    assert len(text.encode("utf-8")) < sum(p.stat().st_size for p in modules.values())


def test_codec_follows_the_model_compressor():
    """brotli packs code smaller, but only runs whose model blob needs the package may import it."""
    pytest.importorskip("brotli")
    modules = _modules("pgolf/__init__.py", "pgolf/quant/mixed.py", "pgolf/models/gpt.py")
    as_brotli = build_wrapper(modules, {"quant": {"compressor": "brotli"}})
    as_bz2 = build_wrapper(modules, {"quant": {"compressor": "lzma"}})  # a stdlib codec
    assert codec_for({"quant": {"compressor": "brotli"}}) == "brotli"
    assert codec_for({"quant": {"compressor": "zstd"}}) == codec_for({}) == "bz2"
    assert "brotli" in as_brotli and "brotli" not in as_bz2
    assert len(as_brotli) < len(as_bz2)
    assert unpack(as_brotli)["pgolf/models/gpt.py"] == unpack(as_bz2)["pgolf/models/gpt.py"]


def test_wrapper_is_deterministic():
    modules = _modules("pgolf/__init__.py", "pgolf/parent/pack.py")
    assert build_wrapper(modules, CONFIG) == build_wrapper(dict(modules), CONFIG)
    assert build_wrapper(modules, CONFIG) == build_wrapper(modules, dict(reversed(list(CONFIG.items()))))
    assert build_wrapper(modules, CONFIG) != build_wrapper(modules, {**CONFIG, "seed": 1})


# ------------------------------------------------------------------------------ base-123 text
def test_alphabet_is_every_one_byte_character_a_plain_literal_can_hold():
    assert len(ALPHABET) == len(set(ALPHABET)) == 123
    assert not set(ALPHABET) & {0, 10, 13, ord('"'), ord("\\")} and max(ALPHABET) < 128


@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 257, 511, 512, 1000, 4096 + 17])
def test_encoding_round_trips_random_bytes_of_any_length(n):
    rng = random.Random(n)
    for data in (bytes(rng.randrange(256) for _ in range(n)), b"\0" * n, b"\xff" * n):
        text = encode(data)
        assert decode(text) == data
        assert set(text.encode("ascii")) <= set(ALPHABET)
        assert len(text) <= -(-n * 8 * 1000 // 6942) + 1  # log2(123) = 6.9425 bits per character


def test_encoding_holds_every_byte_value_and_is_denser_than_base85():
    data = bytes(range(256)) * 40
    text = encode(data)
    assert decode(text) == data
    assert len(text) < 1.16 * len(data) < 1.25 * len(data)


def test_every_alphabet_character_survives_a_source_file(tmp_path):
    """Written into a file and run by a fresh interpreter, the literal decodes to the same bytes."""
    data = bytes(range(256)) * 3 + bytes(random.Random(0).randrange(256) for _ in range(3000))
    text = encode(data)
    assert set(text.encode()) == set(ALPHABET)  # every character is exercised
    script = tmp_path / "t.py"
    script.write_text(
        f'import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom pgolf.parent.pack import decode\nS="{text}"\n'
        "sys.stdout.write(decode(S).hex())\n",
        encoding="utf-8",
        newline="",
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert bytes.fromhex(proc.stdout) == data


# ------------------------------------------------------------------------------ the wrapper runs
@pytest.mark.parametrize("codec", ["bz2", "lzma", "brotli"])
def test_wrapper_runs_the_packed_code(tmp_path, codec):
    """Executing the wrapper extracts the files and imports pgolf from them, not from the installed
    package; the entry point learns which script it runs from."""
    if codec == "brotli":
        pytest.importorskip("brotli")
    fake_train = tmp_path / "src" / "train.py"
    fake_train.parent.mkdir()
    fake_train.write_text(
        "import json, pathlib, sys\n"
        "def run_packed(config_path, script):\n"
        "    cfg = json.loads(pathlib.Path(config_path).read_text())\n"
        "    print(json.dumps({'cfg': cfg, 'train_file': __file__, 'root': sys.path[0], 'script': script}))\n"
    )
    modules = {"pgolf/__init__.py": ROOT / "pgolf/__init__.py", "pgolf/train.py": fake_train}
    script = tmp_path / "run" / "train_gpt.py"
    script.parent.mkdir()
    script.write_text(build_wrapper(modules, CONFIG, codec=codec), encoding="utf-8", newline="")
    assert (
        unpack(script.read_text(encoding="utf-8"))["pgolf/train.py"]
        == minify_source(fake_train.read_text()).encode()
    )
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    env.pop("PYTHONPATH", None)
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run(
        [sys.executable, "train_gpt.py"],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cfg"] == CONFIG
    assert Path(out["train_file"]).resolve() == (Path(out["root"]) / "pgolf" / "train.py").resolve()
    assert Path(out["root"]).name.startswith("pgolf_")
    assert Path(out["root"]).parent == tmp_path / "tmp"
    assert (script.parent / out["script"]).resolve() == script.resolve()


def test_write_wrapper_returns_on_disk_size(tmp_path, compose):
    import pgolf.checkpoint  # noqa: F401  (imported, but this config turns checkpoints off)
    import pgolf.data.shards  # noqa: F401  (make sure some submodules are loaded)
    import pgolf.quant.int8  # noqa: F401
    from pgolf.config import job_config_from_dict, to_dict
    from pgolf.parent.pack import shipped_config, shipped_modules

    config = to_dict(job_config_from_dict(compose()))  # a run's frozen config: the wrapper trims it
    path = tmp_path / "train_gpt.py"
    size, raw = write_wrapper(path, config)
    data = path.read_bytes()
    assert size == len(data) == path.stat().st_size
    assert not (tmp_path / "train_gpt.py.tmp").exists()
    text = data.decode("utf-8")
    ast.parse(text)
    files = unpack(text)
    modules = shipped_modules(config)
    assert raw == sum(p.stat().st_size for p in modules.values())
    assert set(files) == set(modules) | {"config.json"}
    assert "pgolf/checkpoint.py" in imported_modules() and "pgolf/checkpoint.py" not in files
    on = {**config, "checkpoint": {**config["checkpoint"], "every_steps": 5}}
    assert "pgolf/checkpoint.py" in shipped_modules(on)
    sources = shipped_sources(modules, shipped_config(config))
    for rel in ("pgolf/__init__.py", "pgolf/data/__init__.py", "pgolf/data/shards.py", "pgolf/quant/int8.py"):
        assert files[rel] == sources[rel].encode(), rel
    assert json.loads(files["config.json"]) == shipped_config(config)


def test_imported_modules_include_package_inits():
    mods = imported_modules()
    assert all(rel.startswith("pgolf/") and rel.endswith(".py") for rel in mods)
    for rel in mods:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            assert "/".join(parts[:i]) + "/__init__.py" in mods, rel
    assert list(mods) == sorted(mods)


def test_nothing_of_pgolf_parent_and_no_shim_is_shipped():
    """One rule decides what ships: nothing under pgolf.parent (the Hydra parent, the packer and its
    CLIs), nor the root shims that import from it (`python -m pgolf.run` and friends). A packed run
    counts its own file (pgolf.shipped) instead of running the packer."""
    import pgolf.check  # noqa: F401  (the shims)
    import pgolf.pack  # noqa: F401
    import pgolf.plan  # noqa: F401
    import pgolf.report  # noqa: F401
    import pgolf.report.__main__  # noqa: F401
    import pgolf.run  # noqa: F401
    import pgolf.submission  # noqa: F401
    import pgolf.trainer  # noqa: F401

    parent = Path(pgolf.parent.__file__).parent
    assert {p.stem for p in parent.glob("*.py")} >= {"run", "compose", "callbacks", "console", "pack"}
    assert "pgolf.parent.report.render" in sys.modules  # imported, so the rule had work to do
    shipped = imported_modules()
    assert "pgolf/trainer.py" in shipped and "pgolf/shipped.py" in shipped
    shims = {f"pgolf/{name}.py" for name in ("check", "pack", "plan", "run", "submission")}
    shims |= {"pgolf/report/__init__.py", "pgolf/report/__main__.py"}
    assert all((ROOT / rel).is_file() for rel in shims)
    for rel in shipped:
        assert not rel.startswith("pgolf/parent/") and rel not in shims, rel


def test_a_module_that_imports_pgolf_parent_is_parent_side(tmp_path):
    """The shim test reads top-level imports only: a lazy import inside a function (pgolf.shipped's
    packer) keeps a module on the worker side."""
    from pgolf.parent.pack import _imports_parent

    shim, lazy = tmp_path / "shim.py", tmp_path / "lazy.py"
    shim.write_text("import sys\nfrom pgolf.parent.run import main\n")
    lazy.write_text("def f():\n    from pgolf.parent.pack import write_wrapper\n")
    assert _imports_parent(shim) and not _imports_parent(lazy)


# ------------------------------------------------------------------------------ the minifier
def _reference_strip(tree: ast.AST) -> str:
    """What minify may drop, removed independently: docstrings, annotations of functions with no
    decorator beyond staticmethod/classmethod/property, and `if TYPE_CHECKING:` blocks; and the
    spelling of variable names (parameters, attributes, definitions and imports still compare)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and all(
            ast.unparse(d) in ("staticmethod", "classmethod", "property") for d in node.decorator_list
        ):
            node.returns = None
            for arg in ast.walk(node.args):
                if isinstance(arg, ast.arg):
                    arg.annotation = None
            _reference_local_annotations(node)
        if isinstance(node, ast.Name):  # local names may be shortened: compare the structure
            node.id = "_"
        if isinstance(node, ast.ExceptHandler) and node.name:
            node.name = "_"
        if hasattr(node, "body") and isinstance(node.body, list):
            node.body = [
                s
                for s in node.body
                if not (isinstance(s, ast.If) and ast.unparse(s.test) == "TYPE_CHECKING" and not s.orelse)
            ] or [ast.Pass()]
    return ast.dump(tree)


def _reference_local_annotations(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    """In the function's own statements (not nested defs or classes): `x: T = v` becomes `x = v`
    and `name.attr: T` with no value goes."""

    def own(node: ast.AST):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                yield child
                yield from own(child)

    for node in [fn, *own(fn)]:
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                kept = [
                    ast.Assign(targets=[s.target], value=s.value, lineno=0)
                    if isinstance(s, ast.AnnAssign) and s.value is not None
                    else s
                    for s in block
                    if not (
                        isinstance(s, ast.AnnAssign)
                        and s.value is None
                        and isinstance(s.target, ast.Attribute)
                        and isinstance(s.target.value, ast.Name)
                    )
                ]
                setattr(node, field, kept or [ast.Pass()])


@pytest.mark.parametrize(
    "rel",
    [
        "pgolf/trainer.py",
        "pgolf/models/gpt.py",
        "pgolf/quant/mixed.py",
        "pgolf/config.py",
        "pgolf/optim/muon.py",  # a TYPE_CHECKING block (the catalog, components.py, has no nesting left)
    ],
)
def test_minified_source_is_the_same_program(rel):
    """Shipped code drops comments, docstrings, function annotations and layout only."""
    source = (ROOT / rel).read_text()
    small = minify_source(source)
    assert len(small) < 0.85 * len(source)
    assert "#" not in "".join(line.split("'")[0].split('"')[0] for line in small.splitlines())
    assert _reference_strip(ast.parse(small)) == _reference_strip(ast.parse(source))
    indents = {len(line) - len(line.lstrip(" ")) for line in small.splitlines()}
    assert 1 in indents and max(indents) < 8  # one space per level, not four


def test_minify_keeps_the_docstring_a_module_reads():
    source = '"""Usage: tool <x>"""\nHELP = __doc__\ndef f():\n    """gone"""\n'
    namespace: dict = {}
    exec(minify_source(source), namespace)
    assert namespace["HELP"] == "Usage: tool <x>" and namespace["f"].__doc__ is None


TRICKY = textwrap.dedent(
    '''
    """module doc
        an indented line of the docstring the module reads
    """
    from __future__ import annotations

    import dataclasses
    import functools
    import typing
    from typing import TYPE_CHECKING

    if TYPE_CHECKING:
        from collections import OrderedDict  # never runs

    COUNT = 0


    @dataclasses.dataclass(frozen=True)
    class Cfg:
        """fields are read through their annotations"""

        lr: float = 0.1
        tags: tuple[str, ...] = ("a",)
        extra: dict[str, int] = dataclasses.field(default_factory=dict)

        def scaled(self, k: float = 2.0) -> float:
            return self.lr * k


    def tagged(label: str):
        def deco(fn):
            @functools.wraps(fn)
            def inner(*args: int, **kwargs: int) -> str:
                return f"{label}:{fn(*args, **kwargs)!r:>6}|{{literal}}"

            return inner

        return deco


    @tagged("sum")
    def add(a: int, /, b: int = 1, *, c: int = 0) -> int:
        return a + b + c


    def counter(start: int = 0):
        total = start

        def bump(by: int = 1) -> int:
            nonlocal total
            total += by
            return total

        return bump


    def bump_global(n: int) -> int:
        global COUNT
        COUNT += n
        return COUNT


    def keeps(x: int) -> int:
        return x


    keeps.__annotations__  # read by nobody but present


    class Base:
        def __init_subclass__(cls, /, tag: str = "", **kw: object) -> None:
            super().__init_subclass__(**kw)
            cls.tag = tag

        @property
        def name(self) -> str:
            return type(self).__name__

        @staticmethod
        def twice(v: int) -> int:
            return 2 * v


    class Child(Base, tag="kid"):
        pass


    TEXT = """line one
        indented inside a string
    last"""


    def multiline() -> str:
        return """a
            b"""


    def comp(xs: list[int]) -> list[int]:
        k = 3
        return [x * k for x in xs if x] + list(map(lambda y: y + k, xs))


    def locals_tricks(value: int = 5) -> dict:
        total_sum = value * 2
        [last_seen := v for v in range(value)]  # the walrus binds in this function's scope
        try:
            raise KeyError("boom")
        except KeyError as problem:
            caught = str(problem)
        temp_value = 1
        del temp_value
        try:
            temp_value  # noqa: F821
            deleted = False
        except NameError:
            deleted = True
        label_text = f"{total_sum=} {caught!s:>8}"

        def inner(default_arg=total_sum):
            return default_arg + 1

        return {"label": label_text, "inner": inner(), "last": last_seen, "deleted": deleted}


    def reads_locals(alpha_value: int = 1) -> list:
        beta_value = alpha_value + 1
        return sorted(k for k in locals())


    def keyword_target(first_arg: int, second_arg: int = 2) -> int:
        local_sum = first_arg * 10 + second_arg
        return local_sum


    RESULT = {
        "hints": {k: str(v) for k, v in typing.get_type_hints(Cfg).items()},
        "fields": [f.name for f in dataclasses.fields(Cfg)],
        "cfg": Cfg(lr=0.5).scaled(k=3.0),
        "add": add(1, b=2, c=3),
        "counter": [counter(5)(by=2), counter()()],
        "global": [bump_global(2), bump_global(3)],
        "child": [Child.tag, Child().name, Base.twice(v=4)],
        "text": TEXT,
        "multi": multiline(),
        "comp": comp([0, 1, 2]),
        "locals_tricks": locals_tricks(),
        "reads_locals": reads_locals(),
        "keyword": keyword_target(second_arg=3, first_arg=1),
        "doc": __doc__,
        "type_checking": "OrderedDict" in globals(),
    }
    '''
)


def _run_module(name: str, source: str) -> dict:
    """Execute `source` as a registered module (dataclasses look their module up by name)."""
    import types

    mod = types.ModuleType(name)
    sys.modules[name] = mod
    try:
        exec(compile(source, f"{name}.py", "exec"), mod.__dict__)
    finally:
        del sys.modules[name]
    return mod.__dict__


def test_minify_preserves_behaviour_of_tricky_source():
    """Dataclasses read through get_type_hints, decorators, closures, nonlocal/global, keyword and
    positional-only arguments, f-strings with format specs and braces, multi-line strings whose
    indentation is text, class keywords, comprehensions and lambdas: the same results."""
    small = minify_source(TRICKY)
    before, after = _run_module("tricky_src", TRICKY), _run_module("tricky_min", small)
    assert after["RESULT"] == before["RESULT"]
    assert before["RESULT"]["hints"] == {
        "lr": "<class 'float'>",
        "tags": "tuple[str, ...]",
        "extra": "dict[str, int]",
    }
    assert "TYPE_CHECKING:" not in small and "def comp(xs):" in small and "def scaled(self,k=2.0):" in small
    assert "def add(a:int,/,b:int=1,*,c:int=0)->int:" in small  # decorated: annotations kept
    assert "lr:float=0.1" in small  # class-body annotations are dataclass fields: kept
    assert "local_sum" not in small and "label_text" not in small and "problem" not in small  # shortened ...
    assert "def keyword_target(first_arg,second_arg=2):" in small  # ... parameters never
    assert "beta_value" in small  # a function that calls locals() keeps its names
    assert "last_seen" in small and "total_sum" in small  # mentioned in a nested scope: kept
    assert "\n    an indented line of the docstring" in small  # text inside strings is not reindented
    assert after["keeps"].__annotations__ == {} and before["keeps"].__annotations__


def test_minify_keeps_annotations_and_names_a_decorator_may_read():
    """triton.jit reads annotations (tl.constexpr) and compiles the source: decorated functions
    keep both; a plain function's locals are shortened."""
    source = (
        "import functools\n@functools.lru_cache\ndef f(x: int) -> int:\n    doubled = 2 * x\n    return doubled\n"
        "def g(x: int) -> int:\n    doubled = 2 * x\n    return doubled\n"
    )
    small = minify_source(source)
    assert "def f(x:int)->int:" in small and small.count("doubled") == 2
    assert "def g(x):" in small


def test_a_packed_run_ships_the_file_it_runs_from(tmp_path, monkeypatch, compose):
    """pgolf.shipped: from source the packer writes the wrapper; packed, the running script is
    copied byte for byte (the packer is not even importable there)."""
    from pgolf import shipped
    from pgolf.config import job_config_from_dict, to_dict

    built = tmp_path / "built.py"
    size, _ = shipped.write_code(built, to_dict(job_config_from_dict(compose())))
    assert size == built.stat().st_size and unpack(built.read_text(encoding="utf-8"))["config.json"]
    running = tmp_path / "running.py"
    running.write_bytes(b'print("any wrapper")\x0b\n')
    monkeypatch.setattr(shipped, "PACKED_SCRIPT", running)
    out = tmp_path / "artifact" / "train_gpt.py"
    out.parent.mkdir()
    size, raw = shipped.write_code(out, {"ignored": True})
    assert out.read_bytes() == running.read_bytes() and size == len(running.read_bytes())
    assert raw > 0 and not (out.parent / "train_gpt.py.tmp").exists()


def _scopes(source: str) -> list[tuple]:
    """Per scope, in order: its kind and name, parameters, the globals and free variables it reads
    and the cells it offers nested scopes, and how many locals it has."""
    import symtable

    out, stack = [], [symtable.symtable(source, "m.py", "exec")]
    while stack:
        t = stack.pop(0)
        syms = t.get_symbols()
        params = tuple(t.get_parameters()) if isinstance(t, symtable.Function) else ()
        glob = sorted(s.get_name() for s in syms if s.is_global() and s.is_referenced())
        free = sorted(s.get_name() for s in syms if s.is_free())
        cells = sorted(s.get_name() for s in syms if s.is_local() and any(
            s.get_name() in c.get_identifiers() and c.lookup(s.get_name()).is_free() for c in t.get_children()
        ))  # fmt: skip
        n_locals = sum(1 for s in syms if s.is_local())
        out.append((t.get_type(), t.get_name(), params, glob, free, cells, n_locals))
        stack.extend(t.get_children())
    return out


def test_renamed_locals_keep_every_scope_s_interface():
    """Over every pgolf module: after renaming, each function still has the same parameters, reads
    the same globals and free variables, offers the same cells and has as many locals: renaming
    captured nothing and split nothing."""
    from pgolf.parent.pack import _strip

    for path in sorted((ROOT / "pgolf").rglob("*.py")):
        source = path.read_text()
        stripped = ast.unparse(_strip(ast.parse(source), "__doc__" in source))  # all but the renaming
        before, after = _scopes(stripped), _scopes(minify_source(source))
        assert len(before) == len(after), path
        for b, a in zip(before, after):
            assert b == a, (path, b, a)


_KERNEL_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import kernels as k
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
h = torch.randn(37, 48, generator=g).to(dev)
w = torch.randn(24, 48, generator=g).to(dev)
x = torch.randn(2, 9, 3, 16, generator=g).to(dev)
ang = torch.randn(1, 9, 1, 4, generator=g).to(dev)
outs = [
    k.act_mm(h, w, 0.5),
    k.mm_act(h, w, 0.5),
    k.qk_prologue(x, ang.cos(), ang.sin(), 8, torch.tensor([1.0, 2.0, 0.5], device=dev)),
    k.leaky_relu2(h, 0.5),
    k.softcap_cross_entropy(h, torch.arange(37, device=dev) % 48, 30.0),
]
torch.save([o.cpu() for o in outs], sys.argv[2])
"""


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0,
    reason="Triton is not installed",
)
def test_minified_kernels_compute_what_the_originals_do(tmp_path):
    """triton.jit compiles the shipped source itself and torch.library reads its annotations: the
    minified kernels module (what a packed run imports) must give the original's numbers."""
    import torch

    src = (ROOT / "pgolf/models/kernels.py").read_text()
    results = []
    for name, text in (("orig", src), ("min", minify_source(src))):
        d = tmp_path / name
        d.mkdir()
        (d / "kernels.py").write_text(text)
        out = tmp_path / f"{name}.pt"
        env = {**os.environ}
        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
        proc = subprocess.run(
            [sys.executable, "-c", _KERNEL_PROBE, str(d), str(out)], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(torch.load(out))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ tree shaking
SHAKE_A = textwrap.dedent(
    """
    import torch

    TABLE = {"pick": "by_table"}
    UNUSED_TABLE = ((1.5, -2.0), (0.5, 3.0))
    __all__ = ["build"]
    COMPILED = re.compile("x")  # a call may do anything: stays

    def planted_unused(x):
        return helper_of_unused(x)

    def helper_of_unused(x):
        return x

    def by_getattr():
        return 1

    def by_table():
        return 2

    def loss_fn():
        return 5

    def build(cfg):
        return Net()

    def __getattr__(name):
        raise AttributeError(name)

    @some.registry_hook
    def registers_itself():
        return 3

    def default_has_effect(x=print("defined")):
        return x

    class Net(torch.nn.Module):
        def forward(self, x):
            return self.used(x)

        def used(self, x):
            return x

        def never_called(self, x):
            return x

    class Unused:
        def method(self):
            return 4

    class Base:
        def __init_subclass__(cls):
            pass

    class Recorded(Base):
        pass

    def entry():
        import importlib
        getattr(sys.modules[__name__], "{}_fn".format("lo" + "ss"))
        kind = "get" + "attr"
        return getattr(importlib.import_module("pgolf.shake_a"), "by_" + kind)
    """
)
SHAKE_B = textwrap.dedent(
    """
    import importlib

    BUILDERS = ["pgolf.shake_a:build"]

    def run():
        from pgolf.shake_a import entry, TABLE
        module, _, fn = BUILDERS[0].partition(":")
        return getattr(importlib.import_module(module), fn)(None), entry(), TABLE
    """
)


def _shaken(monkeypatch, roots: set[str]) -> tuple[dict[str, str], list[str]]:
    """SHAKE_A and SHAKE_B loaded as pgolf.shake_a / pgolf.shake_b, shaken from `roots`."""
    import types

    from pgolf.parent.pack import _strip, _unparse, shake

    for name, src in (("pgolf.shake_a", SHAKE_A), ("pgolf.shake_b", SHAKE_B)):
        mod = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mod)
        mod.__dict__["re"] = re
        exec(
            compile(src.replace("@some.registry_hook", "@(lambda f: f)"), f"{name}.py", "exec"), mod.__dict__
        )
    trees = {"pgolf/shake_a.py": ast.parse(SHAKE_A), "pgolf/shake_b.py": ast.parse(SHAKE_B)}
    trees = {rel: _strip(t, False) for rel, t in trees.items()}
    dropped = shake(trees, roots)
    return {rel: _unparse(t) for rel, t in trees.items()}, dropped


def test_shake_drops_what_nothing_reaches_and_keeps_what_a_string_or_hook_reaches(monkeypatch):
    out, dropped = _shaken(monkeypatch, {"run"})
    assert sorted(dropped) == [
        "pgolf/shake_a.py:Net.never_called",
        "pgolf/shake_a.py:UNUSED_TABLE",
        "pgolf/shake_a.py:Unused",
        "pgolf/shake_a.py:helper_of_unused",
        "pgolf/shake_a.py:planted_unused",
    ]
    a = out["pgolf/shake_a.py"]
    assert "\nTABLE=" in a and "__all__" in a and "COMPILED" in a
    assert "def planted_unused" not in a and "never_called" not in a and "class Unused" not in a
    for kept in (
        "def by_table",  # a string in a kept table
        "def build",  # a registry-style "module:function" string
        "def __getattr__",  # a module hook Python calls by name
        "def registers_itself",  # a decorator that may register it
        "def default_has_effect",  # its default runs code at import
        "def forward",  # torch calls it: a name of the nn.Module base
        "def used",
        "class Recorded",  # a base's __init_subclass__ sees it
        "def entry",
        "def by_getattr",  # a name built at run time: "by_" + ... may start it
        "def loss_fn",  # ... or "{}_fn".format(...) end it
    ):
        assert kept in a, kept


def test_shake_roots_keep_an_entry_point_and_its_callees(monkeypatch):
    out, _ = _shaken(monkeypatch, set())
    assert "def run" not in out["pgolf/shake_b.py"]  # nothing mentions it
    out, _ = _shaken(monkeypatch, {"run"})
    assert "def run" in out["pgolf/shake_b.py"] and "def entry" in out["pgolf/shake_a.py"]


def _validating_classes(tree: ast.Module) -> dict[str, bool]:
    """Top-level class -> whether it defines `validate`."""
    return {
        c.name: any(isinstance(f, ast.FunctionDef) and f.name == "validate" for f in c.body)
        for c in tree.body
        if isinstance(c, ast.ClassDef)
    }


def _modules_a_fresh_worker_ships(overrides: list[str]) -> dict[str, Path]:
    """The pgolf modules `pgolf.plan` imports for a config, from a fresh interpreter: this test
    process (an xdist worker above all) has imported whatever earlier tests needed, and every extra
    module can keep definitions alive in the tree shaker."""
    probe = (
        "import json, sys; from pgolf.parent.compose import compose_dict;"
        "from pgolf.config import job_config_from_dict; from pgolf.parent import plan;"
        "from pgolf.parent.pack import imported_modules;"
        "plan.code_bytes(job_config_from_dict(compose_dict(sys.argv[1:])));"
        "print(json.dumps({k: str(v) for k, v in imported_modules().items()}))"
    )
    proc = subprocess.run([sys.executable, "-c", probe, *overrides], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: Path(v) for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}


def test_prevalidated_schemas_ship_without_validate_and_the_shipped_config_still_loads(tmp_path, compose):
    """Schemas a packed run never changes lose `validate` (the run that packed them validated the
    same values); the data group and the root (DATA_PATH, TOKENIZER_PATH, SEED) keep theirs, and a
    validate that stores anything is never dropped."""
    import pgolf.train  # noqa: F401  (the entry point: the tree shaker's root)
    from pgolf.config import job_config_from_dict, to_dict
    from pgolf.parent.pack import drop_prevalidated, shipped_config

    config = to_dict(job_config_from_dict(compose(["experiment=r0409"])))
    src = shipped_sources(_modules_a_fresh_worker_ships(["experiment=r0409"]), shipped_config(config))
    assert "def validate" not in src["pgolf/quant/config.py"] + src["pgolf/models/config.py"]
    # every data schema that ships (the registry keeps only the config's and `shards`) keeps its own
    shipped_data, data_cfg = (
        _validating_classes(ast.parse(text))
        for text in (src["pgolf/data/config.py"], (ROOT / "pgolf/data/config.py").read_text())
    )
    assert shipped_data and shipped_data == {c: v for c, v in data_cfg.items() if c in shipped_data}
    assert "ShardDataConfig" in shipped_data and "EmbeddedDataConfig" not in shipped_data
    assert src["pgolf/config.py"].count("def validate") == 1  # RootSettings: the seed
    normalises = ast.parse("class A:\n    def validate(self, path):\n        self.x = tuple(self.x)\n")
    assert drop_prevalidated("pgolf/other.py", normalises) == [] and "validate" in ast.unparse(normalises)
    # The shipped schemas, loaded as a packed run loads them, accept the frozen config as it is.
    pkg = tmp_path / "pkg"
    for rel, text in src.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    probe = (
        "import json; from pgolf.config import job_config_from_dict, to_dict;"
        f"c = json.load(open({str(pkg / 'config.json')!r})); print(json.dumps(to_dict(job_config_from_dict(c))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=pkg, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {**config, "job_dir": ""}


def test_registries_ship_only_the_entries_a_packed_run_can_reach(compose):
    """r0409's registries keep its own model, optimizer, quant, TTT and loader, the `shards` data
    source DATA_PATH switches to, and every hardware entry; the schema classes of the others, and
    the imports that only they used, go with the tree shaker."""
    import pgolf.train  # noqa: F401  (the entry point: the tree shaker's root)
    from pgolf.config import job_config_from_dict, to_dict
    from pgolf.parent.pack import shipped_config

    config = to_dict(job_config_from_dict(compose(["experiment=r0409"])))
    src = shipped_sources(_modules_a_fresh_worker_ships(["experiment=r0409"]), shipped_config(config))
    registered = {
        (ast.unparse(s.value.func.value), s.value.args[0].value)
        for s in ast.parse(src["pgolf/components.py"]).body
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
    }
    assert registered == {
        ("DATA", "shards"),
        ("LOADERS", config["data"]["loader"]),
        ("MODELS", "layered"),
        ("OPTIMIZERS", "muon"),
        ("QUANT", "mixed"),
        ("TTT", "score_first"),
        ("HARDWARE", "cuda"),
        ("HARDWARE", "cpu"),
        ("HARDWARE", "auto"),
    }
    # a dropped entry's schema ships only if other shipped code (loaded by an earlier test) names it
    for name, rel in [
        ("BankedGPTConfig", "pgolf/models/config.py"),
        ("Int8ZlibConfig", "pgolf/quant/config.py"),
        ("NoTTTConfig", "pgolf/ttt/config.py"),
    ]:
        elsewhere = any(name in text for r, text in src.items() if r not in (rel, "pgolf/components.py"))
        assert (f"class {name}" in src[rel]) == elsewhere == (name in src["pgolf/components.py"]), name
    assert "class MixedQuantConfig" in src["pgolf/quant/config.py"]


def test_a_format_spec_is_no_part_of_a_name():
    """`f"{x:g}"` formats x; the shaker must not read `g` as the start or end of a name built at
    run time (it kept every definition ending in g, every `...Config` class among them)."""
    from pgolf.parent.pack import _mentions

    words, prefixes, suffixes = _mentions(ast.parse('f"{x:g} {y:{w}.2f}" + f"by_{z}"'))
    assert {"x", "y", "w", "z"} <= words
    assert "g" not in prefixes | suffixes and "by_" in prefixes


def _glued(source: str) -> tuple[set[str], set[str]]:
    from pgolf.parent.pack import _mentions

    _, prefixes, suffixes = _mentions(ast.parse(source))
    return prefixes - {""}, suffixes - {""}


@pytest.mark.parametrize(
    "source, prefix, suffix",
    [
        ('f"by_{x}"', "by_", None),  # getattr(m, f"by_{x}") reaches by_anything
        ('f"{x}_fn"', None, "_fn"),
        ('"by_" + x', "by_", None),
        ('x + "_fn"', None, "_fn"),
        ('f"q {a}" + "by_" + x', "by_", None),  # the piece a + chain ends with touches x
        ('x + "_fn" + f"{y}"', "_fn", "_fn"),
        ('"{}_fn".format(x)', None, "_fn"),
        ('"%s_fn" % x', None, "_fn"),
        ('"_".join(parts)', "_", "_"),
        ('f"{n:d}_fn"', None, "0_fn"),  # a number ends in a digit (or inf/nan) before _fn
        ('f"{x:.1f}s"', None, "infs"),
        ('f"by{i:03d}"', "by7", None),
    ],
)
def test_a_name_built_at_run_time_keeps_what_it_may_start_or_end(source, prefix, suffix):
    prefixes, suffixes = _glued(source)
    assert prefix is None or prefix in prefixes
    assert suffix is None or suffix in suffixes


def test_only_string_ends_that_touch_computed_text_are_prefixes_or_suffixes():
    """An f-string's outer ends touch nothing (in f"init_from:{path}" nothing continues
    init_from); a number's text (`{t:.1f}s`) can only put digits or inf/nan before the unit; a
    piece between two computed parts (f"{a}_{b}") marks nothing. Each of these kept every
    definition starting with `_` or ending in `s`, `a`, `init_from`, ... (Trainer._load_init_from
    and dozens more shipped on the offline default)."""
    prefixes, suffixes = _glued(
        'f"init_from:{path} layout:{a}"; f"{t:.1f}s {n:,} tokens {p:5.0f}%"; f"{a}_{b}_{c:06d}.bin"'
    )
    assert not {"init_from", "layout", "s", "tokens", "_", "bin"} & (prefixes | suffixes)
    assert {"1s", "infs", "nans"} <= suffixes  # what a number may still build
    # a format spec that is not a number's (a fill character, a conversion) may be any text
    prefixes, suffixes = _glued('f"{x:_<4d}s {y!r:5d}_fn"')
    assert {"s", "_fn"} <= suffixes


def test_shake_drops_a_definition_only_log_lines_seemed_to_reach(monkeypatch):
    """`_load` and `waits` are reached by no name: the log lines around them end in `_` and `s`
    only next to numbers and between two computed parts."""
    from pgolf.parent.pack import shake

    trees = {
        "pgolf/glue_a.py": ast.parse(
            "def run(log, a, b, t, x):\n"
            "    log(f'{a}_{b}.bin done in {t:.1f}s')\n"
            "    return getattr(x, f'by_{a}')\n"
            "def _load(): pass\n"
            "def waits(): pass\n"
            "def by_name(): pass\n"
        )
    }
    assert sorted(shake(trees, {"run"})) == ["pgolf/glue_a.py:_load", "pgolf/glue_a.py:waits"]


def test_an_import_whose_names_nothing_uses_still_loads_its_module_and_they_go():
    """`from pgolf.x import f` whose f the shaker left unused becomes `import pgolf.x` (the module
    still loads; f goes with the next shake), unless the module binds `pgolf` itself or x is a
    package (a name imported from a package may be a submodule only the `from` loads)."""
    from pgolf.parent.pack import drop_unused_imports, shake

    trees = {
        "pgolf/imp_a.py": ast.parse(
            "from pgolf.imp_b import used, unused\n"
            "from pgolf.imp_c import gone\n"
            "from pgolf.imp_pkg import sub\n"
            "def run():\n    return used()\n"
        ),
        "pgolf/imp_b.py": ast.parse("def used(): pass\ndef unused(): pass\n"),
        "pgolf/imp_c.py": ast.parse("def gone(): pass\n"),
        "pgolf/imp_pkg/__init__.py": ast.parse("def sub(): pass\n"),
        "pgolf/imp_d.py": ast.parse("from pgolf.imp_c import gone\npgolf = None\n"),
    }
    assert drop_unused_imports(trees) == 2  # unused, and gone from imp_a
    a = ast.unparse(trees["pgolf/imp_a.py"])
    assert "from pgolf.imp_b import used\n" in a and "import pgolf.imp_c\n" in a
    assert "from pgolf.imp_pkg import sub" in a  # a package's name may be a submodule
    assert "from pgolf.imp_c import gone" in ast.unparse(trees["pgolf/imp_d.py"])  # binds pgolf
    trees.pop("pgolf/imp_d.py")
    assert sorted(shake(trees, {"run"})) == ["pgolf/imp_b.py:unused", "pgolf/imp_c.py:gone"]


def test_squeeze_drops_spaces_between_tokens_but_never_changes_the_program():
    from pgolf.parent.pack import _squeeze

    assert _squeeze("x = f(a, b) + c[1:2]\nif x in y and not z:\n    s = 'q' f'{x!r}' in b'q'\n") == (
        "x=f(a,b)+c[1:2]\nif x in y and not z:\n    s='q'f'{x!r}'in b'q'\n"
    )
    assert _squeeze("x = 1 if y else 2\n") == "x=1 if y else 2\n"  # '1if' would not tokenize
    risky = "y = 1 .real\n"  # '1.real' is a syntax error: the module keeps its spaces
    assert _squeeze(risky) == risky
