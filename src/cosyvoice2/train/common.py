"""Training machinery shared by every recipe: distributed setup, the loop, checkpoints, logs and the CLI.

The loop (``fit``) is deliberately plain, in the spirit of nanoGPT's ``train.py``: an LR schedule that is
a function of the step, explicit gradient accumulation (``no_sync`` on all but the last micro-batch),
gradient clipping, bf16 autocast (GPUs; CPUs with native bf16 if asked), a JSON Lines log and a tqdm
bar on rank 0.

A recipe hands ``fit`` a ``Task``: an *objective* module whose ``forward(batch)`` returns a dict with a
scalar ``"loss"`` (plus any scalar metrics to log), the dataset, per-item lengths for bucketing and a
collate function. The objective holds the network to ship as its ``net`` attribute; its state dict is
what checkpoints store.

Checkpoints (``<out>/ckpt/step_XXXXXXX.pt`` plus a ``latest`` pointer, each written to a temporary file
and renamed into place) hold ``{model, optimizer, step, config, data, rng}``: the data position and the
random states of *every* rank, so a resumed run continues exactly where the saved one would have gone.

Works the same under ``torchrun`` (gloo on CPU, nccl on GPU) and as a plain single process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cosyvoice2.fileio import atomic_path, atomic_write_text  # noqa: F401 (re-exported)

from ..default_model import config_from_dict, config_to_dict
from ..errors import ModelLoadError
from .data import BatchStream

CKPT_DIR = "ckpt"
LATEST = "latest"
BEST = "best.pt"  # the lowest dev loss of a run (TrainConfig.keep_best)

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """The ``[train]`` table of a recipe file. Lengths are in seconds of audio."""

    out_dir: str = "exp/run"
    corpus: str = "data/corpus"
    cache: str = "exp/cache"
    splits: tuple[str, ...] = ("train",)
    utts: tuple[str, ...] = ()  # only these utterance ids (single-utterance overfit checks); () = all
    device: str = "auto"  # auto: cuda when available
    seed: int = 1234
    max_steps: int = 10_000
    # Wall-clock budget in minutes of training (0: none). The run ends at whichever of max_steps and this
    # comes first, and the LR schedule runs on that progress, so a time-boxed run (a lent GPU, the end of a
    # session) still decays to min_lr and saves at its end. Training time is carried in checkpoints.
    max_minutes: float = 0.0
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 500
    schedule: str = "cosine"  # cosine decay to min_lr at max_steps, or "constant" after warm-up
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    accum: int = 1  # micro-batches per optimizer step
    batch_seconds: float = 120.0  # padded audio seconds per micro-batch (dynamic batch size)
    max_batch: int = 64  # items per micro-batch at most
    sort_window: int = 512  # items shuffled together then sorted by length before batching
    min_seconds: float = 0.5
    max_seconds: float = 20.0
    num_workers: int = 2
    bf16: bool = True  # autocast on CUDA
    # bf16 autocast on CPU too: only where the CPU has native bf16 (AVX512_BF16 or AMX); elsewhere bf16 is
    # emulated and slower than float32 (bench/README.md). Measured for the LM only (recipes/README.md). Off by
    # default: CPU trains in float32.
    cpu_bf16: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: no dev evaluation
    eval_batches: int = 20
    save_every: int = 1000
    keep_checkpoints: int = 3
    # With eval_every: the weights of the step with the lowest dev loss so far go to ckpt/best.pt (step,
    # model, config: what export reads). A run that starts to overfit keeps its best point, which the
    # newest ``keep_checkpoints`` checkpoints may no longer hold.
    keep_best: bool = True
    # > 0: also keep an exponential moving average of the weights (decay per optimizer step, warmed up as
    # min(decay, (1 + n) / (10 + n)) over the run's n steps), stored in each step checkpoint as "ema";
    # `network_from_run(kind, "CKPT@ema")` (export, probe) reads it. Why: a run stopped mid-schedule ends
    # on one noisy point of a short CPU campaign; the average over its last ~1 / (1 - decay) steps is a
    # smoother one (the same idea as averaging checkpoints, without keeping them).
    ema_decay: float = 0.0
    find_unused_parameters: bool = False
    threads: int = 0  # torch CPU threads per process (0: leave torch's default)
    # Warm start: a checkpoint file or run folder whose weights (those with the same name and shape) start
    # a new run; optimizer, step and data order start fresh. Ignored once out_dir has a checkpoint.
    init_from: str = ""
    # Tensors of init_from whose names contain one of these keep their fresh initialisation: e.g. the
    # LM's "embed_tokens" when the text units (and so the meaning of every text id) changed.
    init_exclude: tuple[str, ...] = ()
    # Regular expressions: parameters whose names match start at zero after the warm start. Zeroing the
    # output layers of the residual blocks that a deeper network adds, e.g.
    # r"encoder\.blocks\.[3-5]\.(attn\.out|ff\.fc2)\.", makes those blocks the identity: the grown network
    # starts as the one it came from.
    init_zero: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # steps are taken modulo these: 0 would fail mid-run (after the model is built), not here
        for name in ("log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0 (0: no dev evaluation), got {self.eval_every}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1) (0: no average), got {self.ema_decay}")


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up from lr / warmup to lr, then cosine decay to min_lr at max_steps (or constant).

    ``progress`` (``Budget.progress``) replaces the step-based decay position when a run is time-boxed."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    by_step = (step - cfg.warmup_steps) / span
    frac = min(1.0, by_step if progress is None else max(by_step, progress))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


class Budget:
    """How far a run is, in [0, 1]: the larger of steps / max_steps and train time / max_minutes.

    The time share is refreshed only at ``sync`` (log steps), averaged over ranks, so every rank uses the
    same learning rate and stops at the same step. ``seconds`` (train time including earlier processes of
    the run) goes into checkpoints as ``"train_seconds"``.
    """

    def __init__(self, cfg: TrainConfig, step: int = 0, seconds: float = 0.0, world: int = 1) -> None:
        self.max_steps, self.limit = cfg.max_steps, cfg.max_minutes * 60.0
        self.before, self.start = seconds, time.perf_counter()
        self.time_frac = min(1.0, seconds / self.limit) if self.limit else 0.0
        self.world = world
        self.stop_requested = False  # SIGTERM / SIGINT on this rank (``stop_on_signals``)
        self.stopped = False  # a stop every rank has agreed on

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def sync(self, d: Dist) -> None:
        if self.world == 1:
            if self.limit:
                self.time_frac = self.seconds() / self.limit
            return
        m = all_mean({"t": self.seconds(), "stop": float(self.stop_requested)}, d)
        if self.limit:
            self.time_frac = m["t"] / self.limit
        self.stopped = self.stopped or m["stop"] > 0

    def progress(self, step: int) -> float:
        return max(step / max(1, self.max_steps), self.time_frac)

    def done(self, step: int) -> bool:
        if self.world == 1:  # no other rank to agree with: stop at the step the signal came in
            self.stopped = self.stopped or self.stop_requested
        return self.stopped or self.progress(step) >= 1.0


@contextlib.contextmanager
def stop_on_signals(budget: Budget, name: str) -> Iterator[None]:
    """SIGTERM or Ctrl-C end the run after the current step with a checkpoint, as the time budget does
    (``kill`` or the end of a session then loses nothing); a second one stops at once. Ranks agree on the
    stop at the next log step. Handlers are installed from the main thread only and restored after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if budget.stop_requested:
            raise KeyboardInterrupt
        budget.stop_requested = True
        print(f"[{name}] {signal.Signals(signum).name}: saving and stopping after this step", file=sys.stderr)

    old = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one (env WORLD_SIZE > 1); otherwise a single process."""
    kind = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        # TF32 matmuls/convs: the float32 parts (HiFT, losses) run several times faster on Ampere+.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[Dist]:
    """``setup_distributed`` for a block; the process group is destroyed only if this block created it
    (a driver that runs several recipes in one process keeps its group)."""
    owned = not dist.is_initialized()
    d = setup_distributed(device)
    try:
        yield d
    finally:
        if owned:
            teardown_distributed()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def all_mean(values: Mapping[str, float], d: Dist) -> dict[str, float]:
    """Average scalar metrics over ranks."""
    keys = sorted(values)
    if not d.distributed or not keys:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return {k: float(v) / d.world for k, v in zip(keys, t.tolist())}


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, d: Dist) -> Any:
    if not d.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------
# Random states
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global random state of this process, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


@contextlib.contextmanager
def preserved_rng():
    """Run a block (e.g. evaluation) without disturbing the training random streams."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# --------------------------------------------------------------------------------------------------
