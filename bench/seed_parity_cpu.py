"""A seed PR's script against `experiment=prNNN` on the CPU, piece by piece (no GPU, minutes).

    python bench/seed_parity_cpu.py pr399 [--steps 3] [--loader-steps 60]
    SP8192_DATA=/tmp/pgolf_bench/sp8192 python bench/seed_parity_cpu.py pr1775 [--steps 3]
    python bench/seed_parity_cpu.py pr1532 [--steps 3] [--loader-steps 20]
    SP8192_DATA=... python bench/seed_parity_cpu.py pr1775 --steps 1 --prime-steps 2  (priming, minutes)

1. init: the script's model (built by the lines of its own main(), seed 1337) and pgolf's, parameter
   by parameter (names, dtypes, values), and which optimizer / lr / WD each parameter gets;
2. forward + backward in fp32 on the same random weights and tokens: relative gradient difference;
3. optimizer: `--steps` steps where pgolf's parameters get the script model's exact gradients; the
   script's own step (lr_mul, momentum warmup, clip, its optimizers) against pgolf's bundle;
4. (--loader-steps) PR #726's coprime loader: the token windows of each micro-batch, from both
   loaders, over shards under /tmp/pgolf_bench/sp1024 (bench/seeds.sh's $DATA); PR #1532's
   threaded ShuffledSequenceLoader over a few synthetic shards, against pgolf's prefetching
   shuffled loader with the script's RNG key (its rank) and with pgolf's (seed, rank);
5. (--prime-steps K, pr1775) priming: from the equal init, the script's own warm-up (its
   train_model lines, executed: one micro-batch for the cu_seqlens-bucket compile warm-up, K steps
   with the loop off and K with it on, then the restore and a new loader) under a one-process gloo
   group, so its Parallel Muon takes the sharded path torchrun takes, against pgolf's
   Trainer.prime (train.prime_steps=K, prime_skip_batches=1, keep_primed_momentum), over the same
   synthetic document shards with tiny micro-batches: the micro-batches each side draws, the Muon
   momentum after priming (the script's `shard_mom`), the restored weights, and the first real step.

At seq 128 the scripts' RoPE tables are bf16 (their cast buffer, used up to 1024 positions), so
pgolf runs with model.rope_table_dtype=bfloat16 here; at the bench's 2048 both are fp32.
Needs .refs/<pr>/train_gpt.py (as published: #1532's lzma/base85 wrapper is decoded on import) and
an importable `flash_attn_interface` (an SDPA stand-in is made).
"""

from __future__ import annotations

import argparse
import inspect
import os
import shlex
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DATA = "/tmp/pgolf_bench/sp1024"
SP8192_DATA = os.environ.get("SP8192_DATA", "/tmp/pgolf_bench/sp8192")  # bench/sp8192_prep.sh's OUT
SP8192 = ("pr1532", "pr1775")  # the sp8192 seeds: GPT(h) and Optimizers(h, model), no main() lines
REFS = Path(os.environ.get("REFS", REPO / ".refs"))  # the scripts, .refs/<pr>/train_gpt.py
SHIM = """import torch
import torch.nn.functional as F
def flash_attn_func(q, k, v, causal=True, softmax_scale=None, **_):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                       enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           softmax_scale=None, **_):
    cu = cu_seqlens_q.tolist()
    outs = [flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
            for a, b in zip(cu[:-1], cu[1:]) if b > a]
    return torch.cat(outs)
"""


def script_env(pr: str) -> dict[str, str]:
    """The run command's environment (bench/seeds.sh's ref_env) plus the bench's step settings."""
    cmd = f"source <(sed -n '/^ref_env()/,/^}}/p' {REPO}/bench/seeds.sh); ref_env {pr}"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout
    env = dict(kv.split("=", 1) for kv in shlex.split(out))
    env.update(ITERATIONS="150", WARMDOWN_ITERS="100", MAX_WALLCLOCK_SECONDS="0", DATA_PATH=DATA)
    if pr in SP8192:  # the scripts' DATA_DIR layout (bench/sp8192_prep.sh) and a warmdown fraction
        env.update(DATA_DIR=SP8192_DATA, WARMDOWN_FRAC=str(100 / 150))
    return env


