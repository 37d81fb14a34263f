"""The code that ships: a self-extracting `train_gpt.py` holding exactly the pgolf modules a run imported.

The challenge counts the UTF-8 bytes of the submitted `train_gpt.py` (docs/techniques.md#artifact-size-cap). Records
ship their code as an LZMA + base85 `exec` wrapper; pgolf ships the worker's modules and the frozen
config the same way, denser: minified and tree-shaken sources joined by NUL bytes, bzip2 (or
brotli), and a base-123 string literal (every 1-byte ASCII character a `"..."` literal can hold), so the counted code bytes are the
size of a real file that runs. docs/quant.md ("Code bytes") has the measured sizes.
"""

from __future__ import annotations

import ast
import builtins
import bz2
import io
import itertools
import json
import keyword
import lzma
import re
import string
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

from pgolf.checkpoint_gate import checkpoints_on
from pgolf.config import CheckpointConfig, JobConfig, job_config_from_dict
from pgolf.parent.specialize import specialize
from pgolf.registry import ConfigError
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

# The decoder: base-123 chunks -> bz2 (or brotli) -> "path\0source\0path\0source..." -> files in a
# temp dir, then the worker's packed entry point, told which file it runs from (its size is the code
# bytes). @CODEC@ is the decompressor's module, imported on the first line.
_HEAD = 'import @CODEC@,os,sys,tempfile\nS="'
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


# What ships, one rule: nothing of pgolf.parent (the Hydra parent, the packer and the CLIs around
# them), nor any module whose own top-level imports reach into it (the `python -m pgolf.run`-style
# shims at the package root), since such a module cannot load without pgolf.parent. A single-device
# run trains inside the parent process, so these are in sys.modules, but the worker never imports
# them: shipping them would only inflate code bytes, and pgolf.parent.tracking (wandb) would stop a
# packed script from running where wandb is not installed. docs/architecture.md#what-ships.
PARENT_PACKAGE = "pgolf.parent"


def _parent_side(name: str, path: Path) -> bool:
    return name == PARENT_PACKAGE or name.startswith(PARENT_PACKAGE + ".") or _imports_parent(path)


def _imports_parent(path: Path) -> bool:
    """Whether the module's top-level statements import from pgolf.parent (a shim's do)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            mods = [node.module or ""]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        if any(m == PARENT_PACKAGE or m.startswith(PARENT_PACKAGE + ".") for m in mods):
            return True
    return False


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
        if (name == "pgolf" or name.startswith("pgolf.")) and f and f.endswith(".py"):
            p = Path(f).resolve()
            if not _parent_side(name, p):
                out[p.relative_to(root).as_posix()] = p
    # Packages' __init__ files are needed for imports even if only a submodule was used.
    for rel in list(out):
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            init = root.joinpath(*parts[:i], "__init__.py")
            if init.is_file():
                out.setdefault(init.relative_to(root).as_posix(), init)
    return dict(sorted(out.items()))


# Modules a worker imports only for a feature its config may turn off, by the test of the frozen
# config that says the feature is on. When it is off they never ship, even if this process imported
# them (a resume in the Hydra parent imports pgolf.checkpoint; so does a fault drill in the worker):
# an in-process run, a worker and pgolf.plan then pack the same files.
CONFIG_GATED = {
    "pgolf/checkpoint.py": lambda cfg: checkpoints_on(CheckpointConfig(**cfg.get("checkpoint", {}))),
}


def shipped_modules(config: dict) -> dict[str, Path]:
    """`imported_modules` less the `CONFIG_GATED` ones whose feature `config` turns off."""
    return {
        rel: p for rel, p in imported_modules().items() if CONFIG_GATED.get(rel, lambda cfg: True)(config)
    }


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


def _drop_local_annotations(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    """`x: T = v` -> `x = v` and `self.x: T` (no value) -> nothing, in `fn`'s own statements: in
    a function body an annotation is neither evaluated nor stored anywhere, so it is text only.
    `x: T` without a value stays (it makes `x` local). Statements of nested functions and classes
    are left to their own turn (a class body's annotations are dataclass fields)."""
    if not all(isinstance(d, ast.Name) and d.id in _PLAIN_DECORATORS for d in fn.decorator_list):
        return
    todo: list[ast.AST] = [fn]
    while todo:
        node = todo.pop()
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if not isinstance(block, list) or not block or not isinstance(block[0], ast.stmt):
                continue
            new = []
            for st in block:
                if isinstance(st, ast.AnnAssign) and st.value is not None:
                    st = ast.copy_location(ast.Assign(targets=[st.target], value=st.value), st)
                elif (
                    isinstance(st, ast.AnnAssign)
                    and isinstance(st.target, ast.Attribute)
                    and isinstance(st.target.value, ast.Name)
                ):
                    continue  # evaluates a name and nothing else
                new.append(st)
            setattr(node, field, new or [ast.Pass()])
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                todo.append(child)


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
            _drop_local_annotations(node)
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
    return _unparse(_strip(ast.parse(source), "__doc__" in source, keep_messages))


def _unparse(tree: ast.Module) -> str:
    rename_locals(tree)
    return _squeeze(_reindent(ast.unparse(tree) + "\n"))


def _squeeze(source: str) -> str:
    """`source` without the spaces `ast.unparse` puts around operators, after commas and colons:
    between two tokens a space stays only where both sides are word characters (`x if y`,
    `in b"..."`). Indentation and everything inside a token (strings) are left alone. Checked: the
    result must parse to the same AST, else `source` is returned as it is."""
    out: list[str] = []
    prev = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NL, tokenize.NEWLINE):
            out.append("\n")
            prev = None
        elif tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT):
            continue
        elif prev is None:
            out.append(" " * tok.start[1] + tok.string)  # the line's indentation
            prev = tok
        else:
            word = (prev.string[-1:].isalnum() or prev.string[-1:] == "_") and (
                tok.string[:1].isalnum() or tok.string[:1] in "_'\""
            )
            out.append((" " if word and prev.end != tok.start else "") + tok.string)
            prev = tok
    small = "".join(out)
    try:
        same = ast.dump(ast.parse(small)) == ast.dump(ast.parse(source))
    except SyntaxError:
        same = False
    return small if same else source


