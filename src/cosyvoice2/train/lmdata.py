"""The LM's training data, kept in git: corpus text + speech tokens, grown session by session.

The text-speech LM needs only each utterance's text and speech tokens (``train.lm``), a few hundred KB per
hour of speech, while the flow and the vocoder need the audio (tens of MB per hour). A fresh machine
rebuilds audio at a few times real time, so the LM's data would otherwise be capped at what one session
can synthesise. ``pack`` folds a corpus's manifest and its extracted tokens into one directory that is
committed (``recipes/lm_data``); it is a corpus (``manifest.jsonl``) and a feature cache
(``tokens.safetensors``) at once, so the LM trains from it directly::

    python -m cosyvoice2.train.lmdata pack --corpus data/corpus_big --cache exp/cache_big \\
        --out recipes/lm_data --tokenizer src/cosyvoice2/assets/default_model/speech_tokenizer.safetensors
    python -m cosyvoice2.train.lm --config recipes/conf_cpu/lm.toml \\
        --set train.corpus='"recipes/lm_data"' --set train.cache='"recipes/lm_data"' ...

and the corpus builder continues where the last session stopped (``resume``: the manifest and the
rejects go into the corpus directory, so ``corpus build`` skips those utterances and synthesises only new
ones; their audio is not there, so the flow and vocoder train on the new rows only)::

    python -m cosyvoice2.train.lmdata resume --data recipes/lm_data --corpus data/corpus_big
    python -m cosyvoice2.data.corpus build --out data/corpus_big --hours 6

Tokens are stored as int16 (codes < 6561), which halves the file. The tokens belong to one speech tokenizer:
``pack`` records the SHA-256 of its weights in ``lm_data.json`` and refuses to mix tokens of another one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.corpus import read_jsonl, write_json_atomic, write_jsonl_atomic
from .data import FeatureCache, save_tensors_atomic

INFO = "lm_data.json"
MANIFEST = "manifest.jsonl"
REJECTS = "rejects.jsonl"
TOKENS = "tokens.safetensors"
# What the LM (and a builder resume) needs of a manifest row; "audio" stays so that the directory is a corpus.
KEYS = ("id", "audio", "text", "language", "speaker", "duration", "split", "teacher")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(corpus: Path, cache: Path, out: Path, tokenizer: Path) -> dict:
    """Merge ``out`` (if any) with ``corpus``'s rows whose tokens are in ``cache``; returns the summary."""
    digest = sha256(tokenizer)
    info_path = out / INFO
    old_rows: list[dict] = []
    tokens: dict[str, torch.Tensor] = {}
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("tokenizer_sha256") != digest:
            raise SystemExit(
                f"{out} holds tokens of another speech tokenizer ({info.get('tokenizer_sha256', '?')[:12]}, "
                f"this one {digest[:12]}): pack into a new directory"
            )
        old_rows = read_jsonl(out / MANIFEST)
        tokens = load_file(str(out / TOKENS))
    new = FeatureCache(cache, "tokens").load()
    rows = {r["id"]: r for r in old_rows}
    added = 0
    for r in read_jsonl(corpus / MANIFEST):
        t = new.get(r["id"])
        if r["id"] in rows or t is None or not t.numel():
            continue  # already packed, or never tokenised (too long for the tokenizer: cached empty)
        rows[r["id"]] = {k: r[k] for k in KEYS if k in r}
        tokens[r["id"]] = t.to(torch.int16)
        added += 1
    rejects = {r["id"]: r for r in read_jsonl(out / REJECTS)} if (out / REJECTS).is_file() else {}
    if (corpus / REJECTS).is_file():
        rejects |= {r["id"]: r for r in read_jsonl(corpus / REJECTS)}
    out.mkdir(parents=True, exist_ok=True)
    # Tokens first: a manifest row never points at a missing token sequence, even after a crash between.
    save_tensors_atomic({k: v.contiguous() for k, v in tokens.items()}, out / TOKENS)
    write_jsonl_atomic(out / MANIFEST, rows.values())
    write_jsonl_atomic(out / REJECTS, rejects.values())
    hours = sum(float(r["duration"]) for r in rows.values()) / 3600
    splits: dict[str, int] = {}
    for r in rows.values():
        splits[r["split"]] = splits.get(r["split"], 0) + 1
    info = {
        "tokenizer_sha256": digest,
        "utterances": len(rows),
        "hours": round(hours, 3),
        "tokens": int(sum(t.numel() for t in tokens.values())),
        "splits": dict(sorted(splits.items())),
    }
    write_json_atomic(info_path, info)
    return info | {"added": added}


def resume(data: Path, corpus: Path) -> int:
    """Seed ``corpus`` with the packed manifest and rejects, so that ``corpus build`` skips them."""
    if (corpus / MANIFEST).is_file() and read_jsonl(corpus / MANIFEST):
        raise SystemExit(f"{corpus / MANIFEST} exists and is not empty: resume into a new corpus directory")
    corpus.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, REJECTS):
        if (data / name).is_file():
            shutil.copyfile(data / name, corpus / name)
    return len(read_jsonl(corpus / MANIFEST))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="add a corpus's tokenised rows to the LM data directory")
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True, help="feature cache holding tokens.safetensors")
    p.add_argument("--out", type=Path, default=Path("recipes/lm_data"))
    p.add_argument("--tokenizer", type=Path, required=True, help="the speech tokenizer's .safetensors")
    r = sub.add_parser("resume", help="seed a new corpus directory so that the builder continues")
    r.add_argument("--data", type=Path, default=Path("recipes/lm_data"))
    r.add_argument("--corpus", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            print(json.dumps(pack(args.corpus, args.cache, args.out, args.tokenizer)))
        else:
            print(f"{resume(args.data, args.corpus)} manifest rows copied into {args.corpus}")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
