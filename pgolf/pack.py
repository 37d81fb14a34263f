"""The code that ships: a self-extracting `train_gpt.py` holding exactly the pgolf modules a run imported.

The challenge counts the UTF-8 bytes of the submitted `train_gpt.py` (TECHNIQUES §1.1). Records
ship their code as an LZMA + base85 `exec` wrapper; pgolf ships the worker's modules and the frozen
config the same way, denser: minified sources joined by NUL bytes, raw LZMA2, and a base-123 string
literal (every 1-byte ASCII character a `"..."` literal can hold), so the counted code bytes are the
size of a real file that runs. docs/quant.md ("Code bytes") has the measured sizes.
"""

from __future__ import annotations

import ast
import builtins
import io
import itertools
import json
import keyword
import lzma
import string
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

from pgolf.results import write_text_atomic

# The literal's alphabet: ASCII minus NUL (not allowed in source), LF and CR (end a "..." literal;
# a CR would also be rewritten by universal newlines), the quote and the backslash.
ALPHABET = bytes(c for c in range(1, 128) if c not in (10, 13, 34, 92))
BASE = len(ALPHABET)  # 123
# 256 bytes -> 295 characters (123**295 >= 256**256): 1.152 characters per byte against base85's 1.25.
CHUNK = 256
# lc/lp/pb and the match finder, tuned on the r0409 module set (docs/quant.md); LZMA2 stores them in
# the stream, so the decoder needs only the filter id.
FILTERS = [
    {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0, "nice_len": 273}
]

# The decoder: base-123 chunks -> raw LZMA2 -> "path\0source\0path\0source..." -> files in a temp dir,
# then the worker's packed entry point, told which file it runs from (its size is the code bytes).
_HEAD = 'import lzma,os,sys,tempfile\nS="'
_TAIL = """"
T=bytearray(256);B=b""
for i,c in enumerate(c for c in range(1,128)if c not in(10,13,34,92)):T[c]=i
for j in range(0,len(S),295):
 n=0;C=S[j:j+295].encode()
 for c in reversed(C):n=n*123+T[c]
 B+=n.to_bytes(((123**len(C)).bit_length()-1)//8,"little")
D=tempfile.mkdtemp(prefix="pgolf_");F=@DECOMPRESS@.split(b"\\0")
for k,v in zip(F[::2],F[1::2]):
 p=os.path.join(D,k.decode());os.makedirs(os.path.dirname(p),exist_ok=True)
 with open(p,"wb")as f:f.write(v)
sys.path.insert(0,D)
from pgolf.train import run_packed;run_packed(os.path.join(D,"config.json"),__file__)
"""


def encode(data: bytes) -> str:
    """`data` as base-123 text: each 256-byte chunk (the last may be shorter) a little-endian number
    written with the fewest digits that hold any chunk of its length."""
    out = []
    for i in range(0, len(data), CHUNK):
        chunk = data[i : i + CHUNK]
        n, k = int.from_bytes(chunk, "little"), _digits(len(chunk))
        digits = bytearray(k)
        for j in range(k):
            n, digits[j] = divmod(n, BASE)
        out.append(digits.translate(_TO_CHAR).decode("ascii"))
    return "".join(out)