# ------------------------------------------------------------------------------ tree shaking
# Decorators that only wrap or describe the definition: nothing runs at import that a dropped
# definition would have done. Any other decorator (triton.jit, torch.library.custom_op, a registry
# hook) may register the definition somewhere by itself, so its definition always stays.
_PURE_DECORATORS = {
    "staticmethod",
    "classmethod",
    "property",
    "cached_property",
    "dataclass",
    "contextmanager",
    "cache",
    "lru_cache",
    "wraps",
    "no_grad",
    "inference_mode",
}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# Calls that build a value and do nothing else, allowed in a droppable class body (dataclass fields).
_INERT_CALLS = {"field", "frozenset", "tuple"}


def _inert(node: ast.AST | None) -> bool:
    """An expression whose evaluation has no effect beyond its value: literals, names, attribute
    reads, operators, lambdas, containers of those, and `_INERT_CALLS`."""
    for n in ast.walk(node) if node is not None else ():
        if isinstance(n, (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom, ast.Subscript)):
            return False
        if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in _INERT_CALLS):
            return False
    return True


def _droppable(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> bool:
    """Whether defining `node` does nothing but bind its name: decorators in `_PURE_DECORATORS`,
    inert default values and (a class) inert base and body statements."""
    for d in node.decorator_list:
        f = d.func if isinstance(d, ast.Call) else d
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name not in _PURE_DECORATORS or (isinstance(d, ast.Call) and not all(map(_inert, d.args))):
            return False
    if isinstance(node, ast.ClassDef):
        body_ok = all(
            isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Pass))
            or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            or (isinstance(s, (ast.Assign, ast.AnnAssign)) and _inert(s.value))
            for s in node.body
        )
        return body_ok and all(map(_inert, node.bases)) and not node.keywords
    a = node.args
    return all(map(_inert, [*a.defaults, *a.kw_defaults]))


