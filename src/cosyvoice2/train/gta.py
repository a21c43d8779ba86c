"""Flow-generated mels of a corpus's utterances, for fine-tuning the vocoder on what it will really hear.

    python -m cosyvoice2.train.gta --corpus data/cb7 --cache exp/cache_big \
        --flow src/cosyvoice2/assets/default_model/flow.safetensors --out exp/gta_b7

The vocoder is trained on mels computed from real audio, but at inference it renders the flow's mels,
which are smoother and off in ways real mels never are. Each utterance's speech tokens go through the
flow as zero-shot synthesis does (a prompt: another utterance of the same speaker, its tokens, mel and
speaker embedding), offline, with the flow's own sampler settings. The flow emits exactly
``token_mel_ratio`` frames per token, so the result lines up frame for frame with the utterance's audio
(and its mel in the feature cache): ``[hift] gta_cache`` then trains the vocoder to turn the flow's mel
of a segment into that segment's real audio ("ground-truth-aligned" mels, as Tacotron 2 did for WaveNet).

Writes ``<out>/gta_mels.safetensors`` (uint8 mel codes [M, T], as ``extract mels``), resumable: part files
every ``--flush`` utterances, merged at the end.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from .data import FeatureCache, read_manifest
from .export import network_from_run
from .flow import dequantize_mel, quantize_mel


def prompt_for(utt_id: str, candidates: list[str], seed: int) -> str | None:
    """A prompt utterance for ``utt_id`` among ``candidates`` (same speaker), fixed per id and seed."""
    others = [c for c in candidates if c != utt_id]
    return random.Random(f"{seed}:gta:{utt_id}").choice(others) if others else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="tokens, embeddings and mels of the corpus")
    ap.add_argument("--flow", required=True, help="run dir, checkpoint or .safetensors of the flow")
    ap.add_argument("--out", type=Path, required=True, help="where gta_mels.safetensors goes")
    ap.add_argument("--splits", default="train", help="comma-separated manifest splits")
    ap.add_argument("--prompt-seconds", type=float, nargs=2, default=(2.0, 8.0))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flush", type=int, default=200, help="utterances per part file")
    ap.add_argument("--limit", type=int, default=0, help="at most this many utterances (0: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokens = FeatureCache(args.cache, "tokens").load()
    emb = FeatureCache(args.cache, "embeddings").load()
    mels = FeatureCache(args.cache, "mels").load()
    have = set(tokens) & set(emb) & set(mels)
    utts = [u for u in read_manifest(args.corpus, tuple(args.splits.split(","))) if u.id in have]
    lo, hi = args.prompt_seconds
    prompts: dict[str, list[str]] = {}
    for u in read_manifest(args.corpus, None):
        if u.id in have and lo <= u.duration <= hi:
            prompts.setdefault(u.speaker, []).append(u.id)
    out = FeatureCache(args.out, "gta_mels")
    done = out.done_keys()
    todo = [u for u in utts if u.id not in done][: args.limit or None]
    print(f"[gta] {len(todo)} utterances to render ({len(done)} done)", file=sys.stderr, flush=True)

    flow = network_from_run("flow", args.flow).eval()
    ratio = flow.cfg.token_mel_ratio
    pending: dict[str, torch.Tensor] = {}
    t0, frames = time.perf_counter(), 0
    with torch.inference_mode():
        for i, u in enumerate(todo):
            p = prompt_for(u.id, prompts.get(u.speaker, []), args.seed)
            tok = tokens[u.id].long()[None]
            if p is None:  # no prompt of this speaker: the utterance's own embedding, no prompt
                ptok, pmel, e = (
                    torch.zeros(1, 0, dtype=torch.long),
                    torch.zeros(1, 0, mels[u.id].shape[0]),
                    u.id,
                )
            else:
                ptok, e = tokens[p].long()[None], p
                n = min(ptok.shape[1], mels[p].shape[1] // ratio)
                ptok, pmel = ptok[:, :n], dequantize_mel(mels[p][:, : n * ratio]).T[None]
            mel = flow.inference(tok, ptok, pmel, emb[e].float()[None], streaming=False, finalize=True)
            pending[u.id] = quantize_mel(mel[0])
            frames += mel.shape[-1]
            if len(pending) >= args.flush or i == len(todo) - 1:
                out.write_part(pending, 0)
                pending = {}
                rate = frames * 0.02 / (time.perf_counter() - t0)
                print(f"[gta] {i + 1}/{len(todo)}: {rate:.2f}x real time", file=sys.stderr, flush=True)
    out.merge()
    print(f"[gta] wrote {out.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