def load_script(pr: str, extra_env: dict[str, str] | None = None):
    shim = Path(tempfile.mkdtemp()) / "flash_attn_interface.py"
    shim.write_text(SHIM)
    sys.path.insert(0, str(shim.parent))
    os.environ.update(script_env(pr))  # its Hyperparameters read the environment (once, at import)
    os.environ.update(extra_env or {})
    sys.path.insert(0, str(REPO / "bench"))
    from r0409_init import load_record

    return load_record(REFS / pr / "train_gpt.py", f"script_{pr}")


def build_script(module) -> dict:
    """Run main()'s own lines from `base_model = GPT(` to the parameter count: model + optimizers."""
    lines = inspect.getsource(module.main).splitlines()
    start = next(i for i, line in enumerate(lines) if "base_model = GPT(" in line)
    end = next(i for i, line in enumerate(lines) if "n_params = sum(" in line)
    body = "\n".join(line[4:] for line in lines[start:end])
    body = body.replace("torch.compile(", "(lambda f, **_: f)(").replace("fused=True", "foreach=False")
    ns = dict(vars(module))
    ns.update(args=module.Hyperparameters(), device=torch.device("cpu"), distributed=False, local_rank=0)
    ns.update(rank=0, world_size=1, log0=lambda *a, **k: None, master_process=True)
    torch.manual_seed(1337)
    exec(body, ns)
    return ns


def build_script_sp8192(module) -> dict:
    """The sp8192 scripts' train_model() lines (#1532, #1775): GPT(h) seeded and cast as the script
    does it, then its Optimizers."""
    from r0409_init import record_init

    h = module.Hyperparameters()
    base_model = record_init(module)  # train_and_eval seeds, then train_model builds the model first
    for block in base_model.blocks:
        if hasattr(block.mlp, "use_fused"):  # #1775's fused Triton MLP needs CUDA; the plain path is the same
            block.mlp.use_fused = False
    opts = module.Optimizers(h, base_model)
    for opt in opts:  # fused=True AdamW: pgolf's on CUDA, foreach on the CPU (last-bit differences)
        if isinstance(opt, torch.optim.AdamW):
            for group in opt.param_groups:
                group.update(fused=False, foreach=True)
    return dict(
        base_model=base_model,
        optimizers=list(opts),
        optimizer_muon=opts.optimizer_muon,
        args=h,
        optimizers_obj=opts,
    )


def script_lr_scale(pr: str, args, step: int) -> float:
    """The script's lr multiplier at `step` of an iteration-budget run (no wallclock cap)."""
    if pr in SP8192:  # fraction warmdown: frac = step / iterations
        frac = step / max(args.iterations, 1)
        if args.warmdown_frac > 0 and frac >= 1.0 - args.warmdown_frac:
            return max((1.0 - frac) / args.warmdown_frac, args.min_lr)
        return 1.0
    start = max(args.iterations - args.warmdown_iters, 0)
    return (args.iterations - step) / args.warmdown_iters if start <= step < args.iterations else 1.0


# The scripts that call their Newton-Schulz one matrix at a time. Their experiments batch it (it
# trains the same and is faster, docs/benchmarks.md §9g), which rounds differently; the audit checks
# the arithmetic, so it runs pgolf's NS one matrix at a time for these.
SCRIPT_NS_PER_MATRIX = ("pr339", "pr1532")


