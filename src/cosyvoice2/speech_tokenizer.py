"""Our supervised semantic speech tokenizer: 16 kHz audio -> 25 Hz FSQ codes (CosyVoice 2 paper, §2.2).

The paper inserts finite scalar quantisation (FSQ) in the middle of an ASR encoder: the first half of
the encoder turns whisper log-mel features into hidden states, a low-rank projection maps each 25 Hz
frame to ``fsq_dim`` values, each value is bounded and rounded to one of ``fsq_levels`` integers, and
the code is projected back up and fed to the rest of the ASR model, whose transcription loss makes the
codes carry the words (the "supervised semantic" part). With 8 dimensions x 3 levels there are
3^8 = 6561 codes, the CosyVoice 2 speech vocabulary.

Only the part before the quantiser is needed for tokenising; it is ``SpeechTokenizerModel``. The part
after it (up-projection, more encoder blocks, CTC head) only exists for training and lives in
``cosyvoice2.train.tokenizer``.

Shape legend: B batch, M mel bins (128), F feature frames (100 Hz), N tokens (25 Hz, N = F // 4),
D model width, Q = fsq_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio import whisper_log_mel
from .config import RATES
from .errors import InputError, ModelLoadError


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    n_mels: int = 128  # whisper-large-v3 front end, as speech_tokenizer_v2 (SPEC §4)
    d_model: int = 256
    n_heads: int = 4
    ff_dim: int = 1024
    n_blocks: int = 4  # encoder blocks before the quantiser (the shipped part)
    fsq_dim: int = 8
    fsq_levels: int = 3
    downsample: int = 4  # 100 Hz features -> 25 Hz tokens
    dropout: float = 0.1
    # "strided": two stride-2 convs, the blocks run at 25 Hz. "whisper": Whisper's encoder layout (conv
    # k3 s1, conv k3 s2, blocks at 50 Hz, then frame pairs averaged to 25 Hz), so a pretrained Whisper
    # encoder can start it (cosyvoice2.train.whisper_init).
    stem: str = "strided"
    max_seconds: float = 30.0  # the official tokenizer's limit

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ModelLoadError(
                f"speech tokenizer: d_model {self.d_model} not divisible by {self.n_heads} heads"
            )
        if self.fsq_levels < 2 or self.fsq_levels % 2 == 0:
            # Odd level counts put a level at 0 and round symmetrically; even ones need an offset.
            raise ModelLoadError(f"speech tokenizer: fsq_levels must be odd and >= 3, got {self.fsq_levels}")
        if self.downsample != 4:
            raise ModelLoadError("speech tokenizer: only 4x downsampling (two stride-2 convs) is implemented")
        if self.stem not in ("strided", "whisper"):
            raise ModelLoadError(f"speech tokenizer: stem must be 'strided' or 'whisper', got {self.stem!r}")

    @property
    def codebook_size(self) -> int:
        return self.fsq_levels**self.fsq_dim

    @property
    def token_rate(self) -> float:
        hop = RATES.tokenizer_sample_rate // 100  # whisper features: 10 ms hop
        return RATES.tokenizer_sample_rate / hop / self.downsample


# --------------------------------------------------------------------------------------------------
# Building blocks (shared with the training-only ASR head)
# --------------------------------------------------------------------------------------------------


def sinusoids(n: int, d: int, device: torch.device | None = None) -> Tensor:
    """Absolute sinusoidal positions [n, d] (whisper's encoder table: sin half, cos half)."""
    inv = torch.exp(
        -math.log(10000.0) * torch.arange(d // 2, device=device, dtype=torch.float32) / (d // 2 - 1)
    )
    arg = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None]
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class Block(nn.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)); x + FF(LN(x)), FF = Linear -> GELU -> Linear."""

    def __init__(self, d: int, n_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.h, self.dropout = n_heads, dropout
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ff_norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_valid: Tensor | None) -> Tensor:
        """x [B, N, D], key_valid [B, N] bool (None: no padding) -> [B, N, D]."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, N, D/H]
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.ff_norm(x)))


