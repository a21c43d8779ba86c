"""Paired comparison of two probe row files (``session.sh rank|rankhift|lmrank`` with ``RAW=FILE``).

    python recipes/paired.py BASE.jsonl CANDIDATE.jsonl [--key error_hift]

Per language: the mean of each file over the utterances both hold, and the mean per-utterance difference
(candidate - base) with the 95 % paired bootstrap interval of ``cosyvoice2 compare`` (10 000 resamples of
the utterances, seed 0). The same rows, so the speaker and sentence variance cancels: an interval that
excludes zero is a change.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from cosyvoice2.evaluate import paired_mean_interval


def rows(path: str, key: str) -> dict[str, float]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if key in r:
                    out[r["id"]] = float(r[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("candidate")
    ap.add_argument("--key", default="error_hift", help="the per-utterance figure to compare")
    args = ap.parse_args()
    a, b = rows(args.base, args.key), rows(args.candidate, args.key)
    for lang in ("en", "zh"):
        ids = sorted(i for i in a.keys() & b.keys() if f"-{lang}-" in i)
        if not ids:
            continue
        x, y = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
        lo, hi = paired_mean_interval(x, y, n_boot=10_000, seed=0)
        print(
            f"{lang}: n={len(ids)} {args.key} {100 * x.mean():.1f} -> {100 * y.mean():.1f} % "
            f"({100 * (y - x).mean():+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}])"
        )


if __name__ == "__main__":
    main()