def _mentions(node: ast.AST, skip: set[int] = frozenset()) -> tuple[set[str], set[str], set[str]]:
    """What `node` could reach a definition by: (identifiers, prefixes, suffixes). Identifiers:
    names, attributes, imported names, keyword arguments, and every identifier-like word inside a
    string constant (getattr by name, registry builders "module:function", `__all__`). Prefixes and
    suffixes: the identifier characters at the ends of string pieces that touch computed text
    (f"by_{x}", "by_" + x, "{}_fn".format(x)), since such a string may be a name that never
    appears whole (`_glue`). Subtrees whose id() is in `skip` are not entered."""
    words: set[str] = set()
    prefixes: set[str] = set()
    suffixes: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in skip:
            continue
        if isinstance(n, ast.Name):
            words.add(n.id)
        elif isinstance(n, ast.Attribute):
            words.add(n.attr)
            if n.attr in ("format", "join") and _is_str(n.value):  # "_".join(parts): both ends touch
                _glue_text(n.value.value, prefixes, suffixes, outer=n.attr == "join")
        elif isinstance(n, ast.alias):
            words.update(n.name.split("."))
            if n.asname:
                words.add(n.asname)
        elif isinstance(n, ast.keyword) and n.arg:
            words.add(n.arg)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            words.update(_IDENT.findall(n.value))
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            words.update(n.names)
        elif isinstance(n, ast.FormattedValue):
            # a format spec (`{x:g}`, `{x:{w}}`) formats the value; its text is no part of a name
            stack.append(n.value)
            spec = n.format_spec.values if isinstance(n.format_spec, ast.JoinedStr) else []
            stack.extend(v.value for v in spec if isinstance(v, ast.FormattedValue))
            continue
        elif isinstance(n, (ast.JoinedStr, ast.BinOp)):
            _glue(n, prefixes, suffixes)
        stack.extend(ast.iter_child_nodes(n))
    return words, prefixes, suffixes


_HEAD_RUN = re.compile(r"^[A-Za-z0-9_]*")
_TAIL_RUN = re.compile(r"[A-Za-z0-9_]*$")


# A placeholder of str.format or %-formatting: computed text inside a constant.
_PLACEHOLDER = re.compile(r"\{[^{}]*\}|%[-#0 +]*[0-9*]*(?:\.[0-9*]+)?[a-zA-Z%]")

# A format spec of a number (`{x:.2f}`, `{n:,}`, `{i:06d}`: no fill character, a numeric type or
# only grouping): its text starts and ends with a digit, a sign, a space, `.`, `%`, or is inf/nan.
# Log lines put units right after such values (`{t:.1f}s`); glued to anything, `s` would keep every
# definition ending in s.
_NUMERIC_SPEC = re.compile(
    r"[<>=^]?[-+ ]?z?#?0?[0-9]*[,_]?(?:\.[0-9]+)?[dfFeEgGn%]|[<>=^]?[-+ ]?0?[0-9]*[,_]"
)
_NUMBER_ENDS = (*"0123456789", "inf", "nan", "INF", "NAN", "Infinity", "NaN", "sNaN")  # floats, Decimal


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _numeric(value: ast.AST) -> bool:
    """Whether an f-string's `{...}` is formatted as a number (its text can join a name only as
    digits or inf/nan)."""
    spec = value.format_spec if isinstance(value, ast.FormattedValue) else None
    return (
        isinstance(spec, ast.JoinedStr)
        and value.conversion == -1
        and len(spec.values) == 1
        and _is_str(spec.values[0])
        and _NUMERIC_SPEC.fullmatch(spec.values[0].value) is not None
    )


def _glue_text(text: str, prefixes: set[str], suffixes: set[str], outer: bool = False) -> None:
    """The identifier runs around the placeholders inside a constant (computed text may continue
    them on either side), and at its two ends when `outer` (computed text touches those too)."""
    parts = _PLACEHOLDER.split(text)
    for i, part in enumerate(parts):
        if outer or i < len(parts) - 1:
            prefixes.add(_TAIL_RUN.search(part).group())  # the start of a name built as "run" + x
        if outer or i > 0:
            suffixes.add(_HEAD_RUN.match(part).group())  # the end of one built as x + "run"


def _edge(node: ast.AST, last: bool) -> ast.AST:
    """The piece at the start (or end, `last`) of a string built by `+` and f-strings."""
    while True:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            node = node.right if last else node.left
        elif isinstance(node, ast.JoinedStr) and node.values:
            node = node.values[-1 if last else 0]
        else:
            return node


def _touch(computed: ast.AST, run: str, out: set[str], before: bool) -> None:
    """Record `run`, a constant's identifier run that `computed` text continues (after it when
    `before`, else before it): as is, or, for a number, with each way a number can end or start."""
    if run:
        if not _numeric(computed):
            out.add(run)
        else:
            out.update(run + e if before else e + run for e in _NUMBER_ENDS)


