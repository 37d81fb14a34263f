"""The trainer: build -> prime -> train -> artifact -> eval -> ttt -> report, read top to bottom.

Timer hygiene follows the challenge's reference loop: compile-priming steps run before the clock
and are undone (weights restored, optimizer state reset, loader rebuilt); periodic validation
pauses the clock; the stop decision is taken on every rank together. The step itself never waits
for the GPU: host-side bookkeeping reads the previous step's flags after the current step has been
queued (one step of lag, which the stop rule accounts for).
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pgolf import __version__
from pgolf.checkpoint_gate import NoCheckpoints, needs_checkpointer
from pgolf.components import DATA, MODELS, OPTIMIZERS, QUANT, TTT
from pgolf.config import JobConfig, config_hash, to_dict
from pgolf.data.loader import build_loader, to_xy
from pgolf.eval.sliding import ModeResult, WindowScorer, evaluate_sliding, from_eval_result
from pgolf.eval.val import ByteLUT, EvalResult, evaluate
from pgolf.flops import train_flops_per_token
from pgolf.history import History
from pgolf.hw.device import Runtime
from pgolf.hw.device import build as build_runtime
from pgolf.log import RunLog
from pgolf.loop import LossLog, StepFlags, StepTimes, StopRule, TrainClock
from pgolf.models import attention
from pgolf.models.config import GPTModelConfig
from pgolf.models.layers import restore_fp32_params
from pgolf.results import sha256_file, write_text_atomic
from pgolf.rules import not_trained_here, verdict
from pgolf.run_result import ByteCounts, RunResult
from pgolf.shipped import write_code
from pgolf.throughput import log_line, throughput
from pgolf.timing import PhaseTimer

if TYPE_CHECKING:  # annotations only: a packed run ships no Protocol, and no checkpoint module when off
    from pgolf.checkpoint import Checkpointer
    from pgolf.contracts import BatchLoader, Optimizer, Quantizer, TrainModel, TTTMode


class TrainingError(RuntimeError):
    """A run-stopping condition with a message that says what happened and what to change."""


class ArtifactTooLarge(TrainingError):
    pass


class RulesBroken(TrainingError):
    """The run finished but is not a legal submission (time over a limit, a diverged score, ...)."""


# Calibration batches timed before the clock starts; the first is often slower (kernel set-up), so
# the estimate takes the slowest of the others.
PROBE_BATCHES = 3
# Headroom on the measured calibration cost when reserving it off the training clock.
CALIBRATION_MARGIN = 1.25
# SDPA kernels of the training graphs under hardware.train_cudnn_attention, first choice first.
TRAIN_CUDNN_SDPA = ["cudnn", "flash", "efficient", "math"]


def versions() -> dict[str, str]:
    import sentencepiece

    v = {
        "pgolf": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "sentencepiece": sentencepiece.__version__,
        "cuda": torch.version.cuda or "none",
    }
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


class Trainer:
    def __init__(self, job: JobConfig, job_dir: Path):
        self.job = job
        self.job_dir = job_dir
        self.rt: Runtime = build_runtime(job.hardware)
        self.log = RunLog(job_dir / "train.log", enabled=self.rt.is_main)
        self.timer = PhaseTimer(self.rt.sync)
        self.result = RunResult(
            label=job.label,
            seed=job.seed,
            config_hash=config_hash(job),
            config_hash_with_seed=config_hash(job, include_seed=True),
            world_size=self.rt.world_size,
            versions=versions(),
        )
        self.history = History(job_dir, self.rt.is_main)
        self.calibration_plan: dict = {}  # the probe's measurement and the reserve taken off the clock
        # The components (pgolf.contracts), built by build(); the loader is rebuilt after priming and
        # the checkpointer, which is given the stateful parts, is built when training starts.
        self.model: TrainModel
        self.opt: Optimizer
        self.quant: Quantizer
        self.ttt: TTTMode
        self.loader: BatchLoader | None = None
        self.ckpt: Checkpointer | NoCheckpoints | None = None

    # -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every phase of the job; returns the result.json dict (also kept as `self.result`)."""
        t_start = time.perf_counter()
        with self.phase("build"):
            self.build()
        if self.job.score_artifact:  # a re-score: another run's artifact, this config's eval and TTT
            with self.phase("prime"):
                blob_path = self.artifact_to_score(self.job.score_artifact)
        else:
            with self.phase("prime"):
                self.prime()
            with self.phase("train"):
                self.train()
            with self.phase("artifact"):
                blob_path = self.write_artifact()
        with self.phase(
            "eval_warmup"
        ):  # compile on random tokens, reported apart (docs/techniques.md#time-limits)
            self.warm_eval()
        # budget.eval_seconds counts eval + TTT from here; TTT stops updating in time (wallclock)
        self.eval_deadline = time.perf_counter() + self.job.budget.eval_seconds
        with self.phase("eval"):
            final = self.eval_artifact(blob_path)
        with self.phase("ttt"):
            if self.ttt.enabled:
                final = self.run_ttt()
        self.result.val_loss, self.result.val_bpb = final.val_loss, final.val_bpb
        # `roundtrip`: the artifact's final score (the last eval mode, or TTT), which val_bpb reports
        self.result.metrics["roundtrip"] = vars(final)
        self.result.timings = {
            **self.timer.seconds,
            **self._sub_phases(),
            "total": time.perf_counter() - t_start,
        }
        self.log("phases: " + " ".join(f"{k}:{v:.1f}s" for k, v in self.result.timings.items()))
        self.enforce_rules()
        self.result.status = "ok"
        if self.rt.is_main:  # byte accounting lives on rank 0, which wrote the artifact
            self.log(
                f"final_roundtrip val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f} "
                f"bytes_total:{self.result.bytes.total} eval_time:{self.timer.seconds['eval']:.1f}s "
                f"ttt_time:{self.timer.seconds['ttt']:.1f}s final_mode:{self.result.final_mode}"
            )
        return self.result.to_json()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A timed phase; its edges are debug lines (hydra.verbose=pgolf.trainer), so a hang shows where."""
        self.log.debug(f"phase:{name} start")
        with self.timer.phase(name):
            yield
        self.log.debug(f"phase:{name} done in {self.timer.seconds[name]:.2f}s")

    def _sub_phases(self) -> dict[str, float]:
        """Seconds inside the timed phases: calibration and export (artifact), each eval mode."""
        out: dict[str, float] = {}
        if "artifact" in self.timer.seconds:
            cal = self.result.calibration_seconds or 0.0
            out["calibration"] = cal
            out["export"] = max(self.timer.seconds["artifact"] - cal, 0.0)
        for mode in self.job.eval.modes:
            seconds = (self.result.metrics or {}).get(mode, {}).get("seconds")
            if seconds is not None:
                out[f"eval_{mode}"] = seconds
        return out

    # ---------------------------------------------------------------------------------- build
    def build(self) -> None:
        job, rt = self.job, self.rt
        self.log(f"pgolf {__version__} job_dir:{self.job_dir} device:{rt.device} world_size:{rt.world_size}")
        self.data = DATA.build(job.data)
        self.grad_accum = job.train.grad_accum_base // rt.world_size
        self.log(
            f"data:{job.data.name} train_shards:{len(self.data.train_files)} train_tokens:{self.data.train_tokens:,} "
            f"val_tokens:{self.data.val_tokens_total:,} tokenizer:{self.data.tokenizer_path}"
        )
        for warning in self.data.warnings:
            self.log(f"WARNING {warning}")
        # nonoverlap validation's sequence length (eval.nonoverlap_seq_len, else train.seq_len)
        self.val_len = job.eval.nonoverlap_len(job.train.seq_len)
        self.val_tokens = self.data.val_tokens(self.val_len)
        self.lut = ByteLUT(self.data.bytes, rt.device)
        self.loader = self._build_loader()

        backend = attention.select_backend(rt.attention, rt.device.type)
        if rt.train_cudnn_attention and backend == "sdpa":
            backend = "sdpa(cudnn first)"
        if isinstance(job.model, GPTModelConfig) and job.model.doc_mask:  # its kernel is chosen apart
            from pgolf.models.docmask import select_doc_backend  # imported (and shipped) only then

            doc = select_doc_backend(job.hardware.doc_attention, rt.device.type)
            backend = f"{backend}+doc_mask:{doc}"
        # training graphs use the global SDPA flags (flash first), or cuDNN first with
        # hardware.train_cudnn_attention; either way this also drops an eval kernel list (warm_eval)
        # that an earlier run in this process may have left behind
        attention.set_sdpa_backends(TRAIN_CUDNN_SDPA if rt.train_cudnn_attention else None)

        torch.manual_seed(job.seed)
        np.random.seed(job.seed)
        self.model = self._fresh_model()
        if job.init_from:  # before priming, which snapshots these weights and restores them after
            self._load_init_from(job.init_from)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"model:{job.model.name} params:{n_params:,} attention_backend:{backend} amp:{rt.amp_dtype} compile:{rt.compile}"
        )
        self.result.params, self.result.attention_backend = n_params, backend
        fused = self.model.fused_kernels
        if fused:
            self.result.fused_kernels = fused
            self.log("fused_kernels: " + " ".join(f"{k}:{'on' if on else 'off'}" for k, on in fused.items()))
        self.result.grad_accum = self.grad_accum
        compiled = torch.compile(self.model, dynamic=False, fullgraph=True) if rt.compile else self.model
        self.opt = OPTIMIZERS.build(
            job.optimizer,
            model=self.model,
            device=rt.device,
            compile_ns=rt.compile,
            late_qat=self._late_qat(),
        )
        # An optimizer that averages gradients itself (parallel_muon: reduce-scatter of the banks)
        # must not get DDP's all-reduce on top, which would communicate every bank twice.
        if rt.distributed and not self.opt.handles_grad_sync:
            ids = [rt.local_rank] if rt.device.type == "cuda" else None
            self.train_model = DDP(compiled, device_ids=ids, broadcast_buffers=False)
        else:
            self.train_model = compiled
        self.quant = QUANT.build(job.quant)
        self.ttt = TTT.build(job.ttt, compile=rt.compile)  # lora/phased compile their per-chunk step
        self.compiled_model = compiled  # the TTT training step reuses the compiled forward
        self._window_scorer: WindowScorer | None = None  # built on first use by _scorer()
        self.eval_nll = (
            torch.compile(self.model.token_nll, dynamic=False, fullgraph=True)
            if rt.compile
            else self.model.token_nll
        )
        self.log(
            f"world_size:{rt.world_size} grad_accum:{self.grad_accum} global_batch_tokens:{job.train.batch_tokens}"
        )

    def _build_loader(self) -> BatchLoader:
        rt = self.rt
        return build_loader(
            self.job.data,
            self.data.train_files,
            seed=self.job.seed,
            rank=rt.rank,
            world_size=rt.world_size,
            device=rt.device,
        )

    def _fresh_model(self) -> torch.nn.Module:
        model = MODELS.build(self.job.model).to(self.rt.device)
        if self.rt.amp_dtype == torch.bfloat16:
            model = model.bfloat16()  # embeddings compute in bf16 ...
            restore_fp32_params(model)  # ... linear weights and control tensors stay fp32
        return model

    def _late_qat(self):
        """Late QAT at the quant group's bits when optimizer.late_qat_threshold is set, else None."""
        threshold = self.job.optimizer.late_qat_threshold
        if threshold <= 0:
            return None
        # Imported here: only runs that use it ship it in their code bytes.
        from pgolf.quant.qat import LateQAT

        return LateQAT(self.model, self.job.quant, threshold)

    def _load_init_from(self, path: str) -> None:
        # Imported here: only runs that use it ship the converter in their code bytes.
        from pgolf.models.convert import InitFromError, load_into

        try:
            layout = load_into(self.model, path, self.job.model.name)
        except InitFromError as e:
            raise TrainingError(str(e)) from e
        self.log(f"init_from:{path} layout:{layout}")

    # ---------------------------------------------------------------------------------- steps
    def _train_step(self, step: int, elapsed_ms: float, cap_ms: float | None) -> torch.Tensor:
        """One optimizer step over the global batch; returns the mean micro-batch loss on device."""
        t, rt = self.job.train, self.rt
        self.opt.zero_grad()
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(self.grad_accum):
            if isinstance(self.train_model, DDP):
                self.train_model.require_backward_grad_sync = micro == self.grad_accum - 1
            x, y = self.loader.next_batch(t.batch_tokens, t.seq_len, self.grad_accum)
            with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype != torch.float32):
                loss = self.train_model(x, y)
            (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        self.opt.step(step, elapsed_ms, t.iterations, cap_ms)
        return loss_sum / self.grad_accum

    # ---------------------------------------------------------------------------------- prime
    def prime(self) -> None:
        """Compile every graph with real steps, then undo them so training starts from the init."""
        t = self.job.train
        n = t.prime_steps
        if self.quant.needs_calibration and self.job.budget.mode == "wallclock":
            # Before the compile (calibration runs the eager model): a reserve that leaves no
            # training time is refused in seconds, not after minutes of priming. The loader restarts
            # after it, so priming and training draw the stream they would without the probe.
            self.probe_calibration()
            self.loader.close()
            self.loader = self._build_loader()
        if n == 0:
            return
        if self.rt.compile:  # minutes on a GPU with nothing else to show
            self.log(f"priming: compiling the training graphs with {n} steps (undone after)")
        snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # train.prime_skip_batches: micro-batches a record's warm-up consumed before its optimizer
        # steps (#1775: one, for its cu_seqlens compile warm-up), so the priming steps, and the Muon
        # momentum that optimizer.keep_primed_momentum carries into training, see the same stream.
        # Every rank draws them (each from its own stream), so the ranks stay in step.
        for _ in range(t.prime_skip_batches):
            self.loader.next_batch(t.batch_tokens, t.seq_len, self.grad_accum)
        # Models that switch graphs during training (depth recurrence off -> on, ...) name every
        # variant; each gets its priming steps and its eval graph here, so the switch in train()
        # finds an already compiled graph instead of stalling on a recompile under the clock.
        variants = self.model.graph_variants()
        for variant in variants:
            self.model.set_graph_variant(variant)
            for i in range(n):
                self._train_step(i, 0.0, None)
            # Also compile the eval graph now, so validation inside training never stalls on it.
            self._prime_eval()
        self.rt.sync()
        with torch.no_grad():
            self.model.load_state_dict(snapshot, strict=True)
        self.model.on_progress(0.0)  # back to the variant that training starts in
        self.opt.reset_state()
        self.loader.close()
        self.loader = self._build_loader()
        self.log(
            f"primed {n} steps (compile) x graph variants {variants}"
            + (f" after skipping {t.prime_skip_batches} batches" if t.prime_skip_batches else "")
            + " and restored the initial weights, optimizer state and loader"
        )

    # ---------------------------------------------------------------------------------- train
    def train(self) -> None:
        """The loop: each step asks the clock, the stop rule, the flags, the loss log and the
        checkpointer whether they are due. The step itself never waits for the device."""
        t, rt = self.job.train, self.rt
        cap_ms = self._cap_ms()
        cuda = rt.device.type == "cuda"
        clock = TrainClock(rt.sync, time.perf_counter)
        # On CUDA the host times a step while it is still queued; a vote through the lagged
        # all-reduce lands one step later still.
        stop = StopRule(
            t.iterations, cap_ms, in_flight=int(cuda), lookahead=2 if rt.distributed and cuda else 1
        )
        flags = StepFlags(rt.device, rt.distributed)
        times, losses = StepTimes(cuda), LossLog(t.log_every, t.iterations)
        self.ckpt = self._checkpointer()
        step = self._resume(clock, stop, times, losses)  # a killed run continues where it left off
        clock.start()
        times.start()
        looped = 0  # steps run in the deeper graph variant (depth recurrence on): their FLOPs differ
        while True:
            last = stop.is_last(step)
            if last or (t.val_every > 0 and step > 0 and step % t.val_every == 0):
                with clock.paused():  # validation is off the clock
                    self._validate_in_training(step, clock.train_ms, last)
                if last:
                    break
            elapsed_ms = clock.elapsed_ms()
            note = self.model.on_progress(stop.progress(step, elapsed_ms))  # host-side switches; no sync
            if note:
                self.log(f"step:{step} {note}")
            loss = self._train_step(step, elapsed_ms, cap_ms)
            looped += self.model.looping  # a host-side flag: no sync
            step += 1
            # Host bookkeeping. On CUDA, wait only for the *previous* step (this one stays queued).
            self._act_on_flags(flags.previous(), step - 1, stop)
            done_ms = clock.elapsed_ms()
            self._act_on_flags(
                flags.send(stop.vote(step, done_ms), loss, self.ckpt.time_due(done_ms)), step, stop
            )
            times.mark(done_ms)
            if losses.due(step):
                self._log_train_loss(step, losses.read(step, loss, rt.world_size), done_ms, cap_ms)
            # Every input to this decision is identical on all ranks (the time vote came in the flags).
            if self.ckpt.enabled and step < t.iterations and not stop.stopping and self.ckpt.due(step):
                self._save_checkpoint(step, clock, stop, times, losses)
            self.ckpt.fault_point(step)
        self.log.end_bar()
        self._record_training(step, clock.train_ms, stop, times, losses, looped)

    def _checkpointer(self) -> Checkpointer | NoCheckpoints:
        """Built once priming is undone: it is given the parts it saves (the loader is the new one).
        A run that neither saves nor has a checkpoint folder to resume from gets `NoCheckpoints`, and
        never imports (so never ships) the checkpoint module."""
        rt = self.rt
        if not needs_checkpointer(self.job.checkpoint, self.job_dir):
            return NoCheckpoints()
        from pgolf.checkpoint import Checkpointer, training_parts

        parts = training_parts(self.model, self.opt, self.loader, rt.device)
        fingerprint = self.result.config_hash_with_seed  # a checkpoint only resumes its own job
        return Checkpointer(
            self.job.checkpoint,
            self.job_dir,
            rt.rank,
            rt.world_size,
            fingerprint,
            parts=parts,
            device=rt.device,
        )

    def _cap_ms(self) -> float | None:
        """The training clock's cap under budget.mode=wallclock: budget.train_seconds less the
        quantization reserve (raised by the calibration probe where it measured more)."""
        b = self.job.budget
        if b.mode != "wallclock":
            return None
        return 1000.0 * (
            b.train_seconds - self.calibration_plan.get("reserve_seconds", b.quant_reserve_seconds)
        )

    def _resume(self, clock: TrainClock, stop: StopRule, times: StepTimes, losses: LossLog) -> int:
        """Load the latest checkpoint, if any, into the parts and the loop's counters; the first step."""
        resumed = self.ckpt.restore()
        if resumed is None:
            return 0
        step, clock.train_ms, stop.stop_after = resumed["step"], resumed["train_ms"], resumed["stop_after"]
        losses.values, times.host_ms = list(resumed["losses"]), list(resumed["step_host_ms"])
        self.result.resumed_from_step = step
        self.log(
            f"resumed from the checkpoint at step {step} ({clock.train_ms / 1000:.1f}s of training done)"
        )
        return step

    def _validate_in_training(self, step: int, train_ms: float, last: bool) -> None:
        if last:  # EMA/SWA weights go in now: they are what pre_quant and the artifact see
            note = self.opt.finish()
            if note:
                self.log(note)
        res = self._validate()
        self.log(
            f"step:{step}/{self.job.train.iterations} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
            f"train_time:{train_ms:.0f}ms"
        )
        self.history(step, val_loss=res.val_loss, val_bpb=res.val_bpb)
        if last:
            self.result.metrics = {"pre_quant": vars(res)}

    def _act_on_flags(self, flags: list[float] | None, step: int, stop: StopRule) -> None:
        """The all-reduced flags of `step` (None: not arrived yet): stop, fail or checkpoint."""
        if flags is None:
            return
        stop_vote, nonfinite, checkpoint_due = flags
        self.ckpt.vote(bool(checkpoint_due), step)
        if nonfinite:
            raise TrainingError(
                f"train loss became NaN/inf at step {step}; lower the learning rates "
                "(optimizer.*_lr), set optimizer.grad_clip_norm, or check the data"
            )
        stop.agree(bool(stop_vote), step)

    def _log_train_loss(self, step: int, value: float, done_ms: float, cap_ms: float | None) -> None:
        iterations = self.job.train.iterations
        ms = done_ms / max(step - 1, 1)
        self.log(
            f"step:{step}/{iterations} train_loss:{value:.4f} train_time:{done_ms:.0f}ms step_avg:{ms:.2f}ms"
        )
        eta = (iterations - step) * ms / 1000.0 if cap_ms is None else max(cap_ms - done_ms, 0) / 1000.0
        self.log.progress(step, iterations, value, ms, eta)
        self.history(step, train_loss=value, lr_scale=self.opt.last_lr_scale)
        if not math.isfinite(value):
            raise TrainingError(
                f"train loss is {value} at step {step}; lower the learning rates (optimizer.*_lr), "
                "set optimizer.grad_clip_norm, or check the data"
            )

    def _save_checkpoint(
        self, step: int, clock: TrainClock, stop: StopRule, times: StepTimes, losses: LossLog
    ) -> None:
        with clock.paused() as paused_at:  # the clock pauses while saving
            train_state = {"step": step, "train_ms": clock.train_ms, "stop_after": stop.stop_after}
            self.ckpt.save({**train_state, "losses": losses.values, "step_host_ms": times.host_ms})
        self.log.debug(f"step:{step} checkpoint saved in {clock.now() - paused_at:.1f}s (off the clock)")

    def _record_training(
        self, steps: int, train_ms: float, stop: StopRule, times: StepTimes, losses: LossLog, looped: int = 0
    ) -> None:
        rt, r = self.rt, self.result
        peak = torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" else 0
        r.steps, r.train_ms, r.ms_per_step = steps, train_ms, times.median_ms()
        r.ms_per_step_mean, r.train_losses = train_ms / max(steps, 1), losses.values
        r.peak_memory_bytes, r.stopped_by = peak, stop.stopped_by(steps)
        r.optimizer = self.opt.report()  # late-QAT start, averaging, optional optimizer timing
        self.log(
            f"trained {steps} steps in {train_ms / 1000:.1f}s, median {r.ms_per_step:.2f}ms/step, "
            f"peak memory {peak / 2**20:.0f} MiB"
        )
        # steps run in this process (a resumed run's earlier steps are in train_ms but not here)
        ran = steps - (r.resumed_from_step or 0)
        if ran > 0:
            t = self.job.train
            flops = {lp: train_flops_per_token(self.job.model, t.seq_len, lp) for lp in (False, True)}
            peak_tflops = self.job.hardware.peak_tflops
            ran_ms = r.ms_per_step_mean * ran  # the clock's share of the steps counted here
            r.throughput = throughput(
                t.batch_tokens, ran, ran_ms, r.ms_per_step, flops, looped, peak_tflops, rt.world_size
            )
            self.log(log_line(r.throughput))

    def _val_batch_seqs(self) -> int:
        t = self.job.train
        return max(1, t.val_batch_tokens // (self.rt.world_size * self.grad_accum * self.val_len))

    def _validate(self, label: str = "val") -> EvalResult:
        batch_seqs = self._val_batch_seqs()
        self.model.eval()
        res = evaluate(
            self._nll_for(batch_seqs * self.val_len),
            self.val_tokens,
            self.val_len,
            batch_seqs,
            self.lut,
            self.rt.device,
            self.rt.amp_dtype,
            self.rt.rank,
            self.rt.world_size,
            self.log,
            label,
            packed=self.job.eval.nonoverlap_packed,
        )
        self.model.train()
        return res

    @torch.inference_mode()
    def _prime_eval(self) -> None:
        """Compile the eval graph on random tokens: validation data is never touched before scoring."""
        rt, n, L = self.rt, self._val_batch_seqs(), self.val_len
        shape = (1, n * L + 1) if self.job.eval.nonoverlap_packed else (n, L + 1)  # as _validate's rows
        x = torch.randint(0, self.job.model.vocab_size, shape, device=rt.device)
        self.model.eval()
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype != torch.float32):
            self.eval_nll(x[:, :-1].contiguous(), x[:, 1:].contiguous())
        self.model.train()

    def _nll_for(self, batch_tokens: int):
        # Full batches (of batch_tokens inputs) use the compiled graph; a ragged last batch runs
        # eagerly instead of compiling a second graph for one call.
        def nll(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (self.eval_nll if x.numel() == batch_tokens else self.model.token_nll)(x, y)

        return nll

    # ------------------------------------------------------------------------------- artifact
    def write_artifact(self) -> Path:
        """Quantize + compress on rank 0, write the blob and the code wrapper, enforce the cap."""
        out = self.job_dir / "artifact"
        blob_path = out / "final_model.ptz"
        cap = self.job.budget.artifact_bytes
        refusal = ""
        if self.quant.needs_calibration:
            self.calibrate()
        if self.rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            # Code first: a quant that prunes to fit (quant.prune_to_fit) aims at the bytes left.
            code_bytes, code_raw = write_code(out / "train_gpt.py", to_dict(self.job))
            # A banked model exports its banks as per-layer 2-D matrices under the canonical names.
            blob = self.quant.export(self.model.export_state_dict(), model_budget=cap - code_bytes)
            tmp = blob_path.with_name(blob_path.name + ".tmp")
            write_text_atomic(tmp, blob)  # a full disk: one clear error and no partial file
            model_bytes = tmp.stat().st_size  # measured from the files that would ship
            total = model_bytes + code_bytes
            self.result.bytes = ByteCounts(model_bytes, code_bytes, code_raw, total, cap, total <= cap)
            self.log(f"artifact: model {model_bytes:,} + code {code_bytes:,} = {total:,} bytes (cap {cap:,})")
            stats = self.quant.stats  # per-group bits/error, seconds, bytes
            prune = stats.get("prune")
            if prune:
                self.log(
                    f"quant: pruned {prune['pruned']:,} of {prune['candidates']:,} +-1 codes "
                    f"({prune['bytes_before']:,} -> {prune['bytes_after']:,} bytes, {prune['compressions']} "
                    f"compressions, {prune['seconds']:.1f}s){'' if prune['fits'] else ': cannot fit'}"
                )
            if stats:
                self.result.quant = stats
            if total > cap:
                tmp.unlink()  # never leave an over-cap model where a submission would pick it up
                refusal = (
                    f"artifact is {total:,} bytes (model {model_bytes:,} + code {code_bytes:,}), over the "
                    f"budget.artifact_bytes cap of {cap:,} by {total - cap:,}; shrink the model or use a "
                    "stronger quant= scheme"
                )
            else:
                tmp.replace(blob_path)
                # What ships, hashed as written: `pgolf.check` and `pgolf.pack` re-hash the files.
                self.result.files = {
                    f.relative_to(self.job_dir).as_posix(): {
                        "bytes": f.stat().st_size,
                        "sha256": sha256_file(f),
                    }
                    for f in (out / "train_gpt.py", blob_path)
                }
        if self.rt.distributed:  # every rank learns rank 0's verdict before anyone raises
            flag = torch.tensor([1.0 if refusal else 0.0], device=self.rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not refusal:
                refusal = "rank 0 refused the artifact (over budget.artifact_bytes); see its log"
        if refusal:
            raise ArtifactTooLarge(refusal)
        return blob_path

    def _calibration_batches(self) -> int:
        """Batches this rank calibrates on: training micro-batches, or batches of sampled sequences."""
        cal, ws = self.job.quant.calibration, self.rt.world_size
        if cal.source == "self":
            return math.ceil(math.ceil(cal.self_seqs / ws) / cal.self_batch)
        return math.ceil(cal.batches / ws)

    def _calibration_stream(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's calibration batches: the training loader's next n micro-batches, or its share
        of the record's shuffled batches (quant.calibration.source=shuffled); read lazily."""
        t, cal, rt = self.job.train, self.job.quant.calibration, self.rt
        if cal.source != "shuffled":
            return (self.loader.next_batch(t.batch_tokens, t.seq_len, self.grad_accum) for _ in range(n))
        from pgolf.data.shuffled import record_batches  # imported (and shipped) only by runs that use it

        local = t.batch_tokens // (rt.world_size * self.grad_accum)  # a training micro-batch's tokens
        L = cal.shuffled_seq_len or t.seq_len
        windows = record_batches(
            self.data.train_files, rt.world_size, cal.batches, local, L, rt.rank, rt.world_size
        )
        return (to_xy(torch.from_numpy(w.view(np.int16)).to(rt.device), L) for w in windows)

    def calibrate(self, max_batches: int | None = None, probe: bool = False) -> dict:
        """GPTQ Hessians from training batches the run has not trained on (the loader continues its
        stream), from the record's shuffled batches (quant.calibration.source=shuffled) or from the
        model's own samples (source=self); every rank takes its share and the sums are all-reduced.
        Under budget.mode=wallclock no batch starts that would end past budget.train_seconds
        (training time included): a slower calibration than the probe measured uses fewer batches
        instead of breaking the limit."""
        b, cal = self.job.budget, self.job.quant.calibration
        n = self._calibration_batches()
        batches = self._calibration_stream(n)
        reduce = (lambda h: dist.all_reduce(h, op=dist.ReduceOp.SUM)) if self.rt.distributed else None
        plan = self.calibration_plan
        deadline = None
        if not probe and b.mode == "wallclock":
            left = b.train_seconds - self.result.train_ms / 1000.0
            # the part after the last batch (all-reduce, bookkeeping) must fit too
            deadline = time.perf_counter() + left - CALIBRATION_MARGIN * plan.get("fixed_seconds", 0.0)
        t0 = time.perf_counter()
        # quant.calibration.doc_mask=false: attention across documents, as PR #1775 calibrates
        with self.model.doc_unmasked() if not cal.doc_mask else nullcontext():
            info = self.quant.calibrate(
                self.model, batches, self.rt.amp_dtype if cal.autocast else None, reduce, seed=self.job.seed + self.rt.rank,
                world_size=self.rt.world_size, deadline=deadline, batch_seconds=plan.get("batch_seconds", 0.0),
                max_batches=max_batches, sync=self.rt.sync,
            )  # fmt: skip
        self.rt.sync()
        info["seconds"] = time.perf_counter() - t0
        if probe:
            self.quant.reset_calibration()
            return info
        self.result.calibration_seconds = info["seconds"]
        self.result.calibration = {
            "batches": info["batches"],
            "planned": n,
            "cut_by_deadline": info["cut_by_deadline"],
            "seconds": info["seconds"],
        }
        self.log(
            f"calibration: {info['hessians']} Hessians from {info['batches']} batches/rank in {info['seconds']:.1f}s"
            + (f" (unseen, round-to-nearest: {info['unseen']})" if info["unseen"] else "")
        )
        if info["cut_by_deadline"]:
            self.log(
                f"calibration: stopped after {info['batches']} of {n} batches, the most that fit the "
                f"{b.train_seconds:g}s of budget.train_seconds left after {self.result.train_ms / 1000:.1f}s "
                "of training; raise budget.quant_reserve_seconds or lower quant.calibration.batches"
            )
        return info

    def probe_calibration(self) -> None:
        """Time calibration on a few batches before the clock starts and take what the full
        calibration will need off the training clock: budget.quant_reserve_seconds is a floor, the
        measurement (with CALIBRATION_MARGIN) raises it. Every rank takes the largest reserve."""
        b, n = self.job.budget, self._calibration_batches()
        # Calibration runs after the last step, in the graph variant training ends in (a recurrent
        # model's layer loop on: more layer passes a batch), so that is the variant to time.
        self.model.on_progress(1.0)
        try:
            info = self.calibrate(max_batches=min(PROBE_BATCHES, n), probe=True)
        finally:
            self.model.on_progress(0.0)
        times = info["batch_seconds"]
        per_batch = max(times[1:] or times or [0.0])
        fixed = max(info["seconds"] - sum(times), 0.0)
        estimate = fixed + n * per_batch
        reserve = max(b.quant_reserve_seconds, CALIBRATION_MARGIN * estimate)
        if self.rt.distributed:  # the training clock's cap (and model switches on it) must agree
            r = torch.tensor([reserve], dtype=torch.float64, device=self.rt.device)
            dist.all_reduce(r, op=dist.ReduceOp.MAX)
            reserve = float(r.item())
        self.calibration_plan = {
            "probe_batches": len(times),
            "batch_seconds": per_batch,
            "fixed_seconds": fixed,
            "estimate_seconds": estimate,
            "reserve_seconds": reserve,
            "configured_reserve_seconds": b.quant_reserve_seconds,
        }
        self.result.calibration_plan = self.calibration_plan
        raised = "" if reserve == b.quant_reserve_seconds else f", raised from {b.quant_reserve_seconds:g}s"
        self.log(
            f"calibration probe: {per_batch:.2f}s/batch x {n} batches + {fixed:.2f}s = {estimate:.1f}s; "
            f"reserving {reserve:.1f}s of budget.train_seconds{raised}"
        )
        if reserve >= b.train_seconds:
            raise TrainingError(
                f"GPTQ calibration needs ~{estimate:.1f}s ({n} batches), which leaves no training time in "
                f"budget.train_seconds={b.train_seconds:g}; lower quant.calibration.batches"
            )

    # ----------------------------------------------------------------------------------- eval
    def artifact_to_score(self, where: str) -> Path:
        """score_artifact=: the blob of an earlier run (its job folder or the blob itself), its bytes
        counted from the files as a run counts its own, and the eval graph compiled off the clock."""
        path = Path(where)
        blob_path = path / "artifact" / "final_model.ptz" if path.is_dir() else path
        if not blob_path.is_file():
            raise TrainingError(
                f"score_artifact={where}: no artifact at {blob_path}; pass a finished run's job folder "
                "or its artifact/final_model.ptz"
            )
        try:  # checked now, before any compile: eval_artifact loads it again into the NaN-filled model
            self.model.load_export_state_dict(self.quant.load(blob_path.read_bytes()))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(
                f"score_artifact={where}: {blob_path} does not load into this config's model={self.job.model.name} "
                f"/ quant={self.job.quant.name} ({first}); score it under the model and quant settings of the "
                f"run that wrote it (its config.json: {blob_path.parent.parent / 'config.json'})"
            ) from e
        model_bytes = blob_path.stat().st_size
        code = blob_path.with_name("train_gpt.py")
        code_bytes = code.stat().st_size if code.is_file() else 0
        cap = self.job.budget.artifact_bytes
        total = model_bytes + code_bytes
        self.result.bytes = ByteCounts(model_bytes, code_bytes, None, total, cap, total <= cap)
        self.result.metrics = {}  # no pre_quant score: the eval modes and TTT fill it
        self.result.scored_artifact = {
            "path": str(blob_path.resolve()),
            "bytes": model_bytes,
            "sha256": sha256_file(blob_path),
        }
        self.log(
            f"score_artifact: {blob_path} (model {model_bytes:,} + code {code_bytes:,} bytes); no training"
        )
        # A trained model ends in its last graph variant (a recurrent model's loop on), and is scored so.
        self.model.on_progress(1.0)
        if "nonoverlap" in self.job.eval.modes:  # compiled during priming in a run that trains
            self._prime_eval()
        return blob_path

    def eval_artifact(self, blob_path: Path) -> ModeResult:
        """Score what ships: decompress the file on disk into a fresh model, then run eval.modes."""
        state = self.quant.load(blob_path.read_bytes())
        # strict=True overwrites every parameter, and the model holds no other state (RoPE tables
        # are recomputed per call), so this is a fresh model holding only the artifact's weights;
        # loading in place keeps the already-compiled eval graph.
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))  # anything the artifact failed to restore would poison the score
        self.model.load_export_state_dict(state)  # strict; re-stacks the banks from the per-layer matrices
        final: ModeResult | None = None
        for mode in self.job.eval.modes:
            if mode == "nonoverlap":
                self.rt.sync()
                t0 = time.perf_counter()
                final = from_eval_result(self._validate("eval:nonoverlap"), time.perf_counter() - t0)
            else:
                self.model.eval()
                final = evaluate_sliding(
                    self._scorer(), self.rt.rank, self.rt.world_size, self.rt.sync, self.log
                )
                self.model.train()
            self._record_mode(mode, final, windowed=mode == "sliding")
        assert final is not None  # eval.modes is validated non-empty
        return final

    def _record_mode(self, mode: str, res: ModeResult, windowed: bool = False) -> None:
        # vars(): the result's own __dict__, so `roundtrip` (the same object) shows its window_rule too
        self.result.metrics[mode] = vars(res)
        if windowed:  # which sliding-window rule scored it (eval.window_rule): exact or legacy
            self.result.metrics[mode]["window_rule"] = self.job.eval.window_rule
        self.result.final_mode = mode
        self.result.final_window_rule = self.job.eval.window_rule if windowed else None
        self.log(
            f"eval:{mode} val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f} tokens:{res.tokens} "
            f"time:{res.seconds:.2f}s tokens_per_s:{res.tokens_per_s:,.0f}"
        )

    def _scorer(self) -> WindowScorer:
        """The sliding-window scorer (built once: it holds the val stream on the device and its graph)."""
        if self._window_scorer is None:
            e, rt = self.job.eval, self.rt
            L = e.window(self.job.train.seq_len)
            stream = self.val_tokens if L == self.val_len else self.data.val_tokens(L)
            self._window_scorer = WindowScorer(
                self.model.token_nll,
                stream,
                L,
                e.stride,
                e.batch_seqs,
                self.lut,
                rt.device,
                rt.amp_dtype,
                compile=rt.compile,
                rule=e.window_rule,
            )
        return self._window_scorer

    def warm_eval(self) -> None:
        """Compile the eval graphs on random tokens before the eval clock starts."""
        if self.rt.compile:
            self.log("eval warm-up: compiling the eval graphs on random tokens (off the eval clock)")
        if self.rt.eval_cudnn_attention:
            # The graphs traced from here on (eval) put cuDNN first; the training graphs keep the
            # flash kernel. Dynamo guards on the choice, so the nonoverlap graph compiled during
            # training would recompile on the eval clock: it is compiled again here, off the clock.
            attention.set_sdpa_backends(["cudnn", "flash", "efficient", "math"])
            if "nonoverlap" in self.job.eval.modes:
                self._prime_eval()
        if "sliding" in self.job.eval.modes or self.ttt.enabled:
            self.model.eval()
            if self.ttt.enabled:
                self.ttt.warmup(
                    self.model,
                    self._scorer(),
                    self.compiled_model,
                    self.job.model.vocab_size,
                    self.rt.world_size,
                )
            if "sliding" in self.job.eval.modes:  # lora/phased do not use the window graph themselves
                self._scorer().warmup()
            self.model.train()

    def run_ttt(self) -> ModeResult:
        # TTT modes that can stop updating early read the deadline; a steps run has no eval clock
        deadline = self.eval_deadline if self.job.budget.mode == "wallclock" else None
        res = self.ttt.run(
            self.model,
            self._scorer(),
            self.compiled_model,
            self.rt.rank,
            self.rt.world_size,
            self.log,
            self.rt.sync,
            deadline=deadline,
        )
        self._record_mode(self.job.ttt.name, res, windowed=self.job.ttt.name == "score_first")
        if self.ttt.stopped_at is not None:  # the eval clock ran short: later chunks had no updates
            self.result.ttt_updates_stopped_at_chunk = self.ttt.stopped_at
        return res

    def enforce_rules(self) -> None:
        """Record the rules verdict; a run that is not a legal submission fails (status failed,
        exit 1, nothing to pack). A diverged score, an incomplete val split or an illegal TTT mode
        always fail; the time limits fail a budget.mode=wallclock run (a steps run has no clock
        to hold, so its verdict only records them). A score under eval.window_rule=legacy is only
        recorded too: such a run compares with the pre-fix records on purpose, so it finishes, and
        its verdict (pass false) keeps it from pgolf.pack. The decision is taken on every rank together."""
        final_mode = self.result.final_mode
        L = self.val_len if final_mode == "nonoverlap" else self.job.eval.window(self.job.train.seq_len)
        self.result.val = {  # what pgolf.check re-reads: the split's shards and the tokenizer
            "dir": str(self.data.val_files[0].parent.resolve()),
            "files": [f.name for f in self.data.val_files],
            "tokens_total": self.data.val_tokens_total,
            "seq_len": L,
            "tokenizer": str(Path(self.data.tokenizer_path).resolve()),
            "tokenizer_sha256": sha256_file(self.data.tokenizer_path),
        }
        rules = verdict(self.result.to_json(), to_dict(self.job))
        if self.job.score_artifact:
            rules = not_trained_here(rules, self.result.scored_artifact["path"])
        self.result.rules = rules
        c = rules["checks"]
        self.result.limits = {k: c[k] for k in ("artifact_bytes", "eval_seconds", "train_seconds")}
        enforced = ["val_bpb", "val_split", "ttt"]
        if self.job.budget.mode == "wallclock":
            enforced += ["train_seconds", "eval_seconds"]
        broken = [k for k in enforced if not c[k]["held"]]
        flag = torch.tensor([float(bool(broken))], device=self.rt.device)
        if self.rt.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            why = rules["reason"] if broken else "another rank found a broken rule; see its log"
            raise RulesBroken(f"not a legal submission: {why}")
        if not rules["pass"]:
            self.log(f"rules: not a legal submission (recorded; the run finishes): {rules['reason']}")

    def write_result(self) -> None:
        if self.rt.is_main:
            self.result.write(self.job_dir / "result.json")
            if self.result.status == "ok" and self.ckpt is not None:
                self.ckpt.discard()

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()  # stops the prefetch thread; also on failure
        self.history.close()
        self.log.close()
