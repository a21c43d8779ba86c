"""Start an LM on a new tokenizer's codes from one trained on the old codes (issue 10).

    python recipes/codebook_map.py --lm src/cosyvoice2/assets/default_model/lm.safetensors \
        --old exp/cache_big --new exp/cache_t15 --out exp/lm_map/lm.safetensors

Both caches must hold tokens of the same audio (the two tokenizers share Whisper's 25 Hz frames, so their
codes pair up frame by frame). From the pairs' counts C[old, new]:

* the new code j's input embedding is the mean of the old codes' embeddings over the frames where j
  occurs: sum_i P(old i | new j) E[i];
* its output row is the same mix of the old head's rows, with the bias moved by the expected
  log P(new j | old i): if j always rode on one old code i, its logit is i's plus log P(j | i), as it
  should be for P(j | h) = sum_i P(j | i) P(i | h);
* codes that never occur keep the mean embedding and the lowest bias (they are rare in the new codes too).

The old tables are written again as ``aux_speech_*``: `train.lm` with ``lm.aux_corpus`` / ``lm.aux_cache``
keeps training them on the old codes' hours beside the new (LmTrainConfig.aux_corpus). The stop rows (ids
>= the code count) are copied. Everything else is the source LM's. Written atomically, float32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from cosyvoice2.fileio import atomic_path
from cosyvoice2.train.data import FeatureCache
from cosyvoice2.train.lm import map_tables, pair_counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm", required=True, help="the old codes' LM (.safetensors, an exported network)")
    ap.add_argument("--old", required=True, help="token cache of the old tokenizer")
    ap.add_argument("--new", required=True, help="token cache of the new tokenizer, same utterances")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with safe_open(args.lm, "pt") as f:
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
        meta = f.metadata() or {}
    codes = int(json.loads(meta["config"])["speech_token_size"]) if "config" in meta else 6561
    try:
        old, new = FeatureCache(args.old, "tokens").load(), FeatureCache(args.new, "tokens").load()
        counts = pair_counts(old, new, codes)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"codebook_map: {e}") from None
    e, w, b = map_tables(
        tensors["speech_embedding.weight"], tensors["speech_head.weight"], tensors["speech_head.bias"], counts
    )
    for name, mapped in (("speech_embedding.weight", e), ("speech_head.weight", w), ("speech_head.bias", b)):
        tensors["aux_" + name] = tensors[name]
        tensors[name] = mapped
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    top1 = float(counts.max(1).values.sum() / counts.sum())
    print(f"{int(counts.sum())} paired frames; new codes seen {int((counts.sum(0) > 0).sum())} of {codes};"
          f" top-1 new from old {top1:.3f} -> {out}")  # fmt: skip


if __name__ == "__main__":
    main()
