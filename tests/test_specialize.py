"""Config specialization (pgolf.parent.specialize): `if` tests the frozen config decides ship only
the branch taken, and a packed run still reproduces the unpacked run bit for bit."""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_cpu_args

from pgolf.config import job_config_from_dict
from pgolf.parent.pack import shipped_sources, unpack
from pgolf.parent.specialize import specialize

HEADER = """
from pgolf.config import JobConfig, BudgetConfig
from pgolf.models.config import BaselineModelConfig
"""


def _fold(compose, source: str, overrides: list[str] | None = None, **more: str) -> str:
    """`source` (as pgolf/fake.py, with `more` as other modules) specialized to a composed config."""
    job = job_config_from_dict(compose(overrides or []))
    trees = {"pgolf/fake.py": ast.parse(HEADER + textwrap.dedent(source))}
    trees.update({rel: ast.parse(textwrap.dedent(src)) for rel, src in more.items()})
    specialize(job, trees)
    return ast.unparse(trees["pgolf/fake.py"])


def test_tests_on_frozen_values_keep_only_the_branch_taken(compose):
    out = _fold(
        compose,
        """
        class Trainer:
            def __init__(self, job: JobConfig):
                self.job = job

            def run(self):
                if self.job.budget.mode == "wallclock":
                    wall()
                else:
                    steps()
                t, b = self.job.train, self.job.budget
                if t.iterations > 5 and b.mode != "steps":
                    big()
                x = 1 if self.job.checkpoint.every_steps else 2
                if self.job.seed == 1337:  # SEED may change in a packed run: never folded
                    seeded()
                if self.job.data.name:  # nor the data group (DATA_PATH)
                    data()

        def build(cfg: BaselineModelConfig):
            if not cfg.tie_embeddings:
                untied()
        """,
        ["budget.mode=steps"],
    )
    assert "wall()" not in out and "steps()" in out and "big()" not in out
    assert "x = 2" in out
    assert "self.job.seed == 1337" in out and "self.job.data.name" in out
    assert "untied()" not in out


def test_undecidable_or_unsafe_tests_stay(compose):
    out = _fold(
        compose,
        """
        def a(cfg: BaselineModelConfig, x):
            if x and cfg.tie_embeddings:  # x unknown: the test stays
                one()
            if f() and not cfg.tie_embeddings:  # f() runs before the decided operand: stays
                two()
            if x.y and not cfg.tie_embeddings:  # a pure unknown before it: decided
                three()

        def b(cfg: BaselineModelConfig):
            cfg = other()  # rebound: no longer the frozen config
            if cfg.tie_embeddings:
                four()

        def c(cfg: BaselineModelConfig):
            if not cfg.tie_embeddings:  # dropping it would make c a plain function
                yield 1

        def d(x, cfg: BaselineModelConfig = None):  # a caller may leave it out
            if cfg.tie_embeddings:
                five()
        """,
    )
    assert "one()" in out and "two()" in out and "three()" not in out
    assert "four()" in out and "yield 1" in out and "five()" in out


def test_a_field_that_code_assigns_is_never_folded(compose):
    src = """
        def a(cfg: BaselineModelConfig):
            if cfg.tie_embeddings:
                tied()
        """
    assert "tied()" not in _fold(compose, src, ["model.tie_embeddings=false"])
    assert "if" not in _fold(compose, src, ["model.tie_embeddings=true"]).split("def a")[1]
    mutated = _fold(
        compose,
        src,
        ["model.tie_embeddings=false"],
        **{"pgolf/other.py": "def m(c):\n c.tie_embeddings = 1\n"},
    )
    assert "if cfg.tie_embeddings" in mutated
    # a config built from other data (the checkpoint converter's from_dict) turns folding off
    rebuilt = _fold(
        compose,
        src,
        ["model.tie_embeddings=false"],
        **{"pgolf/other.py": "def m(s, n):\n from_dict(s, n, 'model')\n"},
    )
    assert "if cfg.tie_embeddings" in rebuilt
    # and so does a class that shipped code constructs itself
    built = _fold(
        compose,
        src,
        ["model.tie_embeddings=false"],
        **{"pgolf/other.py": "def m():\n BaselineModelConfig()\n"},
    )
    assert "if cfg.tie_embeddings" in built


