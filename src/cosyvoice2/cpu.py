"""CPU features and the compute plan: which precision the LM and the flow run in on this machine.

``cosyvoice2.load(path, compute="exact" | "fast")`` asks ``plan(compute)`` for a ``ComputePlan``:

* ``exact``: float32 everywhere, today's default path bit for bit; the official numbers, what the parity
  tests use, and the same output on every machine.
* ``fast``: the fastest combination measured for the kind of CPU found here, at a small, measured cost in
  output deviation (bench/README.md, tests/test_compute.py). The choice is made per network because the
  two are bound by different things:

  - the LM decodes one token per backbone call: a [1, D] row against every weight, so it is bound by
    memory traffic. int8 weights read a quarter of the bytes: on a 2-core AVX512-VNNI EPYC the decode
    GEMM [1, 896] x [896, 4864] took 1.46 ms fp32, 0.32 ms bf16, 0.075 ms int8; on an AVX2-only EPYC the
    full LM went from 104 to 33 ms/token. So int8 wherever fbgemm's int8 kernels run (x86 with AVX2).
  - the flow estimator runs [frames, 256] x [256, 1024]-sized GEMMs: compute bound. With native bf16
    (AVX512_BF16 or AMX) bf16 beats int8 there: one estimator ODE step over 206 frames (full size, 1
    thread) took 1.65 s fp32, 0.69 s int8, 0.60 s bf16 (autocast), at a mel deviation no larger than
    int8's. Without native bf16, bf16 is emulated and slower than fp32 (~10x on an AVX2-only EPYC; 2.1x
    for a 56-frame ODE step on an AVX-512 + VNNI Xeon, 1613 vs 764 ms), so int8 (measured 15-30 % faster
    than fp32 on the AVX2 EPYC, ~2.4x with VNNI on the AVX512_BF16 EPYC, 2.05x on that Xeon: 373 ms).
  - the vocoder (HiFT, ~10 % of the time) is convolutions over audio-rate signals: compute bound like the
    flow. With native bf16 its decoder convolutions run under bf16 autocast (``engine.cast_hift_bf16``;
    full size, 100 mel frames, 1 thread, AMX: 0.25-0.29 s CPU against 0.52-0.56 s, audio within 0.9 %
    RMS); elsewhere float32 (int8 convolutions are not offered).

``fast`` also solves a stream's first chunk in 3 Euler steps (``first_chunk_steps=3``; every later chunk is
exact streaming's): the saved-voice first packet fell 1.25 -> 0.66 s (full size, AMX, 2 threads, quiet);
on the default model (48 sentences per language) the streamed error moved -2.3 to +1.1 points per condition,
mean -0.6, every 95 % interval across zero, and similarity +0.001 (bench/README.md). Fewer ODE steps
everywhere (``flow_steps``) and guidance on part of the steps (``cfg_steps``) are not part of ``fast``: they
change the sampler of every chunk, and their quality cost on a trained model is not measured
(bench/README.md "Flow sampler levers").
Explicit ``lm_quant``/``flow_quant``/``flow_steps``/``cfg_steps``/``first_chunk_steps`` arguments of
``load`` override the plan's entries.

Features come from /proc/cpuinfo's flags (Linux) and ``torch.backends.cpu.get_cpu_capability()`` (the
vector ISA torch's kernels were dispatched to), read once per process.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import InputError

COMPUTE_CHOICES = ("exact", "fast")
FAST_FIRST_CHUNK_STEPS = 3  # ``fast``'s Euler steps for a stream's first chunk (module docstring)
PRECISIONS = ("fp32", "int8", "bf16")  # what ``lm``/``flow`` of a plan can be

# /proc/cpuinfo flags that decide the plan (reported by bench.py so results from machines can be compared)
_FLAGS_OF_INTEREST = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU offers the kernels that matter here. ``flags``: the relevant /proc/cpuinfo flags."""

    arch: str  # platform.machine(): x86_64, aarch64, ...
    model: str  # /proc/cpuinfo "model name" ("unknown" elsewhere)
    flags: frozenset[str]
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...

    @property
    def x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i686", "x86")

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags or self.torch_capability.startswith(("AVX2", "AVX512"))

    @property
    def native_bf16(self) -> bool:
        """bf16 GEMMs in hardware (oneDNN uses them); without, bf16 is emulated and slower than fp32."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def vnni(self) -> bool:
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def int8_kernels(self) -> bool:
        """fbgemm's int8 GEMMs (what ``Int8DynamicLinear`` calls) have AVX2 and AVX-512 (VNNI) paths."""
        return self.x86 and self.avx2

    @property
    def kind(self) -> str:
        """The class of CPU a plan (and a bench/README.md table) is made for."""
        if self.flags & {"amx_bf16", "amx_int8"}:
            return "amx"
        if "avx512_bf16" in self.flags:
            return "avx512-bf16"
        if "avx512_vnni" in self.flags:
            return "avx512-vnni"
        if "avx_vnni" in self.flags:
            return "avx-vnni"
        if self.avx2 and self.x86:
            return "avx2"
        return "other"

    def as_dict(self) -> dict:
        return {
            "arch": self.arch,
            "model": self.model,
            "kind": self.kind,
            "torch_capability": self.torch_capability,
            "flags": sorted(self.flags),
        }


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, relevant flags) of the first processor in /proc/cpuinfo's text."""
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm64 spelling
            flags = frozenset(value.split()) & frozenset(_FLAGS_OF_INTEREST)
    return model, flags


