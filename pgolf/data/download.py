"""Fetch the challenge's published FineWeb exports: manifest-driven, resumable, verified.

The format of what it fetches: docs/techniques.md#data-format

The hub repo holds `<remote_root>/manifest.json`, `<remote_root>/datasets/fineweb10B_<variant>/`
shards and `<remote_root>/tokenizers/` models, as the challenge's `cached_challenge_fineweb.py`
expects. They land in `<root>/datasets/fineweb10B_<variant>/` and `<root>/tokenizers/`, where the
`data=fineweb_sp*` configs look (root = $PGOLF_DATA_ROOT, default ./data).

A file already in place is kept when it verifies (a shard's header, exact size and, where the
manifest implies it, token count; a tokenizer's vocabulary size), so an interrupted download
resumes where it stopped and a truncated or corrupt file is fetched again. New files are written
next to their destination and renamed only after they verify. The source is pluggable: the
Hugging Face hub (`huggingface_hub`, an optional dependency) or a local folder laid out like the
hub repo, through the same code path.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from pgolf.data.shards import ShardError, read_header
from pgolf.results import write_text_atomic

# Where each variant is published (the SP4096/SP8192 records' READMEs point at the second repo).
DEFAULT_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
}
REMOTE_ROOT = "datasets"


class DownloadError(RuntimeError):
    """A file could not be fetched or did not verify; the message names it and the fix."""


class Source(Protocol):
    def fetch(self, remote: str) -> Path:
        """A local, complete copy of `remote` (a path inside the repo) to copy from."""
        ...


class HubSource:
    """A Hugging Face dataset repo. hf_hub_download keeps its own cache and resumes partial files."""

    def __init__(self, repo_id: str):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise DownloadError(
                "downloading from the Hugging Face hub needs huggingface_hub: "
                "pip install 'pgolf[download]' (or pip install huggingface_hub), or pass --local-hub DIR"
            ) from None
        self.repo_id = repo_id
        self._download = hf_hub_download

    def fetch(self, remote: str) -> Path:
        p = PurePosixPath(remote)
        path = self._download(
            repo_id=self.repo_id,
            filename=p.name,
            subfolder=None if str(p.parent) == "." else str(p.parent),
            repo_type="dataset",
        )
        # Cache entries are symlinks into a blob store: copy the blob, not the link.
        return Path(path).resolve(strict=True)

    def __str__(self) -> str:
        return f"hf://datasets/{self.repo_id}"


class LocalHub:
    """A folder laid out like the hub repo (tests, mirrors, or the root a `build` wrote)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def fetch(self, remote: str) -> Path:
        path = self.root / remote
        if not path.is_file():
            raise DownloadError(f"{path}: not found in the local hub {self.root}")
        return path

    def __str__(self) -> str:
        return str(self.root)


@dataclass
class Item:
    remote: str  # path inside the repo
    dest: Path
    kind: str  # "shard" | "tokenizer" | "file"
    tokens: int | None = None  # expected token count of a shard, when the manifest implies it
    vocab_size: int | None = None  # expected pieces of a tokenizer


def dataset_dir(variant: str) -> str:
    if not (variant.startswith("sp") and variant[2:].isdigit()):
        raise DownloadError(f"variant {variant!r} is not sp<vocab> (e.g. sp1024, sp4096, sp8192)")
    return f"fineweb10B_{variant}"


def _remote(remote_root: str, rel: str) -> str:
    return f"{remote_root.strip('/')}/{rel}" if remote_root.strip("/") else rel


def _split_tokens(stats: dict, split: str, shard_size: int | None, n_files: int) -> list[int | None]:
    """Expected tokens of each shard of a split: full shards, then the remainder in the last one."""
    total = stats.get(f"tokens_{split}")
    if not shard_size:
        return [None] * n_files
    sizes: list[int | None] = [int(shard_size)] * n_files
    if n_files:
        sizes[-1] = int(total) - (n_files - 1) * int(shard_size) if total is not None else None
    return sizes