def _glue(node: ast.JoinedStr | ast.BinOp, prefixes: set[str], suffixes: set[str]) -> None:
    """Prefixes and suffixes of names `node` may build: only where a constant touches computed text
    (an f-string piece next to a `{value}`, the two sides of a `+`, a placeholder of `%`). The
    outer ends of an f-string touch nothing unless a `+` glues them (seen from that `+`): in
    f"init_from:{path}" nothing continues `init_from`, in f"{t:.1f}s" only a number precedes s.
    A piece of identifier characters between two `{value}`s (the `_` of f"{a}_{b}") marks
    nothing: a name through it is assembled from two computed parts, which no prefix or suffix
    can catch (docs/quant.md, tree shaking: pgolf builds no such name)."""
    if isinstance(node, ast.JoinedStr):
        values = node.values
        for i, piece in enumerate(values):
            if not _is_str(piece):
                continue
            after = i > 0 and isinstance(values[i - 1], ast.FormattedValue)
            before = i + 1 < len(values) and isinstance(values[i + 1], ast.FormattedValue)
            if after and before and _HEAD_RUN.fullmatch(piece.value):
                continue  # f"{a}_{b}": a name through it is assembled from two computed parts
            _glue_text(piece.value, prefixes, suffixes)
            if after:
                _touch(values[i - 1], _HEAD_RUN.match(piece.value).group(), suffixes, before=False)
            if before:
                _touch(values[i + 1], _TAIL_RUN.search(piece.value).group(), prefixes, before=True)
    elif isinstance(node.op, ast.Add):
        left, right = _edge(node.left, last=True), _edge(node.right, last=False)
        for piece in (left, right):
            if _is_str(piece):
                _glue_text(piece.value, prefixes, suffixes)
        if _is_str(left):
            _touch(right, _TAIL_RUN.search(left.value).group(), prefixes, before=True)
        if _is_str(right):
            _touch(left, _HEAD_RUN.match(right.value).group(), suffixes, before=False)
    elif isinstance(node.op, ast.Mod) and _is_str(node.left):
        _glue_text(node.left.value, prefixes, suffixes)


def _live_class(rel: str, name: str) -> type | None:
    """The class `name` of the shipped module `rel` as loaded in this process, if it is."""
    module = rel[:-3].replace("/", ".").removesuffix(".__init__")
    obj = getattr(sys.modules.get(module), name, None)
    return obj if isinstance(obj, type) else None


def _plain_class(cls: type | None) -> bool:
    """Creating `cls` ran no code of its own: no metaclass, no `__init_subclass__` of a base (either
    could record the class somewhere, as a registry does)."""
    return (
        cls is not None
        and type(cls) is type
        and not any("__init_subclass__" in vars(b) for b in cls.__mro__[1:-1])
    )


def _external_attrs(cls: type | None) -> set[str] | None:
    """Attribute names `cls` inherits from a base outside pgolf (torch calls `forward`, `step`,
    `extra_repr`, ... on such a class by name), or None when the class is not loaded here (then
    every method stays)."""
    if cls is None:
        return None
    out: set[str] = set()
    for base in cls.__mro__[1:]:
        if not base.__module__.startswith("pgolf"):
            out.update(dir(base))
    return out


