"""Training throughput of a run: tokens/s and MFU from step times the loop already measured.

Nothing here touches the device: the median step comes from the loop's CUDA events (read once,
after training) and the total from the training clock. FLOPs per token are `pgolf.flops`'s; a model
whose graph deepens during training (depth recurrence switching on) counts each step at the
depth it ran. MFU is against `hardware.peak_tflops` per device (0: not reported).
docs/architecture.md#throughput-and-mfu.
"""

from __future__ import annotations


def throughput(
    batch_tokens: int,
    steps: int,
    train_ms: float,
    median_ms: float,
    flops_per_token: dict[bool, float],
    looped_steps: int,
    peak_tflops: float,
    world_size: int,
) -> dict:
    """The `throughput` block of result.json. `flops_per_token[looping]` is the training FLOPs of
    a token in each graph variant; `looped_steps` of the `steps` ran looped (the deeper one)."""
    last = flops_per_token[looped_steps > 0]  # the variant training ended in: what the median step ran
    total_flops = batch_tokens * (
        looped_steps * flops_per_token[True] + (steps - looped_steps) * flops_per_token[False]
    )
    out = {
        "tokens_per_step": batch_tokens,
        "tokens_per_s_median": batch_tokens / (median_ms / 1e3) if median_ms > 0 else 0.0,
        "tokens_per_s": steps * batch_tokens / (train_ms / 1e3) if train_ms > 0 else 0.0,
        "flops_per_token": last,
        "train_tflops": total_flops / (train_ms / 1e3) / 1e12 if train_ms > 0 else 0.0,
        "looped_steps": looped_steps,
    }
    out["tflops_median"] = out["tokens_per_s_median"] * last / 1e12
    if peak_tflops > 0:
        peak = peak_tflops * world_size
        out.update(peak_tflops=peak, mfu_median=out["tflops_median"] / peak, mfu=out["train_tflops"] / peak)
    return out


def log_line(t: dict) -> str:
    line = (
        f"throughput: {t['tokens_per_s_median']:,.0f} tokens/s at the median step, {t['tokens_per_s']:,.0f} "
        f"over the training clock; {t['flops_per_token'] / 1e6:,.1f} MFLOP/token (fwd+bwd), "
        f"{t['tflops_median']:,.1f} TFLOP/s at the median step"
    )
    if "mfu" in t:
        line += (
            f"; MFU {100 * t['mfu_median']:.1f}% (median step), {100 * t['mfu']:.1f}% (whole training) "
            f"of {t['peak_tflops']:,.1f} TFLOP/s peak"
        )
    return line
