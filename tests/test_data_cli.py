"""`python -m pgolf.data download|build`: a fake local hub through the real download path, resume
after partial and corrupt files, the huggingface_hub call, and the build round trip."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import REPO, SAMPLE_TEXT, write_tokens

from pgolf.data.download import DownloadError, HubSource, LocalHub, download
from pgolf.data.shards import HEADER_BYTES, load_tokens, read_header
from pgolf.data.source import open_shards

SHARD = 500  # tokens per full shard in the fake export
VAL_SIZES = [500, 210]
TRAIN_SIZES = [500, 500, 500, 123]
DATASET = "datasets/datasets/fineweb10B_sp1024"  # inside the hub repo (remote root "datasets")


def _shard_tokens(split: str, i: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(hash((split, i)) % 2**32)
    return rng.integers(0, 400, size=n)


@pytest.fixture
def hub(tmp_path, tokenizer_model) -> Path:
    """A folder laid out like willdepueoai/parameter-golf, with a 400-piece tokenizer."""
    root = tmp_path / "hub"
    for split, sizes in (("val", VAL_SIZES), ("train", TRAIN_SIZES)):
        for i, n in enumerate(sizes):
            path = root / DATASET / f"fineweb_{split}_{i:06d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_tokens(path, _shard_tokens(split, i, n))
    tok = root / "datasets/tokenizers"
    tok.mkdir(parents=True)
    shutil.copyfile(tokenizer_model, tok / "fineweb_1024_bpe.model")
    shutil.copyfile(tokenizer_model.with_suffix(".vocab"), tok / "fineweb_1024_bpe.vocab")
    manifest = {
        "version": "10B",
        "shard_size": SHARD,
        "datasets": [
            {"name": "fineweb10B_sp4096", "tokenizer_name": "sp_bpe_4096", "stats": {}},
            {
                "name": "fineweb10B_sp1024",
                "tokenizer_name": "sp_bpe_1024",
                "vocab_size": 400,
                "stats": {
                    "files_val": len(VAL_SIZES),
                    "files_train": len(TRAIN_SIZES),
                    "tokens_val": sum(VAL_SIZES),
                    "tokens_train": sum(TRAIN_SIZES),
                },
            },
        ],
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
    }
    (root / "datasets/manifest.json").write_text(json.dumps(manifest))
    return root


class Counting(LocalHub):
    """The local hub, counting what the downloader actually fetched."""

    def __init__(self, root):
        super().__init__(root)
        self.fetched: list[str] = []

    def fetch(self, remote: str) -> Path:
        self.fetched.append(remote)
        return super().fetch(remote)


def _get(root: Path, source, train_shards: int = 3, **kw) -> dict:
    return download(root, "sp1024", train_shards, source=source, log=lambda _: None, **kw)


def _dest(root: Path, name: str) -> Path:
    return root / "datasets/fineweb10B_sp1024" / name


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------


def test_download_fetches_the_manifest_plan_into_the_config_layout(tmp_path, hub):
    root = tmp_path / "data"
    src = Counting(hub)
    out = _get(root, src)
    folder = root / "datasets/fineweb10B_sp1024"
    assert out["dataset_dir"] == folder and out["tokenizer"] == root / "tokenizers/fineweb_1024_bpe.model"
    assert sorted(p.name for p in folder.glob("*.bin")) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
        "fineweb_val_000000.bin",
        "fineweb_val_000001.bin",
    ]
    assert (folder / "manifest.json").is_file() and (root / "tokenizers/fineweb_1024_bpe.vocab").is_file()
    assert len(out["fetched"]) == 7 and not out["present"]  # 2 val + 3 train + model + vocab
    assert not list(root.rglob("*.part"))
    for p in folder.glob("*.bin"):
        assert p.read_bytes() == (hub / "datasets/datasets/fineweb10B_sp1024" / p.name).read_bytes()
    # What the data=fineweb_sp1024 config would open passes every pre-training check.
    src_data = open_shards(folder, "fineweb_train_*.bin", "fineweb_val_*.bin", out["tokenizer"], 400)
    assert src_data.train_tokens == 1500 and src_data.val_tokens_total == sum(VAL_SIZES)


def test_download_resumes_and_replaces_partial_and_corrupt_files(tmp_path, hub):
    root = tmp_path / "data"
    _get(root, LocalHub(hub), train_shards=2)
    # A later call with more shards fetches only what is missing.
    src = Counting(hub)
    out = _get(root, src, train_shards=3)
    assert [r for r in src.fetched if r.endswith(".bin")] == [f"{DATASET}/fineweb_train_000002.bin"]
    assert len(out["present"]) == 6
    # An interrupted copy (truncated) and a file with a broken header are fetched again.
    partial, corrupt = _dest(root, "fineweb_train_000001.bin"), _dest(root, "fineweb_val_000000.bin")
    data = partial.read_bytes()
    partial.unlink()  # a new inode: never write through a hard link into the hub's copy
    partial.write_bytes(data[: HEADER_BYTES + 100])
    bad = bytearray(corrupt.read_bytes())
    bad[0:4] = (12345).to_bytes(4, "little")
    corrupt.unlink()
    corrupt.write_bytes(bytes(bad))
    src = Counting(hub)
    out = _get(root, src)
    assert sorted(r for r in src.fetched if r.endswith(".bin")) == [
        f"{DATASET}/fineweb_train_000001.bin",
        f"{DATASET}/fineweb_val_000000.bin",
    ]
    assert sorted(out["replaced"]) == sorted([str(partial), str(corrupt)])
    assert read_header(partial) == 500 and read_header(corrupt) == 500
    # A right-sized shard whose token count contradicts the manifest is not trusted either.
    short = _dest(root, "fineweb_train_000000.bin")
    short.unlink()
    write_tokens(short, np.zeros(499))
    src = Counting(hub)
    _get(root, src)
    assert [r for r in src.fetched if r.endswith(".bin")] == [f"{DATASET}/fineweb_train_000000.bin"]
    assert read_header(short) == 500


def test_a_damaged_source_file_is_refused_and_named(tmp_path, hub):
    victim = hub / DATASET / "fineweb_train_000001.bin"
    victim.write_bytes(victim.read_bytes()[:-2])  # one token short
    with pytest.raises(DownloadError, match=r"fineweb_train_000001\.bin.*delete it"):
        _get(tmp_path / "data", LocalHub(hub))
    assert not _dest(tmp_path / "data", "fineweb_train_000001.bin").exists()
    assert not list((tmp_path / "data").rglob("*.part"))
    # A tokenizer that is not a SentencePiece model is refused as well.
    (hub / "datasets/tokenizers/fineweb_1024_bpe.model").write_bytes(b"not a model")
    victim.unlink()
    write_tokens(victim, _shard_tokens("train", 1, 500))
    with pytest.raises(DownloadError, match="SentencePiece"):  # a fresh root: the first copy stays intact
        _get(tmp_path / "fresh", LocalHub(hub))


def test_plan_errors_name_the_fix(tmp_path, hub):
    with pytest.raises(DownloadError, match=r"--train-shards must be in 0\.\.4"):
        _get(tmp_path / "d", LocalHub(hub), train_shards=5)
    with pytest.raises(DownloadError, match="no dataset fineweb10B_sp2048.*fineweb10B_sp1024"):
        download(tmp_path / "d", "sp2048", 1, source=LocalHub(hub), log=lambda _: None)
    with pytest.raises(DownloadError, match="sp<vocab>"):
        download(tmp_path / "d", "byte260", 1, source=LocalHub(hub), log=lambda _: None)
    with pytest.raises(DownloadError, match="manifest.json"):
        _get(tmp_path / "fresh", LocalHub(tmp_path / "nowhere"))


def test_unreachable_source_falls_back_to_the_saved_manifest(tmp_path, hub):
    root = tmp_path / "data"
    _get(root, LocalHub(hub))

    class Offline(LocalHub):
        def fetch(self, remote):
            raise ConnectionError("no network")

    messages: list[str] = []
    out = download(root, "sp1024", 3, source=Offline(hub), log=messages.append)
    assert len(out["present"]) == 7 and any("unreachable" in m for m in messages)


def test_hub_source_calls_hf_hub_download(tmp_path, hub, monkeypatch):
    """The default source asks huggingface_hub for each file of the dataset repo, and links the
    resolved blob (hub cache entries are symlinks), not the link."""
    calls = []
    cache = tmp_path / "hf_cache"

    def hf_hub_download(repo_id, filename, subfolder=None, repo_type=None):
        calls.append((repo_id, filename, subfolder, repo_type))
        rel = f"{subfolder}/{filename}" if subfolder else filename
        link = cache / "snapshots" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            os.symlink(hub / rel, link)
        return str(link)

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download)
    )
    root = tmp_path / "data"
    out = download(root, "sp1024", 1, log=lambda _: None)
    assert {c[0] for c in calls} == {"willdepueoai/parameter-golf"} and {c[3] for c in calls} == {"dataset"}
    assert ("willdepueoai/parameter-golf", "manifest.json", "datasets", "dataset") in calls
    assert (
        "willdepueoai/parameter-golf",
        "fineweb_val_000001.bin",
        "datasets/datasets/fineweb10B_sp1024",
        "dataset",
    ) in calls
    assert not out["tokenizer"].is_symlink() and read_header(_dest(root, "fineweb_train_000000.bin")) == 500
    calls.clear()
    download(tmp_path / "d2", "sp1024", 0, repo_id="me/mirror", log=lambda _: None)
    assert {c[0] for c in calls} == {"me/mirror"}


def test_missing_huggingface_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(DownloadError, match=r"pip install 'pgolf\[download\]'.*--local-hub"):
        HubSource("willdepueoai/parameter-golf")


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pgolf.data", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_download_from_a_local_hub(tmp_path, hub):
    proc = _cli(
        "download",
        "--local-hub",
        str(hub),
        "--remote-root",
        "datasets",
        "--root",
        str(tmp_path / "r"),
        "--train-shards",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "next: " in proc.stdout and "data.vocab_size=400" in proc.stdout
    assert read_header(tmp_path / "r/datasets/fineweb10B_sp1024/fineweb_train_000001.bin") == 500
    proc = _cli("download", "--local-hub", str(hub), "--root", str(tmp_path / "r"), "--train-shards", "9")
    assert proc.returncode != 0 and "pgolf.data download:" in proc.stderr


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------


def _docs() -> list[str]:
    from _corpus import embedded_docs

    return list(SAMPLE_TEXT) + list(embedded_docs()[:60]) + ["x", "Naïve café 😀 ①"]


def _split_at_bos(stream: np.ndarray, bos: int) -> list[list[int]]:
    starts = np.flatnonzero(stream == bos)
    assert starts.size and starts[0] == 0, "a split must start with BOS"
    ends = list(starts[1:]) + [stream.size]
    return [stream[a + 1 : b].tolist() for a, b in zip(starts, ends)]


def test_cli_build_round_trip_and_serves_as_a_local_hub(tmp_path):
    docs = _docs()
    inputs = tmp_path / "in"
    inputs.mkdir()
    # Three input kinds, in order: jsonl.xz, gz jsonl with another field name... and a text file.
    with lzma.open(inputs / "a.jsonl.xz", "wt", encoding="utf-8") as f:
        for d in docs[:40]:
            f.write(json.dumps({"text": d}) + "\n")
    with gzip.open(inputs / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[40:-1]:
            f.write(json.dumps({"text": d}) + "\n\n")  # blank lines are skipped
    (inputs / "c.txt").write_text(docs[-1], encoding="utf-8")
    root = tmp_path / "root"
    proc = _cli(
        "build",
        "--input",
        str(inputs / "a.jsonl.xz"),
        str(inputs / "b.jsonl.gz"),
        str(inputs / "c.txt"),
        "--root",
        str(root),
        "--vocab-size",
        "512",
        "--val-docs",
        "7",
        "--shard-tokens",
        "3000",
    )
    assert proc.returncode == 0, proc.stderr
    model = root / "tokenizers/fineweb_512_bpe.model"
    folder = root / "datasets/fineweb10B_sp512"
    assert f"data.path={folder}" in proc.stdout
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 512 and sp.bos_id() == 1

    def split(name: str) -> np.ndarray:
        files = sorted(folder.glob(f"fineweb_{name}_*.bin"))
        assert all(read_header(f) == 3000 for f in files[:-1])
        return np.concatenate([load_tokens(f) for f in files])

    spans = _split_at_bos(split("val"), 1) + _split_at_bos(split("train"), 1)
    assert len(spans) == len(docs) and len(_split_at_bos(split("val"), 1)) == 7
    for doc, ids in zip(docs, spans):
        # decode(shards) == the document after the tokenizer's own nmt_nfkc normalization
        assert sp.decode(ids) == sp.normalize(doc).replace("\u2581", " ")
    manifest = json.loads((root / "manifest.json").read_text())
    stats = manifest["datasets"][0]["stats"]
    assert (stats["docs_val"], stats["docs_train"]) == (7, len(docs) - 7)
    # The built root is a hub: download from it through the same code path.
    out = download(
        tmp_path / "copy",
        "sp512",
        stats["files_train"],
        source=LocalHub(root),
        remote_root="",
        log=lambda _: None,
    )
    assert len(out["fetched"]) == stats["files_train"] + stats["files_val"] + 2


def test_build_reuses_a_tokenizer_and_rejects_bad_input(tmp_path, tokenizer_model):
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"body": d}) + "\n" for d in _docs()[:30]))
    root = tmp_path / "root"
    ok = _cli(
        "build", "--input", str(docs), "--root", str(root), "--tokenizer", str(tokenizer_model),
        "--text-field", "body", "--val-docs", "5",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert (root / "tokenizers/fineweb_400_bpe.model").read_bytes() == tokenizer_model.read_bytes()
    assert len(list((root / "datasets/fineweb10B_sp400").glob("fineweb_*_000000.bin"))) == 2
    wrong_field = _cli(
        "build", "--input", str(docs), "--root", str(root), "--tokenizer", str(tokenizer_model)
    )
    assert (
        wrong_field.returncode != 0
        and f"{docs}:1" in wrong_field.stderr
        and "--text-field" in wrong_field.stderr
    )
    too_few = _cli(
        "build", "--input", str(docs), "--root", str(root), "--tokenizer", str(tokenizer_model),
        "--text-field", "body", "--val-docs", "30",
    )  # fmt: skip
    assert too_few.returncode != 0 and "--val-docs 30" in too_few.stderr


def test_export_streams_a_generator_on_several_processes(tmp_path, tokenizer_model):
    """A generator (no len) on a spawn pool gives the same shards as a list in one process."""
    from pgolf.data.build import export_shards

    docs = list(_docs()) * 20  # > 4 batches, so the pool really splits the work
    a = export_shards(tokenizer_model, docs, tmp_path / "a", val_docs=9, shard_tokens=5000, workers=1)
    b = export_shards(tokenizer_model, iter(docs), tmp_path / "b", val_docs=9, shard_tokens=5000, workers=2)
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").glob("*.bin"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("*.bin")) and len(names) > 3
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