def test_values_init_derives_module_constants_and_decided_locals_fold(compose, monkeypatch):
    class Gate:  # the live class of pgolf/fake.py's `Gate`, which isinstance is decided against
        pass

    monkeypatch.setitem(sys.modules, "pgolf.fake", type(sys)("pgolf.fake"))
    sys.modules["pgolf.fake"].Gate = Gate
    out = _fold(
        compose,
        """
        FORMS = ("a", "b")

        class Gate:
            pass

        class Net:
            def __init__(self, cfg: BaselineModelConfig):
                self.cfg = cfg
                self.untied = not cfg.tie_embeddings
                self.form = "a" if cfg.tie_embeddings else None
                self.gate: Gate | None = None
                self.items = []
                self.later = None
                if self.untied:  # __init__ may read an attribute before its store: left alone
                    early()

            def forward(self, x):
                if self.untied:
                    untied()
                if isinstance(self.gate, Gate):
                    gated()
                if self.items:  # a list may be appended to: stays
                    items()
                if self.later is None:  # stored again below: stays
                    later_none()
                k = self.form
                if k in FORMS:
                    return x
                after()

            def grow(self):
                self.later = 1

        def gen(cfg: BaselineModelConfig):
            if cfg.tie_embeddings:
                return
            yield 1  # dead, but dropping it would turn the generator into a function
        """,
    )
    assert "untied()" not in out and "early()" in out
    assert "gated()" not in out and "items()" in out and "later_none()" in out
    assert "if k in FORMS" not in out and "after()" not in out
    assert "yield 1" in out


def test_a_loop_over_a_list_nothing_can_fill_goes(compose):
    out = _fold(
        compose,
        """
        def quantize(cfg: BaselineModelConfig, state):
            pending: list = []
            passed = []
            for k in state:
                if not cfg.tie_embeddings:  # folded away: nothing appends to `pending` any more
                    pending.append(k)
                fill(passed)
            for k in pending:
                lqer(k)
            else:
                done()
            for k in passed:  # `fill` may have appended
                kept(k)
        """,
    )
    assert "lqer(k)" not in out and "done()" in out and "kept(k)" in out


PARTS_SOURCE = """
class Base:
    stopped_at = None

class NoPart(Base):
    enabled = False
    hidden = 1

    def __init__(self, cfg):
        self.cfg = cfg
        self.hidden = 2  # the instance's value shadows the class's: never folded

class Other:
    enabled = True

def build(cfg, compile=False):
    return NoPart(cfg)

def build_either(cfg):
    if cfg.name == "none":
        return NoPart(cfg)
    return Other()
"""


def test_a_component_a_registry_builds_from_the_config_folds_its_class_constants(compose, monkeypatch):
    """`self.part = PARTS.build(job.ttt)`: the entry ttt=none names builds a NoPart on every path,
    so `self.part.enabled` is NoPart.enabled. Not when the builder may return another class, nor
    for an attribute the instance stores itself, nor when a store off `self` may hit the trainer."""
    from pgolf.registry import Registry

    parts = type(sys)("pgolf.fake_parts")
    exec(compile(PARTS_SOURCE, "pgolf/fake_parts.py", "exec"), parts.__dict__)
    fake = type(sys)("pgolf.fake")
    for name, builder in [("PARTS", "build"), ("EITHER", "build_either")]:
        setattr(fake, name, Registry("ttt"))
        getattr(fake, name).register("none", None, f"pgolf.fake_parts:{builder}")
    monkeypatch.setitem(sys.modules, "pgolf.fake_parts", parts)
    monkeypatch.setitem(sys.modules, "pgolf.fake", fake)
    out = _fold(
        compose,
        """
        from pgolf.registry import Registry

        PARTS = Registry("ttt")
        EITHER = Registry("ttt")

        class Result:
            pass

        class Trainer:
            def __init__(self, job: JobConfig):
                self.job = job
                self.part: object  # a declaration, no store
                self.result = Result()

            def build(self):
                job = self.job
                if self.part.enabled:  # before the store (it raises here): stays
                    early()
                self.part = PARTS.build(job.ttt, compile=False)
                self.either = EITHER.build(job.ttt)
                self.poked = PARTS.build(job.ttt)
                self.result.part = None  # on a Result, never the trainer
                if self.part.enabled:  # after the store in the method's own top level
                    after_store()

            def run(self):
                if self.part.enabled:
                    enabled()
                if self.part.stopped_at is not None:  # inherited from Base
                    stopped()
                if self.part.hidden == 2:  # wrongly folded, 1 == 2 would drop it
                    hidden()
                if self.either.enabled:
                    either()
                if self.poked.enabled:
                    poked()

        def poke(t):
            t.poked = None  # t may be a Trainer
        """,
        **{"pgolf/fake_parts.py": PARTS_SOURCE},
    )
    assert "enabled()" not in out and "stopped()" not in out and "after_store()" not in out
    assert "early()" in out and "hidden()" in out and "either()" in out and "poked()" in out