def decode(text: str) -> bytes:
    """Inverse of `encode` (the wrapper inlines the same loop)."""
    out = bytearray()
    step = _digits(CHUNK)
    for i in range(0, len(text), step):
        digits = text[i : i + step].encode("ascii").translate(_FROM_CHAR)
        n = 0
        for d in reversed(digits):
            n = n * BASE + d
        out += n.to_bytes(((BASE ** len(digits)).bit_length() - 1) // 8, "little")
    return bytes(out)


def _digits(n_bytes: int) -> int:
    """Fewest base-123 digits that hold every n-byte number (decode inverts it exactly through
    bit_length: 256**n <= 123**k < 256**(n+1))."""
    k = 0
    while BASE**k < 256**n_bytes:
        k += 1
    return k


_TO_CHAR = bytes(ALPHABET[i] if i < BASE else 0 for i in range(256))
_FROM_CHAR = bytes(ALPHABET.index(c) if c in ALPHABET else 0 for c in range(256))


# Modules of the Hydra parent. A single-device run trains inside the parent process, so they are
# in sys.modules, but the worker never imports them: shipping them would only inflate code bytes.
# pgolf.tracking (wandb) above all: a packed script must run where wandb is not installed.
PARENT_ONLY = (
    "pgolf.run",
    "pgolf.compose",
    "pgolf.callbacks",
    "pgolf.console",
    "pgolf.outdir",
    "pgolf.slots",
    "pgolf.report",
    "pgolf.tracking",
)
# The packer and its CLIs: a packed run counts its own file (pgolf.shipped), so they never run there.
PACKER = ("pgolf.pack", "pgolf.plan", "pgolf.submission", "pgolf.check")


def _parent_only(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PARENT_ONLY + PACKER)


def imported_modules() -> dict[str, Path]:
    """pgolf modules the worker loaded in this process, by archive path (pgolf/..../x.py)."""
    import pgolf

    root = Path(pgolf.__file__).resolve().parent.parent
    out = {}
    for key, mod in list(sys.modules.items()):
        # A worker started as `python -m pgolf.train` holds that module as `__main__`: its spec
        # keeps the real name, so the worker ships the same files as an in-process run.
        spec = getattr(mod, "__spec__", None)
        name = spec.name if key == "__main__" and spec is not None else key
        f = getattr(mod, "__file__", None)
        if (
            (name == "pgolf" or name.startswith("pgolf."))
            and not _parent_only(name)
            and f
            and f.endswith(".py")
        ):
            p = Path(f).resolve()
            out[p.relative_to(root).as_posix()] = p
    # Packages' __init__ files are needed for imports even if only a submodule was used.
    for rel in list(out):
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            init = root.joinpath(*parts[:i], "__init__.py")
            if init.is_file():
                out.setdefault(init.relative_to(root).as_posix(), init)
    return dict(sorted(out.items()))


def _drop_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        body = body[1:] or [ast.Pass()]
    return body


# Decorators that never read the function's annotations. Any other decorator may (triton.jit reads
# `tl.constexpr`, torch.library infers schemas), so such functions keep theirs.
_PLAIN_DECORATORS = ("staticmethod", "classmethod", "property")


def _drop_annotations(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    """Argument and return annotations of a function nothing introspects. Under
    `from __future__ import annotations` they are strings stored in `__annotations__` and read only
    by introspection (pgolf's config reads class annotations only: `typing.get_type_hints(cls)`);
    class-body annotations (dataclass fields) are never touched."""
    if not all(isinstance(d, ast.Name) and d.id in _PLAIN_DECORATORS for d in fn.decorator_list):
        return
    fn.returns = None
    a = fn.args
    for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
        if arg is not None:
            arg.annotation = None


def _is_type_checking_block(node: ast.stmt) -> bool:
    """`if TYPE_CHECKING:` with no else: its body never runs."""
    return (
        isinstance(node, ast.If)
        and not node.orelse
        and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        )
    )


def _reindent(source: str) -> str:
    """One space per indentation level instead of `ast.unparse`'s four. Lines that continue a
    multi-line string token are text, not code, and stay as they are."""
    inside: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.start[0] != tok.end[0]:
            inside.update(range(tok.start[0] + 1, tok.end[0] + 1))
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines, 1):
        if i not in inside:
            body = line.lstrip(" ")
            lines[i - 1] = " " * ((len(line) - len(body)) // 4) + body
    return "".join(lines)


# Exceptions whose argument is not a message: SystemExit("...") exits 1 and SystemExit() exits 0.
_KEEP_ARGS = {"SystemExit", "KeyboardInterrupt", "StopIteration"}
# Modules whose error messages a packed run's user needs: its only inputs from outside are
# DATA_PATH and TOKENIZER_PATH (read and checked in these data modules), SEED and the machine.
# Every other message (config validation of a config that was validated before it shipped,
# internal invariants) costs code bytes for nothing: 1.2 KB more if all of pgolf.data kept theirs.
KEEP_MESSAGES = ("pgolf/data/shards.py", "pgolf/data/source.py", "pgolf/hw/device.py", "pgolf/train.py")


def _is_text(node: ast.expr) -> bool:
    """A string literal, an f-string, or a concatenation of them."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_text(node.left) and _is_text(node.right)
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _drop_message(node: ast.Raise) -> None:
    """`raise E("a long explanation")` -> `raise E("")`: the type, the traceback and the cause stay;
    one empty argument keeps any constructor's arity. Other arguments are left alone."""
    call = node.exc
    if isinstance(call, ast.Call) and len(call.args) == 1 and not call.keywords and _is_text(call.args[0]):
        name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")
        if name not in _KEEP_ARGS:
            call.args = [ast.Constant("")]


def _strip(tree: ast.Module, keep_module_doc: bool, keep_messages: bool = True) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and not keep_messages:
            _drop_message(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.body = _drop_docstring(node.body)
            _drop_annotations(node)
        elif isinstance(node, ast.ClassDef):
            node.body = _drop_docstring(node.body)
        elif isinstance(node, ast.Module) and not keep_module_doc:
            node.body = _drop_docstring(node.body)
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and any(
                isinstance(s, ast.stmt) and _is_type_checking_block(s) for s in block
            ):
                setattr(node, field, [s for s in block if not _is_type_checking_block(s)] or [ast.Pass()])
    return tree


# ------------------------------------------------------------------------------ local names
_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ClassDef,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)
# Calls that can see a function's locals by name: a function that makes one keeps its names.
_INTROSPECTING = {"locals", "vars", "eval", "exec", "dir", "globals", "breakpoint"}


def _own_nodes(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.AST]:
    """The nodes evaluated in `fn`'s own scope: its body, not nested scopes (whose defaults,
    decorators and first iterators do run here, so `_nested_names` counts them as nested)."""
    out, stack = [], list(fn.body)
    while stack:
        n = stack.pop()
        out.append(n)
        if not isinstance(n, _SCOPES):
            stack.extend(ast.iter_child_nodes(n))
    return out


def _names_of(node: ast.AST) -> list[str]:
    """The identifiers one AST node binds or mentions (a name, argument, definition, import alias,
    global/nonlocal declaration); none for other nodes."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.alias):
        return [(node.asname or node.name).split(".")[0]]
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return list(node.names)
    return []


def _nested_names(nodes: list[ast.AST]) -> set[str]:
    """Every identifier mentioned anywhere inside the nested scopes among `nodes`."""
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, _SCOPES):
            for m in ast.walk(n):
                out.update(_names_of(m))
    return out


def _short_names(taken: set[str]) -> Iterator[str]:
    letters = string.ascii_letters
    for k in itertools.count(1):
        for t in itertools.product(letters, repeat=k):
            name = "".join(t)
            if name not in taken and not keyword.iskeyword(name):
                yield name


def rename_locals(tree: ast.Module) -> int:
    """Shorten, in place, the local variables of every function where that provably keeps the
    program: names bound in the function's own scope (assignment, loop/with target, `except as`,
    `del`), never its parameters (callers may pass them by keyword), and only names that no nested
    scope (def, lambda, class, comprehension) mentions at all, so no closure or class body can
    refer to them. Left alone: decorated functions (but staticmethod/classmethod/property:
    triton.jit compiles the source), and functions containing `global`, `nonlocal`, `match` or a
    call that can read locals by name (locals, vars, eval, exec, dir, globals, breakpoint). New
    names are ones the module never uses (nor builtins), so they shadow nothing. Returns the count."""
    taken = set(dir(builtins))
    for n in ast.walk(tree):
        taken.update(_names_of(n))
    renamed = 0
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        if not all(isinstance(d, ast.Name) and d.id in _PLAIN_DECORATORS for d in fn.decorator_list):
            continue  # triton.jit and the like compile the function's source: leave it as written
        inside = list(ast.walk(fn))
        if any(isinstance(n, (ast.Global, ast.Nonlocal, ast.Match)) for n in inside) or any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _INTROSPECTING
            for n in inside
        ):
            continue
        nodes = _own_nodes(fn)
        bound = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
        bound |= {n.name for n in nodes if isinstance(n, ast.ExceptHandler) and n.name}
        params = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
        names = sorted(bound - params - _nested_names(nodes))
        fresh = _short_names(taken)
        mapping = {name: next(fresh) for name in names if len(name) > 1}
        for n in nodes:
            if isinstance(n, ast.Name) and n.id in mapping:
                n.id = mapping[n.id]
            elif isinstance(n, ast.ExceptHandler) and n.name in mapping:
                n.name = mapping[n.name]
        renamed += len(mapping)
    return renamed


def minify_source(source: str, keep_messages: bool = True) -> str:
    """The same program with comments, docstrings, function annotations, `if TYPE_CHECKING:` blocks
    and formatting removed (`ast.unparse`, one-space indentation).

    Code bytes count against the 16,000,000-byte cap like weights do; what a reader needs (comments,
    docstrings, type hints, line breaks inside expressions) costs bytes and runs nothing. A module
    that reads its own `__doc__` keeps its module docstring. Function-local variables get short
    names where `rename_locals` can prove it safe; parameters, attributes and module-level names
    keep theirs (keyword calls, getattr by string and torch hooks reach them by name).
    Without `keep_messages`, the text of `raise E("...")` is dropped too (`_drop_message`).
    """
    tree = _strip(ast.parse(source), "__doc__" in source, keep_messages)
    rename_locals(tree)
    return _reindent(ast.unparse(tree) + "\n")


def _changed(value: dict, default: dict) -> dict:
    """The keys of `value` that differ from `default`. A nested mapping (a nested dataclass) that
    differs at all ships whole: a partial one would be completed from the nested class's own
    defaults, which need not be the parent's (quant.embed's factory is not GroupQuant())."""
    return {k: v for k, v in value.items() if v != default.get(k, _MISSING)}


_MISSING = object()


def shipped_config(config: dict) -> dict:
    """The frozen config as the wrapper carries it: only what differs from the shipped schemas'
    defaults (those defaults ship in the code, so the worker rebuilds the same config), every
    group's `name`, the whole `data` group (the packed entry swaps it for DATA_PATH's shards,
    whose defaults differ) and no `job_dir` (a path of the machine that ran it; the packed run
    picks its own). Checked: the result loads into exactly the run's config."""
    from pgolf.components import REGISTRIES
    from pgolf.config import GROUPS, RootSettings, job_config_from_dict, to_dict

    full = {k: v for k, v in config.items() if k != "job_dir"}
    out = _changed({k: v for k, v in full.items() if k not in GROUPS}, to_dict(RootSettings()))
    for group in GROUPS:
        node = full[group]
        if group == "data":
            out[group] = node
            continue
        try:
            default = to_dict(REGISTRIES[group].get(node["name"]).schema())
        except TypeError:  # a schema with required fields: ship the group as it is
            default = {}
        out[group] = {"name": node["name"], **_changed(node, default)}
    if to_dict(job_config_from_dict(out)) != to_dict(job_config_from_dict({**full, "job_dir": ""})):
        raise RuntimeError("the trimmed config does not load into the run's config; ship it whole")
    return out


