"""Model + code bytes on the same weights: a seed PR's own export against `experiment=prNNN`'s (CPU).

Issue 15 asks that pgolf's artifact be no larger than the record script's on the same weights. This
builds the script's own model (its `GPT(...)` construction and dtype casts, executed from the
script's source), fills every matrix with seeded Gaussian weights (std 1/sqrt(fan-in), what a
trained matrix roughly looks like; the script's own init leaves output projections at zero, which
would compress to nothing on both sides), and then:

- **reference:** executes the script's own export statements (unbanking, `mixed_quantize_int6`,
  `torch.save`, its compressor) on `export_sd`, and counts its code as the script's UTF-8 bytes;
- **pgolf:** loads the very same state dict with `init_from=` into `experiment=prNNN` on CPU,
  trains 0 steps, exports, and reads `result.json`'s model bytes; its code is what
  `python -m pgolf.plan experiment=prNNN` counts on a CUDA host (the experiment's own packed
  wrapper, eval kernels included), with this CPU run's wrapper and the plan on this host beside it.

Nothing of the scripts is copied: they are read from `.refs/<pr>/train_gpt.py` (git-ignored) and
executed in place; the FA3 import is served by `.bench/fa3_shim`.

    python3 bench/seed_bytes.py pr339 pr399 pr726 --out /tmp/seed_bytes
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # pgolf from this checkout, whatever is installed
SHIM = REPO / ".bench" / "fa3_shim"
TOKENIZER = REPO / ".bench" / "corpus" / "fineweb_1024_bpe.model"


def ref_env(pr: str) -> dict[str, str]:
    """The PR's run command, from `ref_env` in bench/seeds.sh (one source for both benches)."""
    script = f'source <(sed -n "/^ref_env()/,/^}}/p" "{REPO}/bench/seeds.sh"); ref_env {pr}'
    words = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout.split()
    return dict(w.split("=", 1) for w in words)


def _main_source_between(source: str, start: str, end: str) -> str:
    """The statements of `main()` from the first line containing `start` (alternatives split by " | ")
    through the next one containing `end`."""
    tree = ast.parse(source)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    lines = source.splitlines()[main.lineno - 1 : main.end_lineno]
    first = next(i for i, line in enumerate(lines) if any(s in line for s in start.split(" | ")))
    last = next(i for i in range(first, len(lines)) if end in lines[i])
    return textwrap.dedent("\n".join(lines[first : last + 1]))


