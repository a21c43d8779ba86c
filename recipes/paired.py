"""Paired comparison of two probe row files (``session.sh rank|rankhift|lmrank`` with ``RAW=FILE``).

    python recipes/paired.py BASE.jsonl CANDIDATE.jsonl [--key error_hift]

Per language: the mean of each file over the utterances both hold, and the mean per-utterance difference
(candidate - base) with a 95 % bootstrap interval (10 000 resamples of the utterances, fixed seed). The
same rows, so the speaker and sentence variance cancels: an interval that excludes zero is a change.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


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
    rng = np.random.default_rng(0)
    for lang in ("en", "zh"):
        ids = sorted(i for i in a.keys() & b.keys() if f"-{lang}-" in i)
        if not ids:
            continue
        x, y = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
        d = y - x
        boots = d[rng.integers(0, len(d), size=(10_000, len(d)))].mean(axis=1)
        lo, hi = np.percentile(boots, [2.5, 97.5])
        print(
            f"{lang}: n={len(ids)} {args.key} {100 * x.mean():.1f} -> {100 * y.mean():.1f} % "
            f"({100 * d.mean():+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}])"
        )


if __name__ == "__main__":
    main()