# Checkpoints and logs
# --------------------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = Path(out_dir) / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_file() else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def warm_start(
    source: str | Path,
    exclude: Sequence[str] = (),
    required: Mapping[str, str] | None = None,
    **modules: nn.Module,
) -> tuple[int, int]:
    """Copy into each of ``modules`` the weights that ``source`` (a checkpoint, or a run folder's latest)
    holds under the same keyword ("model", "disc", ...) with matching names and shapes; the rest keep
    their initialisation. An exported ``.safetensors`` network counts as the "model" entry, so a fresh
    machine can continue from what git holds. Names containing a string of ``exclude`` are not copied.
    ``required`` ({name part: what to do}, see ``Task.init_required``): a tensor whose name contains one of
    these that the source does not fill is an error. Returns (tensors copied, tensors in the modules)."""
    path = Path(source)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"init_from: no checkpoint in {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} not found")
    if path.suffix == ".safetensors":
        # An exported network (e.g. the shipped default model's): plain names, maybe fp16. Trainers wrap the
        # network as ``net`` in their objective, so its names are matched with and without that prefix.
        from safetensors.torch import load_file

        ckpt = {"model": {k: v.float() for k, v in load_file(str(path)).items()}}
    else:
        ckpt = load_checkpoint(path)
    copied = total = 0
    for key, module in modules.items():
        mine, theirs = module.state_dict(), dict(ckpt.get(key, {}))
        theirs.update({f"net.{k}": v for k, v in theirs.items() if f"net.{k}" in mine and k not in mine})
        theirs.update(_weight_norm_pairs(theirs, mine))
        take = {
            k: v
            for k, v in theirs.items()
            if k in mine and mine[k].shape == v.shape and not any(x in k for x in exclude)
        }
        module.load_state_dict(take, strict=False)
        copied, total = copied + len(take), total + len(mine)
        # A partial load is the silent failure of warm starts (shapes or names that no longer match):
        # name what kept its initialisation, beyond what ``exclude`` asked for.
        kept = [k for k in mine if k not in take and not any(x in k for x in exclude)]
        if take and kept:
            more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
            print(
                f"[warm start] {key}: {len(take)} of {len(mine)} tensors from {path.name}; kept their "
                f"initialisation: {', '.join(kept[:3])}{more}",
                file=sys.stderr,
            )
        for part, hint in (required or {}).items():
            if missing := [k for k in mine if part in k and k not in take]:
                raise ValueError(f"{path} holds no {missing[0]} (which this run must start from): {hint}")
    return copied, total


