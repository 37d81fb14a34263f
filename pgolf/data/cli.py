"""`python -m pgolf.data {download,build}`: get challenge-format data into a data root.

    python -m pgolf.data download --variant sp1024 --train-shards 80       # from the hub
    python -m pgolf.data build --input docs.jsonl.xz --vocab-size 4096     # from your documents

Both write `<root>/datasets/fineweb10B_<variant>/` and `<root>/tokenizers/`, with root =
--root, else $PGOLF_DATA_ROOT, else ./data: the folders the `data=fineweb_sp*` configs read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from pgolf.data.shards import SHARD_TOKENS
from pgolf.results import write_text_atomic


def default_root() -> str:
    return os.environ.get("PGOLF_DATA_ROOT", "./data")


def _run_hint(variant: str, dataset: Path, tokenizer: Path, vocab: int | None) -> str:
    """The command that trains on what was just written."""
    root = dataset.parent.parent
    standard = tokenizer == root / "tokenizers" / f"fineweb_{variant[2:]}_bpe.model"
    if variant in ("sp1024", "sp4096", "sp8192") and standard and vocab in (None, int(variant[2:])):
        return f"PGOLF_DATA_ROOT={root} python -m pgolf.run data=fineweb_{variant}"
    return (
        f"python -m pgolf.run data=shards data.path={dataset} data.tokenizer_path={tokenizer} "
        f"data.vocab_size={vocab}"
    )


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> None:
    from pgolf.data.download import REMOTE_ROOT, LocalHub, download

    source = LocalHub(args.local_hub) if args.local_hub else None
    remote_root = (
        args.remote_root if args.remote_root is not None else ("" if args.local_hub else REMOTE_ROOT)
    )
    root = Path(args.root)
    done = download(
        root,
        variant=args.variant,
        train_shards=args.train_shards,
        source=source,
        repo_id=args.repo_id,
        remote_root=remote_root,
        workers=args.workers,
    )
    print(f"next: {_run_hint(args.variant, done['dataset_dir'], done['tokenizer'], done['vocab_size'])}")


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------


def _merge_manifest(path: Path, dataset: dict, tokenizer: dict, shard_tokens: int, val_docs: int) -> None:
    """Add (or replace) this dataset and tokenizer in `<root>/manifest.json`, in the layout of the
    challenge's manifest, so the root can also serve as `download --local-hub`."""
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if manifest.get("shard_size") not in (None, shard_tokens):
        raise SystemExit(
            f"{path} describes shards of {manifest['shard_size']} tokens, not {shard_tokens}; "
            "build into another --root or pass the same --shard-tokens"
        )
    manifest.update(version="pgolf-build-1", shard_size=shard_tokens, num_val_docs=val_docs)
    for key, entry in (("datasets", dataset), ("tokenizers", tokenizer)):
        manifest[key] = [e for e in manifest.get(key, []) if e.get("name") != entry["name"]] + [entry]
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")