def shipped_sources(modules: dict[str, Path], config: dict) -> dict[str, str]:
    """What the wrapper carries, by path: each module minified (error messages only where a packed
    run's user needs them, KEEP_MESSAGES), and the config as compact JSON (a run's, trimmed by
    `shipped_config` first).

    Dropping top-level definitions nothing references (tree shaking) was measured and left out:
    it saved ~200 bytes on the r0409 set, for a soundness argument a reader would have to check."""
    out = {
        rel: minify_source(path.read_text(encoding="utf-8"), keep_messages=rel.startswith(KEEP_MESSAGES))
        for rel, path in modules.items()
    }
    out["config.json"] = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return out


def payload_of(modules: dict[str, Path], config: dict) -> bytes:
    """The bytes the wrapper carries, before compression: path NUL source NUL ... config.json NUL
    json. Neither minified source nor JSON can hold a raw NUL (both escape it)."""
    return "\0".join(x for kv in shipped_sources(modules, config).items() for x in kv).encode("utf-8")


# How the wrapper inflates its payload, per codec. brotli-11 packs Python ~3% smaller than LZMA2
# (its built-in dictionary knows code words), but only runs whose model blob is brotli already
# require the package; every other run uses LZMA2 from the standard library.
_DECOMPRESS = {
    "lzma": 'lzma.decompress(B,lzma.FORMAT_RAW,filters=[{"id":lzma.FILTER_LZMA2}])',
    "brotli": "__import__('brotli').decompress(B)",
}


