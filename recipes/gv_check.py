"""Is the flow's mel over-smoothed in time, and does stretching its contrast help Whisper?

    python recipes/gv_check.py en 24 1.0,1.2,1.4 [FLOW] > rows.jsonl

On the rows ``session.sh rank`` picks (N held-out-speaker rows of data/corpus, round-robin over the
speakers; tokens and embeddings from exp/cache_big) and with its seed, so k = 1 reproduces its
``error_hift``: per row, ``std_ratio`` (the mean over bins of the flow mel's standard deviation in time
over the recording mel's) and, for each k, Whisper's error on the shipped HiFT's rendering of
mean + k (mel - mean) (per-bin mean over the utterance). Global-variance compensation (HMM-era TTS) helps
an acoustic model whose output is too flat; a ratio near 1 says the flow's mel is not.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

from cosyvoice2.config import RATES
from cosyvoice2.train.data import load_wav, read_manifest
from cosyvoice2.train.probe import _Listener, _mel, flow_mel, network_from_run

M = "src/cosyvoice2/assets/default_model"


def main() -> None:
    lang, n, ks = sys.argv[1], int(sys.argv[2]), [float(k) for k in sys.argv[3].split(",")]
    flow_run = sys.argv[4] if len(sys.argv) > 4 else f"{M}/flow.safetensors"
    torch.set_num_threads(1)
    corpus = "data/corpus"
    rows = [json.loads(line) for line in open(f"{corpus}/manifest.jsonl", encoding="utf-8")]
    pick = sorted(r["id"] for r in rows if r["split"] == "test_unseen_speaker" and r["language"] == lang)
    by_speaker: dict[str, list[str]] = {}
    for i in pick:
        by_speaker.setdefault(i.split("-")[0], []).append(i)
    ids = [i for group in itertools.zip_longest(*by_speaker.values()) for i in group if i][:n]
    flow, voc = network_from_run("flow", flow_run), network_from_run("hift", f"{M}/hift.safetensors")
    listen = _Listener(1)
    for utt in read_manifest(corpus, None, ids=ids):
        ref = _mel(load_wav(utt, RATES.sample_rate))  # [M, T]
        mel = flow_mel(flow, "exp/cache_big", utt.id)  # [1, M, T], as probe_flow renders it
        t = min(mel.shape[2], ref.shape[1])
        ratio = mel[0, :, :t].std(1).mean() / ref[:, :t].std(1).mean()
        row = {"id": utt.id, "std_ratio": round(float(ratio), 4)}
        mean = mel.mean(2, keepdim=True)
        for k in ks:
            with torch.no_grad():
                out = voc.inference(mean + k * (mel - mean), generator=torch.Generator().manual_seed(0))
            row[f"error_k{k}"] = listen(out[0][0].numpy(), utt)[0]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