@functools.cache
def detect() -> CpuFeatures:
    """This machine's features (cached: they do not change while the process runs)."""
    import torch

    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: the torch capability alone decides (no bf16/VNNI claimed)
        model, flags = platform.processor() or "unknown", frozenset()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return CpuFeatures(platform.machine(), model, flags, capability)


@dataclass(frozen=True)
class ComputePlan:
    """The precision of each network for one ``compute`` choice on one CPU, and why."""

    compute: str  # "exact" | "fast"
    cpu_kind: str  # CpuFeatures.kind
    lm: str  # "fp32" | "int8" | "bf16": the LM backbone's Linear weights
    flow: str  # "fp32" | "int8" | "bf16": the flow estimator (bf16: autocast, bf16 Linear weights)
    vocoder: str = "fp32"  # "fp32" | "bf16": the vocoder's decoder convolutions (engine.cast_hift_bf16)
    flow_steps: int | None = None  # None: the model's own (official 10)
    reasons: dict[str, str] = field(default_factory=dict)
    cfg_steps: int | None = None  # guided Euler steps (None: all, official; FlowConfig.cfg_steps)
    first_chunk_steps: int | None = None  # Euler steps of a stream's first chunk (None: all)

    def load_options(self) -> dict:
        """The ``cosyvoice2.api.speed_up`` arguments that realise this plan."""
        return {
            "lm_quant": None if self.lm == "fp32" else self.lm,
            "flow_quant": None if self.flow == "fp32" else self.flow,
            "flow_steps": self.flow_steps,
            "cfg_steps": self.cfg_steps,
            "first_chunk_steps": self.first_chunk_steps,
            "vocoder_quant": None if self.vocoder == "fp32" else self.vocoder,
        }

    def as_dict(self) -> dict:
        return asdict(self)

    def with_overrides(
        self, lm: str | None = None, flow: str | None = None, flow_steps: int | None = None,
        cfg_steps: int | None = None, first_chunk_steps: int | None = None, vocoder: str | None = None,
    ) -> ComputePlan:  # fmt: skip
        """The plan with the entries a caller set explicitly (``load(lm_quant=..., ...)``); None keeps one."""
        reasons, changes = dict(self.reasons), {}
        explicit = (
            ("lm", lm), ("flow", flow), ("flow_steps", flow_steps), ("cfg_steps", cfg_steps),
            ("first_chunk_steps", first_chunk_steps), ("vocoder", vocoder),
        )  # fmt: skip
        for key, value in explicit:
            if value is not None and value != getattr(self, key):
                changes[key] = value
                reasons[key] = "set by the caller"
        return replace(self, **changes, reasons=reasons) if changes else self


def check_compute(compute: str) -> str:
    if compute not in COMPUTE_CHOICES:
        raise InputError(f"compute must be one of {', '.join(map(repr, COMPUTE_CHOICES))}, got {compute!r}")
    return compute


def plan(compute: str = "exact", cpu: CpuFeatures | None = None) -> ComputePlan:
    """The plan for ``compute`` on ``cpu`` (None: this machine). See the module docstring for the figures."""
    check_compute(compute)
    cpu = cpu or detect()
    if compute == "exact":
        why = "exact: float32, the official numbers (parity tests), identical on every machine"
        reasons = {"lm": why, "flow": why, "vocoder": why}
        return ComputePlan("exact", cpu.kind, "fp32", "fp32", reasons=reasons)
    reasons = {}
    if cpu.int8_kernels:
        lm = "int8"
        reasons["lm"] = "memory-bound decode: int8 weights read 1/4 of the bytes (fbgemm, x86 AVX2+)"
    elif cpu.native_bf16:
        lm = "bf16"
        reasons["lm"] = "memory-bound decode: bf16 weights read 1/2 of the bytes; no int8 kernels here"
    else:
        lm = "fp32"
        reasons["lm"] = "no int8 kernels and no native bf16 on this CPU"
    if cpu.native_bf16:
        flow = "bf16"
        reasons["flow"] = "compute-bound estimator, native bf16 GEMMs: measured 2.75x fp32 (int8: 2.4x)"
    elif cpu.int8_kernels:
        flow = "int8"
        why = "VNNI int8 GEMMs" if cpu.vnni else "AVX2 int8 GEMMs (1.15-1.3x fp32)"
        slow = "emulated bf16 measured 2x (AVX-512) to 10x (AVX2) slower than fp32"
        reasons["flow"] = f"compute-bound estimator, no native bf16 ({slow}): {why}"
    else:
        flow = "fp32"
        reasons["flow"] = "no native bf16 and no int8 kernels on this CPU"
    vocoder = "bf16" if cpu.native_bf16 else "fp32"
    reasons["vocoder"] = (
        "compute-bound convolutions, native bf16: measured 2.05x float32 (AMX, 1 thread)"
        if cpu.native_bf16
        else "float32: no native bf16 (emulated bf16 is slower than float32)"
    )
    reasons["first_chunk_steps"] = (
        "first packet: a stream's first chunk in 3 Euler steps (1.25 -> 0.66 s, AMX); streamed error on "
        "the default model -2.3..+1.1 points, every interval across zero; similarity +0.001"
    )
    return ComputePlan(
        "fast", cpu.kind, lm, flow, vocoder, reasons=reasons, first_chunk_steps=FAST_FIRST_CHUNK_STEPS
    )