def plan(manifest: dict, variant: str, train_shards: int, root: Path, remote_root: str) -> list[Item]:
    """Every file to have on disk: all val shards, the first `train_shards` train shards, the tokenizer."""
    name = dataset_dir(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        have = ", ".join(d.get("name", "?") for d in manifest.get("datasets", [])) or "none"
        raise DownloadError(
            f"the manifest lists no dataset {name} (it has: {have}); check --variant and --repo-id"
        )
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 <= train_shards <= n_train:
        raise DownloadError(f"{variant} has {n_train} train shards; --train-shards must be in 0..{n_train}")
    if n_val < 1:
        raise DownloadError(f"the manifest's {name} entry lists no validation shards")
    shard_size = manifest.get("shard_size")
    folder = root / "datasets" / name
    items = []
    for split, count, n_files in (("val", n_val, n_val), ("train", train_shards, n_train)):
        expected = _split_tokens(stats, split, shard_size, n_files)
        for i in range(count):
            fname = f"fineweb_{split}_{i:06d}.bin"
            items.append(
                Item(_remote(remote_root, f"datasets/{name}/{fname}"), folder / fname, "shard", expected[i])
            )
    tok = next(
        (t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None
    )
    if tok is None or not tok.get("model_path"):
        raise DownloadError(
            f"the manifest has no tokenizer model for {name} ({entry.get('tokenizer_name')!r})"
        )
    vocab = entry.get("vocab_size") or tok.get("vocab_size")
    for key, kind in (("model_path", "tokenizer"), ("vocab_path", "file")):
        rel = tok.get(key)
        if rel:
            items.append(
                Item(_remote(remote_root, rel), root / rel, kind, vocab_size=int(vocab) if vocab else None)
            )
    return items


def verify(item: Item, path: Path) -> str | None:
    """None if `path` is a complete, valid copy of `item`; otherwise why not."""
    if not path.is_file():
        return "missing"
    if item.kind == "shard":
        try:
            n = read_header(path)
        except ShardError as e:
            return str(e)
        if item.tokens is not None and n != item.tokens:
            return f"{path}: holds {n} tokens but the manifest implies {item.tokens}"
        return None
    if item.kind == "tokenizer":
        import sentencepiece as spm

        try:
            pieces = int(spm.SentencePieceProcessor(model_file=str(path)).vocab_size())
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a damaged model
            return f"{path}: not a loadable SentencePiece model ({e})"
        if item.vocab_size is not None and pieces != item.vocab_size:
            return f"{path}: has {pieces} pieces but the manifest says {item.vocab_size}"
        return None
    return None if path.stat().st_size > 0 else f"{path}: empty file"


def copy_file(src: Path, dest: Path) -> None:
    """An independent copy of `src` at `dest`. Never a hard link: a link is the same file, so
    damaging the copy in the data root would damage the hub folder or cache it came from. Where the
    filesystem shares blocks copy-on-write (btrfs, XFS with reflink), the copy is a clone: no second
    200 MB per shard on disk, and a write to either side stays private. Elsewhere a plain copy."""
    try:
        _reflink(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _reflink(src: Path, dest: Path) -> None:
    """A copy-on-write clone (FICLONE ioctl, Linux); raises OSError where the filesystem has none."""
    import fcntl

    ficlone = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
    if sys.platform != "linux":
        raise OSError("no reflink ioctl on this platform")
    with open(src, "rb") as s, open(dest, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), ficlone, s.fileno())
        except OSError:
            d.close()
            dest.unlink(missing_ok=True)
            raise


def install(item: Item, source: Source) -> str:
    """Make item.dest a verified copy; returns "present", "fetched" or "replaced"."""
    reason = verify(item, item.dest)
    if reason is None:
        return "present"
    src = source.fetch(item.remote)
    item.dest.parent.mkdir(parents=True, exist_ok=True)
    part = item.dest.with_name(item.dest.name + ".part")
    part.unlink(missing_ok=True)
    copy_file(src, part)
    bad = verify(item, part)
    if bad is not None:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{item.remote} from {source} does not verify: {bad}. The source copy ({src}) is damaged: "
            "delete it (for the hub, its Hugging Face cache entry) and run the download again"
        )
    os.replace(part, item.dest)
    return "fetched" if reason == "missing" else "replaced"


def load_manifest(source: Source, remote_root: str, local_copy: Path, log: Callable[[str], None]) -> dict:
    """The source's manifest (saved beside the shards); the saved copy if the source is unreachable."""
    remote = _remote(remote_root, "manifest.json")
    try:
        path = source.fetch(remote)
        text = path.read_text(encoding="utf-8")
        manifest = json.loads(text)
    except Exception as e:
        if not local_copy.is_file():
            raise DownloadError(f"cannot read {remote} from {source}: {type(e).__name__}: {e}") from e
        log(f"download: {source} unreachable ({type(e).__name__}); using the saved {local_copy}")
        return json.loads(local_copy.read_text(encoding="utf-8"))
    write_text_atomic(local_copy, text)
    return manifest


def record_tokenizer_hash(manifest_path: Path, dataset: str, tokenizer: Path) -> None:
    """Write the sha256 of the verified tokenizer into the saved manifest beside the shards (the
    challenge's manifest has none), so every run checks that its tokenizer is this one. A manifest
    that already names a hash must match the file."""
    from pgolf.results import sha256_file

    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset), {})
    tok = next(t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name"))
    digest = sha256_file(tokenizer)
    if tok.get("sha256") not in (None, digest):
        raise DownloadError(
            f"{tokenizer} has sha256 {digest} but {manifest_path} says {tok['sha256']}: delete the tokenizer "
            "file and run the download again"
        )
    tok["sha256"] = digest
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)