def shake(trees: dict[str, ast.Module], roots: set[str]) -> list[str]:
    """Drop, in place, the top-level functions, classes and constants (`_constant_name`), and the
    methods, that no kept code can reach by name; return what went ("path:name" /
    "path:Class.method").

    Conservative by construction: a definition stays when its name is mentioned anywhere in kept
    code of any shipped module (`_mentions`: names, attributes, string words, so getattr by string
    and registry builders count) or in `roots` (the entry point, the frozen config's words). Always
    kept: every top-level statement that is not a def, a class or a constant (imports, assignments
    whose value calls anything, registry calls, `if __name__` blocks), definitions under a decorator that may register them
    (`_PURE_DECORATORS`), dunder methods, methods whose name a non-pgolf base class of the live
    class has (framework hooks), and every method of a class not loaded in this process."""
    mentioned = set(roots)
    prefixes: set[str] = set()
    suffixes: set[str] = set()

    def mention(found: tuple[set[str], set[str], set[str]]) -> None:
        mentioned.update(found[0])
        prefixes.update(p for p in found[1] if p)
        suffixes.update(x for x in found[2] if x)

    def reached(name: str) -> bool:
        return (
            name in mentioned
            or any(name.startswith(p) for p in prefixes)
            or any(name.endswith(x) for x in suffixes)
        )

    pending: list[tuple[str, ast.AST, ast.AST | None]] = []  # (module path, def or constant, owning class)
    kept_ids: set[int] = set()

    def keep(rel: str, node: ast.AST, owner: ast.ClassDef | None) -> None:
        kept_ids.add(id(node))
        if isinstance(node, ast.ClassDef):  # the class's own statements run; its methods wait
            inherited = _external_attrs(_live_class(rel, node.name)) if owner is None else None
            methods = set()
            for s in node.body:
                if (
                    isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and inherited is not None
                    and _droppable(s)
                    and not (s.name.startswith("__") and s.name.endswith("__"))
                    and s.name not in inherited
                ):
                    pending.append((rel, s, node))
                    methods.add(id(s))
            mention(_mentions(node, methods))
        else:
            mention(_mentions(node))

    for rel, tree in trees.items():
        for s in tree.body:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (
                not (s.name.startswith("__") and s.name.endswith("__"))  # module __getattr__ and the like
                and _droppable(s)
                and (not isinstance(s, ast.ClassDef) or _plain_class(_live_class(rel, s.name)))
            ):
                pending.append((rel, s, None))
            elif _constant_name(s) is not None:
                pending.append((rel, s, None))
            else:
                keep(rel, s, None)
    changed = True
    while changed:
        changed = False
        for rel, node, owner in list(pending):
            if id(node) not in kept_ids and reached(_defined_name(node)):
                keep(rel, node, owner)
                changed = True
    dropped = []
    for rel, node, owner in pending:
        if id(node) in kept_ids:
            continue
        holder = owner if owner is not None else trees[rel]
        holder.body = [s for s in holder.body if s is not node] or [ast.Pass()]
        dropped.append(f"{rel}:{owner.name + '.' if owner is not None else ''}{_defined_name(node)}")
    return dropped


def _constant_name(s: ast.stmt) -> str | None:
    """The name a module-level `NAME = value` (or `NAME: T = value`) binds, when evaluating the
    value does nothing else (`_inert`: a literal table, a tuple of names) and NAME is not a dunder
    (`__all__` is read by star imports): such a statement can go like a definition."""
    if isinstance(s, ast.Assign) and len(s.targets) == 1:
        target, value = s.targets[0], s.value
    elif isinstance(s, ast.AnnAssign) and s.value is not None:
        target, value = s.target, s.value
    else:
        return None
    if not isinstance(target, ast.Name) or target.id.startswith("__") or not _inert(value):
        return None
    return target.id


def _defined_name(node: ast.AST) -> str:
    return node.name if hasattr(node, "name") else _constant_name(node)


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


