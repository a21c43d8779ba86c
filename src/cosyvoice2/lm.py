"""The text-speech language model of CosyVoice 2: a compact Qwen2 decoder plus the speech-token LM on top.

Reads top to bottom: config, sampling (nucleus + repetition-aware), the KV cache, the Qwen2 modules,
then ``CosyVoice2LM`` (input layout, uni-stream decoding, bistream decoding, training loss), and last an
opt-in int8 CPU speed mode.

Dimension legend used in the shape comments:
    B   batch rows (requests)     T   new positions in this call   Tk  key positions attended
    D   hidden size               H   query heads                  Hkv key/value heads
    G   query heads per KV head   hd  head dim                     V   speech vocabulary (speech ids + 3)

Behaviour follows the official ``Qwen2LM`` / ``Qwen2Encoder`` (SPEC §7) with these deliberate differences:
* no text ``lm_head`` is ever computed (the official one runs on every position and is discarded, SPEC §7.1);
* the KV cache is an explicit object owned by the caller, batched over rows with per-row lengths, so a
  streaming engine can decode many requests in one backbone call;
* sampling takes an explicit ``torch.Generator`` per request (``None`` = the global generator, as official).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CosyVoiceError, InputError, ModelLoadError

IGNORE_ID = -1  # training target for positions that predict nothing (official IGNORE_ID)
SOS_ROW, TASK_ROW = 0, 1  # rows of the 2-row ``llm_embedding``: start of sequence, "speech starts here"
N_STOP_IDS = 3  # speech vocabulary = speech ids + {EOS, reserved second stop id, FILL}


class GenerationError(CosyVoiceError, RuntimeError):
    """The model produced an id that the decoding protocol does not allow at this point."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMConfig:
    """Dimensions of the Qwen2 backbone plus the CosyVoice 2 LM and sampling settings."""

    # Qwen2 backbone
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    # CosyVoice 2 LM
    speech_token_size: int = 6561
    mix_ratio: tuple[int, int] = (5, 15)  # bistream: text positions, speech positions per block
    # ras_sampling (official yaml values)
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    # official inference defaults: generated tokens per tts-text token
    min_token_text_ratio: float = 2.0
    max_token_text_ratio: float = 20.0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads {self.num_heads} is not a multiple of kv heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not (0.0 < self.top_p and self.top_k >= 1 and self.win_size >= 1):
            raise ModelLoadError(
                f"bad sampling settings top_p={self.top_p} top_k={self.top_k} win={self.win_size}"
            )
        if len(self.mix_ratio) != 2 or min(self.mix_ratio) < 1:
            raise ModelLoadError(f"mix_ratio must be two positive ints, got {self.mix_ratio}")

    # Special speech ids (SPEC §7.1): EOS ends an utterance, FILL asks for more text in bistream.
    @property
    def eos_id(self) -> int:
        return self.speech_token_size

    @property
    def fill_id(self) -> int:
        return self.speech_token_size + 2

    @property
    def speech_vocab(self) -> int:
        """Rows of ``speech_embedding`` and outputs of the speech head (V)."""
        return self.speech_token_size + N_STOP_IDS

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(range(self.speech_token_size, self.speech_vocab))

    @classmethod
    def from_official(cls, cfg: dict[str, Any], qwen: dict[str, Any] | None = None) -> LMConfig:
        """Build from the official config (``cfg["llm"]["args"]`` ...) and a Qwen2 HF ``config.json`` dict.

        ``qwen`` defaults to ``cfg["qwen2_config"]`` (the fixtures' format); for a model directory pass
        ``CosyVoice-BlankEN/config.json``.
        """
        if qwen is None:
            qwen = cfg.get("qwen2_config")
            if qwen is None:
                raise ModelLoadError("no Qwen2 config given (CosyVoice-BlankEN/config.json)")
        try:
            llm = cfg["llm"]["args"]
            sampling = cfg.get("llm.sampling", {}).get("args", {})
            hidden = int(qwen["hidden_size"])
            heads = int(qwen["num_attention_heads"])
            if int(llm["llm_input_size"]) != hidden or int(llm.get("llm_output_size", hidden)) != hidden:
                raise ModelLoadError(
                    f"llm_input_size/llm_output_size {llm['llm_input_size']}/{llm.get('llm_output_size')} "
                    f"do not match the Qwen2 hidden_size {hidden}"
                )
            if qwen.get("hidden_act", "silu") != "silu":
                raise ModelLoadError(f"unsupported Qwen2 hidden_act {qwen['hidden_act']!r}")
            scaling = qwen.get("rope_scaling")
            if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
                raise ModelLoadError(f"unsupported Qwen2 rope_scaling {scaling!r}")
            # use_sliding_window is false in the released config; the window (32768) would never bind anyway.
            defaults = cls.__dataclass_fields__
            return cls(
                vocab_size=int(qwen["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(qwen["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(qwen.get("num_key_value_heads", heads)),
                head_dim=int(qwen.get("head_dim") or hidden // heads),
                intermediate_size=int(qwen["intermediate_size"]),
                rms_norm_eps=float(qwen.get("rms_norm_eps", defaults["rms_norm_eps"].default)),
                rope_theta=float(qwen.get("rope_theta", defaults["rope_theta"].default)),
                speech_token_size=int(llm["speech_token_size"]),
                mix_ratio=tuple(int(v) for v in llm.get("mix_ratio", defaults["mix_ratio"].default)),
                top_p=float(sampling.get("top_p", defaults["top_p"].default)),
                top_k=int(sampling.get("top_k", defaults["top_k"].default)),
                win_size=int(sampling.get("win_size", defaults["win_size"].default)),
                tau_r=float(sampling.get("tau_r", defaults["tau_r"].default)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"LM config is incomplete or malformed: {type(e).__name__}: {e}") from None

    @classmethod
    def cosyvoice2_0_5b(cls) -> LMConfig:
        """The released CosyVoice2-0.5B LM: Qwen2.5-0.5B dims (SPEC §7.1) and the yaml's LM settings."""
        return cls(
            vocab_size=151936,
            hidden_size=896,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            head_dim=64,
            intermediate_size=4864,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            speech_token_size=6561,
        )


# --------------------------------------------------------------------------------------------------
# Sampling (official ras_sampling / nucleus_sampling / random_sampling, SPEC §7.4)
# --------------------------------------------------------------------------------------------------


def nucleus_sample(scores: Tensor, top_p: float, top_k: int, generator: torch.Generator | None) -> int:
    """Top-p/top-k draw from 1-D ``scores`` [V] (log-probabilities).

    Walks the probabilities in descending order (stable sort) and takes an id while the running sum
    *before* adding it is < top_p and fewer than top_k were taken, so the id that crosses top_p is
    included. The sum is accumulated one float32 add at a time, as the official loop does (a cumsum
    kernel may accumulate in double and pick a different cut). The selected probabilities are drawn
    from as they are (multinomial renormalises implicitly); the draw consumes the generator exactly
    like the official ``multinomial(1, replacement=True)`` on the same-length tensor.
    """
    probs = scores.softmax(dim=0)
    sorted_p, sorted_idx = probs.sort(descending=True, stable=True)
    head = sorted_p[:top_k].numpy()
    limit = np.float32(top_p)
    cum = np.float32(0.0)
    n = 0
    while n < head.shape[0] and cum < limit:
        cum = np.float32(cum + head[n])
        n += 1
    pick = torch.multinomial(sorted_p[:n], 1, replacement=True, generator=generator)
    return int(sorted_idx[pick])


def ras_sample(
    scores: Tensor, history: Sequence[int], cfg: LMConfig, generator: torch.Generator | None
) -> tuple[int, bool]:
    """Repetition-aware sampling (VALL-E 2): nucleus draw, redrawn from the full softmax on repeats.

    ``scores`` [V] log-probs (EOS may already be -inf); ``history`` the ids generated so far. If the
    drawn id occurs at least ``win_size * tau_r`` times in the last ``win_size`` ids, it is banned and
    an id is drawn from the softmax over all remaining ids. Returns (id, whether it was redrawn).
    """
    tok = nucleus_sample(scores, cfg.top_p, cfg.top_k, generator)
    window = list(history[-cfg.win_size :])
    if window.count(tok) >= cfg.win_size * cfg.tau_r:
        scores = scores.clone()
        scores[tok] = -math.inf
        tok = int(torch.multinomial(scores.softmax(dim=0), 1, replacement=True, generator=generator))
        return tok, True
    return tok, False


def _redraw_valid(
    scores: Tensor,
    history: Sequence[int],
    cfg: LMConfig,
    generator: torch.Generator | None,
    keep: Sequence[int],
) -> int:
    """Draw again (``ras_sample``) with every non-speech id masked except ``keep``.

    For a bistream id the protocol does not allow where it was drawn: a FILL or reserved stop id after
    the text ended (only speech ids and EOS are valid), a reserved stop id while text streams (speech ids
    and FILL). The official loop raises there, which fails the whole request; a weak model does this
    often enough to matter for a server. Draws that were valid are untouched, so wherever the official
    loop does not raise, the ids (and the generator's state) are the same."""
    masked = scores.clone()
    masked[cfg.speech_token_size :] = -math.inf
    for i in keep:
        masked[i] = scores[i]
    tok, _ = ras_sample(masked, history, cfg, generator)
    return tok


@dataclass
class SamplingState:
    """Per-request decoding state (one per row of a batched engine), owned by the caller.

    ``history`` holds the generated speech ids (the repetition window reads it); before ``min_len`` ids
    EOS is masked; generation ends at a stop id or after ``max_len`` ids (SPEC §7.3).
    """

    min_len: int
    max_len: int
    generator: torch.Generator | None = None  # None: the global torch generator (official behaviour)
    history: list[int] = field(default_factory=list)
    redraws: int = 0
    finished: bool = False
    stopped_by_stop_id: bool = False

    @classmethod
    def for_text(cls, n_text: int, cfg: LMConfig, generator: torch.Generator | None = None) -> SamplingState:
        """Limits for ``n_text`` tts-text tokens (prompt text excluded), as official: int(ratio * n)."""
        return cls(
            min_len=int(n_text * cfg.min_token_text_ratio),
            max_len=int(n_text * cfg.max_token_text_ratio),
            generator=generator,
            finished=int(n_text * cfg.max_token_text_ratio) <= 0,
        )


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Per-layer keys/values for B rows, preallocated, with a valid length per row.

    ``keys[l]`` / ``values[l]``: [B, Hkv, capacity, hd]. Row b holds ``lengths[b]`` valid positions; the
    rest is masked out, so ``reset_row`` frees a slot at once (no zeroing). The backbone updates the
    cache in place; a single request is just B = 1. Capacity grows by doubling when a call needs more.
    """

    keys: list[Tensor]
    values: list[Tensor]
    lengths: Tensor  # [B] int64

    @classmethod
    def empty(
        cls, cfg: LMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        shape = (batch, cfg.num_kv_heads, max(int(max_len), 1), cfg.head_dim)
        # zeros, not empty: masked keys must still be finite, or 0-weight * NaN would poison attention
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        return cls(keys, values, torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reset_row(self, row: int) -> None:
        """Forget row ``row`` (a finished or cancelled request); its slot can take a new request."""
        self.lengths[row] = 0

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions per row (doubling, copying the valid prefix)."""
        if needed <= self.capacity:
            return
        new_cap = self.capacity
        while new_cap < needed:
            new_cap *= 2
        keep = int(self.lengths.max()) if self.batch_size else 0
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                grown[:, :, :keep] = t[:, :, :keep]
                store[i] = grown


@dataclass
class _CallPlan:
    """What every layer needs for one backbone call: where new keys go and what each query may see."""

    cos: Tensor  # [B, 1, T, hd] fp32-computed, cast to the activation dtype
    sin: Tensor
    mask: Tensor | None  # [B, 1, T, Tk] bool (True = attend) or None when every cached key is visible
    cache: KVCache | None
    rows: Tensor | None  # [B] cache rows of the batch entries
    single_row: int | None  # fast path: B == 1, the cache row
    start: int  # single_row: first new position
    positions: Tensor  # [B, T] absolute positions of the new tokens
    key_len: int  # Tk
    all_rows: bool  # rows == all cache rows in order: no gather needed


# --------------------------------------------------------------------------------------------------
# Qwen2 modules
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm, computed in fp32 whatever the activation dtype (as HF ``Qwen2RMSNorm``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the fused kernel: same math in fp32, a few small ops fewer per call (49 calls per token)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, 1, T, hd] for integer ``positions`` [B, T] (default RoPE, computed in fp32)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]: Qwen2 rotates the two halves of each head
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, hd]: rotate pairs (i, i + hd/2) by the position angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention; q/k/v are one fused Linear (with bias), o has no bias."""

    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.hd, bias=True)
        self.o = nn.Linear(self.h * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, plan: _CallPlan) -> Tensor:
        B, T, _ = x.shape
        qk, v = self.qkv(x).split([(self.h + self.hkv) * self.hd, self.hkv * self.hd], dim=-1)
        # rotate q and k heads in one go: [B, H+Hkv, T, hd]
        qk = apply_rope(qk.view(B, T, self.h + self.hkv, self.hd).transpose(1, 2), plan.cos, plan.sin)
        q, k = qk[:, : self.h], qk[:, self.h :]  # [B, H, T, hd], [B, Hkv, T, hd]
        v = v.view(B, T, self.hkv, self.hd).transpose(1, 2)
        if plan.cache is not None:
            k, v = self._update_cache(k, v, plan)  # [B, Hkv, Tk, hd]
        # Fold the G query heads of each KV head into the query axis instead of repeating K/V G times:
        # [B, H, T, hd] -> [B, Hkv, G*T, hd]; query row g*T + t keeps the mask row of position t.
        g = self.h // self.hkv
        q = q.reshape(B, self.hkv, g * T, self.hd)
        mask = plan.mask
        if mask is not None and g > 1:
            mask = mask.repeat(1, 1, g, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, Hkv, G*T, hd]
        out = out.view(B, self.h, T, self.hd).transpose(1, 2).reshape(B, T, self.h * self.hd)
        return self.o(out)

    def _update_cache(self, k: Tensor, v: Tensor, plan: _CallPlan) -> tuple[Tensor, Tensor]:
        kc, vc = plan.cache.keys[self.layer], plan.cache.values[self.layer]
        T, Tk = k.shape[2], plan.key_len
        if plan.single_row is not None:
            r, s = plan.single_row, plan.start
            kc[r, :, s : s + T] = k[0]
            vc[r, :, s : s + T] = v[0]
            return kc[r : r + 1, :, :Tk], vc[r : r + 1, :, :Tk]
        # Scatter each row's new keys at its own positions: index [B,1] x [B,T] -> [B, T, Hkv, hd].
        idx_rows = plan.rows[:, None]
        kc[idx_rows, :, plan.positions] = k.transpose(1, 2)
        vc[idx_rows, :, plan.positions] = v.transpose(1, 2)
        if plan.all_rows:
            return kc[:, :, :Tk], vc[:, :, :Tk]
        return kc[:, :, :Tk].index_select(0, plan.rows), vc[:, :, :Tk].index_select(0, plan.rows)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up are one fused Linear [2I, D]."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, plan: _CallPlan) -> Tensor:
        x = x + self.attn(self.attn_norm(x), plan)
        return x + self.mlp(self.mlp_norm(x))


class Qwen2Decoder(nn.Module):
    """Qwen2 decoder stack fed with embeddings; returns the final-norm hidden states (no text head)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # text embeddings only
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cache: KVCache | None = None, rows: Sequence[int] | None = None) -> Tensor:
        """x [B, T, D] -> hidden [B, T, D].

        Without a cache: plain causal attention over the T positions (training, teacher forcing; with
        right padding the valid positions never see the pads). With a cache: the T new positions of each
        row are appended after that row's ``lengths[row]`` cached ones (prefill of one row, or one decode
        token for many rows); ``rows`` names the cache row of each batch entry (default: all rows in
        order). The cache is updated in place.
        """
        plan = self._plan(x, cache, rows)
        for layer in self.layers:
            x = layer(x, plan)
        if cache is not None:
            if plan.single_row is not None:
                cache.lengths[plan.single_row] += x.shape[1]
            else:
                cache.lengths[plan.rows] += x.shape[1]
        return self.norm(x)

    def _plan(self, x: Tensor, cache: KVCache | None, rows: Sequence[int] | None) -> _CallPlan:
        B, T, _ = x.shape
        dev = x.device
        steps = torch.arange(T, device=dev)
        if cache is None:
            positions = steps.expand(B, T)
            cos, sin = rope_tables(positions[:1], self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
            mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None] if T > 1 else None
            return _CallPlan(cos, sin, mask, None, None, None, 0, positions, T, True)
        if rows is None:
            if B != cache.batch_size:
                raise ValueError(f"{B} batch entries for a cache of {cache.batch_size} rows; pass rows=")
            row_list = list(range(B))
        else:
            row_list = [int(r) for r in rows]
            if len(row_list) != B or len(set(row_list)) != B:
                raise ValueError(f"rows must name {B} distinct cache rows, got {row_list}")
        starts = cache.lengths[row_list]  # [B]
        start_list = starts.tolist()
        key_len = max(start_list) + T
        cache.reserve(key_len)
        positions = starts[:, None] + steps  # [B, T]
        if B == 1:
            cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
            mask = None
            if T > 1:  # causal inside the new block; all cached keys visible
                mask = torch.ones(T, key_len, dtype=torch.bool, device=dev).tril(key_len - T)[None, None]
            return _CallPlan(
                cos, sin, mask, cache, None, row_list[0], start_list[0], positions, key_len, True
            )
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = None
        if T > 1 or min(start_list) != max(start_list):
            # key j is visible to the query at position p iff j <= p: hides other rows' longer history,
            # stale keys of a reset row, and the future inside the new block.
            mask = (torch.arange(key_len, device=dev)[None, None, :] <= positions[:, :, None])[:, None]
        row_t = torch.tensor(row_list, dtype=torch.long, device=dev)
        all_rows = row_list == list(range(cache.batch_size))
        return _CallPlan(cos, sin, mask, cache, row_t, None, 0, positions, key_len, all_rows)


# --------------------------------------------------------------------------------------------------
# CosyVoice 2 LM
# --------------------------------------------------------------------------------------------------


def _ids(x: Tensor | Sequence[int] | None, name: str, limit: int) -> Tensor:
    """Token ids as a 1-D int64 tensor; accepts a list, [N] or [1, N]; checks 0 <= id < limit."""
    if x is None:
        return torch.zeros(0, dtype=torch.long)
    t = torch.as_tensor(x)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or (t.numel() and t.is_floating_point()):
        raise InputError(f"{name} must be a 1-D sequence of token ids, got shape {tuple(t.shape)}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
        raise InputError(f"{name} has ids outside [0, {limit}): min {int(t.min())}, max {int(t.max())}")
    return t


@dataclass
class BistreamTrace:
    """Optional record of a bistream run: one decision per backbone call and the call shapes."""

    decisions: list[int] = field(default_factory=list)  # sampled/forced id of each call (FILL, final EOS)
    calls: list[tuple[int, int]] = field(default_factory=list)  # (input_len, past_len) of each call


class CosyVoice2LM(nn.Module):
    """Speech-token LM: [SOS] + text + [TASK] + speech, decoded one speech token at a time."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Qwen2Decoder(cfg)
        self.sos_task = nn.Embedding(2, cfg.hidden_size)  # official llm_embedding: rows SOS, TASK_ID
        self.speech_embedding = nn.Embedding(cfg.speech_vocab, cfg.hidden_size)
        self.speech_head = nn.Linear(cfg.hidden_size, cfg.speech_vocab, bias=True)  # official llm_decoder

    # ---- inputs ---------------------------------------------------------------------------------

    def embed_text(self, ids: Tensor | Sequence[int] | None, name: str = "text") -> Tensor:
        """Text ids -> [N, D] with the backbone's token embedding."""
        t = _ids(ids, name, self.cfg.vocab_size).to(self.speech_embedding.weight.device)
        return self.backbone.embed_tokens(t)

    def embed_speech(self, ids: Tensor | Sequence[int] | None, name: str = "prompt_speech") -> Tensor:
        """Speech ids (< speech_token_size) -> [N, D]."""
        t = _ids(ids, name, self.cfg.speech_token_size).to(self.speech_embedding.weight.device)
        return self.speech_embedding(t)

    def build_input(
        self,
        text: Tensor | Sequence[int],
        prompt_text: Tensor | Sequence[int] | None = None,
        prompt_speech: Tensor | Sequence[int] | None = None,
    ) -> Tensor:
        """The uni-stream input [1, L, D] of every mode (SPEC §7.2).

        ``[SOS] + emb(prompt_text ++ text) + [TASK] + speech_emb(prompt_speech)``: sft/cross-lingual have no
        prompt text or speech, zero-shot has both, instruct2 puts the instruct text in ``prompt_text``.
        """
        txt = torch.cat([self.embed_text(prompt_text, "prompt_text"), self.embed_text(text, "text")])
        sos, task = self.sos_task.weight[SOS_ROW : SOS_ROW + 1], self.sos_task.weight[TASK_ROW : TASK_ROW + 1]
        return torch.cat([sos, txt, task, self.embed_speech(prompt_speech)])[None]

    # ---- steps (shared by generate() and a batching engine) -------------------------------------

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for ``batch`` rows of ``max_len`` positions (it grows if needed)."""
        w = self.speech_embedding.weight
        return KVCache.empty(self.cfg, batch, max_len, w.dtype, w.device)

    def forward_embeds(
        self, x: Tensor, cache: KVCache | None = None, rows: Sequence[int] | None = None
    ) -> Tensor:
        """Backbone on embeddings x [B, T, D] -> hidden [B, T, D]; see ``Qwen2Decoder.forward``."""
        return self.backbone(x, cache, rows)

    def speech_logp(self, h: Tensor) -> Tensor:
        """Hidden [..., D] -> log-probabilities over the speech vocabulary [..., V] (fp32)."""
        return self.speech_head(h).float().log_softmax(dim=-1)

    def step(self, x: Tensor, cache: KVCache, rows: Sequence[int] | None = None) -> Tensor:
        """Feed x [B, T, D] into the cache rows; log-probs of each row's next token [B, V]."""
        return self.speech_logp(self.forward_embeds(x, cache, rows)[:, -1])

    def decode_step(self, tokens: Sequence[int], cache: KVCache, rows: Sequence[int] | None = None) -> Tensor:
        """One decode step for B rows: feed each row's last speech id; log-probs [B, V]."""
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.speech_embedding.weight.device)
        return self.step(self.speech_embedding(ids)[:, None], cache, rows)

    def sample(self, logp: Tensor, state: SamplingState) -> int | None:
        """Choose the next id for one row from its log-probs [V]; None when the row stops.

        Before ``min_len`` ids only EOS is masked (the reserved stop ids stay possible, official since
        commit 0e62489). A stop id ends the row and is not emitted; so does reaching ``max_len``.
        """
        if state.finished:
            raise GenerationError("sample() called on a finished row")
        scores = logp.float()
        if len(state.history) < state.min_len:
            scores = scores.clone()
            scores[self.cfg.eos_id] = -math.inf
        tok, redrawn = ras_sample(scores, state.history, self.cfg, state.generator)
        state.redraws += int(redrawn)
        if tok in self.cfg.stop_ids:
            state.finished, state.stopped_by_stop_id = True, True
            return None
        state.history.append(tok)
        state.finished = len(state.history) >= state.max_len
        return tok

    # ---- uni-stream generation ------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        text: Tensor | Sequence[int],
        prompt_text: Tensor | Sequence[int] | None = None,
        prompt_speech: Tensor | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        state: SamplingState | None = None,
        step: Callable[[Tensor], Tensor] | None = None,
    ) -> Iterator[int]:
        """Speech ids for ``text`` (all modes, SPEC §7.2/7.3), one at a time; B = 1.

        ``generator`` gives the request its own random stream (a fresh ``Generator().manual_seed(s)``
        draws like the global generator after ``torch.manual_seed(s)``). Pass ``state`` (whose own
        generator is then used) to choose the limits or read the history/redraw counters afterwards.
        ``step`` (x [1, T, D] -> log-probs [1, V], keeping its own cache) replaces ``self.step`` on a
        private cache: a batching engine routes the calls of many requests through one backbone call.
        """
        n_text = _ids(text, "text", self.cfg.vocab_size).numel()
        if n_text == 0:
            raise InputError("text has no tokens")
        if state is None:
            state = SamplingState.for_text(n_text, self.cfg, generator)
        x = self.build_input(text, prompt_text, prompt_speech)
        if step is None:
            step = partial(self.step, cache=self.new_cache(1, x.shape[1] + state.max_len))
        while not state.finished:
            tok = self.sample(step(x)[0], state)
            if tok is None:
                return
            yield tok
            x = self.speech_embedding.weight[tok].view(1, 1, -1)

    # ---- bistream (text-in streaming, SPEC §7.5) ------------------------------------------------

    @torch.inference_mode()
    def generate_bistream(
        self,
        text_chunks: Iterable[Tensor | Sequence[int]],
        prompt_text: Tensor | Sequence[int] | None = None,
        prompt_speech: Tensor | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        max_tail_tokens: int | None = None,
        trace: BistreamTrace | None = None,
        step: Callable[[Tensor], Tensor] | None = None,
    ) -> Iterator[int]:
        """Speech ids while text token chunks are still arriving (official ``inference_bistream``).

        Prompt text is the initial text queue. Blocks of ``mix_ratio`` (5 text, 15 prompt-speech)
        embeddings are interleaved while prompt speech remains. Then each 5-text block is decoded until
        a FILL (forced every 16 decisions, or sampled) asks for more text; EOS is masked meanwhile. When
        the text ends, the rest of the text and TASK are fed and decoding runs until EOS.
        ``max_tail_tokens`` caps that last phase (the official loop has no cap; default
        ``max_token_text_ratio`` x streamed text tokens). ``trace`` records every backbone call; ``step``
        routes the backbone calls as in ``generate``. An id the protocol does not allow where it is drawn
        (FILL after the text ended, a reserved stop id) is drawn again among the allowed ids, where the
        official loop raises (``_redraw_valid``).
        """
        cfg = self.cfg
        n_txt, n_sp = cfg.mix_ratio
        fill, eos = cfg.fill_id, cfg.eos_id
        emb = self.speech_embedding.weight
        task = self.sos_task.weight[TASK_ROW : TASK_ROW + 1]
        text_queue = self.embed_text(prompt_text, "prompt_text")  # [N, D]
        speech_queue = self.embed_speech(prompt_speech)  # [P, D]
        fed = self.sos_task.weight[SOS_ROW : SOS_ROW + 1]  # [n, D] the next input (or the last one fed)
        history: list[int] = []  # emitted ids and FILLs: the repetition window reads both (official)
        # The official first FILL falls where the prompt's last (partial) 15-block would have ended.
        next_fill = (speech_queue.shape[0] // n_sp + 1) * n_sp - speech_queue.shape[0]
        n_streamed = past = 0
        if step is None:
            step = partial(self.step, cache=self.new_cache(1, 256))

        def call(x: Tensor) -> Tensor:
            nonlocal past
            if trace is not None:
                trace.calls.append((x.shape[0], past))
            past += x.shape[0]
            return step(x[None])[0]

        def decide(tok: int) -> None:
            history.append(tok)
            if trace is not None:
                trace.decisions.append(tok)

        for chunk in text_chunks:
            ids = _ids(chunk, "text chunk", cfg.vocab_size)
            n_streamed += ids.numel()
            text_queue = torch.cat([text_queue, self.embed_text(ids)])
            while speech_queue.shape[0] and text_queue.shape[0] >= n_txt:
                fed = torch.cat([fed, text_queue[:n_txt], speech_queue[:n_sp]])
                text_queue, speech_queue = text_queue[n_txt:], speech_queue[n_sp:]
            if speech_queue.shape[0]:
                continue  # wait for text to pair with the remaining prompt speech
            if history or fed.shape[0] == 1:  # after a FILL, or nothing to decode yet: needs a text block
                if text_queue.shape[0] < n_txt:
                    continue
                # Official: only one block per arriving chunk (the frontend sends one token at a time).
                block, text_queue = text_queue[:n_txt], text_queue[n_txt:]
                fed = block if history else torch.cat([fed, block])  # FILL's own embedding is never fed
            while True:
                logp = call(fed)
                if len(history) == next_fill:
                    tok = fill
                else:
                    scores = logp.clone()
                    scores[eos] = -math.inf
                    tok, _ = ras_sample(scores, history, cfg, generator)
                    if tok >= cfg.speech_token_size and tok != fill:
                        tok = _redraw_valid(scores, history, cfg, generator, keep=(fill,))
                if tok == fill:
                    next_fill = len(history) + n_sp + 1
                decide(tok)
                if tok == fill:
                    break  # `fed` keeps the already-consumed input (see the tail below)
                yield tok
                fed = emb[tok][None]

        if n_streamed == 0:
            raise InputError("the text stream had no tokens")
        # Official quirk, pinned by the fixtures (SPEC §16.3): after a FILL `fed` still holds the last input
        # that was already fed, and it is fed a second time in front of the tail.
        tail = [fed, text_queue, task]
        if speech_queue.shape[0]:
            # Text ended before all prompt speech was interleaved. The official code drops the rest of
            # the prompt speech; we keep it after TASK, the layout training uses: SOS (T5 S15)* T TASK S.
            tail.append(speech_queue)
        x = torch.cat(tail)
        cap = max_tail_tokens if max_tail_tokens is not None else int(cfg.max_token_text_ratio * n_streamed)
        for _ in range(cap):
            logp = call(x)
            tok, _ = ras_sample(logp, history, cfg, generator)
            if tok >= cfg.speech_token_size and tok != eos:
                tok = _redraw_valid(logp, history, cfg, generator, keep=(eos,))
            decide(tok)
            if tok == eos:
                return
            yield tok
            x = emb[tok][None]

    # ---- training ---------------------------------------------------------------------------------

    def train_example(
        self, text: Tensor, speech: Tensor, bistream: bool, speech_in: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One training sequence: inputs [L, D], targets [L] (IGNORE_ID where nothing is predicted) and
        is_text [L] (True at the text positions: what a guided-attention loss aligns speech with).
        ``speech_in`` (default ``speech``): the speech ids fed as inputs, e.g. with some replaced by noise;
        the targets are always ``speech``.

        Uni-stream: ``SOS, text, TASK, speech`` -> targets ignore SOS and text; TASK predicts the first
        speech id, each speech id the next, the last one EOS. Bistream: ``SOS, (T5 S15)*, T_rest, TASK,
        S_rest``: within a full block the 5th text token predicts the block's first speech id and the
        block's last speech id predicts FILL; the final part ends with EOS (official prepare_lm_input_target).
        """
        cfg = self.cfg
        n_txt, n_sp = cfg.mix_ratio
        text, speech = text.long(), speech.long()
        speech_in = speech if speech_in is None else speech_in.long()
        t_emb, s_emb = self.backbone.embed_tokens(text), self.speech_embedding(speech_in)
        sos, task = self.sos_task.weight[SOS_ROW : SOS_ROW + 1], self.sos_task.weight[TASK_ROW : TASK_ROW + 1]
        ign = [IGNORE_ID]
        if not bistream:
            targets = ign * (1 + len(text)) + speech.tolist() + [cfg.eos_id]
            is_text = [False] + [True] * len(text) + [False] * (1 + len(speech))
            return torch.cat([sos, t_emb, task, s_emb]), torch.tensor(targets), torch.tensor(is_text)
        inputs, targets, is_text = [sos], list(ign), [False]
        for j in range(math.ceil((len(text) + 1) / n_txt)):  # always ends with a partial (maybe empty) block
            tb = slice(j * n_txt, (j + 1) * n_txt)
            if len(text[tb]) == n_txt:
                sb = slice(j * n_sp, (j + 1) * n_sp)
                inputs += [t_emb[tb], s_emb[sb]]
                targets += ign * (n_txt - 1) + speech[sb].tolist() + [cfg.fill_id]
                is_text += [True] * n_txt + [False] * len(speech[sb])
            else:
                rest = slice(j * n_sp, None)
                inputs += [t_emb[tb], task, s_emb[rest]]
                targets += ign * len(text[tb]) + speech[rest].tolist() + [cfg.eos_id]
                is_text += [True] * len(text[tb]) + [False] * (1 + len(speech[rest]))
        return torch.cat(inputs), torch.tensor(targets), torch.tensor(is_text)

    def forward_train(
        self,
        text: Tensor,
        text_len: Tensor,
        speech: Tensor,
        speech_len: Tensor,
        bistream_prob: float = 0.5,
        rng: random.Random | None = None,
        input_noise: float | Tensor = 0.0,
        clean_prefix: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Length-normalised cross-entropy for padded batches text [B, Lt], speech [B, Ls].

        ``input_noise``: each speech input id is replaced by a uniformly random one with this probability
        (targets unchanged), so that the next id cannot be read off the previous ones alone (0: official);
        a float, or one probability per example [B]. ``clean_prefix`` [B]: that many leading speech ids of
        each example (a prompt utterance's) are kept free of it.

        Each example uses the bistream layout with probability ``bistream_prob`` when its speech/text
        ratio exceeds mix_ratio[1]/mix_ratio[0], else the uni-stream layout. Returns loss (mean over all
        predicted positions of the batch), acc and the number of predicted positions.
        """
        rng = rng or random.Random()
        n_txt, n_sp = self.cfg.mix_ratio
        seqs, tgts, texts = [], [], []
        for b in range(text.shape[0]):
            t, s = text[b, : int(text_len[b])], speech[b, : int(speech_len[b])]
            # draw first, as official, so the random stream does not depend on the ratio test
            bi = rng.random() < bistream_prob and len(t) > 0 and len(s) / len(t) > n_sp / n_txt
            s_in = None
            p = float(input_noise[b]) if isinstance(input_noise, Tensor) else input_noise
            if p > 0:
                noisy = torch.rand(s.shape, device=s.device) < p
                if clean_prefix is not None:
                    noisy[: int(clean_prefix[b])] = False
                s_in = torch.where(noisy, torch.randint_like(s, self.cfg.speech_token_size), s)
            x, y, is_text = self.train_example(t, s, bi, s_in)
            seqs.append(x)
            tgts.append(y)
            texts.append(is_text)
        x = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        y = nn.utils.rnn.pad_sequence(tgts, batch_first=True, padding_value=IGNORE_ID).to(x.device)
        logits = self.speech_head(self.forward_embeds(x)).float()  # [B, L, V]
        valid = y != IGNORE_ID
        n = valid.sum()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_ID, reduction="sum") / n
        acc = (logits.argmax(-1)[valid] == y[valid]).float().mean()
        is_text = nn.utils.rnn.pad_sequence(texts, batch_first=True).to(x.device)  # [B, L] bool
        return {"loss": loss, "acc": acc, "n_tokens": n, "targets": y, "is_text": is_text}


# --------------------------------------------------------------------------------------------------
# Optional CPU speed mode: int8 backbone weights
# --------------------------------------------------------------------------------------------------


class Int8DynamicLinear(nn.Module):
    """Inference-only Linear: int8 weights (one scale per output row), activations quantised per call.

    A decode step reads every backbone weight once, so on CPU it is bound by memory bandwidth:
    1.43 GB of fp32 weights per token at full size. int8 weights cut that 4x (fbgemm kernels).
    Not bit-compatible with the official fp32 model: sampled tokens will differ.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        zeros = torch.zeros(w.shape[0], dtype=torch.long)
        bias = None if linear.bias is None else linear.bias.detach().float()
        qweight = torch.quantize_per_channel(w, scales, zeros, axis=0, dtype=torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.out_features = w.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        # reduce_range: 7-bit activations, so fbgemm's AVX2 u8*s8 pair sums cannot saturate int16
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)


def quantize_backbone_int8(model: CosyVoice2LM) -> CosyVoice2LM:
    """Swap every backbone projection (qkv, o, gate_up, down) for ``Int8DynamicLinear``, in place.

    Opt-in speed mode for CPU decoding; apply after loading weights. Embeddings, norms and the speech
    head stay fp32 (the head sets the sampling probabilities directly). The model can no longer be
    trained or saved with ``state_dict``.
    """
    import warnings

    with warnings.catch_warnings():
        # torch marks its eager quantised-tensor API as deprecated; the fbgemm kernels are what we need.
        warnings.simplefilter("ignore")
        for layer in model.backbone.layers:
            layer.attn.qkv = Int8DynamicLinear(layer.attn.qkv)
            layer.attn.o = Int8DynamicLinear(layer.attn.o)
            layer.mlp.gate_up = Int8DynamicLinear(layer.mlp.gate_up)
            layer.mlp.down = Int8DynamicLinear(layer.mlp.down)
    return model