def load_script(pr: str):
    path = REPO / ".refs" / pr / "train_gpt.py"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; fetch the seed script (see .refs/SOURCES.md)")
    os.environ.update(ref_env(pr))  # Hyperparameters reads the environment when the class is defined
    sys.path.insert(0, str(SHIM))
    spec = importlib.util.spec_from_file_location(f"ref_{pr}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.read_text(encoding="utf-8")


def seeded_weights(model: torch.nn.Module, seed: int) -> None:
    """Every parameter of two or more dims: N(0, 1/fan_in), fan-in = the last dim; the rest as built."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                w = torch.randn(p.shape, generator=gen, dtype=torch.float32) / math.sqrt(p.shape[-1])
                p.copy_(w.to(p.dtype))


def reference_bytes(pr: str, seed: int, out: Path) -> dict:
    module, source = load_script(pr)
    ns = dict(vars(module))
    ns.update(args=module.Hyperparameters(), device=torch.device("cpu"))
    exec(_main_source_between(source, "base_model = GPT(", "restore_low_dim_params_to_fp32(base_model)"), ns)
    model = ns["base_model"]
    seeded_weights(model, seed)
    export_sd = {k: v for k, v in model.state_dict().items() if "mtp_heads" not in k}
    torch.save(export_sd, out / f"{pr}_weights.pt")
    ns.update(export_sd=export_sd)
    exec(_main_source_between(source, "sd_cpu = {k: v.detach().cpu() | sd_cpu = {}", "quant_blob = "), ns)
    (out / f"{pr}_reference_quant.pt").write_bytes(ns["quant_raw"])  # for compare(): the codes themselves
    code = len(source.encode("utf-8"))
    model_bytes = len(ns["quant_blob"])
    params = sum(p.numel() for p in model.parameters())
    return {"model_bytes": model_bytes, "code_bytes": code, "total": model_bytes + code, "params": params}


def shards(out: Path) -> Path:
    from pgolf.data.build import export_shards
    from pgolf.data.embedded import collect_documents

    path = out / "shards"
    if not (path / "fineweb_val_000000.bin").exists():
        export_shards(TOKENIZER, collect_documents()[:40], path, val_docs=2, shard_tokens=200_000)
    return path


def pgolf_bytes(pr: str, out: Path) -> dict:
    run_dir = out / f"pgolf_{pr}"
    args = [
        sys.executable,
        "-m",
        "pgolf.run",
        f"experiment={pr}",
        f"init_from={out / f'{pr}_weights.pt'}",
        "data=shards",
        f"data.path={shards(out)}",
        f"data.tokenizer_path={TOKENIZER}",
        "data.vocab_size=1024",
        "hardware=cpu",
        "budget.mode=steps",
        "train.iterations=0",
        "train.prime_steps=0",
        "train.val_every=0",
        # bytes do not depend on TTT; one epoch keeps #726's legal TTT pass short on CPU
        *(["ttt.epochs=1"] if pr == "pr726" else []),
        "wandb.mode=disabled",
        f"hydra.run.dir={run_dir}",
        "overwrite=true",  # a rerun of this bench replaces its own earlier folder
    ]
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"pgolf {pr} failed:\n{proc.stderr[-4000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    b = result["bytes"]
    code = plan_code_bytes(pr, cuda_host=True)
    return {
        "model_bytes": b["model"],
        "code_bytes": code,
        "total": b["model"] + code,
        "code_bytes_cpu_run": b["code"],
        "code_bytes_plan_cpu_host": plan_code_bytes(pr, cuda_host=False),
        "params": result.get("params"),
    }


# `pgolf.plan`'s code bytes: the packed train_gpt.py that `experiment=<pr>` itself ships (this CPU
# run's overrides pull in other modules: shards data, init_from). On a CUDA host with Triton the
# experiments' `auto` eval kernels are on and pgolf/models/kernels.py ships too; `switch_on` asks
# torch.cuda, so answering yes there gives that host's wrapper (the only module that differs).
# A fresh process each: the wrapper packs the modules the process has imported.
_PLAN_CODE = """
import sys, torch
if sys.argv[2] == "cuda":
    torch.cuda.is_available = lambda: True
from pgolf.parent.compose import compose_job
from pgolf.parent.plan import code_bytes
print(code_bytes(compose_job(["experiment=" + sys.argv[1]])))
"""


def plan_code_bytes(pr: str, cuda_host: bool) -> int:
    cmd = [sys.executable, "-c", _PLAN_CODE, pr, "cuda" if cuda_host else "cpu"]
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, check=True)
    return int(proc.stdout.split()[-1])


def compare(pr: str, out: Path) -> None:
    """Do both sides store the same numbers? Dequantized tensors of the script's export against
    pgolf's artifact, by canonical name: the largest difference, and the tensors that differ."""
    from pgolf.quant.mixed import MixedQuant

    module, _ = load_script(pr)
    saved = torch.load(io.BytesIO((out / f"{pr}_reference_quant.pt").read_bytes()), map_location="cpu")
    blob = next((out / f"pgolf_{pr}" / "artifact").glob("final_model*")).read_bytes()
    mine = MixedQuant.load(blob)
    # the script's dequantizer takes each tensor's dtype from a template: the original weights'
    # dtypes, under the canonical (unbanked) names that pgolf's artifact holds too
    weights = {k: v for k, v in torch.load(out / f"{pr}_weights.pt", map_location="cpu").items() if k in mine}
    template = {k: torch.empty(0, dtype=weights.get(k, mine[k]).dtype) for k in saved["m"]}
    ref = module.dequantize_mixed_int6(saved["w"], saved["m"], template)
    only = sorted(set(ref) ^ set(mine))
    print(f"names only on one side: {only[:10]}")
    for name in sorted(set(ref) & set(mine)):
        a, b = ref[name].float(), mine[name].float().reshape(ref[name].shape)  # both in the weights' dtype
        diff = (a - b).abs().max().item()
        if diff > 0:
            print(
                f"{name:40s} {tuple(a.shape)} max|diff| {diff:.3e} differing {(a != b).float().mean().item():.4f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prs", nargs="+")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=Path("/tmp/seed_bytes"))
    parser.add_argument("--one", action="store_true", help="measure one PR in this process (internal)")
    parser.add_argument("--compare", action="store_true", help="compare the stored numbers (after a run)")
    opts = parser.parse_args()
    if opts.compare:
        for pr in opts.prs:
            compare(pr, opts.out)
        return
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.one:  # the scripts read their settings from the environment at import: one per process
        (pr,) = opts.prs
        cached = opts.out / f"{pr}_reference_s{opts.seed}.json"  # the script's export takes minutes on CPU
        if cached.exists() and (opts.out / f"{pr}_weights.pt").exists():
            ref = json.loads(cached.read_text())
        else:
            ref = reference_bytes(pr, opts.seed, opts.out)
            cached.write_text(json.dumps(ref))
        mine = pgolf_bytes(pr, opts.out)
        print(json.dumps({"reference": ref, "pgolf": mine, "ratio_total": mine["total"] / ref["total"]}))
        return
    rows = {}
    for pr in opts.prs:
        cmd = [sys.executable, __file__, pr, "--one", "--seed", str(opts.seed), "--out", str(opts.out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{pr}: {proc.stderr[-4000:]}")
        rows[pr] = json.loads(proc.stdout.splitlines()[-1])
        print(pr, json.dumps(rows[pr]), flush=True)
    (opts.out / "seed_bytes.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