def cmd_build(args: argparse.Namespace) -> None:
    import sentencepiece as spm

    from pgolf.data.build import (
        check_val_docs,
        export_shards,
        read_documents,
        tokenizer_sentences,
        train_tokenizer,
    )
    from pgolf.results import sha256_file

    for p in args.input:
        if not Path(p).is_file():
            raise SystemExit(f"--input {p}: no such file")
    # Before the tokenizer trains (minutes on a large input): reads only the first --val-docs + 1.
    check_val_docs(read_documents(args.input, args.text_field), args.val_docs, "--input")
    root = Path(args.root).expanduser()
    (root / "tokenizers").mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        vocab = int(spm.SentencePieceProcessor(model_file=args.tokenizer).vocab_size())
        model = root / "tokenizers" / f"fineweb_{vocab}_bpe.model"
        if Path(args.tokenizer).resolve() != model.resolve():
            shutil.copyfile(args.tokenizer, model)
        print(f"build: using the {vocab}-piece tokenizer {args.tokenizer}", file=sys.stderr)
    else:
        vocab = args.vocab_size
        model = root / "tokenizers" / f"fineweb_{vocab}_bpe.model"
        print(f"build: training a {vocab}-piece SentencePiece BPE tokenizer -> {model}", file=sys.stderr)
        train_tokenizer(
            tokenizer_sentences(args.input, args.text_field), vocab, model, args.tokenizer_train_docs
        )
    variant = args.name or f"sp{vocab}"
    out = root / "datasets" / f"fineweb10B_{variant}"
    stats = export_shards(
        model,
        read_documents(args.input, args.text_field),
        out,
        val_docs=args.val_docs,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
    )
    tok_name = f"sp_bpe_{vocab}"
    tokenizer = {
        "name": tok_name,
        "kind": "sentencepiece_bpe",
        "vocab_size": vocab,
        "model_path": f"tokenizers/{model.name}",
        "sha256": sha256_file(model),  # runs check the tokenizer against it
    }
    if model.with_suffix(".vocab").is_file():
        tokenizer["vocab_path"] = f"tokenizers/{model.with_suffix('.vocab').name}"
    dataset = {
        "name": out.name,
        "tokenizer_name": tok_name,
        "vocab_size": vocab,
        "stats": {
            "docs_val": stats["docs_val"],
            "docs_train": stats["docs_train"],
            "files_val": stats["files_val"],
            "files_train": stats["files_train"],
            "tokens_val": stats["val"],
            "tokens_train": stats["train"],
        },
    }
    _merge_manifest(root / "manifest.json", dataset, tokenizer, args.shard_tokens, args.val_docs)
    print(
        f"build: {stats['docs_val']:,} val docs ({stats['val']:,} tokens, {stats['files_val']} shard(s)) and "
        f"{stats['docs_train']:,} train docs ({stats['train']:,} tokens, {stats['files_train']} shard(s)) in {out}"
    )
    print(f"next: {_run_hint(variant, out, model, vocab)}")


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pgolf.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("download", help="fetch the challenge's published FineWeb exports")
    d.add_argument("--variant", default="sp1024", help="sp1024 (default), sp4096 or sp8192")
    d.add_argument("--train-shards", type=int, default=80, help="the first N train shards (default 80)")
    d.add_argument("--root", default=default_root(), help="data root (default $PGOLF_DATA_ROOT or ./data)")
    d.add_argument("--repo-id", default=None, help="Hugging Face dataset repo (default: the variant's)")
    d.add_argument(
        "--remote-root",
        default=None,
        help="folder of the export inside the repo (default 'datasets'; '' with --local-hub)",
    )
    d.add_argument("--local-hub", default=None, help="a folder laid out like the hub repo instead of the hub")
    d.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    d.set_defaults(func=cmd_download)

    b = sub.add_parser("build", help="train a tokenizer and export shards from your documents")
    b.add_argument(
        "--input", nargs="+", required=True, help=".jsonl[.xz|.gz|.bz2] files, or text files (one doc each)"
    )
    b.add_argument("--root", default=default_root(), help="data root (default $PGOLF_DATA_ROOT or ./data)")
    b.add_argument("--vocab-size", type=int, default=1024)
    b.add_argument("--val-docs", type=int, default=50_000, help="the first N documents are validation")
    b.add_argument("--tokenizer", default=None, help="use this SentencePiece model instead of training one")
    b.add_argument(
        "--tokenizer-train-docs",
        type=int,
        default=None,
        help="train the tokenizer on the first N documents (of a text file: its chunks of <= 4 KB)",
    )
    b.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (default 1e8)")
    b.add_argument("--text-field", default="text", help="the JSON field holding the text (default 'text')")
    b.add_argument("--name", default=None, help="variant name (default sp<vocab>)")
    b.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: every core)")
    b.set_defaults(func=cmd_build)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from pgolf.data.download import DownloadError
    from pgolf.results import DiskFullError

    # RuntimeError: what sentencepiece raises
    known = (DownloadError, ValueError, FileNotFoundError, RuntimeError, DiskFullError)
    try:
        args.func(args)
    except known as e:
        raise SystemExit(f"pgolf.data {args.command}: {e}") from None