def _weight_norm_pairs(theirs: dict[str, Tensor], mine: dict[str, Tensor]) -> dict[str, Tensor]:
    """An export folds weight norm into plain ``X.weight`` (inference needs no parametrisation), while a
    trainer's network keeps it as ``X.parametrizations.weight.original0`` (g, the norm over all dims but
    0) and ``original1`` (v, the direction). g = ||w||, v = w gives back w exactly. Without this a warm
    start of HiFT from its ``.safetensors`` silently kept the random init of every weight-normed layer."""
    out = {}
    for k, w in theirs.items():
        if not k.endswith(".weight"):
            continue
        for prefix in ("", "net."):  # as above: trainers may wrap the network as ``net``
            base = prefix + k[: -len("weight")] + "parametrizations.weight."
            g, v = base + "original0", base + "original1"
            if g in mine and v in mine and mine[v].shape == w.shape:
                out[v] = w
                out[g] = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).reshape(mine[g].shape)
    return out


def zero_matching(model: nn.Module, patterns: Sequence[str]) -> int:
    """Zero every parameter whose name matches one of the regular expressions (``re.search``)."""
    import re

    regexes = [re.compile(p) for p in patterns]
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(r.search(name) for r in regexes):
                p.zero_()
                n += 1
    if patterns and not n:
        raise ValueError(f"init_zero: no parameter matches {list(patterns)}")
    return n


