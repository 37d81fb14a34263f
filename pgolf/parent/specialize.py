"""Config specialization: the packer knows the frozen config, so `if` tests that read only frozen
config values are decided at pack time and the dead branch never ships.

What counts as a frozen config value: a field of a config dataclass instance of the run's
`JobConfig`, reached through a name whose config class is certain:
- a parameter annotated with a config class (`cfg: GPTModelConfig`), without a default, that is
  never rebound in its function, when exactly one instance of the run's whole config tree is of
  that class;
- `self.<attr>` in a class whose `__init__` binds it from such a parameter, when no other code
  (the class's bases and subclasses included) stores that attribute and no code stores it on
  anything but `self`;
- `self` in a method of a config class with exactly one instance in the tree;
- a local name bound once, at the top of its function, from one of these (`t, b = self.job.train,
  self.job.budget`).
Never folded: the `data` and `hardware` groups and the root's `seed`, `label` and `job_dir` (a
packed run swaps the data for DATA_PATH's, takes SEED, and resolves the hardware on its machine);
any field whose name some shipped code assigns or deletes on an object that may be a config (any
but `self` in a class that is not a config class); a class that shipped code
other than `pgolf/config.py` (which builds the tree) constructs itself. If any shipped module other than `pgolf/config.py` calls `from_dict` (the
checkpoint converter builds a second model config), nothing is folded.

Also decided: a plain class-level constant of a component that a registry builds from a frozen
config group (`self.ttt = TTT.build(job.ttt)` with ttt=none: `self.ttt.enabled` is
`NoTTT.enabled`, False), where the entry's builder returns that one class on every path
(`Specializer.built_attrs`).

A test is decided only when it is built from such values, constants, `not`, `and`/`or` (operands
it skips must be side-effect free: names, attributes, comparisons, `isinstance`), comparisons and
truthiness. The branch taken replaces the `if` (or the conditional expression); the tree shaker
that runs after drops the definitions only the dead branch used. Tested end to end: a packed run
gives the same losses, val_bpb and model bytes as the unpacked run (tests/test_specialize.py).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import operator
import sys
from typing import Any

# Root fields a packed run may change (SEED) or that are the machine's (job_dir), and the groups it
# swaps (data: DATA_PATH, TOKENIZER_PATH) or resolves per machine (hardware).
UNFOLDED_ROOT = ("seed", "label", "job_dir", "data", "hardware")
# Scalars a test may compare; containers of them (eval.modes, model.xsa_layers) too.
_SCALARS = (bool, int, float, str, type(None))
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_UNKNOWN = object()
# nn.Module methods that store an attribute under a name given as a string
_REGISTERS = ("register_buffer", "register_parameter", "register_module", "add_module")
# env key of the names a function binds itself (they shadow module-level classes and constants)
_LOCALS = "#locals"
_MODULE = "#module"  # env key of the folded module's path
# Methods that change how an instance's attributes are found or stored, or what its class makes
_HOOKS = {"__getattribute__", "__getattr__", "__setattr__", "__delattr__", "__new__", "__init_subclass__"}


def _immutable(v: Any) -> bool:
    """A plain value no code can change in place (a name bound to a list could be appended to)."""
    if isinstance(v, tuple):
        return all(_immutable(x) for x in v)
    return isinstance(v, _SCALARS)


def _bound_value(v: Any) -> Any:
    return v.value if isinstance(v, _Const) else _Obj(v)


@dataclasses.dataclass(frozen=True)
class _Obj:
    """A config dataclass instance of the run's tree (its fields fold, not the object itself)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class _Const:
    """A plain value the frozen config (or the code alone) fixes, bound to a name or `self.<attr>`:
    a module constant, an attribute `__init__` derives from the config, a local bound from one."""

    value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class _Built:
    """`self.<attr>` holding what a registry built from a frozen config group: an instance of
    exactly `cls` (its builder returns `cls(...)` on every path). Only `attrs` fold: the plain
    class-level values no code can shadow (`NoTTT.enabled = False`)."""

    cls: type
    attrs: dict[str, Any]
    store: int  # id() of the method that stores it (reads there may come before the store)
    after: int | None  # id() of the store when it is a statement of the method's own top level


def _own_self(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """`self` is the method's first parameter and the function never rebinds it."""
    args = [*fn.args.posonlyargs, *fn.args.args]
    plain = not any(_annotation_name(d) in ("staticmethod", "classmethod") for d in fn.decorator_list)
    return plain and bool(args) and args[0].arg == "self" and not _bound_names(fn).get("self")


def _module_name(rel: str) -> str:
    """pgolf/models/gpt.py -> pgolf.models.gpt (a package's __init__.py -> the package)."""
    return rel[:-3].replace("/", ".").removesuffix(".__init__")


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _SCALARS)


def _instances(job: Any, every_group: bool = False) -> list[Any]:
    """Every config dataclass instance of the tree that folds: the root, its groups but data and
    hardware (`every_group`: those too), and the dataclasses nested in them."""
    out = [job]

    def walk(obj: Any) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                out.append(v)
                walk(v)

    for f in dataclasses.fields(job):
        v = getattr(job, f.name)
        if (every_group or f.name not in UNFOLDED_ROOT) and dataclasses.is_dataclass(v):
            out.append(v)
            walk(v)
    return out