def download(
    root: str | Path,
    variant: str = "sp1024",
    train_shards: int = 80,
    source: Source | None = None,
    repo_id: str | None = None,
    remote_root: str = REMOTE_ROOT,
    workers: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Bring `root` up to date for `variant`; returns what was done and where the data is."""
    root = Path(root).expanduser()
    name = dataset_dir(variant)
    if source is None:
        source = HubSource(repo_id or DEFAULT_REPOS.get(variant, DEFAULT_REPOS["sp1024"]))
    manifest = load_manifest(source, remote_root, root / "datasets" / name / "manifest.json", log)
    items = plan(manifest, variant, train_shards, root, remote_root)
    outcome: dict[str, list[str]] = {"present": [], "fetched": [], "replaced": []}
    errors: list[str] = []
    lock = threading.Lock()

    def one(item: Item) -> None:
        try:
            what = install(item, source)
        except Exception as e:
            with lock:
                errors.append(f"{item.remote}: {e}")
            return
        with lock:
            outcome[what].append(str(item.dest))
            done = sum(map(len, outcome.values()))
            if what != "present":
                log(
                    f"download: [{done}/{len(items)}] {what} {item.dest} ({item.dest.stat().st_size:,} bytes)"
                )

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, items))
    if errors:
        raise DownloadError(f"{len(errors)} of {len(items)} files failed:\n  " + "\n  ".join(errors))
    tokenizer = next(i for i in items if i.kind == "tokenizer")
    record_tokenizer_hash(root / "datasets" / name / "manifest.json", name, tokenizer.dest)
    log(
        f"download: {name} ready in {root}: {len(outcome['fetched'])} fetched, {len(outcome['replaced'])} "
        f"replaced, {len(outcome['present'])} already present"
    )
    return {
        "dataset_dir": root / "datasets" / name,
        "tokenizer": tokenizer.dest,
        "vocab_size": tokenizer.vocab_size,
        **outcome,
    }