def save_checkpoint(out_dir: Path, payload: dict[str, Any], keep: int) -> Path:
    """Write ``step_XXXXXXX.pt``, point ``latest`` at it, delete all but the newest ``keep``."""
    ckpt_dir = out_dir / CKPT_DIR
    path = ckpt_dir / f"step_{payload['step']:07d}.pt"
    atomic_torch_save(payload, path)
    atomic_write_text(ckpt_dir / LATEST, path.name + "\n")
    if keep > 0:
        for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


class WeightEMA:
    """Exponential moving average of a module's floating-point state (parameters and float buffers), kept
    in float32 beside the training weights; integer buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float, state: Mapping[str, Tensor] | None = None) -> None:
        self.decay = decay
        self.updates = 0
        src = model.state_dict() if state is None else state
        self.state = {
            k: v.detach().clone().float() if v.is_floating_point() else v.clone() for k, v in src.items()
        }
        if set(self.state) != set(model.state_dict()):
            raise ModelLoadError("the checkpoint's EMA weights do not match the network")
        self._floats = [k for k, v in self.state.items() if v.is_floating_point()]
        self._others = [k for k, v in self.state.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        ema, now = [self.state[k] for k in self._floats], [current[k].float() for k in self._floats]
        torch._foreach_lerp_(ema, now, 1.0 - decay)
        for k in self._others:
            self.state[k].copy_(current[k])


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys under ``prefix`` (e.g. ``"net."``) with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class JsonlLog:
    """Append-only JSON Lines log (one object per line, flushed at once)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class Task:
    """What ``fit`` trains. ``objective(batch)`` -> {"loss": scalar tensor, other scalar metrics}."""

    name: str
    objective: nn.Module
    dataset: Any  # indexable by BatchStream items
    lengths: Sequence[float]
    collate: Callable[[list[Any]], dict[str, Any]]
    config: dict[str, Any]  # stored in checkpoints: {"model": ..., "train": ..., anything else}
    dev_dataset: Any = None
    dev_lengths: Sequence[float] = ()
    # {name part: what to do}: tensors that a fresh run must take from train.init_from (e.g. an LM's
    # second codebook), where a random initialisation would train the rest on noise
    init_required: Mapping[str, str] = dataclasses.field(default_factory=dict)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast(cfg: TrainConfig, device: torch.device):
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cfg.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings' 1-D relatives (any parameter with < 2 dims)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr if lr is None else lr, betas=cfg.betas, fused=fused)


def _scalars(out: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in out.items() if _is_scalar(v)
    }


def _is_scalar(v: Any) -> bool:
    return (isinstance(v, Tensor) and v.numel() == 1) or isinstance(v, int | float)


