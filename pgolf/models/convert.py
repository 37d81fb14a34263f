"""Foreign weights into a pgolf model: the `init_from` loader and `python -m pgolf.models.convert`.

Accepted state dicts, detected from their names (banked layouts: docs/techniques.md#parameter-banks):

- pgolf's own `state_dict()` of either layout: banked (`qo_bank`, `kv_bank`, `mlp_up_bank`,
  `mlp_down_bank`) or per-layer (`blocks.{i}.attn.c_q.weight`, ...); a pgolf checkpoint file
  (`checkpoint/step_*/rank0.pt`) is unwrapped to its model weights first;
- pgolf's canonical per-layer export (`export_state_dict()`, what artifacts and checkpoints hold);
- the record scripts' `final_model.pt`. The 2026-03-23 record saves its banked module, whose bank
  layout pgolf's banks copy slice for slice (`qo_bank[i]` = W_q of layer i, `qo_bank[L+i]` = W_o,
  `kv_bank[i]` = W_k, `kv_bank[L+i]` = W_v, `mlp_up_bank[i]`, `mlp_down_bank[i]`; every matrix stored
  (out, in) as nn.Linear does); the 2026-04-09 record saves per-layer linears under the names the
  canonical export uses. Every other record name (tok_emb, bigram.*, smear.gate, ve_shared.*,
  ve_layer_scales.k, skip_weights, skip_gates, blocks.{i}.{attn.q_gain, attn_scale, mlp_scale,
  resid_mix}) is pgolf's name for the same tensor. What conversion does beyond the layout: strip
  wrapper prefixes (torch.compile, DDP), drop the record's training-only heads, and refuse with a
  named reason the record switches that pgolf does not implement (`RECORD_UNSUPPORTED`).

Everything is compared in canonical per-layer names, so a banked file loads into a layered model
and back. Mismatched names or shapes raise `InitFromError` naming the file and the tensors.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from pgolf.contracts import SingleGraphModel
from pgolf.models.banks import BANKS, bank_slots, unbank

CKPT_DIR = "checkpoint"  # pgolf.checkpoint.CKPT_DIR (not imported: that module pulls in the trainer's config)

WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
# Record names that carry no weight of the scored model: dropped (the record drops them too).
RECORD_DROPPED = {
    r"^mtp_heads\.": "the 2026-03-23 record's multi-token-prediction heads (training-only; MTP_NUM_HEADS)",
}
# Record switches pgolf has no equivalent for: their tensors cannot be placed anywhere.
RECORD_UNSUPPORTED = {
    r"\.attn\.attn_gate\.(weight|bias)$": "GATED_ATTENTION=1 of the 2026-03-23 record (a biased linear "
    "gate; pgolf's model.gated_attn has no bias)",
    r"\.attn\.vr_lambda$": "VALUE_RESIDUAL=1 of the 2026-03-23 record (not implemented in pgolf)",
    r"\.dtg_gate\.(weight|bias)$": "DTG=1 of the 2026-03-23 record (not implemented in pgolf)",
    r"^(embed_proj|head_proj)\.weight$": "EMBEDDING_DIM != MODEL_DIM of the 2026-04-09 record (a factorized "
    "embedding; not implemented in pgolf)",
}
MAX_LISTED = 8


class InitFromError(ValueError):
    """A weight file that does not fit the model; the message names the file and the tensors."""


def _listed(names: list[str]) -> str:
    more = f" ... (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def read_state(path: str | Path) -> dict[str, Tensor]:
    """The name -> tensor mapping in `path`: a plain state dict, or a pgolf checkpoint's model part."""
    path = Path(path)
    if not path.is_file():
        raise InitFromError(f"init_from={path}: no such file (give a state dict .pt path, or null)")
    # Plain tensors only, except for pgolf's own checkpoints, which also pickle RNG and loader states.
    own_checkpoint = path.parent.parent.name == CKPT_DIR
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not own_checkpoint)
    except Exception as e:  # pickle errors, truncated files, ...
        raise InitFromError(f"init_from={path}: torch.load failed ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and "model" in obj and "optimizer" in obj:
        obj = obj["model"]  # a pgolf checkpoint (checkpoint/step_*/rank*.pt)
    if not isinstance(obj, Mapping) or not obj:
        raise InitFromError(
            f"init_from={path}: expected a non-empty dict of name -> tensor, got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise InitFromError(f"init_from={path}: entries that are not name -> tensor: {_listed(bad)}")
    return dict(obj)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _check_banks(state: dict[str, Tensor], num_layers: int, src: str) -> None:
    expect = {bank: len(names) for bank, names in bank_slots(num_layers).items()}
    present = [b for b in BANKS if b in state]
    if len(present) != len(BANKS):
        missing = [b for b in BANKS if b not in state]
        raise InitFromError(f"init_from={src}: a banked state dict needs all four banks; missing {missing}")
    bad = [
        f"{b} {tuple(state[b].shape)} (need {expect[b]} slices of 2-D matrices)"
        for b in BANKS
        if state[b].ndim != 3 or state[b].shape[0] != expect[b]
    ]
    if bad:
        raise InitFromError(
            f"init_from={src}: bank shapes do not fit model.num_layers={num_layers}: {'; '.join(bad)}"
        )


def canonical_state(
    state: dict[str, Tensor], num_layers: int, src: str = "<state>"
) -> tuple[dict[str, Tensor], str]:
    """Any accepted layout -> canonical per-layer names; returns (state, description of the layout)."""
    state = _strip_prefixes(state)
    unsupported = sorted(
        f"{k} ({why})" for k in state for pat, why in RECORD_UNSUPPORTED.items() if re.search(pat, k)
    )
    if unsupported:
        raise InitFromError(
            f"init_from={src}: tensors of features pgolf does not implement: {_listed(unsupported)}"
        )
    dropped = [k for k in state if any(re.search(p, k) for p in RECORD_DROPPED)]
    state = {k: v for k, v in state.items() if k not in dropped}
    note = f", dropped {len(dropped)} training-only record tensors (mtp_heads)" if dropped else ""
    if any(b in state for b in BANKS):
        _check_banks(state, num_layers, src)
        return unbank(state, num_layers), "banked (pgolf model=banked state_dict / 2026-03-23 record)" + note
    return state, "per-layer (pgolf export_state_dict, model=layered state_dict / 2026-04-09 record)" + note


def _mismatch(
    src: str, model_name: str, have: dict[str, Tensor], want: dict[str, Tensor], layout: str
) -> None:
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    shapes = sorted(
        f"{k} file {tuple(have[k].shape)} model {tuple(want[k].shape)}"
        for k in set(have) & set(want)
        if have[k].shape != want[k].shape
    )
    if not (extra or missing or shapes):
        return
    parts = [f"init_from={src} ({layout}) does not fit model.name={model_name}:"]
    if extra:
        parts.append(f"in the file but not in the model: {_listed(extra)}")
    if missing:
        parts.append(f"in the model but not in the file: {_listed(missing)}")
    if shapes:
        parts.append(f"shapes differ: {_listed(shapes)}")
    parts.append(
        "the model config must match the run that wrote the file (model preset and overrides such as "
        "num_layers, model_dim, mlp_mult, num_kv_heads, data.vocab_size, bigram/ve/skip/loop switches)"
    )
    raise InitFromError("; ".join(parts))


@torch.no_grad()
def load_into(model: nn.Module, path: str | Path, model_name: str = "?") -> str:
    """Load the weights in `path` into `model` in place (strict); returns the detected layout."""
    src = str(path)
    state = read_state(path)
    if isinstance(model, SingleGraphModel):  # the baseline family: its own names only
        state = _strip_prefixes(state)
        _mismatch(src, model_name, state, model.state_dict(), "state_dict")
        model.load_state_dict(state, strict=True)
        return "state_dict"
    canon, layout = canonical_state(state, model.num_layers, src)
    want = model.export_state_dict()
    _mismatch(src, model_name, canon, want, layout)
    # load_state_dict copies into the existing parameters, so each keeps the model's dtype (e.g. the
    # record's bf16 token embedding lands in pgolf's fp32 one exactly, and the reverse rounds).
    model.load_export_state_dict({k: canon[k] for k in want})
    return layout


# ------------------------------------------------------------------------------------- CLI
def build_model(preset: str, overrides: list[str]) -> tuple[nn.Module, str]:
    """The model of `model=<preset>` plus Hydra-style overrides, composed as `pgolf.run` does."""
    from pgolf.components import MODELS
    from pgolf.config import from_dict
    from pgolf.parent.compose import compose_dict

    # Only the model group is validated: a conversion needs no data (or any other group) to exist.
    node = compose_dict(["experiment=none", f"model={preset}", *overrides])["model"]
    schema = MODELS.get(node["name"]).schema
    return MODELS.build(from_dict(schema, node, "model")), node["name"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pgolf.models.convert",
        description="Convert a record final_model.pt (or any accepted state dict) into pgolf's canonical "
        "per-layer names, checked against the model it will initialize.",
    )
    p.add_argument("src", help="input state dict (.pt)")
    p.add_argument(
        "--model", required=True, help="model preset (conf/model/<name>.yaml), e.g. banked, sp8192_recur"
    )
    p.add_argument("--out", required=True, help="output .pt (canonical per-layer names; usable as init_from)")
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. data.vocab_size=1024 model.num_layers=9"
    )
    args = p.parse_intermixed_args(argv)
    from pgolf.parent.override_hints import config_errors_exit

    with config_errors_exit("pgolf.models.convert", [f"model={args.model}", *args.overrides]):
        model, name = build_model(args.model, args.overrides)
    try:
        layout = load_into(model, args.src, name)
    except InitFromError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # clone: the banked export holds views of the banks, which torch.save would write whole
    out = {k: v.detach().clone().contiguous() for k, v in model.export_state_dict().items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    n = sum(v.numel() for v in out.values())
    print(f"{args.src}: {layout} -> {args.out} ({len(out)} tensors, {n:,} parameters, model.name={name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
