"""`python -m pgolf.plan <overrides>`: will this config fit in the artifact cap? Answered before training.

Builds the model on the meta device (no memory, no init), routes every exported tensor through the
chosen quantizer's rules, and estimates compressed bytes per group by exporting a Gaussian sample
of each group (up to `SAMPLE` elements, GPTQ replaced by round-to-nearest) with the real exporter
and compressor, then scaling by the group's element count. Code bytes are the real packed wrapper
of the modules a worker imports for this config. Trained weights have heavier tails than a Gaussian
and compress smaller, so the estimate leans high: within ~1% for SDClip, up to ~20% for max-based
clips (docs/quant.md has the measured cases).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys

import torch

SAMPLE = 1 << 18


def _state_on_meta(model_cfg) -> dict[str, torch.Tensor]:
    from pgolf.components import MODELS

    with torch.device("meta"):
        model = MODELS.build(model_cfg)
    return dict(model.export_state_dict())


def _group_of(quant, name: str, t: torch.Tensor) -> str:
    if hasattr(quant, "quantized"):  # mixed
        from pgolf.quant.mixed import route

        if quant.quantized(name, t):
            g = quant.group(name)
            return f"{route(name)}:int{g.bits}/{g.clip}{'+gptq' if g.gptq else ''}"
    elif t.is_floating_point() and t.numel() > quant.cfg.keep_float_max_numel:  # int8_zlib
        return "matrix:int8/percentile"
    if not t.is_floating_point():
        return "raw"
    return "float"


def _sample(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shape = list(t.shape) or [1]
    if len(shape) == 2:
        shape[0] = max(1, min(shape[0], SAMPLE // max(shape[1], 1)))
    else:
        shape = [min(math.prod(shape), SAMPLE)]
    if not t.is_floating_point():
        return torch.zeros(shape, dtype=t.dtype)
    # Unit variance: the scale-free clips (SDClip, percentile, search) do not care, and the step
    # floors (int8_zlib, floor=true) do not bind, as the records' measured sizes show they do not
    # for trained weights. Small trained weights under a floor compress smaller than estimated.
    return torch.randn(shape, generator=g)


def estimate(job) -> dict:
    """Per-group parameter counts and estimated bytes, code bytes, total vs budget.artifact_bytes."""
    from pgolf.components import QUANT

    qcfg = copy.deepcopy(job.quant)
    for f in ("embed", "attn", "mlp", "other"):  # a plan has no Hessians: round to nearest instead
        if hasattr(qcfg, f):
            setattr(qcfg, f, dataclasses.replace(getattr(qcfg, f), gptq=False))
    quant = QUANT.build(qcfg)
    state = _state_on_meta(job.model)
    groups: dict[str, dict] = {}
    for name, t in state.items():
        key = _group_of(quant, name, t)
        gr = groups.setdefault(key, {"tensors": [], "numel": 0})
        gr["tensors"].append(name)
        gr["numel"] += t.numel()
    g = torch.Generator().manual_seed(0)
    empty = len(quant.export({}))  # container overhead, counted once
    model_bytes = float(empty)
    for gr in groups.values():
        sample, n = {}, 0
        for name in gr["tensors"]:  # a few representative tensors, up to the sample size
            if n >= SAMPLE:
                break
            sample[name] = _sample(state[name], g)
            n += sample[name].numel()
        b = len(quant.export(sample)) - empty
        gr["bytes_per_param"] = max(b, 0) / n
        gr["est_bytes"] = gr["bytes_per_param"] * gr["numel"]
        model_bytes += gr["est_bytes"]
        gr["tensors"] = len(gr["tensors"])
    code = code_bytes(job)
    total = int(model_bytes) + code
    return {
        "groups": groups,
        "params": sum(gr["numel"] for gr in groups.values()),
        "model_bytes": int(model_bytes),
        "code_bytes": code,
        "total": total,
        "cap": job.budget.artifact_bytes,
        "fits": total <= job.budget.artifact_bytes,
    }


# Modules a registered builder imports when it runs, by (group, name): the plan loads builders but
# does not run them, and the embedded source's builder imports its corpus builder only on the way
# (the real run imports and ships them: without these the plan printed 41,181 code bytes for the
# offline default against the run's 44,412).
BUILT_LAZILY = {("data", "embedded"): ("pgolf.data.build", "pgolf.data.embedded")}


def code_bytes(job) -> int:
    """Bytes of the packed train_gpt.py for this config: the modules a worker imports, through the
    same `pgolf.parent.pack.shipped_modules` and `build_wrapper` a run writes its artifact with."""
    import importlib

    import pgolf.train  # noqa: F401  (the worker's entry point)
    import pgolf.trainer  # noqa: F401  (imported lazily by pgolf.train.run_job)
    from pgolf.components import LOADERS, REGISTRIES
    from pgolf.config import to_dict
    from pgolf.parent.pack import build_wrapper, codec_for, shipped_config, shipped_modules

    for group, reg in REGISTRIES.items():
        name = getattr(job, group).name
        reg.get(name).load_builder()
        for module in BUILT_LAZILY.get((group, name), ()):
            importlib.import_module(module)
    LOADERS.get(job.data.loader).load_builder()  # the loader imports its sampler by name
    if job.optimizer.late_qat_threshold > 0:  # the trainer imports it only then
        import pgolf.quant.qat  # noqa: F401
    if _fused_kernels_on(job.model):  # the model imports them only then (`auto`: with CUDA + Triton)
        import pgolf.models.kernels  # noqa: F401
    if _switch(job.model, "fused_mlp_train"):  # its own module, imported by that switch alone
        import pgolf.models.fused_mlp_train  # noqa: F401
    config = to_dict(_hardware_as_frozen(job))
    return len(
        build_wrapper(shipped_modules(config), shipped_config(config), codec_for(config)).encode("utf-8")
    )


def _fused_kernels_on(model_cfg) -> bool:
    from pgolf.models.config import FUSED_SWITCHES

    return any(_switch(model_cfg, k) for k in FUSED_SWITCHES)


def _switch(model_cfg, key: str) -> bool:
    from pgolf.models.config import switch_on

    return switch_on(getattr(model_cfg, key, False))


def _hardware_as_frozen(job):
    """`job` with the hardware group as `pgolf.parent.run.freeze` hands it to a worker on this machine:
    `auto` resolved, `nproc_per_node` filled in (the shipped config carries the result: planning
    `hardware=auto` printed 9 bytes more than the offline default run wrote). A GPU config planned
    on a machine without those GPUs keeps its group as written."""
    from pgolf.hw.device import resolve_auto, resolve_nproc

    hw = resolve_auto(job.hardware) if job.hardware.name == "auto" else job.hardware
    try:
        hw = resolve_nproc(hw)
    except RuntimeError:
        pass
    return dataclasses.replace(job, hardware=hw)


def main(argv: list[str] | None = None) -> int:
    from pgolf.parent.compose import compose_job
    from pgolf.parent.override_hints import config_errors_exit

    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):
        print(__doc__.strip())
        print("\nexample: python -m pgolf.plan experiment=r0409   (any overrides python -m pgolf.run takes)")
        return 0
    with config_errors_exit("pgolf.plan", overrides):
        job = compose_job(overrides)
    r = estimate(job)
    print(f"plan: model={job.model.name} quant={job.quant.name} params={r['params']:,}")
    for key, gr in sorted(r["groups"].items()):
        print(
            f"  {key:<28} tensors:{gr['tensors']:>4} params:{gr['numel']:>12,} "
            f"bytes/param:{gr['bytes_per_param']:.3f} est_bytes:{int(gr['est_bytes']):>12,}"
        )
    if any("/percentile" in k or "/search" in k for k in r["groups"]):
        print(
            "  note: max-based clips (percentile, search) depend on the weights' tails; trained weights\n"
            "  have heavier tails than this Gaussian sample and compress up to ~20% smaller (docs/quant.md)"
        )
    verdict = "fits" if r["fits"] else f"DOES NOT FIT (over by {r['total'] - r['cap']:,})"
    print(
        f"estimate: model {r['model_bytes']:,} + code {r['code_bytes']:,} = {r['total']:,} bytes "
        f"vs cap {r['cap']:,}: {verdict}"
    )
    if not r["fits"] and getattr(job.quant, "prune_to_fit", False):
        print(
            "  note: quant.prune_to_fit is on: a run over the cap zeroes the fewest +-1 codes that make it\n"
            "  fit (docs/quant.md, selective pruning); this estimate is before pruning"
        )
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
