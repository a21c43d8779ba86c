"""Extract speech tokens and speaker embeddings once, into the feature cache (resumable, torchrun-aware).

    python -m cosyvoice2.train.extract embeddings --corpus data/corpus --cache exp/cache \\
        --model exp/speaker/speaker_encoder.safetensors
    python -m cosyvoice2.train.extract tokens --corpus data/corpus --cache exp/cache --model exp/tokenizer
    python -m cosyvoice2.train.extract mels --corpus data/corpus --cache exp/cache

Outputs in ``--cache``: ``embeddings.safetensors`` (utterance id -> [E] float32), ``speakers.safetensors``
(speaker -> L2-normalised mean of its train-split utterance embeddings; the official spk2embedding) and
``tokens.safetensors`` (utterance id -> [L] int32) and ``mels.safetensors`` (utterance id -> the flow's
target mel [80, 2L] as 8-bit codes, ``train.flow.quantize_mel``: a corpus's mels are a third of its FLAC
size, so a training machine can be sent features instead of audio). Every split of the manifest is
extracted. Each rank takes every world-th utterance not yet done and writes a part file every ``--flush``
utterances; after all ranks finish, rank 0 merges the parts. Re-running skips what is already in the cache.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import RATES
from ..errors import InputError
from .common import Dist, barrier, distributed
from .data import FeatureCache, Utt, load_wav, read_manifest, save_tensors_atomic


def extract(
    utts: list[Utt],
    cache: FeatureCache,
    fn: Callable[[Tensor], Tensor],
    d: Dist,
    flush: int = 500,
    progress: bool = True,
    sample_rate: int = RATES.tokenizer_sample_rate,
) -> None:
    """Apply ``fn(wav [1, N] at sample_rate) -> tensor`` to every utterance missing from ``cache``; merge
    at the end."""
    done = cache.done_keys()
    barrier(d)  # every rank must see the same done set before anyone writes a new part
    todo = [u for u in utts if u.id not in done][d.rank :: d.world]
    pending: dict[str, Tensor] = {}
    bar = None
    if progress and d.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"extract {cache.name}", unit="utt")
    for utt in todo:
        wav = torch.from_numpy(load_wav(utt, sample_rate))[None]
        try:
            pending[utt.id] = fn(wav).detach().cpu().contiguous()
        except InputError as e:  # e.g. longer than the tokenizer's 30 s: cached as empty, skipped by trainers
            print(f"extract {cache.name}: {utt.id}: {e}", file=sys.stderr)
            pending[utt.id] = torch.zeros(0)
        if len(pending) >= flush:
            cache.write_part(pending, d.rank)
            pending = {}
        if bar is not None:
            bar.update(1)
    if pending:
        cache.write_part(pending, d.rank)
    if bar is not None:
        bar.close()
    barrier(d)
    if d.is_main and (cache.parts() or not cache.path.is_file()):
        cache.merge()
    barrier(d)


def speaker_means(utts: list[Utt], embeddings: dict[str, Tensor]) -> dict[str, Tensor]:
    """Speaker -> L2-normalised mean of its utterance embeddings (train split where it has any)."""
    embeddings = {k: v for k, v in embeddings.items() if v.numel()}
    by_spk: dict[str, list[Tensor]] = {}
    for u in utts:
        if u.id in embeddings and u.split == "train":
            by_spk.setdefault(u.speaker, []).append(embeddings[u.id].float())
    for u in utts:  # held-out speakers: their own utterances
        if u.id in embeddings and u.speaker not in by_spk:
            by_spk.setdefault(u.speaker, []).append(embeddings[u.id].float())
    return {s: F.normalize(torch.stack(v).mean(0), dim=0) for s, v in by_spk.items()}


def run(kind: str, corpus: Path, cache_dir: Path, model_path: str, d: Dist, flush: int = 500) -> None:
    from .export import network_from_run

    utts = read_manifest(corpus, None)
    device = d.device
    if kind == "embeddings":
        model = network_from_run("speaker_encoder", model_path).to(device)
        cache = FeatureCache(cache_dir, "embeddings")
        extract(utts, cache, model.embed, d, flush)
        if d.is_main:
            # One cache may serve several corpora (a training snapshot, the eval rows): the speakers of
            # this corpus are (re)computed, those of the others are kept.
            speakers = FeatureCache(cache_dir, "speakers")
            means = speakers.load() if speakers.path.is_file() else {}
            means.update(speaker_means(utts, cache.load()))
            save_tensors_atomic(
                {k: v.contiguous() for k, v in means.items()}, cache_dir / "speakers.safetensors"
            )
    elif kind == "mels":
        from .flow import padded_mel, quantize_mel

        def mel_codes(wav: Tensor) -> Tensor:
            return quantize_mel(padded_mel(wav[0].numpy()))

        extract(utts, FeatureCache(cache_dir, "mels"), mel_codes, d, flush, sample_rate=RATES.sample_rate)
    elif kind == "tokens":
        model = network_from_run("speech_tokenizer", model_path).to(device)
        extract(utts, FeatureCache(cache_dir, "tokens"), model.tokens, d, flush)
    else:
        raise SystemExit(f"unknown extraction {kind!r}")
    barrier(d)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["embeddings", "tokens", "mels"])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--cache", type=Path, default=Path("exp/cache"))
    ap.add_argument("--model", default="", help="run dir, checkpoint or .safetensors of the network")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--flush", type=int, default=500, help="utterances per part file")
    ap.add_argument(
        "--threads", type=int, default=0,
        help="CPU threads (0: torch's default); 1 beside a training run: on 2 cores, 2 threads that "
        "share a core with a trainer ran the speaker encoder ~30x slower (OpenMP threads wait on each other)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.kind != "mels" and not args.model:
        ap.error(f"{args.kind} needs --model")
    if args.threads < 0:
        ap.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    with distributed(args.device) as d, torch.inference_mode():
        run(args.kind, args.corpus, args.cache, args.model, d, args.flush)


if __name__ == "__main__":
    main()
