"""Training loaders: exact tokens against brute-force references, coverage, rank disjointness,
determinism, prefetch on == off, resumable state, clean shutdown, and document boundaries.

The synthetic shards encode where each token comes from: token i of shard s is s * 4000 + i. So a
window read from a batch names its shard and start, and any off-by-one shows up as a wrong value.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, write_tokens

from pgolf.data.boundaries import document_boundaries
from pgolf.data.loader import build_loader
from pgolf.data.shards import ShardError

STRIDE = 4000  # token value = shard * STRIDE + position
SIZES = [3000, 2500, 4000, 1800, 3500, 50]  # the last shard is shorter than one window
T = 64
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("loader_shards")
    out = []
    for s, n in enumerate(SIZES):
        path = folder / f"fineweb_train_{s:06d}.bin"
        write_tokens(path, s * STRIDE + np.arange(n))
        out.append(path)
    return out


def data_cfg(loader: str, prefetch: int = 0, **extra) -> SimpleNamespace:
    cfg = dict(
        loader=loader,
        prefetch=prefetch,
        # The shards' position-coded ids reach 20050: above the synthetic loader's 1024 ids.
        vocab_size=1024 if loader == "synthetic" else 32768,
        coprime_mix_ramp_batches=10,  # short, so the tests cross the whole mix schedule
        coprime_mix_start=2,
        coprime_mix_end=4,
        coprime_alpha_start=0.9,
        coprime_alpha_end=0.5,
        shuffled_seed="run",
    )
    cfg.update(extra)
    return SimpleNamespace(**cfg)


def batches(loader, n: int, global_tokens: int, seq_len: int = T, grad_accum: int = 1) -> list[tuple]:
    return [tuple(t.clone() for t in loader.next_batch(global_tokens, seq_len, grad_accum)) for _ in range(n)]


def run(name: str, files, n: int, *, seed=0, rank=0, world=1, prefetch=0, rows=3, **extra) -> list[tuple]:
    with build_loader(
        data_cfg(name, prefetch, **extra), files, seed=seed, rank=rank, world_size=world, device=CPU
    ) as loader:
        return batches(loader, n, rows * T * world)


def window_of(row: torch.Tensor, y_row: torch.Tensor) -> tuple[int, int]:
    """(shard, start) of a window, after checking it is one contiguous run and y is x shifted."""
    first = int(row[0])
    shard, start = divmod(first, STRIDE)
    expected = torch.arange(first, first + row.numel() + 1)
    assert torch.equal(row, expected[:-1]) and torch.equal(y_row, expected[1:]), "not one contiguous window"
    assert start + row.numel() + 1 <= SIZES[shard], "window runs past the end of its shard"
    return shard, start


def same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for u, v in zip(a, b) for p, q in zip(u, v))


# ---------------------------------------------------------------------------------------------
# brute-force references
# ---------------------------------------------------------------------------------------------


def stream_reference(files, n_calls: int, local: int, rank: int, world: int) -> list[np.ndarray]:
    """The sequential stream: all shards concatenated, repeated; chunk k = calls' spans of all ranks."""
    stream = np.concatenate([np.fromfile(f, dtype="<u2", offset=1024).astype(np.int64) for f in files])
    span = local + 1
    need = n_calls * world * span
    tiled = np.tile(stream, need // stream.size + 1)
    return [tiled[(k * world + rank) * span : (k * world + rank + 1) * span] for k in range(n_calls)]


class CoprimeReference:
    """The coprime plan written out plainly: each cursor is a materialized list of block indices."""

    def __init__(self, sizes, seed, world, ramp, mix_start, mix_end, a0, a1, names):
        from pgolf.data.coprime import fnv1a64

        self.rng = np.random.Generator(np.random.PCG64([fnv1a64(names), seed]))
        self.sizes, self.world = sizes, world
        self.ramp, self.mix_start, self.mix_end, self.a0, self.a1 = ramp, mix_start, mix_end, a0, a1
        self.queue: dict[int, list[int]] = {}  # shard -> starts still to visit, in cursor order
        self.built = 0

    def stride(self, bc):
        if bc <= 1:
            return 1
        while True:
            s = int(self.rng.integers(1, bc))
            if math.gcd(s, bc) == 1:
                return s

    def redraw(self, si):
        n = self.sizes[si]
        max_phase = min(T - 1, max(0, n - T - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        bc = (n - 1 - phase) // T
        start = int(self.rng.integers(bc)) if bc > 1 else 0
        s = self.stride(bc)
        self.queue[si] = [phase + ((start + k * s) % bc) * T for k in range(bc)]

    def plan(self, gns):
        eligible = [i for i, n in enumerate(self.sizes) if (n - 1) // T > 0]
        progress = min(self.built / self.ramp, 1.0)
        rem = [
            max(len(self.queue[si]), 1) if si in self.queue else (self.sizes[si] - 1) // T for si in eligible
        ]
        alpha = self.a0 + (self.a1 - self.a0) * progress
        w = np.array(rem, dtype=np.float64) ** alpha
        p = w / w.sum()
        ec = len(eligible)
        low = min(max(self.mix_start, self.world), ec, gns)
        high = min(max(self.mix_end, self.mix_start * self.world), ec, gns)
        mix = max(1, min(int(round(low + progress * (high - low))), ec, gns))
        picked = self.rng.choice(ec, size=mix, replace=False, p=p)
        counts = np.ones(mix, dtype=np.int64)
        if gns > mix:
            counts += self.rng.multinomial(gns - mix, p[picked] / p[picked].sum())
        perm = self.rng.permutation(mix)
        buckets = []
        for j, cnt in zip(picked[perm].tolist(), counts[perm].tolist()):
            si = eligible[j]
            got = []
            for _ in range(cnt):
                if not self.queue.get(si):
                    self.redraw(si)
                got.append(self.queue[si].pop(0))
            if len(got) > 1:
                got = [got[k] for k in self.rng.permutation(len(got)).tolist()]
            buckets.append([(si, g) for g in got])
        out = []
        active = buckets
        while active:
            # each round: every non-empty shard once, in a fresh order; survivors keep that order
            active = [active[j] for j in self.rng.permutation(len(active)).tolist()]
            for b in active:
                out.append(b.pop())
            active = [b for b in active if b]
        self.built += 1
        return out


class ShuffledReference:
    """The record's ShuffledSequenceLoader, with Python lists and list.pop()."""

    def __init__(self, sizes, seed, rank, world):
        self.mine = list(range(len(sizes)))[rank::world]
        self.sizes = [sizes[s] for s in self.mine]
        # the records key by the rank alone (seed=None); pgolf's default by (seed, rank)
        self.rng = np.random.Generator(np.random.PCG64(rank if seed is None else [seed, rank]))
        self.lists: list[list[int]] | None = None

    def reset(self):
        self.lists = []
        for n in self.sizes:
            max_phase = min(T - 1, max(0, n - T - 1))
            phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
            count = max((n - 1 - phase) // T, 0)
            self.lists.append([phase + int(k) * T for k in self.rng.permutation(count)])

    def batch(self, rows):
        if self.lists is None:
            self.reset()
        out = []
        for _ in range(rows):
            rem = np.array([len(v) for v in self.lists], dtype=np.float64)
            if rem.sum() == 0:
                self.reset()
                rem = np.array([len(v) for v in self.lists], dtype=np.float64)
            k = int(self.rng.choice(len(self.lists), p=rem / rem.sum()))
            out.append((self.mine[k], self.lists[k].pop()))
        return out


def expected_rows(windows) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([torch.arange(s * STRIDE + p, s * STRIDE + p + T) for s, p in windows])
    return x, x + 1


# ---------------------------------------------------------------------------------------------
# exact tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sequential_matches_the_stream(files, world):
    grad_accum = 8 // world
    local = 2 * T
    global_tokens = local * world * grad_accum
    for rank in range(world):
        with build_loader(
            data_cfg("sequential"), files, seed=0, rank=rank, world_size=world, device=CPU
        ) as ld:
            got = batches(ld, 40, global_tokens, T, grad_accum)  # wraps around the shards several times
        for (x, y), ref in zip(got, stream_reference(files, 40, local, rank, world)):
            assert torch.equal(x.reshape(-1), torch.from_numpy(ref[:-1]))
            assert torch.equal(y.reshape(-1), torch.from_numpy(ref[1:]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_coprime_matches_reference(files, world):
    names = [f.name for f in files]
    rows, n = 5, 30
    ref = CoprimeReference(SIZES, 7, world, 10, 2, 4, 0.9, 0.5, names)
    plans = [ref.plan(rows * world) for _ in range(n)]
    for rank in range(world):
        got = run("coprime", files, n, seed=7, rank=rank, world=world, rows=rows)
        for (x, y), plan in zip(got, plans):
            ex, ey = expected_rows(plan[rank::world])
            assert torch.equal(x, ex) and torch.equal(y, ey)


@pytest.mark.parametrize("world", [1, 2])
def test_shuffled_matches_reference(files, world):
    rows, n = 4, 60
    for rank in range(world):
        ref = ShuffledReference(SIZES, 3, rank, world)
        got = run("shuffled", files, n, seed=3, rank=rank, world=world, rows=rows)
        for x, y in got:
            ex, ey = expected_rows(ref.batch(rows))
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_shuffled_seed_rank_gives_the_records_batches_for_every_run_seed(files):
    """data.shuffled_seed=rank: the records' RNG key (the rank alone), so runs of any seed draw the
    record's batches; the default key (seed, rank) moves with the seed."""
    rows, n, world = 4, 40, 2
    for rank in range(world):
        for seed in (0, 7):
            ref = ShuffledReference(SIZES, None, rank, world)
            got = run(
                "shuffled", files, n, seed=seed, rank=rank, world=world, rows=rows, shuffled_seed="rank"
            )
            for x, y in got:
                ex, ey = expected_rows(ref.batch(rows))
                assert torch.equal(x, ex) and torch.equal(y, ey)
    run_keyed = [run("shuffled", files, 5, seed=s, rows=rows) for s in (0, 7)]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(*run_keyed))


# ---------------------------------------------------------------------------------------------
# coverage and rank disjointness
# ---------------------------------------------------------------------------------------------


def test_coprime_ranks_get_disjoint_windows_and_short_shards_are_skipped(files):
    world, rows, n = 2, 6, 60
    per_rank = [run("coprime", files, n, seed=1, rank=r, world=world, rows=rows) for r in range(world)]
    shards = set()
    for step in range(n):
        windows = {
            window_of(x[k], y[k]) for x, y in (per_rank[r][step] for r in range(world)) for k in range(rows)
        }
        assert len(windows) == rows * world, "two ranks (or rows) got the same window in one step"
        shards |= {s for s, _ in windows}
    assert shards == {0, 1, 2, 3, 4}, "the 50-token shard holds no window and must never be drawn"


def test_coprime_cursor_visits_every_block_once_per_pass(files):
    """The blocks a shard's cursor hands out, in order (before the in-batch shuffle mixes a pass's
    tail with the next pass's head), form whole passes of bc distinct blocks at one phase."""
    ld = build_loader(data_cfg("coprime"), files, seed=1, rank=0, world_size=2, device=CPU)
    taken: dict[int, list[int]] = {}
    original = ld.sampler._take

    def recording_take(si, seq_len, count):
        starts = original(si, seq_len, count)
        taken.setdefault(si, []).extend(starts.tolist())
        return starts

    ld.sampler._take = recording_take
    batches(ld, 60, 6 * T * 2)
    ld.close()
    full_passes = 0
    for s, starts in taken.items():
        i = 0
        while i < len(starts):
            phase = starts[i] % T
            bc = (SIZES[s] - 1 - phase) // T
            chunk = starts[i : i + bc]
            assert all(p % T == phase for p in chunk), "phase changed inside a cursor pass"
            if len(chunk) == bc:
                assert sorted(chunk) == [phase + k * T for k in range(bc)]
                full_passes += 1
            else:
                assert len(set(chunk)) == len(chunk)
            i += bc
    assert full_passes >= 5  # the test really crossed cursor redraws


def test_shuffled_ranks_own_disjoint_shards_and_cover_every_window_per_epoch(files):
    world, rows = 2, 4
    for rank in range(world):
        mine = list(range(len(SIZES)))[rank::world]
        got = run("shuffled", files, 120, seed=5, rank=rank, world=world, rows=rows)
        windows = [window_of(x[k], y[k]) for x, y in got for k in range(rows)]
        assert {s for s, _ in windows} <= set(mine)
        i, epochs = 0, 0
        while i < len(windows):
            # One epoch: every window of every owned shard, at one phase per shard.
            phases: dict[int, int] = {}
            epoch_len = None
            seen: list[tuple[int, int]] = []
            for s, p in windows[i:]:
                if s in phases and phases[s] != p % T:
                    break
                phases.setdefault(s, p % T)
                seen.append((s, p))
                if len(phases) == len([m for m in mine if SIZES[m] > T + 1]):
                    epoch_len = sum((SIZES[m] - 1 - ph) // T for m, ph in phases.items())
                    if len(seen) == epoch_len:
                        break
            if epoch_len is not None and len(seen) == epoch_len:
                expect = {
                    (m, ph + k * T) for m, ph in phases.items() for k in range((SIZES[m] - 1 - ph) // T)
                }
                assert set(seen) == expect and len(seen) == len(expect)
                epochs += 1
            else:
                assert len(set(seen)) == len(seen)  # a partial last epoch repeats nothing
            i += len(seen)
        assert epochs >= 2


# ---------------------------------------------------------------------------------------------
# determinism, seeds, prefetch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["coprime", "shuffled", "synthetic"])
def test_seeded_loaders_repeat_for_a_seed_and_differ_across_seeds(files, name):
    a = run(name, files, 8, seed=11, world=2, rank=1)
    b = run(name, files, 8, seed=11, world=2, rank=1)
    c = run(name, files, 8, seed=12, world=2, rank=1)
    assert same(a, b)
    assert not same(a, c)


def test_sequential_ignores_the_seed(files):
    assert same(run("sequential", files, 5, seed=1), run("sequential", files, 5, seed=2))


def test_synthetic_tokens_are_in_vocab_and_differ_across_ranks(files):
    r0 = run("synthetic", files, 3, world=2, rank=0)
    r1 = run("synthetic", files, 3, world=2, rank=1)
    assert not same(r0, r1)
    for x, y in r0:
        assert x.shape == (3, T) and x.dtype == torch.int64
        assert int(x.min()) >= 0 and int(x.max()) < 1024
        assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("name", ["sequential", "coprime", "shuffled"])
def test_prefetch_on_and_off_give_identical_batches(files, name):
    for rank in range(2):
        off = run(name, files, 25, seed=9, rank=rank, world=2, prefetch=0)
        on = run(name, files, 25, seed=9, rank=rank, world=2, prefetch=3)
        assert same(off, on)


def test_prefetch_follows_a_change_of_batch_shape(files):
    """A new batch size drops the batches made ahead and resumes from the last one handed out."""
    out = {}
    for prefetch in (0, 2):
        with build_loader(
            data_cfg("sequential", prefetch), files, seed=0, rank=0, world_size=1, device=CPU
        ) as ld:
            out[prefetch] = batches(ld, 4, 2 * T) + batches(ld, 4, 5 * T) + batches(ld, 2, 2 * T)
    assert same(out[0], out[2])


@pytest.mark.parametrize("name", ["sequential", "coprime", "shuffled"])
def test_prefetch_threads_give_the_batches_of_no_prefetch(files, name):
    """50 batches per rank, past shuffled epochs (every shard redrawn), coprime cursor redraws and
    the sequential stream's wrap: 1 to 4 threads, a shallow and the PR #1532 queue depth."""
    for rank in range(2):
        off = run(name, files, 50, seed=9, rank=rank, world=2, prefetch=0)
        for threads, depth in ((1, 3), (2, 3), (3, 100), (4, 1)):
            on = run(name, files, 50, seed=9, rank=rank, world=2, prefetch=depth, prefetch_threads=threads)
            assert same(off, on), (rank, threads, depth)


def test_prefetch_threads_deliver_in_plan_order_whatever_order_gathers_finish(files):
    """Gathers that finish out of order (earlier batches sleep longer) still arrive in plan order."""
    import time

    from pgolf.data.loader import Loader
    from pgolf.data.shuffled import ShuffledSampler

    class Slow(ShuffledSampler):
        def gather(self, plan, out, shards=None):
            time.sleep(0.02 * (3 - int(plan[1][0]) % 4))  # a batch-dependent delay of 0-60 ms
            super().gather(plan, out, shards)

    expected = run("shuffled", files, 20, seed=3)
    with Loader("shuffled", Slow(files, 3, 0, 1), 0, 1, CPU, prefetch=8, prefetch_threads=4) as ld:
        assert same(batches(ld, 20, 3 * T), expected)


def test_prefetch_threads_follow_a_change_of_batch_shape(files):
    out = {}
    for prefetch, threads in ((0, 1), (2, 3)):
        cfg = data_cfg("shuffled", prefetch, prefetch_threads=threads)
        with build_loader(cfg, files, seed=0, rank=0, world_size=1, device=CPU) as ld:
            out[threads] = batches(ld, 4, 2 * T) + batches(ld, 4, 5 * T) + batches(ld, 2, 2 * T)
    assert same(out[1], out[3])


# ---------------------------------------------------------------------------------------------
# position (checkpointing)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch, threads", [(0, 1), (3, 1), (3, 3)])
@pytest.mark.parametrize("name", ["sequential", "coprime", "shuffled", "synthetic"])
def test_state_dict_resumes_exactly(files, name, prefetch, threads):
    cfg = data_cfg(name, prefetch, prefetch_threads=threads)
    with build_loader(cfg, files, seed=4, rank=1, world_size=2, device=CPU) as ld:
        batches(ld, 25, 3 * T * 2)  # past a shuffled epoch and coprime cursor redraws
        state = json.loads(json.dumps(ld.state_dict()))  # plain values: any checkpoint format holds it
        expected = batches(ld, 15, 3 * T * 2)
    with build_loader(cfg, files, seed=4, rank=1, world_size=2, device=CPU) as fresh:
        batches(fresh, 2, 3 * T * 2)  # wherever it stands, loading moves it
        fresh.load_state_dict(state)
        assert same(batches(fresh, 15, 3 * T * 2), expected)


def test_a_position_taken_with_threads_resumes_without_them(files):
    """The state of a loader with 3 gather threads and a deep queue (batches in flight), loaded into
    a loader without prefetch, continues the uninterrupted stream."""
    threaded = data_cfg("shuffled", 50, prefetch_threads=3)
    uninterrupted = run("shuffled", files, 40, seed=4)
    with build_loader(threaded, files, seed=4, rank=0, world_size=1, device=CPU) as ld:
        assert same(batches(ld, 17, 3 * T), uninterrupted[:17])
        state = json.loads(json.dumps(ld.state_dict()))
    with build_loader(data_cfg("shuffled"), files, seed=4, rank=0, world_size=1, device=CPU) as fresh:
        fresh.load_state_dict(state)
        assert same(batches(fresh, 23, 3 * T), uninterrupted[17:])


def test_state_of_another_rank_is_refused(files):
    with build_loader(data_cfg("coprime"), files, seed=0, rank=0, world_size=2, device=CPU) as a:
        with build_loader(data_cfg("coprime"), files, seed=0, rank=1, world_size=2, device=CPU) as b:
            with pytest.raises(ValueError, match="same data.loader and number of processes"):
                b.load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------
# shutdown and errors
# ---------------------------------------------------------------------------------------------


def _producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pgolf-data-producer" and t.is_alive()]


def test_close_stops_the_producer_and_is_idempotent(files):
    before = len(_producers())
    ld = build_loader(data_cfg("coprime", 4), files, seed=0, rank=0, world_size=1, device=CPU)
    batches(ld, 2, 3 * T)
    assert len(_producers()) == before + 1
    ld.close()
    ld.close()
    assert len(_producers()) == before
    with pytest.raises(RuntimeError, match="closed"):
        ld.next_batch(3 * T, T, 1)


def test_a_producer_failure_is_raised_in_the_consumer(files):
    from pgolf.data.loader import Loader
    from pgolf.data.sequential import SequentialSampler

    class Failing(SequentialSampler):
        calls = 0

        def fill(self, out, local_tokens, seq_len):
            Failing.calls += 1
            if Failing.calls == 3:
                raise OSError("disk went away")
            super().fill(out, local_tokens, seq_len)

    ld = Loader("sequential", Failing(files, 0, 1), 0, 1, CPU, prefetch=2)
    with pytest.raises(RuntimeError, match="disk went away"):
        batches(ld, 5, 3 * T)
    ld.close()
    assert not _producers()


def _gatherers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pgolf-data-gather-") and t.is_alive()]


def test_close_stops_the_planner_and_every_gather_thread(files):
    before = (len(_producers()), len(_gatherers()))
    ld = build_loader(
        data_cfg("shuffled", 4, prefetch_threads=3), files, seed=0, rank=0, world_size=1, device=CPU
    )
    batches(ld, 2, 3 * T)
    assert (len(_producers()), len(_gatherers())) == (before[0] + 1, before[1] + 3)
    ld.close()
    ld.close()
    assert (len(_producers()), len(_gatherers())) == before


@pytest.mark.parametrize("stage", ["plan", "gather"])
def test_a_planner_or_gather_failure_is_raised_in_the_consumer(files, stage):
    from pgolf.data.loader import Loader
    from pgolf.data.shuffled import ShuffledSampler

    calls = itertools.count(1)  # next() is atomic: exactly one call, in one thread, gets 3

    class Failing(ShuffledSampler):
        def plan(self, local_tokens, seq_len):
            if stage == "plan" and next(calls) == 3:
                raise OSError("disk went away")
            return super().plan(local_tokens, seq_len)

        def gather(self, plan, out, shards=None):
            if stage == "gather" and next(calls) == 3:
                raise OSError("disk went away")
            super().gather(plan, out, shards)

    ld = Loader("shuffled", Failing(files, 0, 0, 1), 0, 1, CPU, prefetch=4, prefetch_threads=3)
    with pytest.raises(RuntimeError, match="disk went away"):
        batches(ld, 8, 3 * T)
    ld.close()
    assert not _producers() and not _gatherers()


@pytest.mark.parametrize("threads", [1, 3])
def test_process_exits_cleanly_with_a_live_producer(files, threads):
    """A process that ends without close(), normally or by an exception, exits at once and cleanly.
    Without the atexit hook, ~80% of such exits aborted ("terminate called without an active
    exception") from a daemon thread frozen inside torch during finalization."""
    code = (
        "import sys, torch; from types import SimpleNamespace; from pathlib import Path;"
        "from pgolf.data.loader import build_loader;"
        f"files = [Path(p) for p in {[str(f) for f in files]!r}];"
        f"cfg = SimpleNamespace(loader='sequential', prefetch=8, prefetch_threads={threads}, vocab_size=32768);"
        "ld = build_loader(cfg, files, seed=0, rank=0, world_size=1, device=torch.device('cpu'));"
        "ld.next_batch(4096, 64, 1); print('ok');"
        "sys.argv[1] == 'raise' and 1 / 0"
    )
    for mode in ("exit", "raise", "exit"):  # one at a time: side by side hides the abort
        proc = subprocess.run(
            [sys.executable, "-c", code, mode], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
        assert proc.returncode == (0 if mode == "exit" else 1), (proc.returncode, proc.stderr[-2000:])
        assert "terminate called" not in proc.stderr, proc.stderr[-2000:]


def test_clear_errors_for_unusable_shard_sets(files):
    with pytest.raises(ShardError, match="use more shards or data.loader=coprime"):
        build_loader(data_cfg("shuffled"), files[:2], seed=0, rank=2, world_size=4, device=CPU)
    with build_loader(data_cfg("coprime"), files[5:], seed=0, rank=0, world_size=1, device=CPU) as ld:
        with pytest.raises(ShardError, match="shorter train.seq_len"):
            ld.next_batch(T, T, 1)
    with build_loader(data_cfg("coprime"), files, seed=0, rank=0, world_size=1, device=CPU) as ld:
        ld.next_batch(2 * T, T, 1)
        with pytest.raises(ValueError, match="cannot switch"):
            ld.next_batch(2 * T, 2 * T, 1)
    with build_loader(data_cfg("sequential"), files, seed=0, rank=0, world_size=1, device=CPU) as ld:
        with pytest.raises(ValueError, match="multiple of seq_len"):
            ld.next_batch(100, T, 1)


def test_loader_options_are_validated(compose):
    from pgolf.config import job_config_from_dict
    from pgolf.registry import ConfigError

    job = job_config_from_dict(compose(["data.loader=coprime", "data.prefetch=4", "data.coprime_mix_end=16"]))
    assert (job.data.loader, job.data.prefetch, job.data.coprime_mix_end) == ("coprime", 4, 16)
    for bad, match in (
        ("data.loader=random", "valid choices"),
        ("data.prefetch=-1", "prefetch"),
        ("data.coprime_mix_start=40", "coprime_mix_start"),
    ):
        with pytest.raises(ConfigError, match=match):
            job_config_from_dict(compose([bad]))


def test_prefetch_thread_options_are_validated(compose):
    from pgolf.config import job_config_from_dict
    from pgolf.registry import ConfigError

    job = job_config_from_dict(compose([]))
    assert (job.data.prefetch, job.data.prefetch_threads, job.data.pin_memory) == (0, 1, True)
    job = job_config_from_dict(
        compose(["data.prefetch=100", "data.prefetch_threads=4", "data.pin_memory=false"])
    )
    assert (job.data.prefetch, job.data.prefetch_threads, job.data.pin_memory) == (100, 4, False)
    with pytest.raises(ConfigError, match=r"data\.prefetch_threads=0 must be >= 1"):
        job_config_from_dict(compose(["data.prefetch_threads=0"]))
    with pytest.raises(ConfigError, match=r"data\.prefetch_threads=2 needs data\.prefetch > 0"):
        job_config_from_dict(compose(["data.prefetch_threads=2"]))


# ---------------------------------------------------------------------------------------------
# document boundaries
# ---------------------------------------------------------------------------------------------


def boundaries_reference(x: np.ndarray, bos: int, max_doc_len: int) -> list[int]:
    """Segment starts by walking every position."""
    rows, width = x.shape
    starts, seg_start = [], None
    for i in range(rows * width):
        new = i % width == 0 or x.flat[i] == bos or (max_doc_len and i - seg_start >= max_doc_len)
        if new:
            starts.append(i)
            seg_start = i
    return starts


@pytest.mark.parametrize("max_doc_len", [0, 20, T])
def test_document_boundaries_match_reference(max_doc_len):
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(40):
        x = rng.integers(2, 50, size=(4, T))
        x[rng.random(x.shape) < rng.uniform(0, 0.3)] = 1  # BOS density varies per trial
        b = document_boundaries(x, bos_id=1, max_doc_len=max_doc_len, bucket=16)
        starts = boundaries_reference(x, 1, max_doc_len)
        total = x.size
        assert b.num_segments == len(starts)
        assert b.cu_seqlens.dtype == np.int32 and b.cu_seqlens.size % 16 == 0
        assert b.cu_seqlens[: len(starts)].tolist() == starts
        assert (b.cu_seqlens[len(starts) :] == total).all()  # padding: zero-length segments
        assert b.bos_positions.tolist() == np.flatnonzero(x.reshape(-1) == 1).tolist()
        seg = np.diff(starts + [total])
        assert b.max_seqlen == seg.max()
        if max_doc_len:
            assert b.max_seqlen <= max_doc_len
        lengths.add(b.cu_seqlens.size)
    # bounded shapes: at most one per bucket step up to the worst case of a segment per token
    assert len(lengths) <= -(-(4 * T + 1) // 16)


def test_document_boundaries_flat_buffer_counts_as_one_row():
    x = np.array([1, 5, 6, 1, 7, 8, 9, 1])
    b = document_boundaries(x, bos_id=1, bucket=4)
    assert b.cu_seqlens.tolist() == [0, 3, 7, 8]
    assert (b.num_segments, b.max_seqlen) == (3, 4)


# ---------------------------------------------------------------------------------------------
# GPU: the side-stream copy path
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sequential", "coprime", "shuffled"])
def test_cuda_prefetch_matches_cpu(files, name):
    cpu = run(name, files, 12, seed=2, rank=1, world=2)
    # The trainer passes cuda:<local_rank>; a bare "cuda" must work too.
    for prefetch, cuda, extra in (
        (0, torch.device("cuda"), {}),
        (3, torch.device("cuda"), {}),
        (3, torch.device("cuda", 0), {}),
        (100, torch.device("cuda", 0), {"prefetch_threads": 4}),
        (3, torch.device("cuda", 0), {"prefetch_threads": 2, "pin_memory": False}),
    ):
        cfg = data_cfg(name, prefetch, **extra)
        with build_loader(cfg, files, seed=2, rank=1, world_size=2, device=cuda) as ld:
            assert ld.pool.pin == extra.get("pin_memory", True)
            got = []
            for _ in range(12):
                x, y = ld.next_batch(3 * T * 2, T, 1)
                assert x.device.type == "cuda" and x.dtype == torch.int64
                got.append(((x * 1).cpu(), (y * 1).cpu()))  # consume on the compute stream
        assert same(cpu, got)


# ---------------------------------------------------------------------------------------------
# through the trainer
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_prefetch_changes_nothing(tmp_path, shard_dir, tokenizer_model):
    """End to end on CPU: prefetch off, on, and on with gather threads give bit-identical losses
    (same batches, same math); the threads are closed at the end (the run's process exits normally)."""
    from conftest import run_cli, tiny_cpu_args

    results = {}
    for prefetch, threads in ((0, 1), (3, 1), (3, 2)):
        d = tmp_path / f"shuffled{prefetch}x{threads}"
        extra = {
            "data.loader": "shuffled",
            "data.prefetch": str(prefetch),
            "data.prefetch_threads": str(threads),
        }
        proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **extra), d)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[(prefetch, threads)] = json.loads((d / "run" / "result.json").read_text())
    for setting in ((3, 1), (3, 2)):
        assert results[(0, 1)]["train_losses"] == results[setting]["train_losses"], setting
        assert results[(0, 1)]["val_loss"] == results[setting]["val_loss"], setting