class FSQ(nn.Module):
    """Finite scalar quantisation (Mentzer et al. 2023) with odd ``levels``: each of Q values is squashed
    to (-h, h) by h * tanh, h = (levels - 1) / 2, and rounded to an integer in [-h, h]. The rounding passes
    gradients straight through. Code index = sum_i (q_i + h) * levels^i (little-endian digits)."""

    def __init__(self, dim: int, levels: int) -> None:
        super().__init__()
        self.dim, self.levels, self.half = dim, levels, (levels - 1) // 2
        self.register_buffer("radix", levels ** torch.arange(dim), persistent=False)
        # Training only (set by cosyvoice2.train.tokenizer): the probability that a training batch replaces
        # the rounding by uniform noise of the same width (noise substitution), so the ASR head also sees
        # the values' continuous part while it learns to use them.
        self.noise_prob = 0.0

    def bound(self, z: Tensor) -> Tensor:
        """z [..., Q] -> h * tanh(z), in (-h, h)."""
        return self.half * torch.tanh(z)

    def round(self, bounded: Tensor) -> tuple[Tensor, Tensor]:
        """bounded [..., Q] -> (values [..., Q] in {-h..h}, straight-through gradient; codes [...])."""
        q = bounded + (torch.round(bounded) - bounded).detach()
        codes = self.codes(q)
        if self.training and self.noise_prob > 0 and float(torch.rand(())) < self.noise_prob:
            q = bounded + torch.rand_like(bounded) - 0.5
        return q, codes

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [..., Q] -> (values [..., Q] in {-h..h}, straight-through gradient; codes [...])."""
        return self.round(self.bound(z))

    def codes(self, q: Tensor) -> Tensor:
        return ((torch.round(q).long() + self.half) * self.radix).sum(-1)

    def values(self, codes: Tensor) -> Tensor:
        """codes [...] -> [..., Q] float: the inverse of ``codes``."""
        digits = torch.div(codes[..., None], self.radix, rounding_mode="floor") % self.levels
        return (digits - self.half).float()


def token_lengths(feature_frames: Tensor | int, cfg: SpeechTokenizerConfig) -> Tensor | int:
    """Tokens of F feature frames: F // 4 (the official batch extractor's feat_len / 4). The convs produce
    ceil(F / 4) frames; the last partial one is dropped so that audio padded to a whole token gives
    exactly two 24 kHz mel frames per token."""
    return feature_frames // cfg.downsample


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


class SpeechTokenizerModel(nn.Module):
    """Whisper log-mel -> 2 convs -> transformer blocks -> (25 Hz) -> Linear(D, Q) -> FSQ codes."""

    def __init__(self, cfg: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.n_mels, d, 3, stride=1 if cfg.stem == "whisper" else 2, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, cfg.ff_dim, cfg.dropout) for _ in range(cfg.n_blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.down = nn.Linear(d, cfg.fsq_dim)  # the low-rank projection into the quantiser
        self.fsq = FSQ(cfg.fsq_dim, cfg.fsq_levels)

    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """feats [B, M, F], feat_lens [B] -> (quantised [B, N, Q], codes [B, N], token lengths [B]).

        N = F // 4; padded positions (beyond each row's length) hold garbage codes.
        """
        bounded, lens = self.encode(feats, feat_lens)
        q, codes = self.fsq.round(bounded)
        return q, codes, lens

    def encode(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """feats [B, M, F], feat_lens [B] -> (bounded values before rounding [B, N, Q], lengths [B])."""
        return self.fsq.bound(self.down(self.hidden(feats, feat_lens))), token_lengths(feat_lens, self.cfg)

    def hidden(self, feats: Tensor, feat_lens: Tensor) -> Tensor:
        """feats [B, M, F], feat_lens [B] -> the encoder's output at 25 Hz [B, N, D], N = F // 4."""
        n = feats.shape[-1] // self.cfg.downsample
        r = 2 if self.cfg.stem == "whisper" else 1  # block frames per token
        h = F.gelu(self.conv2(F.gelu(self.conv1(feats))))  # [B, D, ceil(F * r / 4)]
        h = h[:, :, : n * r].transpose(1, 2)  # [B, N * r, D]
        h = h + sinusoids(n * r, h.shape[-1], h.device).to(h.dtype)
        valid = torch.arange(n * r, device=h.device)[None] < token_lengths(feat_lens, self.cfg)[:, None] * r
        key_valid = None if bool(valid.all()) else valid
        for block in self.blocks:
            h = block(h, key_valid)
        h = self.norm(h)
        if r > 1:  # 50 Hz -> 25 Hz: the mean of each frame pair
            h = h.view(h.shape[0], n, r, h.shape[-1]).mean(2)
        return h

    @torch.inference_mode()
    def tokens(self, wav16k: Tensor) -> Tensor:
        """One utterance of 16 kHz audio [1, N] (or [N]) -> speech tokens [L] int32, L = N // 640."""
        wav = wav16k.reshape(1, -1).float()
        seconds = wav.shape[1] / RATES.tokenizer_sample_rate
        if seconds > self.cfg.max_seconds:
            raise InputError(
                f"the speech tokenizer takes at most {self.cfg.max_seconds:g} s, got {seconds:.1f} s"
            )
        feats = whisper_log_mel(wav.to(self.down.weight.device), self.cfg.n_mels)  # [1, M, F]
        if feats.shape[-1] < self.cfg.downsample:
            return torch.zeros(0, dtype=torch.int32)
        _, codes, _ = self(
            feats.to(self.down.weight.dtype), torch.tensor([feats.shape[-1]], device=feats.device)
        )
        return codes[0].to(torch.int32).cpu()


__all__ = ["FSQ", "Block", "SpeechTokenizerConfig", "SpeechTokenizerModel", "sinusoids", "token_lengths"]