def fit(task: Task, cfg: TrainConfig, d: Dist, resume_from: str | Path | None = None) -> dict[str, float]:
    """Train ``task.objective`` for ``cfg.max_steps`` optimizer steps; resumes from the latest checkpoint
    in ``cfg.out_dir`` (or ``resume_from``). Returns the last logged metrics."""
    out_dir = Path(cfg.out_dir)
    seed_everything(cfg.seed + d.rank)
    model = task.objective.to(d.device)
    opt = make_optimizer(model, cfg)
    stream = BatchStream(
        task.lengths, cfg.batch_seconds, cfg.max_batch, cfg.sort_window, cfg.seed, d.rank, d.world
    )
    step, train_seconds = 0, 0.0
    ckpt_path = Path(resume_from) if resume_from else latest_checkpoint(out_dir)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        stream.load_state(ckpt["data"])
        step = int(ckpt["step"])
        train_seconds = float(ckpt.get("train_seconds", 0.0))
        rngs = ckpt.get("rng") or []
        if len(rngs) == d.world:
            set_rng_state(rngs[d.rank])
        else:  # a different world size: the data order is kept, the random streams restart
            seed_everything(cfg.seed + 7919 * step + d.rank)
        if d.is_main:
            print(f"[{task.name}] resumed from {ckpt_path} at step {step}", file=sys.stderr)
    elif cfg.init_from:
        n, total = warm_start(cfg.init_from, cfg.init_exclude, task.init_required, model=model)
        zeroed = zero_matching(model, cfg.init_zero)
        if d.is_main:
            print(f"[{task.name}] started from {cfg.init_from}: {n} of {total} tensors", file=sys.stderr)
            if cfg.init_zero:
                print(
                    f"[{task.name}] zeroed {zeroed} tensors matching {list(cfg.init_zero)}", file=sys.stderr
                )
    elif task.init_required:
        raise ValueError(f"[{task.name}] needs train.init_from: {', '.join(task.init_required.values())}")
    ema = None
    if cfg.ema_decay > 0 and d.is_main:  # every rank holds the same weights: one average is enough
        ema = WeightEMA(model, cfg.ema_decay, ckpt.get("ema") if ckpt_path is not None else None)
        if ckpt_path is not None:
            ema.updates = step
    # No buffer broadcast: nothing here has running statistics, and the flow's fixed noise table is large.
    ddp = (
        DDP(model, find_unused_parameters=cfg.find_unused_parameters, broadcast_buffers=False)
        if d.distributed
        else model
    )
    log = JsonlLog(out_dir / "log.jsonl" if d.is_main else None)
    if d.is_main:
        atomic_write_text(out_dir / "config.json", json.dumps(task.config, indent=2) + "\n")
    batches = stream.iterate(task.dataset, task.collate, cfg.num_workers, pin=d.device.type == "cuda")
    bar = _progress(task.name, step, cfg.max_steps, d)
    last: dict[str, float] = {}
    sums: dict[str, float] = {}
    n_sum = 0
    t0 = time.perf_counter()
    budget = Budget(cfg, step, train_seconds, d.world)
    best_path = out_dir / CKPT_DIR / BEST
    best_dev = float(load_checkpoint(best_path)["dev"]["loss"]) if best_path.is_file() else math.inf
    model.train()
    with stop_on_signals(budget, task.name):
        while not budget.done(step):
            lr = lr_at(step, cfg, budget.progress(step))
            for group in opt.param_groups:
                group["lr"] = lr
            for micro in range(cfg.accum):
                batch = to_device(next(batches), d.device)
                sync = micro == cfg.accum - 1 or not d.distributed
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with autocast(cfg, d.device):
                        out = ddp(batch)
                    (out["loss"] / cfg.accum).backward()
                for k, v in _scalars(out).items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.accum
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            # Gradients are all-reduced, so every rank sees the same norm and skips the same bad steps.
            if math.isfinite(grad_norm):
                opt.step()
            else:
                sums["skipped"] = sums.get("skipped", 0.0) + 1
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            n_sum += 1
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + (grad_norm if math.isfinite(grad_norm) else 0.0)
            if step % cfg.log_every == 0:
                budget.sync(d)
            if step % cfg.log_every == 0 or budget.done(step):
                elapsed = time.perf_counter() - t0
                last = all_mean({k: v / n_sum for k, v in sums.items()}, d)
                last.update(step=step, lr=lr, sec_per_step=elapsed / n_sum, epoch=stream.epoch)
                log.write(**last)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
                sums, n_sum, t0 = {}, 0, time.perf_counter()
            if cfg.eval_every and task.dev_dataset is not None and step % cfg.eval_every == 0:
                dev = evaluate(ddp, task, cfg, d)
                log.write(step=step, **{f"dev_{k}": v for k, v in dev.items()})
                model.train()
                if cfg.keep_best and d.is_main and dev.get("loss", math.inf) < best_dev:
                    best_dev = dev["loss"]
                    payload = {"step": step, "dev": dev, "model": model.state_dict(), "config": task.config}
                    atomic_torch_save(payload, out_dir / CKPT_DIR / BEST)
            if step % cfg.save_every == 0 or budget.done(step):
                rngs = gather_objects(rng_state(), d)
                if d.is_main:
                    payload = {
                        "step": step,
                        "train_seconds": budget.seconds(),
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "config": task.config,
                        "data": stream.state(),
                        "rng": rngs,
                    }
                    if ema is not None:
                        payload["ema"] = ema.state
                    save_checkpoint(out_dir, payload, cfg.keep_checkpoints)
                barrier(d)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return last


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, cfg: TrainConfig, d: Dist) -> dict[str, float]:
    """Mean metrics over up to ``eval_batches`` dev batches (same on every rank; RNG streams untouched)."""
    stream = BatchStream(
        task.dev_lengths, cfg.batch_seconds, cfg.max_batch, cfg.sort_window, cfg.seed, d.rank, d.world
    )
    sums: dict[str, float] = {}
    n = 0
    model.eval()
    with preserved_rng():
        seed_everything(cfg.seed + d.rank)
        batches = stream.iterate(task.dev_dataset, task.collate, 0, pin=False)
        for _ in range(min(cfg.eval_batches, max(1, stream.batches_per_epoch()))):
            with autocast(cfg, d.device):
                out = model(to_device(next(batches), d.device))
            for k, v in _scalars(out).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    return all_mean({k: v / max(n, 1) for k, v in sums.items()}, d)


