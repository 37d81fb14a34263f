"""The written contracts (pgolf.contracts): every registered implementation provides every member
of its Protocol, so the trainer calls them directly and probes nothing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf.components import MODELS, OPTIMIZERS, QUANT, TTT
from pgolf.contracts import BatchLoader, Optimizer, Quantizer, TrainModel, TTTMode

TRAINER = Path(__file__).resolve().parent.parent / "pgolf" / "trainer.py"
PROBES = ("hasattr", "getattr")


def probes_in(source: str) -> list[str]:
    """Every hasattr/getattr call in `source`, as 'line: call'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in PROBES:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_trainer_probes_no_component():
    found = probes_in(TRAINER.read_text(encoding="utf-8"))
    assert not found, f"pgolf/trainer.py probes with hasattr/getattr; call the Protocol instead: {found}"


def test_the_probe_finder_sees_every_spelling():
    """The control for the test above: a planted probe, in each spelling, is found."""
    planted = "x = getattr(m, 'a', None)\nif hasattr(m, 'b'):\n    pass\ny = builtins.getattr(m, 'c')\n"
    assert [line.split(":")[0] for line in probes_in(planted)] == ["1", "2", "4"]
    assert probes_in("m.a\nm.hasattr_like = 1\n") == []


def members(proto: type) -> set[str]:
    """The members a Protocol asks for (methods and annotated attributes)."""
    names = {n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}
    names |= set(vars(proto).get("__annotations__", {}))  # data members (handles_grad_sync, ...)
    return names | ({"__call__"} if "__call__" in vars(proto) else set())


def missing(obj: object, proto: type) -> list[str]:
    return sorted(m for m in members(proto) if not hasattr(obj, m))


TINY_MODEL = dict(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_keeps_the_model_contract(name):
    model = MODELS.build(MODELS.get(name).schema(**TINY_MODEL))
    assert not missing(model, TrainModel) and isinstance(model, TrainModel)
    variants = model.graph_variants()
    for v in variants:
        model.set_graph_variant(v)
    assert model.on_progress(0.0) is None or isinstance(model.on_progress(0.0), str)
    state = model.export_state_dict()
    model.load_export_state_dict(state)


def test_every_optimizer_keeps_the_optimizer_contract():
    from pgolf.optim.muon import OptimizerBundle
    from pgolf.optim.parallel_muon import ParallelMuonBundle

    assert set(OPTIMIZERS.names()) == {"muon", "parallel_muon"}
    model = MODELS.build(MODELS.get("banked").schema(**TINY_MODEL))
    opt = OPTIMIZERS.build(
        OPTIMIZERS.get("muon").schema(), model=model, device=torch.device("cpu"), compile_ns=False
    )
    assert type(opt) is OptimizerBundle and not missing(opt, Optimizer) and isinstance(opt, Optimizer)
    # parallel_muon's bundle needs a process group to build; it is the same bundle, Muon swapped
    assert issubclass(ParallelMuonBundle, OptimizerBundle) and ParallelMuonBundle.handles_grad_sync


@pytest.mark.parametrize("name", QUANT.names())
def test_every_quantizer_keeps_the_quantizer_contract(name):
    quant = QUANT.build(QUANT.get(name).schema())
    assert not missing(quant, Quantizer) and isinstance(quant, Quantizer)
    assert isinstance(quant.needs_calibration, bool) and isinstance(quant.stats, dict)


@pytest.mark.parametrize("name", TTT.names())
def test_every_ttt_mode_keeps_the_ttt_contract(name):
    ttt = TTT.build(TTT.get(name).schema(), compile=False)
    assert not missing(ttt, TTTMode) and isinstance(ttt, TTTMode)
    assert ttt.stopped_at is None and ttt.enabled == (name != "none")


def test_every_loader_keeps_the_loader_contract():
    from pgolf.data.loader import Loader
    from pgolf.data.synthetic import SyntheticLoader

    for cls in (Loader, SyntheticLoader):
        assert not missing(cls, BatchLoader), cls


def test_contracts_import_no_torch():
    code = "import sys, pgolf.contracts; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