def _annotation_name(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
        return node.value
    return None


def _bound_names(fn: ast.AST) -> dict[str, int]:
    """How often each name is bound anywhere inside `fn` (its nested scopes included), parameters
    of nested functions and lambdas, imports and `except ... as` counted."""
    counts: dict[str, int] = {}

    def add(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    own = (
        {id(a) for a in ast.walk(fn.args)}
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        else set()
    )
    for n in ast.walk(fn):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            add(n.id)
        elif isinstance(n, ast.arg) and id(n) not in own:
            add(n.arg)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            add(n.name)
        elif isinstance(n, ast.alias):
            add((n.asname or n.name).split(".")[0])
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not fn:
            add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            for name in n.names:
                add(name)
                add(name)
    return counts


def _pure(node: ast.expr) -> bool:
    """Evaluating it has no side effects (properties aside), so skipping it changes nothing."""
    if isinstance(node, (ast.Constant, ast.Name)):
        return True
    if isinstance(node, ast.Attribute):
        return _pure(node.value)
    if isinstance(node, ast.Compare):
        return _pure(node.left) and all(_pure(c) for c in node.comparators)
    if isinstance(node, ast.BoolOp):
        return all(_pure(v) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        return _pure(node.operand)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
        return all(_pure(a) for a in node.args) and not node.keywords
    return False


def _assigned_pairs(s: ast.stmt) -> list[tuple[ast.expr, ast.expr]]:
    """(target, value) of `a = x` and of `a, b = x, y`; nothing for any other statement."""
    if isinstance(s, ast.AnnAssign) and s.value is not None:
        return [(s.target, s.value)]
    if not isinstance(s, ast.Assign) or len(s.targets) != 1:
        return []
    t, v = s.targets[0], s.value
    if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple) and len(t.elts) == len(v.elts):
        return list(zip(t.elts, v.elts))
    return [] if isinstance(t, ast.Tuple) else [(t, v)]


def _self_call_store(node: ast.AST) -> tuple[str, ast.Call] | None:
    """(attr, call) when node is `self.<attr> = <call>` with a single target, else None."""
    if (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Attribute)
        and isinstance(node.targets[0].value, ast.Name)
        and node.targets[0].value.id == "self"
        and isinstance(node.value, ast.Call)
    ):
        return node.targets[0].attr, node.value
    return None


def _own_walk(node: ast.AST) -> list[ast.AST]:
    """`node` and what it holds, nested functions, lambdas and classes left out."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        if n is node or not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(n))
    return out


# Statements after which nothing in the same block runs.
_JUMPS = (ast.Return, ast.Raise, ast.Continue, ast.Break)


def _droppable_tail(rest: list[ast.stmt]) -> bool:
    """Whether dead statements can go without changing the function's kind or scopes: none yields
    (a generator stays one) or declares a name global or nonlocal."""
    return not _yields(rest) and not any(
        isinstance(n, (ast.Global, ast.Nonlocal)) for s in rest for n in _own_walk(s)
    )


def _drop_loops_over_empty(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Replace, in place, `for ... in x: body else: tail` by `tail` where `x` is a local bound once,
    at the function's top level, to an empty list or tuple, and mentioned nowhere else but as such
    loops' iterable (so nothing can fill it: folding took the branch that appended to it, as with
    `quantize`'s LQER list). A body that yields stays. Returns how many loops went."""
    bound = _bound_names(fn)
    params = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    empty = set()
    for s in fn.body:
        for t, v in _assigned_pairs(s):
            if (
                isinstance(t, ast.Name)
                and bound.get(t.id) == 1
                and t.id not in params
                and isinstance(v, (ast.List, ast.Tuple))
                and not v.elts
            ):
                empty.add(t.id)
    if not empty:
        return 0
    loops = [
        n
        for n in ast.walk(fn)
        if isinstance(n, ast.For)
        and isinstance(n.iter, ast.Name)
        and n.iter.id in empty
        and not _yields(n.body)
    ]
    uses: dict[str, int] = {}
    for n in ast.walk(fn):
        if isinstance(n, ast.Name) and n.id in empty:
            uses[n.id] = uses.get(n.id, 0) + 1
    dead = {id(f) for f in loops if uses[f.iter.id] == 1 + sum(g.iter.id == f.iter.id for g in loops)}
    if not dead:
        return 0
    todo: list[ast.AST] = [fn]
    while todo:
        node = todo.pop()
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                new: list[ast.stmt] = []
                for st in block:
                    new.extend(st.orelse if id(st) in dead else [st])
                setattr(node, field, new or [ast.Pass()])
        todo.extend(ast.iter_child_nodes(node))
    return len(dead)


# The most items a loop over a frozen sequence is unrolled for (eval.modes has at most two).
_UNROLL_MAX = 4


def _unrollable_body(body: list[ast.stmt], name: str) -> bool:
    """Whether `for name in ...: body` can become `name = item; body` per item: the body never
    rebinds `name`, jumps out of or past an iteration (break / continue), yields, declares names
    global or nonlocal, or defines a function, lambda or class (a closure would read `name` after
    the next copy has rebound it, while its body was folded for this one)."""
    for s in body:
        for n in ast.walk(s):
            if isinstance(n, (ast.Break, ast.Continue, ast.Yield, ast.YieldFrom, ast.Global, ast.Nonlocal)):
                return False
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                return False
            if isinstance(n, ast.Name) and n.id == name and not isinstance(n.ctx, ast.Load):
                return False
    return True


def _yields(body: list[ast.stmt]) -> bool:
    """Whether the statements yield in their own function: dropping them could turn a generator
    into a plain function."""
    todo: list[ast.AST] = list(body)
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.Yield, ast.YieldFrom)):
            return True
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(n))
    return False


