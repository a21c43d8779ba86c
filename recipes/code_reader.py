"""How much of what an utterance says do its speech codes hold? A CTC phoneme reader trained on frozen codes.

The tokenizer's own head (``phoneme_reader.safetensors``) is local: it sees 3 codes. A reader with
transformer blocks over the whole code sequence shows whether the phonemes it misses are in the codes at
all (in context, where the flow's encoder could find them) or lost. Both readers train here on the same
rows, budget and optimiser, so the only difference is the context:

    python recipes/code_reader.py --corpus data/lmpack --cache exp/cache_big --blocks 0 --minutes 15
    python recipes/code_reader.py --corpus data/lmpack --cache exp/cache_big --blocks 2 --minutes 15

Train rows: the corpus's train split; evaluation: its dev + test rows (greedy CTC phoneme error per
language, like the tokenizer trainer's ``dev_unit_error``). One thread; prints one JSON line per eval.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from cosyvoice2.speech_tokenizer import FSQ, SpeechTokenizerConfig
from cosyvoice2.train.tokenizer import (
    BLANK,
    AsrConfig,
    AsrHead,
    asr_units,
    build_vocab,
    encode_chars,
    greedy_error,
)


def load_rows(corpus: Path, cache: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").open(encoding="utf-8")]
    with safe_open(str(cache / "tokens.safetensors"), "pt") as f:
        keys = set(f.keys())
        for r in rows:
            r["codes"] = f.get_tensor(r["id"]).long().reshape(-1) if r["id"] in keys else None
    rows = [r for r in rows if r["codes"] is not None and r["codes"].numel()]
    for r in rows:
        r["units"] = asr_units(r["text"], r["language"], "phonemes")
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] != "train"]


def batch(rows: list[dict], fsq: FSQ, index: dict[str, int]) -> dict[str, torch.Tensor]:
    n = max(r["codes"].numel() for r in rows)
    q = torch.zeros(len(rows), n, fsq.dim)
    for i, r in enumerate(rows):
        q[i, : r["codes"].numel()] = fsq.values(r["codes"])
    targets = [torch.tensor(encode_chars(r["units"], index) or [1]) for r in rows]
    text = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    return {
        "q": q,
        "lens": torch.tensor([r["codes"].numel() for r in rows]),
        "text": text,
        "text_lens": torch.tensor([t.numel() for t in targets]),
    }


@torch.no_grad()
def evaluate(head: AsrHead, rows: list[dict], fsq: FSQ, index: dict[str, int]) -> dict:
    """Greedy CTC phoneme error per language (edits over all rows), as the tokenizer trainer reads dev."""
    head.eval()
    per: dict[str, list[float]] = {}
    for i in range(0, len(rows), 16):
        for lang in {r["language"] for r in rows[i : i + 16]}:
            b = batch([r for r in rows[i : i + 16] if r["language"] == lang], fsq, index)
            units = int(b["text_lens"].sum())
            logp = head(b["q"], b["lens"]).float().log_softmax(-1)
            acc = per.setdefault(lang, [0.0, 0])
            acc[0] += greedy_error(logp, b["lens"], b["text"], b["text_lens"]) * units
            acc[1] += units
    head.train()
    out = {lang: round(e / max(t, 1), 4) for lang, (e, t) in sorted(per.items())}
    out["all"] = round(sum(e for e, _ in per.values()) / max(1, sum(t for _, t in per.values())), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="directory holding tokens.safetensors")
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks (0: the local head)")
    ap.add_argument("--kernel", type=int, default=3, help="the local head's width in codes")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    train, held = load_rows(args.corpus, args.cache)
    vocab = build_vocab([r["units"] for r in train])
    index = {c: i for i, c in enumerate(vocab)}
    cfg = SpeechTokenizerConfig(d_model=192, n_heads=4, ff_dim=768, dropout=0.1)
    asr = AsrConfig(n_blocks=args.blocks, head_kernel=args.kernel, units="phonemes")
    head = AsrHead(cfg, asr, len(vocab))
    fsq = FSQ(cfg.fsq_dim, cfg.fsq_levels)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.01)
    print(
        json.dumps(
            {
                "train_rows": len(train),
                "held_rows": len(held),
                "params": sum(p.numel() for p in head.parameters()),
            }
        )
    )
    start, step = time.monotonic(), 0
    while time.monotonic() - start < args.minutes * 60:
        b = batch(rng.sample(train, 16), fsq, index)
        logp = head(b["q"], b["lens"]).float().log_softmax(-1)
        loss = F.ctc_loss(
            logp.transpose(0, 1), b["text"], b["lens"], b["text_lens"], blank=BLANK, zero_infinity=True
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            row = {
                "step": step,
                "loss": round(loss.item(), 3),
                "minutes": round((time.monotonic() - start) / 60, 1),
            }
            print(json.dumps(row | evaluate(head, held, fsq, index)), flush=True)
    print(json.dumps({"step": step, "final": True} | evaluate(head, held, fsq, index)), flush=True)


if __name__ == "__main__":
    main()
