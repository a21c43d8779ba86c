"""Training data: the corpus manifest, length-bucketed dynamic batches and the feature cache.

Corpus layout (``cosyvoice2.data.corpus``): ``manifest.jsonl`` rows ``{id, audio, text, language, speaker,
duration, split, ...}`` with ``audio`` relative to the corpus root (24 kHz mono FLAC).

Batches (``BatchStream``): each epoch the items are shuffled (seeded by seed and epoch), cut into windows
of ``sort_window`` items, each window sorted by length and cut into batches whose *padded* length
(longest item x count) stays within ``batch_seconds``; the batches are shuffled and dealt round-robin to
the ranks, each rank getting the same number. The stream's position (epoch, batch index) is part of every
checkpoint. Items are handed to the dataset as ``(index, key)``: ``key`` is a per-item integer derived
from (seed, epoch, position) for random crops, so data randomness does not depend on worker processes.

Feature cache (``FeatureCache``): tensors keyed by utterance id, extracted once. Extraction writes part
files (``<name>.part-r<rank>-<n>.safetensors``) as it goes, so an interrupted run resumes where it
stopped; ``merge`` folds the parts into ``<name>.safetensors``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cosyvoice2.fileio import atomic_path

from ..audio import load_audio

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Utt:
    id: str
    audio: Path  # absolute
    text: str
    language: str
    speaker: str
    duration: float
    split: str


def read_manifest(
    corpus: str | os.PathLike,
    splits: Sequence[str] | None = ("train",),
    min_seconds: float = 0.0,
    max_seconds: float = float("inf"),
    ids: Sequence[str] | None = None,
) -> list[Utt]:
    """Manifest rows of the given splits (None: all) within the duration limits, in file order.

    ``ids`` keeps only these utterances (the single-utterance overfit checks of recipes/README.md); an id
    that is not in the manifest, or not in ``splits``, is an error rather than a silently empty run.
    """
    root = Path(corpus)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no corpus manifest at {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if splits is not None and row.get("split", "train") not in splits:
                continue
            if ids and str(row["id"]) not in ids:
                continue
            dur = float(row["duration"])
            if not (min_seconds <= dur <= max_seconds):
                continue
            out.append(
                Utt(
                    str(row["id"]),
                    root / row["audio"],
                    str(row["text"]),
                    str(row.get("language", "")),
                    str(row["speaker"]),
                    dur,
                    str(row.get("split", "train")),
                )
            )
    if ids:
        missing = sorted(set(ids) - {u.id for u in out})
        if missing:
            where = f"{path} (splits {splits}, {min_seconds}-{max_seconds} s)"
            raise ValueError(f"utterances not in {where}: {missing}")
    return out


def load_wav(utt: Utt, sample_rate: int) -> np.ndarray:
    """float32 mono samples at ``sample_rate`` (the corpus is checked at build time: no silence check)."""
    return load_audio(str(utt.audio), sample_rate, check_silence=False)


def pad_1d(seqs: Sequence[Tensor], value: float = 0) -> tuple[Tensor, Tensor]:
    """[L_i] tensors -> ([B, max L] padded, lengths [B])."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = seqs[0].new_full((len(seqs), int(lens.max()) if len(seqs) else 0), value)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lens


def pad_time(seqs: Sequence[Tensor], value: float = 0) -> tuple[Tensor, Tensor]:
    """[C, L_i] tensors -> ([B, C, max L] padded on the right, lengths [B])."""
    lens = torch.tensor([s.shape[-1] for s in seqs], dtype=torch.long)
    out = seqs[0].new_full((len(seqs), seqs[0].shape[0], int(lens.max())), value)
    for i, s in enumerate(seqs):
        out[i, :, : s.shape[-1]] = s
    return out, lens


# --------------------------------------------------------------------------------------------------
# Dynamic batches
# --------------------------------------------------------------------------------------------------