def test_a_loop_over_frozen_modes_ships_only_the_modes_scored(compose):
    src = """
        class Trainer:
            def __init__(self, job: JobConfig):
                self.job = job

            def evaluate(self):
                for mode in self.job.eval.modes:
                    if mode == "nonoverlap":
                        final = plain(mode)
                    else:
                        final = sliding(mode)
                    record(mode, final)
                return mode

            def kept(self):
                for mode in self.job.eval.modes:  # nothing to decide: stays a loop
                    record(mode)
                for mode in self.job.eval.modes:  # a break: never unrolled
                    if mode == "sliding":
                        break
                for mode in self.job.eval.modes:  # a closure would see the last copy's `mode`
                    hooks.append(lambda: mode == "sliding")
        """
    one = _fold(compose, src, ["eval.modes=[nonoverlap]"])
    evaluate, kept = one.split("def kept")
    assert "sliding(mode)" not in evaluate and "plain(mode)" in evaluate and "for " not in evaluate
    assert "mode = 'nonoverlap'" in evaluate  # still bound for `record` and after the loop
    assert kept.count("for mode in self.job.eval.modes") == 3
    both = _fold(compose, src, ["eval.modes=[nonoverlap,sliding]"]).split("def kept")[0]
    assert both.index("mode = 'nonoverlap'") < both.index("plain(mode)") < both.index("mode = 'sliding'")
    assert both.index("mode = 'sliding'") < both.index("sliding(mode)")
    assert both.count("record(mode, final)") == 2


# ------------------------------------------------------------------------ packed runs
R0409_LIKE = {
    "model": "layered",
    "model.num_layers": "3",
    "model.num_heads": "4",
    "model.num_kv_heads": "2",
    "model.ve_layers": "[1]",
    "quant": "r0409",
    "quant.calibration.batches": "1",
    "optimizer": "muon_r0409",
    "ttt": "score_first",
    "ttt.chunk_tokens": "8192",
    "ttt.epochs": "1",
    "eval.stride": "64",
    "data.loader": "shuffled",
    "train.prime_steps": "0",
}
CONFIGS = {
    "offline_like": {},  # the offline default's model, optimizer and quant, on the test shards
    "r0409_like": R0409_LIKE,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_specialized_packed_run_reproduces_the_run_bit_for_bit(name, tmp_path, shard_dir, tokenizer_model):
    proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **CONFIGS[name]), tmp_path / "src")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "src" / "run"
    script = run / "artifact" / "train_gpt.py"
    shipped = unpack(script.read_text(encoding="utf-8"))

    # the wrapper is specialized: it is what shipped_sources gives with folding on, and smaller
    config = json.loads(shipped["config.json"])
    modules = {rel: REPO / rel for rel in shipped if rel != "config.json"}
    for rel in modules:  # the shaker keeps every method of a class this process has not loaded
        importlib.import_module(rel.removesuffix(".py").removesuffix("/__init__").replace("/", "."))
    on, off = shipped_sources(modules, config), shipped_sources(modules, config, specialized=False)
    assert {k: v.encode() for k, v in on.items()} == shipped
    assert sum(map(len, on.values())) < sum(map(len, off.values())) - 500

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PGOLF_JOB_DIR=str(empty / "job"), DATA_PATH=str(shard_dir), TOKENIZER_PATH=str(tokenizer_model)
    )
    packed_proc = subprocess.run(
        [sys.executable, str(script)], cwd=empty, env=env, capture_output=True, text=True, timeout=600
    )
    assert packed_proc.returncode == 0, packed_proc.stderr[-3000:]
    orig = json.loads((run / "result.json").read_text())
    packed = json.loads((empty / "job" / "result.json").read_text())
    assert packed["status"] == orig["status"] == "ok"
    assert packed["train_losses"] == orig["train_losses"]
    assert (packed["val_loss"], packed["val_bpb"]) == (orig["val_loss"], orig["val_bpb"])
    assert (
        packed["metrics"] == orig["metrics"] or packed["metrics"]["roundtrip"]["val_bpb"] == orig["val_bpb"]
    )
    # every byte count but the raw source's (the packed run's modules are the minified ones)
    assert {**packed["bytes"], "code_source_raw": 0} == {**orig["bytes"], "code_source_raw": 0}
    model = next(p.name for p in (run / "artifact").iterdir() if p.name.startswith("final_model"))
    assert _sha(empty / "job" / "artifact" / model) == _sha(run / "artifact" / model)
    assert (empty / "job" / "artifact" / "train_gpt.py").read_bytes() == script.read_bytes()


_FOLDING_ON = """
import ast, json, sys
from pgolf.config import to_dict
from pgolf.parent import pack, plan
from pgolf.parent.compose import compose_job
from pgolf.parent.specialize import Specializer
job = compose_job(sys.argv[1:])
plan.code_bytes(job)  # imports what a worker of this config imports, as the plan does
trees = {rel: ast.parse(p.read_text()) for rel, p in pack.shipped_modules(to_dict(job)).items()}
print(json.dumps(Specializer(job, trees).enabled))
"""


@pytest.mark.parametrize("experiment", ["offline", "r0409"])
def test_the_code_a_run_ships_leaves_folding_on(experiment):
    """One `setattr(obj, name, value)` with a computed name in any shipped module turns folding off
    for every config, silently: a helper that set an Inductor option that way grew the offline
    default's code by 3,893 bytes (38,937 -> 42,830). The shipped modules of the offline default
    and of a record stack must leave the specializer on."""
    out = subprocess.run(
        [sys.executable, "-c", _FOLDING_ON, f"experiment={experiment}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True