def pgolf_job(pr: str, extra: list[str] | None = None):
    from pgolf.config import job_config_from_dict
    from pgolf.parent.compose import compose_dict

    # The scripts' NS runs ATen's bf16 GEMM on this CPU; pgolf's CPU default (fp32 products rounded
    # to bf16) rounds 1 element in ~20,000 the other way, which the next steps amplify.
    overrides = [
        f"experiment={pr}",
        "data=shards",
        "data.tokenizer_path=/x.model",
        "optimizer.ns_cpu_fp32=false",
    ]
    if pr in SCRIPT_NS_PER_MATRIX:
        overrides += ["optimizer.ns_batch=false"]
    overrides += ["budget.mode=steps", "train.iterations=150", "hardware=cpu"]
    if pr in SP8192:
        overrides += [f"data.path={SP8192_DATA}/datasets/fineweb10B_sp8192", "data.vocab_size=8192"]
        overrides += [f"optimizer.warmdown_frac={100 / 150}"]
    else:
        overrides += [f"data.path={DATA}", "data.vocab_size=1024"]
        overrides += ["optimizer.warmdown_iters=100", "model.rope_table_dtype=bfloat16"]
    return job_config_from_dict(compose_dict(overrides + list(extra or [])))


# The scripts that compile their Newton-Schulz (#339 in main(), #1532 and #1775 with @torch.compile): on the
# CPU, inductor's fused bf16 NS differs from the eager one by several percent, so pgolf compiles
# its NS for these too (as its presets do: optimizer.ns_compile) and runs it eagerly for the rest.
SCRIPT_COMPILES_NS = ("pr339", "pr1532", "pr1775")