class Specializer:
    """Folds the frozen-config `if` tests of a set of module trees (`specialize`)."""

    def __init__(self, job: Any, trees: dict[str, ast.Module]):
        self.instances = _instances(job)
        self.trees = trees
        # Classes whose `self` may be a config: stores on `self` anywhere else cannot touch one.
        self.every_instance = _instances(job, every_group=True)
        config_classes = {c.__name__ for i in self.every_instance for c in type(i).__mro__}
        self.stored_attrs: set[str] = set()  # attribute names assigned or deleted on what may be a config
        self.stored_off_self: set[str] = set()  # attribute names assigned or deleted on anything but `self`
        self.called: set[str] = set()  # names called anywhere (constructors included)
        self.bases: dict[str, set[str]] = {}  # class name -> base class names, over every module
        self.enabled = True
        keyed: set[str] = set()  # stored by a name given as a string (setattr, register_buffer)

        classes: dict[str, list[ast.ClassDef]] = {}
        for rel, tree in trees.items():
            for n in ast.walk(tree):
                if isinstance(n, ast.ClassDef):
                    classes.setdefault(n.name, []).append(n)
                    self.bases.setdefault(n.name, set()).update(
                        {_annotation_name(b) for b in n.bases} - {None}
                    )
                elif isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del)):
                    if not (isinstance(n.value, ast.Name) and n.value.id == "self"):
                        self.stored_off_self.add(n.attr)
                elif isinstance(n, ast.Call):
                    name = _annotation_name(n.func)
                    if name and rel != "pgolf/config.py":  # config.py builds the tree itself
                        self.called.add(name)
                    if name == "from_dict" and rel != "pgolf/config.py":
                        self.enabled = False  # a config built from other data: types no longer say which
                    if name in _REGISTERS and n.args:  # nn.Module stores these by name
                        key = n.args[0]
                        if isinstance(key, ast.Constant) and isinstance(key.value, str):
                            self.stored_off_self.add(key.value)
                            keyed.add(key.value)
                        else:
                            self.enabled = False
                    if name in ("setattr", "delattr") and len(n.args) > 1:
                        key = n.args[1]
                        if isinstance(key, ast.Constant) and isinstance(key.value, str):
                            self.stored_attrs.add(key.value)
                            self.stored_off_self.add(key.value)
                            keyed.add(key.value)
                        else:
                            self.enabled = False
        self.plain_classes = set(classes) - config_classes  # shipped classes that are not configs
        # Every class statement by name, found once: the per-class questions below look classes up
        # by name hundreds of times, and walking every module's statements each time cost seconds
        # of every run's export. Folding never copies a class statement (an unrolled loop body
        # holds none) and folds the others in place; one in a branch it drops still counts here,
        # which can only make it fold less.
        self.class_defs = classes
        self.config_classes = config_classes
        self.module_bindings = {rel: _bound_names(tree) for rel, tree in trees.items()}
        self._attrs_of: dict[int, dict[str, Any]] = {}
        self._derived_of: dict[int, dict[str, _Const]] = {}
        self._plain_of: dict[int, dict[str, str]] = {}
        self._built_of: dict[int, dict[str, _Built]] = {}
        for tree in trees.values():
            self._scan_stores(tree, None, None)
        # attribute name -> the classes a store off `self` may hit (None: any object)
        self.off_self: dict[str, set[str | None]] = {a: {None} for a in keyed}
        for tree in trees.values():
            self._scan_off_self(tree, None)
        self.folded = 0
        self.unreachable = 0  # statements dropped after a return, raise, continue or break

    def _scan_stores(self, node: ast.AST, cls: ast.ClassDef | None, fn: ast.AST | None) -> None:
        """Record in `stored_attrs` the attribute stores that may hit a config: all but those on
        `self` of a class that is not a config, and on what such a class's `__init__` built from a
        shipped non-config class (`self.result.x = ...`, or through `r = self.result`)."""
        for n in ast.iter_child_nodes(node):
            if isinstance(n, ast.ClassDef):
                self._scan_stores(n, n, None)
                continue
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._scan_stores(n, cls, n)
                continue
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del)):
                if not self._plain_target(n.value, cls, fn):
                    self.stored_attrs.add(n.attr)
            self._scan_stores(n, cls, fn)

    def _scan_off_self(self, node: ast.AST, cls: ast.ClassDef | None) -> None:
        """Fill `off_self`. A store on `self.<attr>` where the class built that attribute by calling
        a shipped class (`self.result.quant = ...`, `self.result = RunResult(...)`) hits only an
        instance of that class; any other store off `self` may hit anything."""
        for n in ast.iter_child_nodes(node):
            if isinstance(n, ast.ClassDef):
                self._scan_off_self(n, n)
                continue
            if (
                isinstance(n, ast.Attribute)
                and isinstance(n.ctx, (ast.Store, ast.Del))
                and not (isinstance(n.value, ast.Name) and n.value.id == "self")
            ):
                target = None
                b = n.value
                if (
                    cls is not None
                    and cls.name not in self.config_classes
                    and isinstance(b, ast.Attribute)
                    and isinstance(b.value, ast.Name)
                    and b.value.id == "self"
                ):
                    target = self.plain_attrs(cls).get(b.attr)
                self.off_self.setdefault(n.attr, set()).add(target)
            self._scan_off_self(n, cls)

    def _plain_target(self, b: ast.expr, cls: ast.ClassDef | None, fn: ast.AST | None) -> bool:
        if cls is None or cls.name in self.config_classes:
            return False
        if isinstance(b, ast.Name) and b.id == "self":
            return True
        if isinstance(b, ast.Attribute) and isinstance(b.value, ast.Name) and b.value.id == "self":
            return b.attr in self.plain_attrs(cls)
        if isinstance(b, ast.Name) and fn is not None and _bound_names(fn).get(b.id) == 1:
            for s in fn.body:  # `r = self.result` / `rt, r = self.rt, self.result` at the top
                if isinstance(s, ast.Assign) and len(s.targets) == 1:
                    t, v = s.targets[0], s.value
                    pairs = (
                        zip(t.elts, v.elts)
                        if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple)
                        else [(t, v)]
                    )
                    for tn, vn in pairs:
                        if isinstance(tn, ast.Name) and tn.id == b.id:
                            return self._plain_target(vn, cls, None)
        return False

    def plain_attrs(self, cls: ast.ClassDef) -> dict[str, str]:
        """`self.<attr>` that `cls.__init__` builds by calling a shipped class that is not a config,
        and that nothing else stores, with that class's name."""
        if id(cls) not in self._plain_of:
            init = next(
                (s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None
            )
            stores = self._self_stores(cls)
            out = {}
            for s in init.body if init else ():
                store = _self_call_store(s)
                if store and _annotation_name(store[1].func) in self.plain_classes:
                    attr = store[0]
                    if stores.get(attr) == 1 and attr not in self.stored_off_self:
                        out[attr] = _annotation_name(store[1].func)
            self._plain_of[id(cls)] = out
        return self._plain_of[id(cls)]

    def _self_stores(self, cls: ast.ClassDef, on_self: bool = False) -> dict[str, int]:
        """How often each attribute is stored in `cls`, its bases and its subclasses (`on_self`:
        only on `self`). A bare declaration (`self.quant: Quantizer`, no value) stores nothing."""
        stores: dict[str, int] = {}
        for c in self._classes_named(self._related(cls.name)):
            declared = {id(n.target) for n in ast.walk(c) if isinstance(n, ast.AnnAssign) and n.value is None}
            for n in ast.walk(c):
                if (
                    isinstance(n, ast.Attribute)
                    and isinstance(n.ctx, (ast.Store, ast.Del))
                    and id(n) not in declared
                    and not (on_self and not (isinstance(n.value, ast.Name) and n.value.id == "self"))
                ):
                    stores[n.attr] = stores.get(n.attr, 0) + 1
        return stores

    def _classes_named(self, names: set[str]) -> list[ast.ClassDef]:
        return [c for name in sorted(names) for c in self.class_defs.get(name, ())]

    # ------------------------------------------------------------------------------ types
    def instance_of(self, class_name: str | None) -> Any:
        """The one instance of the tree whose class is (or derives from) `class_name`, unless
        there are several or shipped code constructs such a class itself."""
        if class_name is None or class_name in self.called:
            return None
        # counted over every group, so a base class that the data or hardware config shares is
        # never taken for the one folded instance that derives from it
        hits = [i for i in self.every_instance if class_name in {c.__name__ for c in type(i).__mro__}]
        if len(hits) != 1 or type(hits[0]).__name__ in self.called:
            return None
        return hits[0] if any(hits[0] is i for i in self.instances) else None

    def _related(self, name: str) -> set[str]:
        """`name`, its bases and its subclasses (by class name, over every shipped module)."""
        up, todo = {name}, [name]
        while todo:
            for b in self.bases.get(todo.pop(), ()):
                if b not in up:
                    up.add(b)
                    todo.append(b)
        down, grew = set(up), True
        while grew:
            grew = False
            for cls, bs in self.bases.items():
                if cls not in down and bs & down:
                    down.add(cls)
                    grew = True
        return down

    def self_attrs(self, cls: ast.ClassDef) -> dict[str, Any]:
        """`self.<attr>` -> config instance, for the attributes `cls.__init__` binds from a typed
        parameter and nothing else ever stores."""
        if id(cls) not in self._attrs_of:
            self._attrs_of[id(cls)] = self._self_attrs(cls)
        return self._attrs_of[id(cls)]

    def _self_attrs(self, cls: ast.ClassDef) -> dict[str, Any]:
        init = next((s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
        if init is None:
            return {}
        params = self.typed_params(init)
        stores = self._self_stores(cls)
        out = {}
        for s in init.body:
            for t, v in _assigned_pairs(s):
                if (
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                    and isinstance(v, ast.Name)
                    and v.id in params
                    and stores.get(t.attr) == 1
                    and t.attr not in self.stored_off_self
                ):
                    out[t.attr] = params[v.id]
        return out

    def derived_attrs(self, cls: ast.ClassDef, outer: dict[str, Any]) -> dict[str, _Const]:
        """`self.<attr>` -> value, for the attributes `cls.__init__` sets, in a statement of its own
        top level that runs on every construction, to a value the frozen config or the code alone
        decides (`self.lane_form = cfg.parallel_residual if ... else None`, `self.bigram = None`),
        that nothing else stores: no other store in `cls`, its bases or subclasses, none off `self`
        anywhere, no method, property or class attribute of that name, no `__dict__` copy. Only
        immutable values (a list could be appended to). Not used in `__init__` itself, where a read
        may come before the store."""
        if id(cls) in self._derived_of:
            return self._derived_of[id(cls)]
        self._derived_of[id(cls)] = {}
        init = next((s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
        defined = self._defined_in(self._related(cls.name))
        if init is None or defined is None:
            return {}
        stores = self._self_stores(cls)
        env = self._function_env(init, outer, cls)
        out: dict[str, _Const] = {}
        for s in init.body:
            for t, v in _assigned_pairs(s):
                if (
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                    and stores.get(t.attr) == 1
                    and t.attr not in self.stored_off_self
                    and t.attr not in defined
                ):
                    got = self.value(v, {**env, **{f"self.{k}": c for k, c in out.items()}})
                    if got is not _UNKNOWN and not isinstance(got, _Obj) and _immutable(got):
                        out[t.attr] = _Const(got)
            if any(isinstance(n, (ast.Return, ast.Yield, ast.YieldFrom)) for n in _own_walk(s)):
                break  # what follows may not run
        self._derived_of[id(cls)] = out
        return out

    def built_attrs(self, cls: ast.ClassDef, outer: dict[str, Any]) -> dict[str, _Built]:
        """`self.<attr>` -> what it holds, for the attributes one method of `cls` stores as
        `self.<attr> = REGISTRY.build(<frozen config group>, ...)` (`self.ttt = TTT.build(job.ttt)`)
        and nothing else stores: no other store in `cls`, its bases or subclasses, none off `self`,
        no method or class attribute of that name, no `__dict__` copy. REGISTRY is a
        `pgolf.registry.Registry` the module binds once; the entry the config names has a builder
        that returns `C(...)` on every path, C a class whose own code is all shipped (`_built`).
        Not used in `__init__`, nor in the storing method but after a store in its own top level
        (`_block`); elsewhere a read before the store raised AttributeError, which the packed run
        no longer does (pgolf's trainer builds before anything reads)."""
        if id(cls) in self._built_of:
            return self._built_of[id(cls)]
        self._built_of[id(cls)] = out = {}
        defined = self._defined_in(self._related(cls.name))
        if defined is None:
            return out
        stores = self._self_stores(cls, on_self=True)  # off_self has the others
        for fn in cls.body:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not _own_self(fn):
                continue
            env: dict[str, Any] | None = None
            for n in _own_walk(fn):
                store = _self_call_store(n)
                call = store[1] if store else None
                if not (
                    call
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "build"
                    and isinstance(call.func.value, ast.Name)
                    and call.args
                ):
                    continue
                attr = store[0]
                related = self._related(cls.name)
                hit = self.off_self.get(attr, set())
                if stores.get(attr) != 1 or None in hit or hit & related or attr in defined:
                    continue
                env = env if env is not None else self._function_env(fn, outer, cls, built=False)
                cfg = self.value(call.args[0], env)
                got = self._built(outer.get(_MODULE), call.func.value.id, cfg)
                if got is not None:
                    top = any(n is t for t in fn.body)
                    out[attr] = _Built(got[0], got[1], id(fn), id(n) if top else None)
        return out

    def _built(self, rel: str | None, registry: str, cfg: Any) -> tuple[type, dict[str, Any]] | None:
        """The class and foldable class attributes of what `registry.build(cfg)` returns, where
        the module `rel` binds `registry` once to a Registry and cfg is a frozen config instance."""
        from pgolf.registry import ConfigError, Registry

        if rel is None or not isinstance(cfg, _Obj) or "build" in self.stored_off_self:
            return None
        if self.module_bindings[rel].get(registry) != 1 or registry in self.stored_off_self:
            return None
        reg = getattr(sys.modules.get(_module_name(rel)), registry, None)
        if type(reg) is not Registry:
            return None
        try:
            entry = reg.get(getattr(cfg.value, reg.key))
        except (ConfigError, AttributeError):
            return None
        module, _, name = entry.builder.partition(":")
        brel = self._rel_of(module)
        if brel is None or self.module_bindings[brel].get(name) != 1 or name in self.stored_off_self:
            return None
        fn = next(
            (s for s in self.trees[brel].body if isinstance(s, ast.FunctionDef) and s.name == name), None
        )
        if fn is None or fn.decorator_list:
            return None
        nodes = _own_walk(fn)
        if any(isinstance(x, (ast.Yield, ast.YieldFrom)) for x in nodes):
            return None
        made = {
            x.value.func.id if isinstance(x.value, ast.Call) and isinstance(x.value.func, ast.Name) else None
            for x in nodes
            if isinstance(x, ast.Return)
        }
        if len(made) != 1 or None in made or not isinstance(fn.body[-1], ast.Return):
            return None  # a return of anything else, or a path that falls off the end (None)
        cname = made.pop()
        if self.module_bindings[brel].get(cname) != 1 or cname in self.stored_off_self:
            return None
        cls = getattr(sys.modules.get(module), cname, None)
        if not isinstance(cls, type) or type(cls) is not type or dataclasses.is_dataclass(cls):
            return None
        own = [self._class_def(k) for k in cls.__mro__[:-1]]
        if any(c is None for c in own):
            return None  # a base outside the shipped code may set anything on the instance
        stored: set[str] = set()
        for c in own:
            for x in ast.walk(c):
                if isinstance(x, ast.Attribute) and x.attr == "__dict__":
                    return None
                if isinstance(x, ast.Attribute) and isinstance(x.ctx, (ast.Store, ast.Del)):
                    stored.add(x.attr)
                if isinstance(x, ast.Call) and _annotation_name(x.func) == "vars":
                    return None
            if {b.name for b in c.body if isinstance(b, ast.FunctionDef)} & _HOOKS:
                return None
        attrs = {}
        for a in dir(cls):
            if a.startswith("__") or a in stored or a in self.stored_off_self:
                continue
            v = inspect.getattr_static(cls, a)
            if _immutable(v):
                attrs[a] = v
        return cls, attrs

    def _rel_of(self, module: str) -> str | None:
        """The shipped module path of a dotted module name."""
        base = module.replace(".", "/")
        return next((r for r in (f"{base}.py", f"{base}/__init__.py") if r in self.trees), None)

    def _class_def(self, cls: type) -> ast.ClassDef | None:
        """The shipped top-level definition of a live class, bound once in its module."""
        rel = self._rel_of(cls.__module__)
        if rel is None or self.module_bindings[rel].get(cls.__name__) != 1:
            return None
        return next(
            (s for s in self.trees[rel].body if isinstance(s, ast.ClassDef) and s.name == cls.__name__), None
        )

    def _defined_in(self, related: set[str]) -> set[str] | None:
        """Names the class bodies of `related` define (methods, class attributes); None when one
        of them touches `__dict__` (an attribute may then come from anywhere)."""
        defined: set[str] = set()
        for c in self._classes_named(related):
            if any(isinstance(n, ast.Attribute) and n.attr == "__dict__" for n in ast.walk(c)):
                return None
            for b in c.body:
                if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined.add(b.name)
                for t, _ in _assigned_pairs(b):
                    defined.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        return defined

    def typed_params(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, Any]:
        bound = _bound_names(fn)
        args = fn.args
        positional = [*args.posonlyargs, *args.args]
        # a parameter with a default may be left out, and then it is not the config
        required = positional[: len(positional) - len(args.defaults)]
        required += [a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
        out = {}
        for a in required:
            inst = self.instance_of(_annotation_name(a.annotation))
            if inst is not None and not bound.get(a.arg):
                out[a.arg] = inst
        return out

    # --------------------------------------------------------------------------- values
    def value(self, node: ast.expr, env: dict[str, Any]) -> Any:
        """The node's value if the frozen config fixes it, else _UNKNOWN (a config instance comes
        back as _Obj)."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return _bound_value(env[node.id]) if node.id in env else _UNKNOWN
        if isinstance(node, (ast.Tuple, ast.List)) and isinstance(node.ctx, ast.Load):
            items = [self.value(e, env) for e in node.elts]
            if any(i is _UNKNOWN or isinstance(i, _Obj) for i in items):
                return _UNKNOWN
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.IfExp):
            t = self.truth(node.test, env)
            return _UNKNOWN if t is None else self.value(node.body if t else node.orelse, env)
        if isinstance(node, ast.Call):
            return self._isinstance(node, env)
        if isinstance(node, ast.Attribute):
            inner = node.value
            if (
                isinstance(inner, ast.Attribute)
                and isinstance(inner.value, ast.Name)
                and inner.value.id == "self"
            ):
                built = env.get(f"self.{inner.attr}")
                if isinstance(built, _Built):
                    return built.attrs.get(node.attr, _UNKNOWN)
            if isinstance(node.value, ast.Name) and node.value.id == "self" and f"self.{node.attr}" in env:
                bound = env[f"self.{node.attr}"]
                return _UNKNOWN if isinstance(bound, _Built) else _bound_value(bound)
            owner = self.value(node.value, env)
            if not isinstance(owner, _Obj) or node.attr in self.stored_attrs:
                return _UNKNOWN
            obj = owner.value
            if node.attr not in {f.name for f in dataclasses.fields(obj)}:
                return _UNKNOWN  # a property or method: code, not a frozen value
            if obj is self.instances[0] and node.attr in UNFOLDED_ROOT:
                return _UNKNOWN
            v = getattr(obj, node.attr)
            if dataclasses.is_dataclass(v):
                return _Obj(v) if any(v is i for i in self.instances) else _UNKNOWN
            return v if _plain(v) else _UNKNOWN
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            t = self.truth(node.operand, env)
            return _UNKNOWN if t is None else not t
        if isinstance(node, ast.Compare):
            left = self.value(node.left, env)
            if left is _UNKNOWN or isinstance(left, _Obj):
                return _UNKNOWN
            for op, right_node in zip(node.ops, node.comparators):
                right = self.value(right_node, env)
                if right is _UNKNOWN or isinstance(right, _Obj) or type(op) not in _COMPARE:
                    return _UNKNOWN
                try:
                    if not _COMPARE[type(op)](left, right):
                        return False
                except TypeError:
                    return _UNKNOWN
                left = right
            return True
        return _UNKNOWN  # `a and b` is a or b, not a bool: only `truth` reads it

    def _isinstance(self, node: ast.Call, env: dict[str, Any]) -> Any:
        """`isinstance(x, C)` where x is a known plain value and C a shipped class (a plain class,
        no metaclass: no `__instancecheck__`) that the function does not rebind: exact, since a
        None, bool, int, float or str is never an instance of a class pgolf defines."""
        if not (
            isinstance(node.func, ast.Name)
            and node.func.id == "isinstance"
            and "isinstance" not in env.get(_LOCALS, ())
            and len(node.args) == 2
            and not node.keywords
            and isinstance(node.args[1], ast.Name)
            and node.args[1].id not in env.get(_LOCALS, ())
        ):
            return _UNKNOWN
        cls = self.shipped_class(node.args[1].id, env)
        x = self.value(node.args[0], env)
        if cls is None or x is _UNKNOWN or isinstance(x, _Obj) or not _plain(x):
            return _UNKNOWN
        return isinstance(x, cls)

    def shipped_class(self, name: str, env: dict[str, Any]) -> type | None:
        """The live class the folded module's global `name` holds (the module binds the name once),
        when that is a plain class (its type is `type`)."""
        rel = env.get(_MODULE)
        if rel is None or self.module_bindings[rel].get(name) != 1:
            return None
        obj = getattr(sys.modules.get(_module_name(rel)), name, None)
        return obj if isinstance(obj, type) and type(obj) is type else None

    def truth(self, node: ast.expr, env: dict[str, Any]) -> bool | None:
        """The test's truth if the frozen config decides it, else None."""
        if isinstance(node, ast.BoolOp):
            # and: the first falsy operand decides; the operands before it run, so they must be
            # known or pure to be dropped (or mirrored for `or`)
            decisive = isinstance(node.op, ast.Or)
            all_known = True
            for i, v in enumerate(node.values):
                t = self.truth(v, env)
                if t is decisive:
                    return decisive if all_known or all(_pure(u) for u in node.values[:i]) else None
                if t is None:
                    all_known = False
            return (not decisive) if all_known else None
        v = self.value(node, env)
        if v is _UNKNOWN:
            return None
        if isinstance(v, _Obj):
            return None  # a config object: truthy, but leave the test alone
        return bool(v)

    # --------------------------------------------------------------------------- folding
    def specialize(self) -> int:
        """Fold every decided test in place; the number folded."""
        if not self.enabled:
            return 0
        for rel, tree in self.trees.items():
            tree.body = self._block(tree.body, self._module_env(rel, tree), None)
        for tree in self.trees.values():
            for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                self.unreachable += _drop_loops_over_empty(fn)
        return self.folded

    def _module_env(self, rel: str, tree: ast.Module) -> dict[str, Any]:
        """The module's constants: names its top level binds once, with `NAME = <expr>` the frozen
        config (or the code alone) decides, that no code stores as an attribute (`mod.NAME = ...`)."""
        env: dict[str, Any] = {_MODULE: rel}
        bound = self.module_bindings[rel]
        for s in tree.body:
            for t, v in _assigned_pairs(s):
                if isinstance(t, ast.Name) and bound.get(t.id) == 1 and t.id not in self.stored_off_self:
                    got = self.value(v, env)
                    if got is not _UNKNOWN and not isinstance(got, _Obj) and _plain(got):
                        env[t.id] = _Const(got)
        return env

    def _block(
        self,
        body: list[ast.stmt],
        env: dict[str, Any],
        cls: ast.ClassDef | None,
        stored: dict[int, tuple[str, _Built]] | None = None,
    ) -> list[ast.stmt]:
        """`body` folded. `stored`: the statements of a method's own top level that store a built
        component (`built_attrs`), by id(): every statement after such a store reads what it
        stored."""
        out: list[ast.stmt] = []
        for i, s in enumerate(body):
            out.extend(self._stmt(s, env, cls))
            if stored and id(s) in stored:
                attr, built = stored[id(s)]
                env = {**env, f"self.{attr}": built}
            rest = body[i + 1 :]
            if out and isinstance(out[-1], _JUMPS) and rest and _droppable_tail(rest):
                self.unreachable += len(rest)
                break  # a folded branch that returns leaves the statements after it dead
        return out

    def _stmt(self, s: ast.stmt, env: dict[str, Any], cls: ast.ClassDef | None) -> list[ast.stmt]:
        if isinstance(s, ast.For):
            unrolled = self._unrolled(s, env, cls)
            if unrolled is not None:
                return unrolled
        if isinstance(s, ast.If):
            t = self.truth(s.test, env)
            if t is not None and not _yields(s.orelse if t else s.body):
                self.folded += 1
                return self._block(s.body if t else s.orelse, env, cls)
        if isinstance(s, ast.ClassDef):
            s.body = self._block(s.body, env, s) or [ast.Pass()]
            return [s]
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
            fn_env = self._function_env(s, env, cls)
            stored = {}
            if cls is not None and _own_self(s):
                built = self.built_attrs(cls, env).items()
                stored = {b.after: (k, b) for k, b in built if b.store == id(s) and b.after is not None}
            s.body = self._block(s.body, fn_env, None, stored) or [ast.Pass()]
            return [s]
        for field, value in ast.iter_fields(s):  # nested blocks (for, while, with, try, ...)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(s, field, self._block(value, env, cls) or [ast.Pass()])
            elif isinstance(value, list) and value and isinstance(value[0], ast.ExceptHandler):
                for h in value:
                    h.body = self._block(h.body, env, cls) or [ast.Pass()]
        self._expressions(s, env)
        return [s]

    def _unrolled(self, s: ast.For, env: dict[str, Any], cls: ast.ClassDef | None) -> list[ast.stmt] | None:
        """`for x in <frozen sequence>: body` as `x = item` + the body, once per item, each copy
        folded with x decided (`for mode in eval.modes: if mode == "nonoverlap": ...` ships only
        the modes the run scores). Kept as a loop (None) unless a copy decides a test: unrolling
        alone would only add bytes. Only loops with a plain name target, no `else`, a sequence of
        1 to `_UNROLL_MAX` scalars the frozen config fixes, and a body `_unrollable_body` accepts."""
        if s.orelse or not isinstance(s.target, ast.Name):
            return None
        items = self.value(s.iter, env)
        if (
            items is _UNKNOWN
            or not isinstance(items, (list, tuple))
            or not 1 <= len(items) <= _UNROLL_MAX
            or not all(isinstance(i, _SCALARS) for i in items)
            or not _unrollable_body(s.body, s.target.id)
        ):
            return None
        counts = self.folded, self.unreachable
        out: list[ast.stmt] = []
        for item in items:
            bind = ast.Assign(targets=[ast.Name(s.target.id, ast.Store())], value=ast.Constant(item))
            out.append(ast.copy_location(bind, s))
            out.extend(self._block(copy.deepcopy(s.body), {**env, s.target.id: _Const(item)}, cls))
        if self.folded == counts[0]:  # nothing decided: the loop stays as it was
            self.folded, self.unreachable = counts
            return None
        return out

    def _expressions(self, s: ast.stmt, env: dict[str, Any]) -> None:
        """Fold `a if test else b` inside the statement's own expressions."""
        spec = self

        class Fold(ast.NodeTransformer):
            def visit_IfExp(self, node: ast.IfExp) -> ast.expr:
                self.generic_visit(node)
                t = spec.truth(node.test, env)
                if t is None:
                    return node
                spec.folded += 1
                return node.body if t else node.orelse

            def visit_Lambda(self, node: ast.Lambda) -> ast.expr:
                return node  # its own scope: its parameters may shadow

        for field, value in ast.iter_fields(s):
            if isinstance(value, ast.expr):
                setattr(s, field, Fold().visit(value))
            elif isinstance(value, list) and value and isinstance(value[0], ast.expr):
                setattr(s, field, [Fold().visit(v) for v in value])

    def _function_env(
        self,
        fn: ast.FunctionDef | ast.AsyncFunctionDef,
        outer: dict[str, Any],
        cls: ast.ClassDef | None,
        built: bool = True,
    ) -> dict[str, Any]:
        bound = _bound_names(fn)
        params = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
        for a in (fn.args.vararg, fn.args.kwarg):
            if a is not None:
                params.add(a.arg)
        env = {
            k: v for k, v in outer.items() if k.split(".")[0] not in bound and k.split(".")[0] not in params
        }
        env[_LOCALS] = set(outer.get(_LOCALS, ())) | set(bound) | params
        env.update(self.typed_params(fn))
        if cls is not None and "self" in params and not bound.get("self"):
            if fn.name != "__init__":
                env.update({f"self.{k}": v for k, v in self.derived_attrs(cls, outer).items()})
                if built:
                    env.update(
                        {f"self.{k}": b for k, b in self.built_attrs(cls, outer).items() if b.store != id(fn)}
                    )
            env.update({f"self.{k}": v for k, v in self.self_attrs(cls).items()})
            own = self.instance_of(cls.name)
            if own is not None and type(own).__name__ == cls.name:
                env["self"] = own
        for s in fn.body:  # names bound once, at the top, from a config instance or a decided value
            if not isinstance(s, ast.Assign) or len(s.targets) != 1:
                continue
            target, value = s.targets[0], s.value
            pairs = (
                list(zip(target.elts, value.elts))
                if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                else [(target, value)]
            )
            for t, v in pairs:
                if isinstance(t, ast.Name) and bound.get(t.id) == 1 and t.id not in params:
                    got = self.value(v, env)
                    if isinstance(got, _Obj):
                        env[t.id] = got.value
                    elif got is not _UNKNOWN and _immutable(got):
                        env[t.id] = _Const(got)
        return env


def specialize(job: Any, trees: dict[str, ast.Module]) -> int:
    """Fold, in place, the `if` tests of `trees` that the frozen config `job` decides; the count."""
    return Specializer(job, trees).specialize()
