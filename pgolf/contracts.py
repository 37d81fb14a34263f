"""What the trainer asks of each component: one Protocol per config group, written down.

The trainer calls these methods directly, never probing with hasattr/getattr, so every
implementation provides every member of its Protocol. Where most implementations have nothing to
do, a small base class below holds the no-op default (a model with one graph, a quantizer that
needs no calibration, a TTT mode that never stops early). Values known only at run time (the
compile flag, the model's byte budget, the eval deadline) are passed in when a component is built
or called, never set on it afterwards.

Imports no torch at run time: the annotations name torch types only for readers and type checkers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from pgolf.eval.sliding import ModeResult, WindowScorer

LossFn = Callable[["Tensor", "Tensor"], "Tensor"]


@runtime_checkable
class Stateful(Protocol):
    """A part of the run that a checkpoint saves and a resume restores, exactly."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------ model
@runtime_checkable
class TrainModel(Protocol):
    """A `model=` implementation (an nn.Module): a loss to train, per-token NLL to score, its
    parameters by optimizer role, the graphs it switches between and its export layout."""

    looping: bool  # the looped (deeper) graph is the one running now; False for a model without loops
    fused_kernels: dict[str, bool]  # each fused-kernel switch as resolved on this machine ({}: none)

    def __call__(self, input_ids: Tensor, target_ids: Tensor) -> Tensor: ...

    def token_nll(self, input_ids: Tensor, target_ids: Tensor, last: int = 0) -> Tensor: ...

    def param_groups(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]: ...

    def graph_variants(self) -> list[str]:
        """The compiled graphs training may switch between; each is primed before the clock."""
        ...

    def set_graph_variant(self, name: str) -> None: ...

    def on_progress(self, frac: float) -> str | None:
        """Host-side, before each step, with the fraction of training done; a log line when the
        model switches graphs, else None. Must not synchronize with the device."""
        ...

    def export_state_dict(self) -> dict[str, Tensor]:
        """The weights under the canonical per-layer names: what quantizers and checkpoints see."""
        ...

    def load_export_state_dict(self, state: dict[str, Tensor]) -> None:
        """Strict, in-place load of `export_state_dict` output."""
        ...

    def doc_unmasked(self) -> AbstractContextManager[None]:
        """Plain causal attention for the forwards inside, whatever the model's document mask says
        (GPTQ calibration with quant.calibration.doc_mask=false); a no-op without a mask."""
        ...


STATIC_GRAPH = "static"


class SingleGraphModel:
    """Defaults for a model with one compiled graph whose state dict is already canonical. Mixed
    into an nn.Module subclass (it uses the module's state_dict/load_state_dict)."""

    looping = False

    @property
    def fused_kernels(self) -> dict[str, bool]:
        return {}

    def graph_variants(self) -> list[str]:
        return [STATIC_GRAPH]

    def set_graph_variant(self, name: str) -> None:
        if name != STATIC_GRAPH:
            raise ValueError(f"unknown graph variant {name!r}; this model has [{STATIC_GRAPH!r}]")

    def on_progress(self, frac: float) -> str | None:
        return None

    def export_state_dict(self) -> dict[str, Tensor]:
        return self.state_dict()  # type: ignore[attr-defined]

    def load_export_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict(state, strict=True)  # type: ignore[attr-defined]

    def doc_unmasked(self) -> AbstractContextManager[None]:
        return nullcontext()  # no document mask to lift


# -------------------------------------------------------------------------------- optimizer
@runtime_checkable
class Optimizer(Protocol):
    """An `optimizer=` implementation: every optimizer of the run behind one step."""

    # True when the optimizer averages gradients across ranks itself (no DDP wrapper then).
    handles_grad_sync: bool
    last_lr_scale: float  # the schedule's multiplier at the last step, for the metrics history

    def zero_grad(self) -> None: ...

    def step(self, step: int, elapsed_ms: float, iterations: int, cap_ms: float | None) -> None: ...

    def reset_state(self) -> None:
        """Back to the freshly built state (after the compile-priming steps)."""
        ...

    def finish(self) -> str | None:
        """End of training: put averaged weights (EMA/SWA) into the model; a log line or None."""
        ...

    def report(self) -> dict[str, Any]:
        """What result.json records about the optimizer run."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# -------------------------------------------------------------------------------- quantizer
@runtime_checkable
class Quantizer(Protocol):
    """A `quant=` implementation: weights -> the artifact's model bytes, and back."""

    needs_calibration: bool  # GPTQ: the trainer calls calibrate() before export()
    stats: dict[str, Any]  # what result.json records under "quant" (empty: nothing)

    def calibrate(
        self,
        model: torch.nn.Module,
        batches: Iterable[Any],
        autocast_dtype: torch.dtype | None = None,
        reduce: Callable[[Tensor], None] | None = None,
        seed: int = 0,
        world_size: int = 1,
        deadline: float | None = None,
        batch_seconds: float = 0.0,
        max_batches: int | None = None,
        sync: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """`sync` waits for the device: each batch's time (what `deadline` is checked against) is
        measured after it, so it counts the batch's GPU work, not only the host's launches."""
        ...

    def reset_calibration(self) -> None: ...

    def export(self, state: dict[str, Tensor], model_budget: int | None = None) -> bytes:
        """The model bytes; `model_budget` is what the cap leaves after the code bytes."""
        ...

    def load(self, blob: bytes) -> dict[str, Tensor]: ...


class NoCalibration:
    """Defaults for a quantizer that needs no calibration and records no statistics."""

    needs_calibration = False

    @property
    def stats(self) -> dict[str, Any]:
        return {}

    def calibrate(self, model: Any, batches: Iterable[Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError(f"{type(self).__name__} needs no calibration (needs_calibration is False)")

    def reset_calibration(self) -> None:
        pass


# -------------------------------------------------------------------------------------- TTT
@runtime_checkable
class TTTMode(Protocol):
    """A `ttt=` implementation: scores the validation stream while adapting to it, legally."""

    enabled: bool  # False: ttt=none, the trainer skips warmup and run
    # The chunk whose update the eval deadline skipped in the last run (later chunks were scored
    # without updates); None when every update ran.
    stopped_at: int | None

    def warmup(
        self, model: torch.nn.Module, scorer: WindowScorer, loss_fn: LossFn, vocab: int, world_size: int
    ) -> None:
        """Compile every graph `run` will need on random tokens, off the eval clock."""
        ...

    def run(
        self,
        model: torch.nn.Module,
        scorer: WindowScorer,
        loss_fn: LossFn,
        rank: int = 0,
        world_size: int = 1,
        log: Callable[[str], None] = print,
        sync: Callable[[], None] = lambda: None,
        deadline: float | None = None,
    ) -> ModeResult:
        """Score the whole stream; `deadline` (time.perf_counter()) is when scoring must be done."""
        ...


class NeverStopsEarly:
    """For a TTT mode that has no deadline to react to: every update runs."""

    stopped_at: int | None = None


# ----------------------------------------------------------------------------------- loader
@runtime_checkable
class BatchLoader(Protocol):
    """A `data.loader=` implementation on the device; its position is checkpointed exactly."""

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum: int) -> tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


__all__ = [
    "BatchLoader",
    "LossFn",
    "NeverStopsEarly",
    "NoCalibration",
    "Optimizer",
    "Quantizer",
    "STATIC_GRAPH",
    "SingleGraphModel",
    "Stateful",
    "TTTMode",
    "TrainModel",
]