class BatchStream:
    """Deterministic, resumable stream of length-bucketed batches for one rank (see the module docstring)."""

    def __init__(
        self,
        lengths: Sequence[float],
        batch_seconds: float,
        max_batch: int,
        sort_window: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if len(lengths) == 0:
            raise ValueError("no training items (empty manifest split, or everything filtered out?)")
        self.lengths = [float(x) for x in lengths]
        self.batch_seconds, self.max_batch, self.sort_window = batch_seconds, max_batch, max(1, sort_window)
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.index = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of ``epoch``: lists of (item index, random key)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.sort_window):
            window = sorted(order[start : start + self.sort_window], key=lambda i: self.lengths[i])
            cur: list[int] = []
            longest = 0.0
            for i in window:
                n = self.lengths[i]
                if cur and (
                    max(longest, n) * (len(cur) + 1) > self.batch_seconds or len(cur) >= self.max_batch
                ):
                    batches.append(cur)
                    cur, longest = [], 0.0
                cur.append(i)
                longest = max(longest, n)
            if cur:
                batches.append(cur)
        rng.shuffle(batches)
        if len(batches) < self.world:  # tiny data sets: every rank still needs a batch
            batches = batches * -(-self.world // len(batches))
        per_rank = len(batches) // self.world
        mine = batches[self.rank :: self.world][:per_rank]
        return [
            [(i, rng_key(self.seed, epoch, b, j)) for j, i in enumerate(batch)]
            for b, batch in enumerate(mine)
        ]

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def iterate(
        self, dataset: Any, collate: Callable, num_workers: int = 0, pin: bool = False
    ) -> Iterator[Any]:
        """Collated batches forever, from the current position; the position advances as batches are taken."""
        while True:
            batches = self.epoch_batches(self.epoch)[self.index :]
            if batches:
                loader = DataLoader(
                    _Indexed(dataset),
                    batch_sampler=batches,
                    collate_fn=collate,
                    num_workers=num_workers,
                    pin_memory=pin,
                    persistent_workers=False,
                )
                for batch in loader:
                    self.index += 1
                    yield batch
            self.epoch, self.index = self.epoch + 1, 0


def rng_key(seed: int, epoch: int, batch: int, item: int) -> int:
    return (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + batch * 0xC2B2AE3D + item * 0x27D4EB2F) % 2**63


class _Indexed(Dataset):
    """Adapter: DataLoader hands us (index, key) pairs; the dataset gets both."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.dataset(*item)

    def __len__(self) -> int:
        return len(self.dataset)


class UttDataset:
    """``dataset(index, key) -> item``: applies ``load(utt, rng)`` to the index-th utterance."""

    def __init__(self, utts: Sequence[Utt], load: Callable[[Utt, random.Random], Any]) -> None:
        self.utts, self.load = list(utts), load

    def __call__(self, index: int, key: int) -> Any:
        return self.load(self.utts[index], random.Random(key))

    def __len__(self) -> int:
        return len(self.utts)


# --------------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------------


class FeatureCache:
    """``<dir>/<name>.safetensors``: one tensor per utterance id (or speaker), plus resumable part files."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        self.dir, self.name = Path(directory), name
        self.path = self.dir / f"{name}.safetensors"

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.name}.part-*.safetensors"))

    def done_keys(self) -> set[str]:
        from safetensors import safe_open

        keys: set[str] = set()
        for p in ([self.path] if self.path.is_file() else []) + self.parts():
            with safe_open(str(p), framework="pt") as f:
                keys.update(f.keys())
        return keys

    def write_part(self, tensors: dict[str, Tensor], rank: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        n = len(list(self.dir.glob(f"{self.name}.part-r{rank}-*.safetensors")))
        path = self.dir / f"{self.name}.part-r{rank}-{n:05d}.safetensors"
        save_tensors_atomic({k: v.contiguous() for k, v in tensors.items()}, path)
        return path

    def merge(self) -> Path:
        """Fold every part into the main file (atomically), then delete the parts."""
        tensors = self.load() if self.path.is_file() else {}
        parts = self.parts()
        for p in parts:
            tensors.update(load_file(str(p)))
        save_tensors_atomic(tensors, self.path)
        for p in parts:
            p.unlink()
        return self.path

    def load(self) -> dict[str, Tensor]:
        if not self.path.is_file():
            raise FileNotFoundError(f"feature cache {self.path} does not exist (run the extraction stage)")
        return load_file(str(self.path))


def save_tensors_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