def _is_main_block(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` with no else."""
    t = node.test if isinstance(node, ast.If) and not node.orelse else None
    return (
        isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Name)
        and t.left.id == "__name__"
        and len(t.ops) == 1
        and isinstance(t.ops[0], ast.Eq)
        and isinstance(t.comparators[0], ast.Constant)
        and t.comparators[0].value == "__main__"
    )


# The schemas whose values a packed run may change before it validates them (pgolf.train.run_packed:
# DATA_PATH and TOKENIZER_PATH rewrite the data group, SEED the root's seed): their `validate`
# methods ship. Every other schema's values are the frozen config's, validated by the run that
# packed them; validating them again can only pass, so their `validate` methods are dropped
# (pgolf.config.from_dict calls `validate` only where the class has one).
REVALIDATED = {"pgolf/data/config.py": None, "pgolf/config.py": {"RootSettings"}}


def _checks_only(fn: ast.FunctionDef) -> bool:
    """A `validate` that only reads and raises: no stores into attributes or items, no mutating
    method calls, no global/nonlocal. Anything else might normalise a value, and stays."""
    for n in ast.walk(fn):
        if isinstance(n, (ast.Global, ast.Nonlocal)):
            return False
        if isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.ctx, (ast.Store, ast.Del)):
            return False
        if isinstance(n, ast.Call) and (
            (isinstance(n.func, ast.Name) and n.func.id in ("setattr", "delattr", "exec", "eval"))
            or (
                isinstance(n.func, ast.Attribute)
                and n.func.attr
                in ("append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "remove")
            )
        ):
            return False
    return True


def drop_prevalidated(rel: str, tree: ast.Module) -> list[str]:
    """Drop, in place, the `validate` methods of schemas a packed run never changes (`REVALIDATED`
    names the ones it may change); return the classes that lost theirs. A method that does more
    than check (`_checks_only`) stays, and with it every other `validate` of that module (a
    subclass's may call it through super())."""
    if rel in REVALIDATED and REVALIDATED[rel] is None:
        return []
    keep = REVALIDATED.get(rel) or set()
    classes = [c for c in tree.body if isinstance(c, ast.ClassDef) and c.name not in keep]
    methods = [
        (c, s) for c in classes for s in c.body if isinstance(s, ast.FunctionDef) and s.name == "validate"
    ]
    if not all(_checks_only(m) for _, m in methods):
        return []
    kept_validates = {c.name for c in tree.body if isinstance(c, ast.ClassDef) and c.name in keep}
    for c, _ in methods:  # without its own, a subclass of a kept schema would run the base's
        if any(isinstance(b, ast.Name) and b.id in kept_validates for b in c.bases):
            return []
    for c, m in methods:
        c.body = [s for s in c.body if s is not m] or [ast.Pass()]
    return [c.name for c, _ in methods]


def _revalidated_reach_other_modules(trees: dict[str, ast.Module]) -> bool:
    """Whether a schema whose `validate` ships calls super().validate on a base from another module
    (whose `validate` might have been dropped): then none is dropped."""
    for rel, keep in REVALIDATED.items():
        tree = trees.get(rel)
        local = {c.name for c in tree.body if isinstance(c, ast.ClassDef)} if tree else set()
        for c in tree.body if tree else ():
            if isinstance(c, ast.ClassDef) and (keep is None or c.name in keep):
                calls_super = any(
                    isinstance(n, ast.Attribute) and n.attr == "validate" and "super()" in ast.unparse(n)
                    for n in ast.walk(c)
                )
                if calls_super and not all(isinstance(b, ast.Name) and b.id in local for b in c.bases):
                    return True
    return False


# Registry entries a packed run may reach besides the one its config names, by (group, key):
# `pgolf.train.run_packed` turns the data group into `shards` when DATA_PATH is set. The hardware
# group is resolved on the machine that runs it, so every hardware entry ships (None).
PACKED_ALSO = {("data", "name"): {"shards"}, ("hardware", "name"): None}


def _registries(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Module-level `NAME = Registry("group", key="...")` of a module: NAME -> (group, key)."""
    out = {}
    for s in tree.body:
        if (
            isinstance(s, ast.Assign)
            and len(s.targets) == 1
            and isinstance(s.targets[0], ast.Name)
            and isinstance(s.value, ast.Call)
            and isinstance(s.value.func, ast.Name)
            and s.value.func.id == "Registry"
            and s.value.args
            and isinstance(s.value.args[0], ast.Constant)
        ):
            key = next((k.value for k in s.value.keywords if k.arg == "key"), ast.Constant("name"))
            if isinstance(key, ast.Constant):
                out[s.targets[0].id] = (s.value.args[0].value, key.value)
    return out


def _registered_name(s: ast.stmt, registries: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(registry variable, entry name) of a `NAME.register("entry", ...)` statement."""
    call = s.value if isinstance(s, ast.Expr) else None
    if (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "register"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id in registries
        and call.args
        and isinstance(call.args[0], ast.Constant)
    ):
        return call.func.value.id, call.args[0].value
    return None


def drop_unused_entries(job: JobConfig, trees: dict[str, ast.Module]) -> list[str]:
    """Drop, in place, the registry entries the frozen config cannot reach: in a module that builds
    registries (`NAME = Registry(group, key=...)`), the `NAME.register(...)` statements of entries
    other than the one `job.<group>.<key>` names (and `PACKED_ALSO`). Their schema classes and
    builders, reached only through these statements, then go with the tree shaker; so do the
    names such a module imported only for them. Returns "group:entry" for each dropped entry."""
    dropped = []
    for tree in trees.values():
        registries = _registries(tree)
        if not registries:
            continue
        kept = []
        for s in tree.body:
            hit = _registered_name(s, registries)
            if hit is not None:
                group, key = registries[hit[0]]
                also = PACKED_ALSO.get((group, key), set())
                named = getattr(getattr(job, group, None), key, None)
                if also is not None and named is not None and hit[1] != named and hit[1] not in also:
                    dropped.append(f"{group}:{hit[1]}")
                    continue
            kept.append(s)
        tree.body = kept
    return dropped


def drop_unused_imports(trees: dict[str, ast.Module]) -> int:
    """Drop, in place, the names a module's top-level `from pgolf... import` binds that the module
    no longer mentions (the shaker took their users) and no other shipped module mentions at all
    (so none imports them from there, nor reads them by string). The last name of an import
    stays, so the imported module still loads. Returns how many went; a definition only such an
    import kept can go with the next `shake`."""

    def pgolf_import(s: ast.stmt) -> bool:
        return isinstance(s, ast.ImportFrom) and s.level == 0 and (s.module or "").startswith("pgolf")

    def module_name(rel: str) -> str:
        return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")

    # What each module uses by name, less its own pgolf imports: two modules that import one class
    # from a third must not keep each other's import of it alive.
    mentions = {
        rel: _mentions(ast.Module(body=[x for x in t.body if not pgolf_import(x)], type_ignores=[]))[0]
        for rel, t in trees.items()
    }
    imported_from: dict[str, set[str]] = {}  # module name -> names other modules import from it
    for t in trees.values():
        for x in t.body:
            if pgolf_import(x):
                imported_from.setdefault(x.module or "", set()).update(a.name for a in x.names)
    dropped = 0
    for rel, tree in trees.items():
        others = set().union(*(m for other, m in mentions.items() if other != rel))
        others |= imported_from.get(module_name(rel), set())
        binds_pgolf = any(
            (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and n.id == "pgolf")
            or (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == "pgolf")
            or (isinstance(n, ast.alias) and n.asname == "pgolf")
            for n in ast.walk(tree)
        )
        made: set[int] = set()  # the `import pgolf.x.y` statements made below (not in `mentions`)
        for i, s in enumerate(tree.body):
            if pgolf_import(s):
                # The module less `s`: its other statements' words are `mentions[rel]`, to which the
                # other imports add theirs as they stand now (earlier ones may have lost names).
                rest = set(mentions[rel])
                for x in tree.body:
                    if x is not s and (pgolf_import(x) or id(x) in made):
                        rest |= _mentions(x)[0]
                names = [a for a in s.names if (a.asname or a.name) in rest or a.name in others]
                dropped += len(s.names) - len(names)
                if names:
                    s.names = names
                elif f"{s.module.replace('.', '/')}.py" in trees and not binds_pgolf:
                    # `import pgolf.x.y` loads the module as the `from` did and binds only the
                    # package `pgolf` (the same object any `import pgolf` binds); the names it
                    # imported can then go with the next `shake`. Not for a package, whose names
                    # may be submodules that only the `from` loads.
                    tree.body[i] = ast.copy_location(ast.Import(names=[ast.alias(name=s.module)]), s)
                    made.add(id(tree.body[i]))
                else:
                    s.names = s.names[:1]
                    dropped -= 1
    return dropped


def _whole_job(config: dict) -> JobConfig | None:
    """The run's JobConfig from the (trimmed) config the wrapper carries; None for a dict that is
    not a whole job's (a run's always is: `shipped_config` checks that it loads)."""
    try:
        return job_config_from_dict({**config, "job_dir": ""})
    except (ConfigError, KeyError, TypeError):
        return None


def shipped_sources(modules: dict[str, Path], config: dict, specialized: bool = True) -> dict[str, str]:
    """What the wrapper carries, by path: each module specialized to the frozen config
    (`pgolf.parent.specialize`: `if` tests the config decides keep only the branch taken), minified (error messages only where a packed
    run's user needs them, KEEP_MESSAGES) without its `if __name__ == "__main__":` block (the
    wrapper imports every module and runs none as a script) and with the definitions no shipped
    code reaches dropped (`shake`, rooted at the wrapper's own code and the config's words), and
    the config as compact JSON (a run's, trimmed by `shipped_config` first)."""
    config_json = json.dumps(config, sort_keys=True, separators=(",", ":"))
    sources = {rel: path.read_text(encoding="utf-8") for rel, path in modules.items()}
    trees = {rel: ast.parse(source) for rel, source in sources.items()}
    job = _whole_job(config) if specialized else None
    if job is not None:  # before _strip: the folder reads the annotations that say which config is which
        specialize(job, trees)
        drop_unused_entries(job, trees)
    for rel, source in sources.items():
        trees[rel] = _strip(trees[rel], "__doc__" in source, rel.startswith(KEEP_MESSAGES))
    for tree in trees.values():  # never true there: the wrapper imports them, it runs none as a script
        tree.body = [s for s in tree.body if not _is_main_block(s)] or [ast.Pass()]
    if not _revalidated_reach_other_modules(trees):
        for rel, tree in trees.items():
            drop_prevalidated(rel, tree)
    roots = set(_IDENT.findall(_TAIL + config_json))
    shake(trees, roots)
    if drop_unused_imports(trees):
        shake(trees, roots)
    out = {rel: _unparse(tree) for rel, tree in trees.items()}
    out["config.json"] = config_json
    return out


def payload_of(modules: dict[str, Path], config: dict, specialized: bool = True) -> bytes:
    """The bytes the wrapper carries, before compression: path NUL source NUL ... config.json NUL
    json. Neither minified source nor JSON can hold a raw NUL (both escape it)."""
    sources = shipped_sources(modules, config, specialized)
    return "\0".join(x for kv in sources.items() for x in kv).encode("utf-8")


# How the wrapper inflates its payload, per codec. On the ~140-175 KB of minified pgolf source,
# bzip2-9 (one Burrows-Wheeler block) packs 1.6-2% smaller than the tuned raw LZMA2 (`FILTERS`) and
# is as much standard library; brotli-11 packs ~1% smaller again (its built-in dictionary knows code
# words), but only runs whose model blob is brotli already require the package. LZMA2 stays for
# comparison and for reading wrappers written before bzip2.
_DECOMPRESS = {
    "bz2": "bz2.decompress(B)",
    "lzma": 'lzma.decompress(B,lzma.FORMAT_RAW,filters=[{"id":lzma.FILTER_LZMA2}])',
    "brotli": "brotli.decompress(B)",
}


def codec_for(config: dict) -> str:
    if config.get("quant", {}).get("compressor") == "brotli":
        try:
            import brotli  # noqa: F401
        except ImportError:
            return "bz2"
        return "brotli"
    return "bz2"


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "brotli":
        import brotli

        return brotli.compress(data, quality=11, lgwin=24)
    if codec == "bz2":
        return bz2.compress(data, 9)
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=FILTERS)


def unpack(text: str) -> dict[str, bytes]:
    """A wrapper's files by path, decoded the way the wrapper decodes them (for tests and checks)."""
    start = text.index('\nS="') + 4
    data = decode(text[start : text.index('"', start)])
    first_line = text[: text.index("\n")]
    if "brotli" in first_line or "__import__('brotli')" in text:  # and wrappers written before bzip2
        import brotli

        raw = brotli.decompress(data)
    elif "bz2" in first_line:
        raw = bz2.decompress(data)
    else:
        raw = lzma.decompress(data, lzma.FORMAT_RAW, filters=FILTERS[:1])
    parts = raw.split(b"\0")
    return {k.decode(): v for k, v in zip(parts[::2], parts[1::2])}


def build_wrapper(
    modules: dict[str, Path], config: dict, codec: str | None = None, specialized: bool = True
) -> str:
    codec = codec or codec_for(config)
    packed = _compress(payload_of(modules, config, specialized), codec)
    return (
        _HEAD.replace("@CODEC@", codec) + encode(packed) + _TAIL.replace("@DECOMPRESS@", _DECOMPRESS[codec])
    )


def write_wrapper(path: Path, config: dict) -> tuple[int, int]:
    """Write the wrapper; return (its bytes on disk, raw bytes of the source it carries)."""
    modules = shipped_modules(config)
    text = build_wrapper(modules, shipped_config(config), codec_for(config))  # the trimmed config may omit it
    write_text_atomic(path, text)  # bytes as they are: the payload's control characters stay
    raw = sum(p.stat().st_size for p in modules.values())
    return path.stat().st_size, raw


if __name__ == "__main__":  # python -m pgolf.pack <run_dir>: the CLI lives in pgolf.submission
    from pgolf.parent.submission import main

    sys.exit(main())
