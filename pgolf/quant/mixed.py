"""The records' export family: per-row int-N, name-routed groups, GPTQ, SDClip (docs/techniques.md#export).

Routing by parameter name: `embed` (token/bigram/VE tables, an untied head), `attn` (`.attn.`),
`mlp` (`.mlp.`), `other` (any other large matrix). Each group has its own bits, clip rule
(SDClip sigmas, percentile, GPTQ-lite search) and GPTQ switch. Float tensors with at most
`keep_float_max_numel` elements, and non-2-D ones, ship as float (control tensors fp32, the rest
fp16); non-float tensors ship as they are.

Blob: b"PGQ1" + compressor id + compress(payload); payload = header length (u32) + JSON header +
int8 codes of all matrices + fp16 section (scales, small tensors) + fp32 section + raw section.
The float sections are byte-shuffled (optional); codes are not (one byte per value already).
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from pgolf.models.layers import is_control
from pgolf.quant.compress import COMPRESSORS, available, compressor, shuffle, unshuffle
from pgolf.quant.config import GroupQuant, MixedQuantConfig, route
from pgolf.quant.gptq import clip_then_round, gptq_codes, round_codes, row_scales
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.selfgen import sample_sequences

MAGIC = b"PGQ1"
_LAYER = re.compile(r"\.(\d+)\.")


def storage_order(name: str) -> tuple[str, int]:
    """Where a tensor goes in the blob: grouped by role across layers (every layer's c_q, then every
    layer's c_k, ...), not layer by layer. The compressor's adaptive statistics then see one kind
    of matrix at a time: on #399's matrices this alone saved 71 KB of lzma output (8,698,892 ->
    8,627,824 bytes of codes; docs/quant.md#the-artifact-layout)."""
    layer = _LAYER.search(name)
    return _LAYER.sub(".*.", name), int(layer.group(1)) if layer else -1


def layer_order(name: str) -> tuple[int, str]:
    """Layer by layer (quant.storage_order=layer): zstd-22 makes #339's blob 725 KB smaller this
    way than by role, where lzma prefers role (docs/quant.md#the-artifact-layout)."""
    layer = _LAYER.search(name)
    return int(layer.group(1)) if layer else -1, name


# Selective pruning's compressions per search round (run on threads). A constant, not the core
# count: the probe points, hence the pruned count, must not depend on the machine it runs on.
PRUNE_PROBES_PER_ROUND = 8


class _Within:
    """`batches`, stopped before a batch that would end after `deadline`: what guarantees that
    calibration fits the time left of budget.train_seconds (fewer batches, never a late finish).
    `times` gets each batch's seconds, from asking for it to asking for the next (producing it,
    i.e. sampling for source=self, plus its forward); `cut` tells whether the deadline stopped it.
    `sync` (the device's) runs before each batch's time is taken: on a GPU the host only queues the
    forward and the Hessian updates, so an unsynced time is the launch time, and a probe that read
    0.04 s a batch preceded a calibration of 0.2 s a batch (pr1532, one H100)."""

    def __init__(
        self,
        batches: Iterable,
        deadline: float | None,
        batch_seconds: float,
        limit: int | None,
        sync: Callable[[], None] | None = None,
    ):
        self.it, self.deadline, self.est, self.limit = iter(batches), deadline, batch_seconds, limit
        self.sync = sync
        self.times: list[float] = []
        self.cut = False

    def __iter__(self):
        t = time.perf_counter()
        while self.limit is None or len(self.times) < self.limit:
            if self.deadline is not None and t + max([self.est, *self.times]) > self.deadline:
                self.cut = True
                return
            batch = next(self.it, None)
            if batch is None:
                return
            yield batch
            if self.sync is not None:
                self.sync()
            now = time.perf_counter()
            self.times.append(now - t)
            t = now


def _np_dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class MixedQuant:
    def __init__(self, cfg: MixedQuantConfig):
        self.cfg = cfg
        # Import the compressor now: a missing package (brotli, zstandard) must stop the run before
        # it trains, not at export after the whole training budget is spent.
        compressor(cfg.compressor, cfg.level, cfg.lzma_extreme)
        self.hessians: dict[str, Tensor] = {}
        self.calibrated = False
        self.stats: dict = {}
        self._prunable: list[tuple[int, Tensor]] = []

    # ----------------------------------------------------------------------------- routing
    def quantized(self, name: str, t: Tensor) -> bool:
        return t.is_floating_point() and t.ndim == 2 and t.numel() > self.cfg.keep_float_max_numel

    def group(self, name: str) -> GroupQuant:
        return self.cfg.groups()[route(name)]

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.needs_calibration

    # -------------------------------------------------------------------------- calibration
    def calibrate(
        self,
        model: torch.nn.Module,
        batches: Iterable,
        autocast_dtype: torch.dtype | None = None,
        reduce: Callable[[Tensor], None] | None = None,
        seed: int = 0,
        world_size: int = 1,
        deadline: float | None = None,
        batch_seconds: float = 0.0,
        max_batches: int | None = None,
        sync: Callable[[], None] | None = None,
    ) -> dict:
        """Collect layer-input Hessians for every matrix whose group uses GPTQ.

        `batches` are this rank's training batches (read lazily; untouched when
        calibration.source=self, where the model samples its own `self_seqs / world_size`
        sequences from `seed`). `reduce` (e.g. an all-reduce SUM) merges the ranks' Hessians.
        No batch is started that would end after `deadline` (a `time.perf_counter()` value), going
        by the slowest batch so far or `batch_seconds`, whichever is larger; at most `max_batches`.
        `sync` waits for the device before each batch's time is taken (see _Within).
        """
        t0 = time.perf_counter()
        watch = {
            n: t for n, t in model.export_state_dict().items() if self.quantized(n, t) and self.group(n).gptq
        }
        cal = self.cfg.calibration
        if cal.source == "self":
            dev = next(model.parameters()).device
            vocab = model.tok_emb.num_embeddings
            n_seqs = -(-cal.self_seqs // world_size)
            batches = sample_sequences(
                model,
                vocab,
                n_seqs,
                cal.self_seq_len,
                cal.self_batch,
                cal.temperature,
                seed,
                dev,
                autocast_dtype,
            )
        batches = _Within(batches, deadline, batch_seconds, max_batches, sync)
        H, n = collect_hessians(model, watch, batches, autocast_dtype)
        for name in sorted(watch):  # same order on every rank; zeros where this rank saw nothing
            if name not in H:
                dim = watch[name].shape[1]
                H[name] = torch.zeros(dim, dim, device=watch[name].device)
            if reduce is not None:
                reduce(H[name])
        self.hessians = {k: v for k, v in H.items() if k in watch and bool((v.diagonal() > 0).any())}
        self.calibrated = True
        info = {
            "batches": n,
            "hessians": len(self.hessians),
            "unseen": sorted(set(watch) - set(self.hessians)),  # these fall back to round-to-nearest
            "seconds": time.perf_counter() - t0,
            "batch_seconds": batches.times,
            "cut_by_deadline": batches.cut,
        }
        self.stats["calibration"] = info
        return info

    def reset_calibration(self) -> None:
        """Forget a calibration (the trainer's timing probe before training)."""
        self.hessians, self.calibrated = {}, False
        self.stats.pop("calibration", None)

    # ---------------------------------------------------------------------------- quantize
    def quantize(self, state: dict[str, Tensor]) -> tuple[dict, dict[str, list[bytes]]]:
        cfg = self.cfg.calibration
        header: dict = {"entries": []}
        sections: dict[str, list[bytes]] = {"codes": [], "f16": [], "f32": [], "raw": []}
        per_group: dict[str, dict] = {}
        self.stats.pop("lqer", None)
        self._prunable = []  # (index into sections["codes"], stored fp16 row scales) per matrix
        lqer_candidates: list[tuple[float, str, Tensor, Tensor, Tensor]] = []
        order = storage_order if self.cfg.storage_order == "role" else layer_order
        for name, tensor in sorted(state.items(), key=lambda kv: order(kv[0])):
            t = tensor.detach()
            if self.is_gate(name, t):  # int8 per row, step = max|row| / 127
                w = t.float().cpu()
                s = row_scales(w, 8, "percentile", 0.0, 100.0)
                sections["codes"].append(round_codes(w, s, 8).numpy().tobytes())
                sections["f16"].append(s.to(torch.float16).numpy().tobytes())
                header["entries"].append([name, "q", list(t.shape), _np_dtype(t), 8, "gate"])
            elif self.quantized(name, t):
                g = self.group(name)
                H = self.hessians.get(name) if g.gptq else None
                dev = H.device if H is not None else torch.device("cpu")
                w = t.to(dev, torch.float32)
                if g.clip_then_round:
                    codes, s = clip_then_round(w, g.bits, g.percentile, g.floor)
                else:
                    s = row_scales(w, g.bits, g.clip, g.sigmas, g.percentile, g.floor, g.search_per_row)
                    if H is not None:
                        codes = gptq_codes(w, H, s, g.bits, cfg.block_size, cfg.damp, cfg.act_order)
                    else:
                        codes = round_codes(w, s, g.bits)
                resid = w - codes.float() * s[:, None]
                err = resid.pow(2).mean() / w.pow(2).mean().clamp_min(1e-30)
                if self.cfg.lqer_rank:
                    lqer_candidates.append((float(resid.pow(2).sum()), name, w, codes, s))
                    lqer_candidates = sorted(lqer_candidates, key=lambda c: -c[0])[: self.cfg.lqer_top_k]
                self._prunable.append((len(sections["codes"]), s.to(torch.float16).float().cpu()))
                sections["codes"].append(codes.cpu().numpy().tobytes())
                sections["f16"].append(s.to(torch.float16).cpu().numpy().tobytes())
                kind = "gptq" if H is not None else "rtn"
                header["entries"].append([name, "q", list(t.shape), _np_dtype(t), g.bits, kind])
                st = per_group.setdefault(
                    route(name), {"numel": 0, "bits": g.bits, "rel_mse_sum": 0.0, "n": 0}
                )
                st["numel"] += t.numel()
                st["rel_mse_sum"] += float(err)
                st["n"] += 1
                st.setdefault("methods", set()).add(f"{kind}/{g.clip}")
            elif t.is_floating_point():
                c = t.cpu().contiguous()
                if is_control(name) and self.cfg.control_fp32:
                    sections["f32"].append(c.float().numpy().tobytes())
                    header["entries"].append([name, "f32", list(t.shape), _np_dtype(t)])
                else:
                    sections["f16"].append(c.to(torch.float16).numpy().tobytes())
                    header["entries"].append([name, "f16", list(t.shape), _np_dtype(t)])
            else:
                c = t.cpu().contiguous()
                sections["raw"].append(c.numpy().tobytes())
                header["entries"].append([name, "raw", list(t.shape), _np_dtype(t)])
        for _, name, w, codes, s in lqer_candidates:  # largest ||W - W_hat||_F first
            self._lqer(name, w - codes.float() * s[:, None], header, sections)
        for st in per_group.values():
            st["rel_mse"] = st.pop("rel_mse_sum") / st.pop("n")
            st["methods"] = sorted(st["methods"])
        self.stats["groups"] = per_group
        return header, sections

    def is_gate(self, name: str, t: Tensor) -> bool:
        return (
            self.cfg.gate_int8
            and name.endswith("attn_gate_w")
            and t.is_floating_point()
            and t.ndim == 2
            and 32 <= t.numel() <= 8192
        )

    def _lqer(self, name: str, err: Tensor, header: dict, sections: dict[str, list[bytes]]) -> None:
        """E = W - W_hat ~ A B with A = U_r S_r (rows x r), B = V_r^T (r x cols), both int-N per row."""
        r, bits = min(self.cfg.lqer_rank, *err.shape), self.cfg.lqer_factor_bits
        U, S, Vh = torch.linalg.svd(err.float(), full_matrices=False)
        before = float(err.pow(2).sum())
        deq = []
        for f in (U[:, :r] * S[:r], Vh[:r]):
            s = row_scales(f, bits, "percentile", 0.0, 100.0)
            q = round_codes(f, s, bits)
            sections["codes"].append(q.cpu().numpy().tobytes())
            sections["f16"].append(s.to(torch.float16).cpu().numpy().tobytes())
            deq.append(q.float() * s[:, None])
        recon = deq[0] @ deq[1]
        header["entries"].append([name, "lqer", list(err.shape), "float32", bits, r])
        self.stats.setdefault("lqer", {})[name] = {
            "rank": r,
            "err_before": before,
            "err_after": float((err - recon).pow(2).sum()),
        }

    def _assemble(self, header: dict, sec: dict[str, list[bytes]], codes: bytes | None = None) -> bytes:
        sh = self.cfg.byte_shuffle
        header["shuffle"] = sh
        body = [b"".join(sec["codes"]) if codes is None else codes]
        f16, f32 = b"".join(sec["f16"]), b"".join(sec["f32"])
        body += [shuffle(f16, 2) if sh else f16, shuffle(f32, 4) if sh else f32, b"".join(sec["raw"])]
        header["sections"] = [len(b) for b in body]
        h = json.dumps(header, separators=(",", ":")).encode()
        return struct.pack("<I", len(h)) + h + b"".join(body)

    def export(self, state: dict[str, Tensor], model_budget: int | None = None) -> bytes:
        """The blob; `model_budget`: the bytes it may take (the cap minus the code bytes), which the
        pruning search (quant.prune_to_fit) aims at."""
        t0 = time.perf_counter()
        missing = [
            n
            for n, t in state.items()
            if self.quantized(n, t) and self.group(n).gptq and n not in self.hessians
        ]
        if missing and not self.calibrated:
            raise RuntimeError(
                f"quant: GPTQ is on for {len(missing)} matrices (e.g. {missing[0]}) but calibrate() was not "
                "run; the trainer calls it, a script must call quant.calibrate(model, batches) first"
            )
        header, sections = self.quantize(state)
        payload = self._assemble(header, sections)
        t1 = time.perf_counter()
        comp, _ = compressor(self.cfg.compressor, self.cfg.level, self.cfg.lzma_extreme)
        prefix = MAGIC + bytes([COMPRESSORS.index(self.cfg.compressor)])
        blob = prefix + comp(payload)
        self.stats.pop("prune", None)
        if self.cfg.prune_to_fit and model_budget is not None and len(blob) > model_budget:
            blob = self._prune(header, sections, lambda p: prefix + comp(p), blob, model_budget)
        t2 = time.perf_counter()
        self.stats.update(
            payload_bytes=len(payload),
            compressor=self.cfg.compressor,
            blob_bytes=len(blob),
            quantize_seconds=t1 - t0,
            compress_seconds=t2 - t1,
        )
        if self.cfg.report_compressors:  # timed apart: not part of quantize/compress seconds
            t3 = time.perf_counter()
            others = compare_compressors(payload, skip=self.cfg.compressor)
            self.stats["compressors"] = {self.cfg.compressor: len(blob) - 5, **others}
            self.stats["compare_seconds"] = time.perf_counter() - t3
        return blob

    # ----------------------------------------------------------------------------- pruning
    def prune_order(self, sections: dict[str, list[bytes]]) -> np.ndarray:
        """Offsets in the joined codes section of every |q| = 1 code of the quantized matrices (not
        gates, not LQER factors), smallest squared row scale first (the error zeroing it adds);
        ties keep payload order."""
        starts = np.cumsum([0] + [len(b) for b in sections["codes"]])
        pos, key = [np.zeros(0, np.int64)], [np.zeros(0, np.float64)]
        for i, s in self._prunable:
            q = np.frombuffer(sections["codes"][i], dtype=np.int8).reshape(s.numel(), -1)
            rows, cols = np.nonzero(np.abs(q) == 1)
            pos.append(starts[i] + rows.astype(np.int64) * q.shape[1] + cols)
            key.append(s.double().numpy()[rows] ** 2)
        pos_all, key_all = np.concatenate(pos), np.concatenate(key)
        return pos_all[np.argsort(key_all, kind="stable")]

    def _prune(
        self,
        header: dict,
        sections: dict[str, list[bytes]],
        pack: Callable[[bytes], bytes],
        blob: bytes,
        budget: int,
    ) -> bytes:
        """The blob with the fewest leading codes of `prune_order` zeroed whose real compressed size
        fits `budget`: n fits and n - 1 does not (the search keeps that bracket; compressed size
        is not exactly monotone in n, so this is the smallest count on the searched path). If zeroing
        every candidate does not fit, the unpruned blob comes back and the trainer's cap refusal
        stands."""
        t0 = time.perf_counter()
        budget = int(budget)
        order = self.prune_order(sections)
        codes = np.frombuffer(b"".join(sections["codes"]), dtype=np.int8)

        def probe(n: int) -> bytes:
            c = codes.copy()
            c[order[:n]] = 0
            return pack(self._assemble(dict(header), sections, c.tobytes()))

        # Each probe is one full compression (tens of seconds at record size, while the other ranks
        # wait), so probes run PRUNE_PROBES_PER_ROUND at a time: the compressors release the GIL.
        workers = PRUNE_PROBES_PER_ROUND
        lo, hi = 0, len(order)  # invariant: size(lo) > budget >= size(hi)
        sizes = {0: len(blob)}
        best = probe(hi)
        sizes[hi] = len(best)
        fits = sizes[hi] <= budget
        with ThreadPoolExecutor(workers) as pool:
            first = True
            while fits and hi - lo > 1:
                if first:  # around the linear guess: size falls about linearly with n
                    f = (sizes[lo] - budget) / max(sizes[lo] - sizes[hi], 1)
                    guess = lo + f * (hi - lo)
                    points = [round(guess * 2 ** ((i - (workers - 1) / 2) / 2)) for i in range(workers)]
                else:  # then k-ary: `workers` evenly spaced probes cut the bracket workers + 1 ways
                    points = [lo + (hi - lo) * (i + 1) // (workers + 1) for i in range(workers)]
                first = False
                points = sorted({p for p in points if lo < p < hi}) or [(lo + hi) // 2]
                for n, out in zip(points, pool.map(probe, points)):
                    sizes[n] = len(out)
                    if len(out) <= budget and n < hi:
                        hi, best = n, out
                lo = max([lo] + [n for n in points if n < hi])
        n = hi if fits else 0
        self.stats["prune"] = {
            "budget": budget,
            "candidates": len(order),
            "pruned": n,
            "fits": fits,
            "bytes_before": sizes[0],
            "bytes_after": sizes[n],
            "compressions": len(sizes) - 1,
            "seconds": time.perf_counter() - t0,
        }
        return best if fits else blob

    # -------------------------------------------------------------------------------- load
    @staticmethod
    def load(blob: bytes) -> dict[str, Tensor]:
        if blob[:4] != MAGIC:
            raise ValueError(
                "artifact is not a pgolf mixed-quant blob (no PGQ1 header); was it written by quant=mixed?"
            )
        _, decompress = compressor(COMPRESSORS[blob[4]], 0)
        payload = decompress(blob[5:])
        (hlen,) = struct.unpack("<I", payload[:4])
        header = json.loads(payload[4 : 4 + hlen])
        pos = 4 + hlen
        parts = []
        for n in header["sections"]:
            parts.append(payload[pos : pos + n])
            pos += n
        codes, f16, f32, raw = parts
        if header["shuffle"]:
            f16, f32 = unshuffle(f16, 2), unshuffle(f32, 4)
        offs = {"codes": 0, "f16": 0, "f32": 0, "raw": 0}
        bufs = {"codes": codes, "f16": f16, "f32": f32, "raw": raw}

        def take(sec: str, dtype: np.dtype, count: int) -> np.ndarray:
            n = count * dtype.itemsize
            a = np.frombuffer(bufs[sec], dtype=dtype, count=count, offset=offs[sec]).copy()
            offs[sec] += n
            return a

        out: dict[str, Tensor] = {}
        for e in header["entries"]:
            name, kind, shape, dtype = e[0], e[1], e[2], getattr(torch, e[3])
            numel = int(np.prod(shape)) if shape else 1
            if kind == "q":
                q = torch.from_numpy(take("codes", np.dtype(np.int8), numel)).view(shape).float()
                s = torch.from_numpy(take("f16", np.dtype(np.float16), shape[0])).float()
                out[name] = (q * s[:, None]).to(dtype)
            elif kind == "lqer":  # low-rank correction of an already loaded matrix
                (rows, cols), r = shape, e[5]
                qa = torch.from_numpy(take("codes", np.dtype(np.int8), rows * r)).view(rows, r).float()
                qb = torch.from_numpy(take("codes", np.dtype(np.int8), r * cols)).view(r, cols).float()
                sa = torch.from_numpy(take("f16", np.dtype(np.float16), rows)).float()
                sb = torch.from_numpy(take("f16", np.dtype(np.float16), r)).float()
                corr = (qa * sa[:, None]) @ (qb * sb[:, None])
                out[name] = (out[name].float() + corr).to(out[name].dtype)
            elif kind == "f16":
                out[name] = torch.from_numpy(take("f16", np.dtype(np.float16), numel)).view(shape).to(dtype)
            elif kind == "f32":
                out[name] = torch.from_numpy(take("f32", np.dtype(np.float32), numel)).view(shape).to(dtype)
            else:
                t = torch.empty(shape, dtype=dtype)
                a = take("raw", np.dtype(t.numpy().dtype), numel)
                out[name] = torch.from_numpy(a).view(shape)
        return out


def compare_compressors(payload: bytes, skip: str = "") -> dict[str, int]:
    """Bytes of `payload` under each installed compressor (but `skip`) at its strongest setting."""
    best = {"zlib": 9, "zstd": 22, "lzma": 9, "brotli": 11}
    return {k: len(compressor(k, best[k])[0](payload)) for k in available() if k != skip}


def build(cfg: MixedQuantConfig) -> MixedQuant:
    return MixedQuant(cfg)