def _progress(name: str, step: int, total: int, d: Dist):
    if not d.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=step, desc=name, unit="step", dynamic_ncols=True, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Recipe files and the command line
# --------------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a TOML recipe file and apply ``section.key=value`` overrides (dotted paths into the tables)."""
    data: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects section.key=value, got {item!r}")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_value(value.strip())
    return data


def recipe_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="TOML recipe file ([train], [model], ... tables)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (repeatable), e.g. --set train.max_steps=100",
    )
    ap.add_argument("--resume-from", help="checkpoint to resume from (default: the latest in out_dir)")
    return ap


def train_config(recipe: Mapping[str, Any]) -> TrainConfig:
    """The ``[train]`` table; a bad value ends the command with its message (no traceback)."""
    try:
        return config_from_dict(TrainConfig, recipe.get("train", {}), "[train]")
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}") from None


def configure_threads(cfg: TrainConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def checkpoint_config(model_cfg: Any, cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    return {"model": config_to_dict(model_cfg), "train": dataclasses.asdict(cfg), **extra}


def run_recipe(
    build_task: Callable[[dict[str, Any], TrainConfig, Dist], Task],
    description: str,
    argv: Sequence[str] | None = None,
) -> dict[str, float]:
    """The ``main`` of every single-optimizer trainer: parse, join the process group, build, fit."""
    args = recipe_parser(description).parse_args(argv)
    recipe = load_recipe(args.config, args.set)
    cfg = train_config(recipe)
    configure_threads(cfg)
    with distributed(cfg.device) as d:
        seed_everything(cfg.seed)  # model init is the same on every rank (DDP also broadcasts rank 0's)
        return fit(build_task(recipe, cfg, d), cfg, d, args.resume_from)