def codec_for(config: dict) -> str:
    if config.get("quant", {}).get("compressor") == "brotli":
        try:
            import brotli  # noqa: F401
        except ImportError:
            return "lzma"
        return "brotli"
    return "lzma"


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "brotli":
        import brotli

        return brotli.compress(data, quality=11, lgwin=24)
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=FILTERS)


def unpack(text: str) -> dict[str, bytes]:
    """A wrapper's files by path, decoded the way the wrapper decodes them (for tests and checks)."""
    start = text.index(_HEAD) + len(_HEAD)
    data = decode(text[start : text.index('"', start)])
    if _DECOMPRESS["brotli"] in text:
        import brotli

        raw = brotli.decompress(data)
    else:
        raw = lzma.decompress(data, lzma.FORMAT_RAW, filters=FILTERS[:1])
    parts = raw.split(b"\0")
    return {k.decode(): v for k, v in zip(parts[::2], parts[1::2])}


def build_wrapper(modules: dict[str, Path], config: dict, codec: str | None = None) -> str:
    codec = codec or codec_for(config)
    packed = _compress(payload_of(modules, config), codec)
    return _HEAD + encode(packed) + _TAIL.replace("@DECOMPRESS@", _DECOMPRESS[codec])


def write_wrapper(path: Path, config: dict) -> tuple[int, int]:
    """Write the wrapper; return (its bytes on disk, raw bytes of the source it carries)."""
    modules = imported_modules()
    text = build_wrapper(modules, shipped_config(config), codec_for(config))  # the trimmed config may omit it
    write_text_atomic(path, text)  # bytes as they are: the payload's control characters stay
    raw = sum(p.stat().st_size for p in modules.values())
    return path.stat().st_size, raw


if __name__ == "__main__":  # python -m pgolf.pack <run_dir>: the CLI lives in pgolf.submission
    from pgolf.submission import main

    sys.exit(main())
