"""Console output through `logging`: Hydra's run.log, hydra.verbose, the worker relay, the progress bar
on a terminal, and progress lines of long loops."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_cpu_args

from pgolf import log as runlog
from pgolf.log import Progress, RunLog
from pgolf.parent.console import RELAY_FORMAT, TAGGED, relay

FINAL = re.compile(r"^pgolf: val_bpb \d+\.\d+ ", re.M)


def _file_lines(text: str, logger: str, level: str) -> list[str]:
    """Messages of run.log lines (`[time][logger][LEVEL] - msg`) from one logger at one level."""
    tag = f"[{logger}][{level}] - "
    return [line.split(tag, 1)[1] for line in text.splitlines() if tag in line]


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_run_log_holds_the_console_lines_and_verbose_adds_debug(
    tiny_run, tmp_path, shard_dir, tokenizer_model
):
    """A single run (worker in the parent's process): run.log is Hydra's record of the console."""
    args = tiny_cpu_args(shard_dir, tokenizer_model)
    plain_dir, plain = tiny_run  # the same args, run once for the whole session
    log = (plain_dir / "run" / "run.log").read_text()
    assert _file_lines(log, "pgolf.trainer", "INFO")[0].startswith("pgolf ")
    assert any(m.startswith("step:6/6 train_loss:") for m in _file_lines(log, "pgolf.trainer", "INFO"))
    assert FINAL.match(_file_lines(log, "pgolf.run", "INFO")[-1])
    assert FINAL.search(plain.stdout)  # the one-line summary is still a plain console line
    assert "[DEBUG]" not in log and "DEBUG " not in plain.stdout
    # train.log is the complete record: debug lines included even when the console hides them
    train_log = (plain_dir / "run" / "train.log").read_text()
    assert "phase:build start" in train_log and "step:6/6 train_loss:" in train_log

    verbose = run_cli([*args, "hydra.verbose=pgolf.trainer"], tmp_path / "verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    log = (tmp_path / "verbose" / "run" / "run.log").read_text()
    debug = _file_lines(log, "pgolf.trainer", "DEBUG")
    assert "phase:build start" in debug and any(m.startswith("phase:eval done in") for m in debug)
    assert "DEBUG pgolf.trainer: phase:build start" in verbose.stdout
    assert not _file_lines(log, "pgolf.run", "DEBUG")  # only the logger named was turned up


@pytest.mark.slow
def test_sweep_job_relays_its_worker_subprocess_into_run_log(tiny_sweep):
    """A sweep job's worker is a subprocess: the parent logs its lines again, names and levels kept."""
    sweep, proc = tiny_sweep  # `-m ... hydra.verbose=[pgolf.trainer]`, one job
    log = (sweep / "0" / "run.log").read_text()
    info = _file_lines(log, "pgolf.trainer", "INFO")
    assert info[0].startswith("pgolf ") and any(m.startswith("step:6/6 train_loss:") for m in info)
    assert any(m.startswith("final_roundtrip val_loss:") for m in info)
    assert "phase:build start" in _file_lines(log, "pgolf.trainer", "DEBUG")  # hydra.verbose reached it
    assert FINAL.match(_file_lines(log, "pgolf.run", "INFO")[-1])
    assert FINAL.search(proc.stdout)
    assert "INFO:pgolf" not in proc.stdout + log  # no relay tag left unparsed


def test_relay_parses_what_the_worker_writes(caplog):
    record = logging.LogRecord("pgolf.trainer", logging.DEBUG, __file__, 1, "step:3 a:b 50%", None, None)
    line = logging.Formatter(RELAY_FORMAT).format(record)
    assert TAGGED.fullmatch(line).groups() == ("DEBUG", "pgolf.trainer", "step:3 a:b 50%")
    with caplog.at_level(logging.DEBUG):
        relay([line + "\n", "Traceback (most recent call last):\n", "\n"], logging.WARNING)
    got = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert got == [
        ("pgolf.trainer", "DEBUG", "step:3 a:b 50%"),
        ("pgolf.worker", "WARNING", "Traceback (most recent call last):"),
    ]


# ------------------------------------------------------------------------- the progress bar
class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: \\r returns to column 0, ESC[K clears to the end of the line."""
    lines, cur, col = [], [], 0
    i = 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            del cur[col:]
            i += 3
            continue
        c = raw[i]
        if c == "\r":
            col = 0
        elif c == "\n":
            lines.append("".join(cur))
            cur, col = [], 0
        else:
            cur[col : col + 1] = [c]
            col += 1
        i += 1
    return lines + ["".join(cur)]


@pytest.fixture
def tty_logger():
    """pgolf.trainer's console on a fake terminal, as Hydra's console handler would write it."""
    tty = FakeTty()
    handler = logging.StreamHandler(tty)
    logger = logging.getLogger("pgolf.trainer")
    old = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield tty, handler
    logger.removeHandler(handler)
    logger.setLevel(old[0])
    logger.propagate = old[1]


def test_log_lines_never_run_into_the_progress_bar(tmp_path, tty_logger):
    tty, handler = tty_logger
    log = RunLog(tmp_path / "train.log", enabled=True, stream=tty)
    for step in range(1, 5):
        log(f"step:{step}/4 train_loss:1.0")
        log.progress(step, 4, 1.0, 10.0, 1.0)
        if step == 2:
            log("a line between two bars")
    log("after the bar")
    log.close()
    shown = screen(tty.getvalue())
    logged = [s for s in shown if not s.startswith("train [")]
    assert logged == ["step:1/4 train_loss:1.0", "step:2/4 train_loss:1.0", "a line between two bars",
                      "step:3/4 train_loss:1.0", "step:4/4 train_loss:1.0", "after the bar", ""]  # fmt: skip
    bars = [s for s in shown if s.startswith("train [")]
    assert len(bars) == 1 and " 4/4 " in bars[0]  # one bar, at its last state, on its own line
    assert shown.index(bars[0]) == shown.index("step:4/4 train_loss:1.0") + 1
    assert handler.stream is tty  # the handler has its own stream back once the bar is done


def test_bar_stays_below_the_lines_while_it_runs(tmp_path, tty_logger):
    tty, _ = tty_logger
    log = RunLog(None, enabled=True, stream=tty)
    log.progress(1, 10, 2.0, 10.0, 9.0)
    log("val_loss:2.0")
    shown = screen(tty.getvalue())
    assert shown[0] == "val_loss:2.0" and shown[1].startswith("train [##") and " 1/10 " in shown[1]
    log.close()


def test_no_bar_off_a_terminal(tmp_path):
    out = io.StringIO()
    log = RunLog(None, enabled=True, stream=out)
    log.progress(1, 2, 1.0, 1.0, 1.0)
    assert out.getvalue() == "" and not log.lifted


# --------------------------------------------------------------------------- progress lines
def test_progress_logs_tenths_no_faster_than_min_and_no_slower_than_max():
    now = [0.0]
    lines: list[str] = []
    p = Progress(lines.append, "eval:sliding", 1000, "windows", clock=lambda: now[0])
    for _ in range(1000):  # 0.1 s per item: a line at each tenth, 10 s apart
        now[0] += 0.1
        p.advance()
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(100, 1000, 100))
    assert lines[0] == "eval:sliding: 100/1,000 windows (10%) 10s, eta 90s"
    now[0], lines[:] = 0.0, []
    p = Progress(lines.append, "x", 1000, "windows", clock=lambda: now[0])
    for _ in range(1000):  # fast: the tenths pass every 0.1 s, but lines come every 5 s at most
        now[0] += 0.001
        p.advance()
    assert lines == []
    for _ in range(3):  # slow and still before the next tenth: a line after 60 s anyway
        now[0] += 30.0
        p.done = 50
        p.advance(0)
    assert len(lines) == 1 and "50/1,000" in lines[0]


def test_sliding_eval_reports_progress(monkeypatch, tokenizer_model):
    """evaluate_sliding's `log` gets window counts as it goes, without changing the score."""
    import sentencepiece as spm

    from pgolf.data.bpb import build_byte_tables
    from pgolf.eval.sliding import WindowScorer, evaluate_sliding
    from pgolf.eval.val import ByteLUT

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    lut = ByteLUT(build_byte_tables(sp, sp.vocab_size()), torch.device("cpu"))
    stream = np.random.default_rng(0).integers(0, sp.vocab_size(), 2000)

    def nll(x, y, last=0):
        out = (x.float() * 0.001 + y.float() * 0.002).sin().abs()
        return out[:, -last:] if last else out

    scorer = WindowScorer(nll, stream, 64, 16, 4, lut, torch.device("cpu"), torch.float32)
    quiet = evaluate_sliding(scorer)
    monkeypatch.setattr(runlog, "PROGRESS_MIN_S", 0.0)
    lines: list[str] = []
    loud = evaluate_sliding(scorer, log=lines.append)
    assert loud.val_bpb == quiet.val_bpb
    n = scorer.starts().size
    done = [int(re.match(rf"eval:sliding: (\d+)/{n:,} windows ", line).group(1)) for line in lines]
    # one line per tenth of the windows, each at the first batch past it (the window at 0, then 4 a batch)
    assert done == [next(d for d in range(1, n, 4) if d >= k * n / 10) for k in range(1, 10)]