def build_pgolf(job, compile_ns: bool = False):
    from pgolf.components import MODELS, OPTIMIZERS
    from pgolf.models.layers import restore_fp32_params

    torch.manual_seed(1337)
    model = MODELS.build(job.model).bfloat16()
    restore_fp32_params(model)
    opt = OPTIMIZERS.build(job.optimizer, model=model, device=torch.device("cpu"), compile_ns=compile_ns)
    return model, opt


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference; a NaN on either side is infinitely far (max() over tuples would
    otherwise pass a NaN over, since every comparison with it is False)."""
    r = ((a.float() - b.float()).norm() / (a.float().norm() + 1e-30)).item()
    return float("inf") if r != r else r


def compare_init(ns: dict, model) -> None:
    ref, ours = dict(ns["base_model"].named_parameters()), dict(model.named_parameters())
    print(
        f"params: script {sum(p.numel() for p in ref.values()):,} pgolf {sum(p.numel() for p in ours.values()):,}"
    )
    print("names only on one side:", sorted(set(ref) ^ set(ours)))
    print("dtypes differ:", [n for n in ref if n in ours and ref[n].dtype != ours[n].dtype])
    print("init values differ:", [n for n in ref if n in ours and not torch.equal(ref[n], ours[n])][:8])
    roles = {id(p): role for role, ps in model.param_groups().items() for _, p in ps}
    names = {id(p): n for n, p in ref.items()}
    for opt in ns["optimizers"]:
        for g in opt.param_groups:
            got = sorted({roles[id(ours[names[id(p)]])] for p in g["params"]})
            print(
                f"script {type(opt).__name__} lr {g['lr']} wd {g.get('weight_decay')}: {len(g['params'])} params -> pgolf {got}"
            )


def random_batch(gen: torch.Generator, T: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    # ids from 2 up: no BOS (id 1), so a document-masked model attends over the whole row as the
    # script's forward without cu_seqlens does
    x = torch.randint(2, 1024, (2, T + 1), generator=gen)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def compare_steps(ns: dict, model, opt, job, steps: int, pr: str) -> None:
    ref, ours = dict(ns["base_model"].named_parameters()), dict(model.named_parameters())
    torch.manual_seed(5)
    with torch.no_grad():  # fp32, and random matrices so that zero-init projections pass gradients
        for n, p in ref.items():
            p.data = torch.randn_like(p.float()) * 0.02 if p.ndim >= 2 else p.data.float()
            ours[n].data = p.data.clone()
    gen = torch.Generator().manual_seed(0)
    ref_model, args = ns["base_model"], ns["args"]
    x, y = random_batch(gen)
    ref_model(x, y).backward()
    model(x, y).backward()
    print("fp32 grads, worst relative difference:", max(rel(ref[n].grad, ours[n].grad) for n in ref))
    for step in range(steps):
        for o in ns["optimizers"]:
            o.zero_grad(set_to_none=True)
        ref_model(*random_batch(gen)).backward()
        for n, p in ref.items():
            ours[n].grad = p.grad.detach().clone()
        scale = script_lr_scale(pr, args, step)
        frac = min(step / args.muon_momentum_warmup_steps, 1.0)
        for g in ns["optimizer_muon"].param_groups:
            g["momentum"] = (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
        for o in ns["optimizers"]:
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * scale
        before = {n: p.detach().clone() for n, p in ours.items()}
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), args.grad_clip_norm)
        for o in ns["optimizers"]:
            o.step()
        opt.step(step, 0.0, job.train.iterations, None)
        worst = max((rel(ref[n], ours[n]), n) for n in ref)
        print(f"step {step}: worst relative weight difference {worst[0]:.2e} ({worst[1]})")
        for role, ps in model.param_groups().items():  # this step's update (w - w_before), per group
            if not ps:
                continue
            d = [(rel(ref[n] - before[n], p - before[n]), n, torch.equal(ref[n], p)) for n, p in ps]
            print(role_line(role, d, "update difference"))


def compare_loader(module, job, steps: int) -> None:
    from pgolf.data.loader import build_loader

    files = sorted(Path(DATA).glob("fineweb_train_*.bin"))
    cpu = torch.device("cpu")
    ref = module.DistributedTokenLoader(module.Hyperparameters().train_files, 0, 1, cpu)
    ours = build_loader(job.data, files, seed=1337, rank=0, world_size=1, device=cpu)
    differ = 0
    for _ in range(steps * 8):
        (rx, ry), (px, py) = ref.next_batch(786432, 2048, 8), ours.next_batch(786432, 2048, 8)
        differ += not (torch.equal(rx.long(), px.long()) and torch.equal(ry.long(), py.long()))
    ours.close()
    print(f"loader: {differ} of {steps * 8} micro-batches differ")


def write_shards(folder: Path, sizes: list[int], doc_len: int = 0) -> list[Path]:
    """Shards of random tokens in the challenge's format (256 int32 header, uint16 tokens); with
    `doc_len`, a BOS (id 1) starts a document about every `doc_len` tokens (random places)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i, n in enumerate(sizes):
        header = np.zeros(256, dtype="<i4")
        header[:3] = (20240520, 1, n)
        files.append(folder / f"fineweb_train_{i:06d}.bin")
        tokens = rng.integers(0, 8192, n, dtype="<u2")
        if doc_len:
            tokens[tokens == 1] = 2  # BOS only where placed
            tokens[rng.choice(n, size=n // doc_len, replace=False)] = 1
        files[-1].write_bytes(header.tobytes() + tokens.tobytes())
    return files


def compare_loader_1532(module, job, steps: int) -> None:
    """#1532's ShuffledSequenceLoader (a producer thread, 100 batches queued) against pgolf's
    shuffled loader as experiment=pr1532 builds it (prefetch 100, one thread, `data.shuffled_seed=rank`:
    the script's RNG key), from the same shards; then with pgolf's default key, (seed, rank).
    Five shards of 150k-310k tokens hold about 8 micro-batches of 48 x 2048, so `steps` * 8
    micro-batches cross many redraws of every shard."""
    import dataclasses
    from types import SimpleNamespace

    from pgolf.data import shuffled

    files = write_shards(Path(tempfile.mkdtemp()) / "shards", [150_001, 310_000, 204_800, 260_017, 180_000])
    h = SimpleNamespace(world_size=1, rank=0, train_seq_len=2048, train_files=str(files[0].parent / "*.bin"))
    cpu, n = torch.device("cpu"), steps * 8
    ref = module.ShuffledSequenceLoader(h, cpu)  # reads TRAIN_BATCH_TOKENS (786,432) and WORLD_SIZE
    theirs = [ref.next_batch() for _ in range(n)]
    ref.stop()
    for label, key in (
        ("as experiment=pr1532 (data.shuffled_seed=rank)", "rank"),
        ("with (seed, rank)", "run"),
    ):
        cfg = dataclasses.replace(job.data, shuffled_seed=key)
        differ = 0
        with shuffled.build(cfg, files, seed=job.seed, rank=0, world_size=1, device=cpu) as ours:
            for rx, ry in theirs:
                px, py = ours.next_batch(786432, 2048, 8)
                differ += not (torch.equal(rx, px.long()) and torch.equal(ry, py.long()))
        print(f"loader, {label}: {differ} of {n} micro-batches differ")


# ------------------------------------------------------------------ 5. priming (--prime-steps, pr1775)
# One micro-batch of PRIME_TOKENS tokens (TRAIN_BATCH_TOKENS / 8 on one process), documents cut every
# PRIME_DOC_LEN (the script's TRAIN_SEQ_LEN, pgolf's model.doc_max_len), a BOS about every
# PRIME_DOC_SPACING tokens, so the document mask and its cuts both show up in every micro-batch.
PRIME_TOKENS = 256
PRIME_DOC_LEN = 128
PRIME_DOC_SPACING = 100


def prime_env(k: int) -> dict[str, str]:
    """The script's settings for the priming stage, read by its Hyperparameters at import: torchrun's
    RANK / WORLD_SIZE (h.distributed, which steps Parallel Muon's sharded path), K warm-up steps,
    tiny micro-batches."""
    return dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        WARMUP_STEPS=str(k),
        TRAIN_BATCH_TOKENS=str(8 * PRIME_TOKENS),
        TRAIN_SEQ_LEN=str(PRIME_DOC_LEN),
    )


def prime_shards(folder: Path, k: int) -> list[Path]:
    """Three shards that together hold a little more than both sides draw (1 + 2K steps of 8
    micro-batches, then one real step, plus the prefetched one), so the stream skips shard tails
    and moves to each next shard's first BOS, as a real run does at its shard ends."""
    need = (1 + 16 * k + 8 + 2) * (PRIME_TOKENS + 1)
    return write_shards(
        folder, [need * 5 // 12 + 37, need * 4 // 12 + 11, need * 5 // 12 + 101], PRIME_DOC_SPACING
    )


Drawn = tuple[str, torch.Tensor, torch.Tensor]  # (the function that asked for it, inputs, targets)


@contextmanager
def unpinned():
    """The script's loader pins its host batches for the copy to the GPU; with no GPU, pinning
    raises, and it changes no value, so it is a no-op while the script's loader runs here."""
    pin = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = pin


def gloo_world_of_one(folder: Path) -> None:
    """A one-process gloo group: under torchrun the script's Muon finds `dist.is_initialized()` and
    keeps its momentum in `shard_mom` (the sharded path, whose buffers its warm-up does not
    restore), even on one GPU. pgolf's Parallel Muon sees world size 1 either way."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{folder / 'pg'}", rank=0, world_size=1)


def script_warmup_source(module) -> str:
    """train_model's own lines from its first `train_loader = DocumentPackingLoader(h, device)` to
    the one that re-creates it at the end of the warm-up: the wallclock/lr helpers, step_fn, the
    cu_seqlens-bucket warm-up, the K + K warm-up steps and the restore. Executed as they are but
    for one token: autocast on the CPU (`device_type="cuda"` would be off here) as pgolf's side
    runs it (hardware.amp_dtype=bfloat16), so both compute in the same precision."""
    lines = inspect.getsource(module.train_model).splitlines()
    marks = [
        i for i, line in enumerate(lines) if line.strip() == "train_loader = DocumentPackingLoader(h, device)"
    ]
    if len(marks) != 2:
        raise RuntimeError(
            f"expected train_model to build its DocumentPackingLoader twice, found {len(marks)}"
        )
    body = "\n".join(line[4:] for line in lines[marks[0] : marks[1] + 1])
    if body.count('device_type="cuda"') != 2 or "cuda.synchronize" in body:
        raise RuntimeError("train_model's warm-up is not as this audit expects: read it again")
    return body.replace('device_type="cuda"', 'device_type="cpu"')


def bank_names(model) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def run_script_prime(module, files: list[Path]) -> dict:
    """The script's warm-up, its restore and its first training step, on its own objects."""
    built = build_script_sp8192(module)  # the seeded init and the Optimizers, as stage 1
    h, base, opts = built["args"], built["base_model"], built["optimizers_obj"]
    h.train_files = str(files[0].parent / "fineweb_train_*.bin")  # the synthetic shards for DATA_DIR's
    init = {n: t.detach().clone() for n, t in base.state_dict().items()}
    loaders: list = []

    class Recording(module.DocumentPackingLoader):
        """Its loader, recording the micro-batches handed out (each instance apart)."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.drawn: list[Drawn] = []
            loaders.append(self)

        def next_batch(self, *a, **k):
            out = super().next_batch(*a, **k)
            # the caller; train_model's own lines run here as exec'd top-level code
            caller = sys._getframe(1).f_code.co_name.replace("<module>", "train_model")
            self.drawn.append((caller, out[0].clone(), out[1].clone()))
            return out

    logged: list[str] = []
    ns = dict(vars(module))
    # model: its torch.compile(base_model), eager here (build_script does the same for main())
    ns.update(h=h, device=torch.device("cpu"), base_model=base, model=base, optimizers=opts)
    ns.update(DocumentPackingLoader=Recording, log=lambda msg, *a, **k: logged.append(msg))
    with unpinned():
        exec(script_warmup_source(module), ns)
        names = bank_names(base)
        out = dict(
            init=init,
            restored={n: t.detach().clone() for n, t in base.state_dict().items()},
            momentum={names[id(m["p"])]: m["shard_mom"].clone() for m in opts.optimizer_muon._bank_meta},
            sharded=opts.optimizer_muon._distributed,
            adam_state=sum(len(o.state) for o in opts if o is not opts.optimizer_muon),
            muon_state=len(opts.optimizer_muon.state),
            log=logged,
        )
        # its loop's first iteration: frac 0 keeps the loop off; lr_mul(frac) is the scale
        loss = ns["step_fn"](0, ns["lr_mul"](ns["training_frac"](0, 0.0)))
    out.update(
        loss=loss.item(),
        stepped={n: p.detach().clone() for n, p in base.named_parameters()},
        momentum_1={names[id(m["p"])]: m["shard_mom"].clone() for m in opts.optimizer_muon._bank_meta},
        warmup_batches=loaders[0].drawn,
        train_batches=loaders[1].drawn,
    )
    return out


class RecordingLoader:
    """pgolf's loader, recording the micro-batches handed out."""

    def __init__(self, inner):
        self.inner, self.drawn = inner, []

    def next_batch(self, *a, **k):
        x, y = self.inner.next_batch(*a, **k)
        self.drawn.append((sys._getframe(1).f_code.co_name, x.clone(), y.clone()))
        return x, y

    def close(self) -> None:
        self.inner.close()


def run_pgolf_prime(k: int, files: list[Path], folder: Path) -> dict:
    """pgolf's Trainer.prime and its first training step, on a Trainer given the audit's model,
    optimizer and shards instead of build() (which would want the real data and tokenizer)."""
    from types import SimpleNamespace

    import flash_attn_interface  # the audit's SDPA stand-in (load_script put it on the path)

    from pgolf.components import QUANT
    from pgolf.models import docmask
    from pgolf.trainer import Trainer

    job = pgolf_job(
        "pr1775",
        [
            f"train.prime_steps={k}",
            f"train.batch_tokens={8 * PRIME_TOKENS}",
            f"train.seq_len={PRIME_TOKENS}",  # doc_packing: one row per micro-batch, as the preset
            f"model.doc_max_len={PRIME_DOC_LEN}",
            "hardware.amp_dtype=bfloat16",
        ],
    )
    # Document attention through the same stand-in as the script's flash_attn_varlen_func (pgolf's
    # `varlen` kernel, which it picks where FA3 imports), so both sides attend with the same calls.
    docmask._DOC_BACKEND, docmask._VARLEN_FN = "varlen", flash_attn_interface.flash_attn_varlen_func
    model, opt = build_pgolf(job, compile_ns=True)
    init = {n: t.detach().clone() for n, t in model.state_dict().items()}
    (folder / "pgolf_job").mkdir()
    tr = Trainer(job, folder / "pgolf_job")
    tr.data = SimpleNamespace(train_files=files)
    tr.grad_accum = job.train.grad_accum_base // tr.rt.world_size
    tr.model, tr.opt, tr.train_model, tr.quant = model, opt, model, QUANT.build(job.quant)
    # the eval graph's compile on random tokens (inference mode: no weight, optimizer or loader
    # state) would score n * 2048 tokens on the CPU for nothing here
    tr._prime_eval = lambda: None
    loaders: list[RecordingLoader] = []

    def build_loader() -> RecordingLoader:
        loaders.append(RecordingLoader(Trainer._build_loader(tr)))
        return loaders[-1]

    tr._build_loader = build_loader
    tr.loader = tr._build_loader()
    tr.prime()
    names = bank_names(model)
    out = dict(
        init=init,
        restored={n: t.detach().clone() for n, t in model.state_dict().items()},
        momentum={names[id(b.p)]: b.mom.clone() for b in opt.muon.banks},
        adam_state=sum(len(o.state) for o in opt.adams),
    )
    model.on_progress(0.0)  # train(): the loop's first step, at progress 0
    loss = tr._train_step(0, 0.0, None)
    out.update(
        loss=loss.item(),
        stepped={n: p.detach().clone() for n, p in model.named_parameters()},
        momentum_1={names[id(b.p)]: b.mom.clone() for b in opt.muon.banks},
        warmup_batches=loaders[0].drawn,
        train_batches=loaders[1].drawn,
        roles={n: role for role, ps in model.param_groups().items() for n, _ in ps},
    )
    loaders[1].close()
    return out


def same_batch(a: Drawn, b: Drawn) -> bool:
    return all(torch.equal(u.long().reshape(-1), v.long().reshape(-1)) for u, v in zip(a[1:], b[1:]))


def report_batches(label: str, theirs: list[Drawn], ours: list[Drawn], step_fns: tuple[str, str]) -> None:
    """Every draw in order, and apart the draws that fed optimizer steps (made inside the script's
    step_fn, inside pgolf's Trainer._train_step), which decide the momentum."""

    def count(pairs: list[tuple[Drawn, Drawn]]) -> str:
        equal = [same_batch(a, b) for a, b in pairs]
        first = f", the first differs at {equal.index(False)}" if False in equal else ""
        return f"{sum(equal)}/{len(equal)} equal{first}"

    def where(drawn: list[Drawn]) -> str:
        return ", ".join(
            f"{sum(d[0] == c for d in drawn)} from {c}" for c in dict.fromkeys(d[0] for d in drawn)
        )

    stepped = [[d for d in side if d[0] == fn] for side, fn in zip((theirs, ours), step_fns)]
    print(f"{label}: script drew {len(theirs)} ({where(theirs)}), pgolf {len(ours)} ({where(ours)})")
    print(
        f"  in draw order: {count(list(zip(theirs, ours)))}; those that fed steps: {count(list(zip(*stepped)))}"
    )


def report_tensors(label: str, theirs: dict, ours: dict) -> None:
    """Per tensor: relative difference, bit for bit or not, share of elements that differ."""
    print(f"{label}: {sum(torch.equal(theirs[n], ours[n]) for n in theirs)}/{len(theirs)} bit for bit")
    for n in theirs:
        a, b = theirs[n], ours[n]
        differ = (a != b).float().mean().item()
        print(
            f"  {n} {tuple(a.shape)} {a.dtype}: |script| {a.float().norm():.4g} relative difference "
            f"{rel(a, b):.2e}, {100 * differ:.3f}% of elements differ"
        )


def role_line(role: str, rows: list[tuple[float, str, bool]], what: str) -> str:
    """One optimizer role's summary: (relative difference, name, bit for bit) per parameter."""
    worst = max(rows)
    return f"  {role}: {sum(e for *_, e in rows)}/{len(rows)} bit for bit, worst relative {what} {worst[0]:.2e} ({worst[1]})"


def report_groups(theirs: dict, ours: dict, roles: dict[str, str]) -> None:
    by_role: dict[str, list] = {}
    for n in theirs:
        by_role.setdefault(roles.get(n, "?"), []).append(
            (rel(theirs[n], ours[n]), n, torch.equal(theirs[n], ours[n]))
        )
    for role, rows in by_role.items():
        print(role_line(role, rows, "difference"))


def compare_prime(module, k: int) -> None:
    folder = Path(tempfile.mkdtemp())
    files = prime_shards(folder / "shards", k)
    gloo_world_of_one(folder)
    print(
        f"priming: {k} + {k} warm-up steps, micro-batches of {PRIME_TOKENS} tokens (documents cut every "
        f"{PRIME_DOC_LEN}), shards of {[f.stat().st_size // 2 - 256 for f in files]} tokens"
    )
    theirs = run_script_prime(module, files)
    ours = run_pgolf_prime(k, files, folder)
    print("script's warm-up log:", " | ".join(theirs["log"]))
    print(f"script's Muon took the sharded path (shard_mom): {theirs['sharded']}")
    fns = ("step_fn", "_train_step")
    report_batches("priming's micro-batches", theirs["warmup_batches"], ours["warmup_batches"], fns)
    report_batches("first training step's (new loaders)", theirs["train_batches"], ours["train_batches"], fns)
    for side in (theirs, ours):
        side["init_equal"] = sum(torch.equal(side["restored"][n], side["init"][n]) for n in side["init"])
    print(
        f"restored to the init: script {theirs['init_equal']}/{len(theirs['init'])} tensors, pgolf "
        f"{ours['init_equal']}/{len(ours['init'])}; the two inits equal: "
        f"{sum(torch.equal(theirs['init'][n], ours['init'][n]) for n in theirs['init'])}/{len(theirs['init'])}"
    )
    print(
        f"optimizer state after the restore: script Adam {theirs['adam_state']} entries, Muon state "
        f"{theirs['muon_state']}; pgolf Adam {ours['adam_state']}"
    )
    report_tensors(
        "Muon momentum after priming (script shard_mom vs pgolf kept momentum)",
        theirs["momentum"],
        ours["momentum"],
    )
    print(f"first training step: loss script {theirs['loss']:.6f} pgolf {ours['loss']:.6f}")
    print("weights after the first training step:")
    report_groups(theirs["stepped"], ours["stepped"], ours["roles"])
    report_tensors("Muon momentum after the first training step", theirs["momentum_1"], ours["momentum_1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pr", choices=["pr339", "pr399", "pr726", *SP8192])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--loader-steps", type=int, default=0)
    ap.add_argument("--prime-steps", type=int, default=0, help="pr1775: K + K warm-up steps on both sides")
    a = ap.parse_args()
    if a.prime_steps and a.pr != "pr1775":
        ap.error(
            "--prime-steps audits PR #1775's warm-up (train.prime_skip_batches, optimizer.keep_primed_momentum)"
        )
    if a.loader_steps and a.pr == "pr1775":
        ap.error(
            "--loader-steps compares the sp1024 scripts' DistributedTokenLoader and #1532's shuffled one; "
            "#1775's document-packing loader is compared by tests/test_doc_packing.py"
        )
    module = load_script(a.pr, prime_env(a.prime_steps) if a.prime_steps else None)
    job = pgolf_job(a.pr)
    ns = build_script_sp8192(module) if a.pr in SP8192 else build_script(module)
    if a.pr == "pr339":
        # its main() compiles the module's NS (`zeropower_via_newtonschulz5 = torch.compile(...)`),
        # a line build_script leaves out with every torch.compile: do it here, as the run does
        module.zeropower_via_newtonschulz5 = torch.compile(module.zeropower_via_newtonschulz5)
    model, opt = build_pgolf(job, compile_ns=a.pr in SCRIPT_COMPILES_NS)
    compare_init(ns, model)
    compare_steps(ns, model, opt, job, a.steps, a.pr)
    if a.loader_steps:
        (compare_loader_1532 if a.pr == "pr1532" else compare_loader)(module, job, a.loader_steps)
    if a.prime_steps:
        compare_prime(module, a.prime_steps)


if __name__ == "__main__":
    main()
