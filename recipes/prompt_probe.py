"""How the LM reads after a voice's prompt: built-in voices speaking an eval report's sentences three ways.

    python recipes/prompt_probe.py --report recipes/results/eval_build10.json --lang zh \
        [--model DIR] [--variants prompt,none,same] [--corpus data/corpus_big] -o out.json

* ``prompt``: the LM continues from the voice's transcript and prompt tokens (``cross_lingual=False``);
* ``none``: it starts without them (``cross_lingual=True``); the flow keeps the voice's prompt either way;
* ``same``: a prompt of the same speaker in the sentence's language, drawn (seeded) from ``--corpus``
  train rows of 3-8 s with audio on disk.

Sentence i goes to voice i mod V, V the voices that speak the language (speakers.json of ``--corpus``),
seed i. Whisper as in ``cosyvoice2 eval`` (plain decode); prints and writes the error rate and the S+D miss
rate per variant. Used to choose ``Models.prompt_language`` for the default model (recipes/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", required=True, help="an eval report: its builtin sentences are spoken")
    ap.add_argument("--lang", default="zh", choices=["en", "zh"])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--variants", default="prompt,none,same")
    ap.add_argument("--corpus", default="data/corpus_big")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import cosyvoice2
    from cosyvoice2.audio import resample
    from cosyvoice2.evaluate import ASR_RATE, WhisperASR, error_count, read_manifest

    report = json.loads(Path(args.report).read_text())
    texts = [
        it["text"] for it in report["items"] if it["condition"] == "builtin" and it["language"] == args.lang
    ]
    tts = cosyvoice2.load(args.model, lm_threads=1)
    speakers = json.loads((Path(args.corpus) / "speakers.json").read_text())["speakers"]
    speaks = {s["name"] for s in speakers if args.lang in s.get("langs", [])}
    voices = [v for v in tts.speakers() if v in speaks]
    rows = [
        u
        for u in read_manifest(Path(args.corpus) / "manifest.jsonl")
        if u.language == args.lang and u.split == "train" and 3 <= u.duration <= 8 and Path(u.audio).exists()
    ]
    asr = WhisperASR(threads=1)
    out = {"report": args.report, "lang": args.lang, "model": args.model, "voices": voices, "variants": {}}
    for variant in args.variants.split(","):
        total, items = None, []
        for i, text in enumerate(texts):
            name = voices[i % len(voices)]
            voice, cross = tts.resolve_voice(name), variant == "none"
            if variant == "same":
                mine = sorted((u for u in rows if u.speaker == name and u.text != text), key=lambda u: u.id)
                if not mine:
                    raise SystemExit(f"no {args.lang} prompt of {name} with audio in {args.corpus}")
                u = random.Random(i).choice(mine)
                voice = dataclasses.replace(tts.voice(u.audio, text=u.text), name=name)
            audio = tts.synthesize(text, voice=voice, seed=i, cross_lingual=cross)
            audio16k = resample(np.asarray(audio, np.float32), tts.sample_rate, ASR_RATE)
            hyp = asr.transcribe(audio16k, args.lang)
            c = error_count(text, hyp, args.lang)
            total = c if total is None else total + c
            items.append({"voice": name, "text": text, "hypothesis": hyp, "error_rate": c.rate})
            print(variant, name, round(c.rate, 2), hyp[:50], flush=True)
        out["variants"][variant] = {"error_rate": total.rate, "miss_rate": total.miss_rate, "items": items}
        rates = f"error {100 * total.rate:.1f} %, miss {100 * total.miss_rate:.1f} %"
        print(f"VARIANT {variant}: {rates}", flush=True)
    Path(args.output).write_text(json.dumps(out, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
