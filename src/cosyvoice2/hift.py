"""HiFT vocoder: 80-bin mel at 50 Hz -> 24 kHz waveform (CosyVoice 2's ``HiFTGenerator``, inference form).

Shape legend: B batch, M mel bins (80), T mel frames, L = T * samples_per_frame audio samples (480 per
frame), H = nb_harmonics + 1 sine channels, K = n_fft // 2 + 1 STFT bins, F = L / istft_hop + 1 STFT frames.

The model is a neural source-filter HiFi-GAN that predicts an iSTFT spectrum instead of samples:

1. ``F0Predictor``: mel -> f0 in Hz per frame.
2. ``SineSource``: f0 -> harmonic sines + noise -> one excitation signal ``source`` [B, 1, L]. This is the
   only random part: per call it draws ``rand(B, H)`` initial phases, ``randn(B, L, H)`` noise and one
   more ``randn(B, L, 1)`` that the official code draws and never uses (kept so the RNG stream stays in
   step with the official implementation).
3. ``HiFT.decode``: mel + STFT(source) -> upsampling conv stack fused with the source at every scale ->
   log-magnitude and phase -> iSTFT -> audio clamped to ``audio_limit``. Deterministic.

Weight norm: the official checkpoint stores weight-normalised convs as (g, v) pairs. The converter folds
them into plain weights (``w = g * v / ||v||``), which is exactly the weight the parametrisation computes
on every forward, so inference carries no parametrisation overhead. ``apply_weight_norm`` puts the
parametrisation back for training.

Streaming (``HiFT.stream_step`` with a caller-owned ``VocoderStream``) follows the official chunk joining
of ``CosyVoice2Model.token2wav``: each chunk is vocoded together with the last mel frames of the previous
chunk, reuses the previous source samples for those frames, cross-fades the overlap with a Hamming window
and holds back the overlap until the next chunk (or the final one) arrives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RATES
from .errors import InputError, ModelLoadError

# Snake divides by alpha; the official activation adds this to avoid dividing by a zero alpha.
_SNAKE_EPS = 1e-9
# SineGen (v1) is what the official code picks at exactly this rate (CosyVoice 1); we only build SineGen2.
_SINEGEN_V1_RATE = 22050


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiFTConfig:
    """HiFTGenerator + ConvRNNF0Predictor hyper-parameters (official yaml names where they exist)."""

    in_channels: int  # mel bins M
    base_channels: int  # width after conv_pre; halves at every upsampling stage
    nb_harmonics: int  # overtones above the fundamental; H = nb_harmonics + 1 sine channels
    sampling_rate: int
    nsf_alpha: float  # sine amplitude
    nsf_sigma: float  # noise std in voiced regions
    nsf_voiced_threshold: float  # f0 (Hz) above which a sample counts as voiced
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    istft_n_fft: int
    istft_hop: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    f0_cond_channels: int  # ConvRNNF0Predictor width
    # Constants of the official code that its yaml does not expose:
    post_lrelu_slope: float = 0.01  # decode() calls leaky_relu with torch's default slope before conv_post
    max_magnitude: float = 100.0  # exp(log-magnitude) is clipped here before the iSTFT
    stream_mel_cache_frames: int = 8  # CosyVoice2Model.mel_cache_len: mel frames overlapped between chunks

    def __post_init__(self) -> None:
        n = len(self.upsample_rates)
        if not (len(self.upsample_kernel_sizes) == len(self.source_resblock_kernel_sizes) == n):
            raise ModelLoadError(
                "hift config: upsample_rates, upsample_kernel_sizes and source resblocks differ in length"
            )
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ModelLoadError("hift config: resblock kernel and dilation lists differ in length")
        if len(self.source_resblock_kernel_sizes) != len(self.source_resblock_dilation_sizes):
            raise ModelLoadError("hift config: source resblock kernel and dilation lists differ in length")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            # padding (k - u) // 2 gives exactly u * n output samples only when k - u is even.
            if k < u or (k - u) % 2:
                raise ModelLoadError(f"hift config: upsample kernel {k} does not fit rate {u}")
        if self.base_channels % (2**n):
            raise ModelLoadError(f"hift config: base_channels {self.base_channels} not divisible by 2**{n}")
        if self.sampling_rate == _SINEGEN_V1_RATE:
            raise ModelLoadError(
                "hift config: 22050 Hz selects the CosyVoice 1 SineGen, which is not implemented"
            )

    @property
    def n_harmonic_channels(self) -> int:
        return self.nb_harmonics + 1

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per mel frame: the conv stack upsamples by prod(rates), the iSTFT by its hop."""
        return math.prod(self.upsample_rates) * self.istft_hop

    @property
    def stream_cache_samples(self) -> int:
        """Samples overlapped between streaming chunks (official ``source_cache_len``, 3840)."""
        return self.stream_mel_cache_frames * self.samples_per_frame

    @classmethod
    def from_official(cls, cfg: dict[str, Any]) -> HiFTConfig:
        """From the official config dict: ``cfg["hift"]["args"]`` and ``cfg["hift.f0_predictor"]["args"]``."""
        try:
            a = cfg["hift"]["args"]
            f0 = cfg["hift.f0_predictor"]["args"]
            if f0.get("num_class", 1) != 1:
                raise ModelLoadError(f"hift config: f0 predictor num_class must be 1, got {f0['num_class']}")
            if f0.get("in_channels", a["in_channels"]) != a["in_channels"]:
                raise ModelLoadError("hift config: f0 predictor in_channels differs from the vocoder's")
            return cls(
                in_channels=int(a["in_channels"]),
                base_channels=int(a["base_channels"]),
                nb_harmonics=int(a["nb_harmonics"]),
                sampling_rate=int(a["sampling_rate"]),
                nsf_alpha=float(a["nsf_alpha"]),
                nsf_sigma=float(a["nsf_sigma"]),
                nsf_voiced_threshold=float(a["nsf_voiced_threshold"]),
                upsample_rates=tuple(int(x) for x in a["upsample_rates"]),
                upsample_kernel_sizes=tuple(int(x) for x in a["upsample_kernel_sizes"]),
                istft_n_fft=int(a["istft_params"]["n_fft"]),
                istft_hop=int(a["istft_params"]["hop_len"]),
                resblock_kernel_sizes=tuple(int(x) for x in a["resblock_kernel_sizes"]),
                resblock_dilation_sizes=_nested_ints(a["resblock_dilation_sizes"]),
                source_resblock_kernel_sizes=tuple(int(x) for x in a["source_resblock_kernel_sizes"]),
                source_resblock_dilation_sizes=_nested_ints(a["source_resblock_dilation_sizes"]),
                lrelu_slope=float(a["lrelu_slope"]),
                audio_limit=float(a["audio_limit"]),
                f0_cond_channels=int(f0["cond_channels"]),
            )
        except (KeyError, TypeError) as e:
            raise ModelLoadError(f"hift config: missing or malformed entry {e}") from None

    @classmethod
    def cosyvoice2_0_5b(cls) -> HiFTConfig:
        """The released CosyVoice2-0.5B vocoder (cosyvoice2.yaml ``hift``)."""
        return cls(
            in_channels=RATES.n_mels,
            base_channels=512,
            nb_harmonics=8,
            sampling_rate=RATES.sample_rate,
            nsf_alpha=0.1,
            nsf_sigma=0.003,
            nsf_voiced_threshold=10.0,
            upsample_rates=(8, 5, 3),
            upsample_kernel_sizes=(16, 11, 7),
            istft_n_fft=16,
            istft_hop=4,
            resblock_kernel_sizes=(3, 7, 11),
            resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
            source_resblock_kernel_sizes=(7, 7, 11),
            source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
            lrelu_slope=0.1,
            audio_limit=0.99,
            f0_cond_channels=512,
        )


def _nested_ints(lists: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in inner) for inner in lists)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha with a learned per-channel alpha (linear scale). [B, C, N] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        # Reciprocal-then-multiply (not a division) rounds exactly like the official activation.
        return x + (1.0 / (alpha + _SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake: per dilation d, x += conv(snake(conv_d(snake(x)))). [B, C, N]."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        # "same" padding for a dilated odd kernel.
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """5 x (Conv1d k3 + ELU), Linear -> |f0|. mel [B, M, T] -> f0 [B, T] in Hz."""

    n_layers = 5

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(self.n_layers):
            layers += [nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # keeps the official indices: convs at 0, 2, 4, 6, 8
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: Tensor) -> Tensor:
        h = self.condnet(mel).transpose(1, 2)  # [B, T, C]
        return self.classifier(h).squeeze(-1).abs()


class SineSource(nn.Module):
    """Neural source-filter excitation (official SineGen2 + SourceModuleHnNSF2). f0 [B, T] -> [B, 1, L].

    Phases are accumulated at frame rate and linearly interpolated up to sample rate (SineGen2), which
    keeps float32 cumsums short. Random draws all come from ``generator`` (None: torch's default one for
    the device), in the official order.
    """

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.merge = nn.Linear(cfg.n_harmonic_channels, 1)  # official m_source.l_linear

    def forward(self, f0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        cfg = self.cfg
        spf = cfg.samples_per_frame
        B = f0.shape[0]
        # Phases and random draws in float32 whatever the model dtype: fp16 phase sums drift audibly, and
        # the official draws are float32.
        f0 = f0.float()
        kw: dict[str, Any] = {"generator": generator, "device": f0.device, "dtype": f0.dtype}
        # Same calls as the official code (nn.Upsample / F.interpolate with a scale factor), so the
        # sample-to-frame index arithmetic matches bit for bit.
        f0_up = F.interpolate(f0[:, None], scale_factor=float(spf), mode="nearest")
        f0_up = f0_up.transpose(1, 2)  # [B, L, 1]
        harmonics = torch.arange(1, cfg.n_harmonic_channels + 1, device=f0.device, dtype=f0.dtype)
        # [B, L, H] cycles advanced per sample; the integer part does not change the phase.
        cycles = (f0_up * harmonics / cfg.sampling_rate) % 1

        phase0 = torch.rand(B, cfg.n_harmonic_channels, **kw)  # random initial phase per overtone ...
        phase0[:, 0] = 0  # ... but not for the fundamental
        cycles[:, 0, :] += phase0

        per_frame = F.interpolate(cycles.transpose(1, 2), scale_factor=1.0 / spf, mode="linear")  # [B, H, T]
        phase = torch.cumsum(per_frame.transpose(1, 2), dim=1) * 2 * math.pi  # [B, T, H] radians per frame
        phase = F.interpolate(phase.transpose(1, 2) * spf, scale_factor=float(spf), mode="linear")
        sines = cfg.nsf_alpha * torch.sin(phase.transpose(1, 2))  # [B, L, H]

        voiced = (f0_up > cfg.nsf_voiced_threshold).to(f0.dtype)  # [B, L, 1]
        noise_amp = voiced * cfg.nsf_sigma + (1 - voiced) * cfg.nsf_alpha / 3
        # The official randn_like inherits the channel-major layout of the interpolated sines, and torch's
        # CPU normal_ draws a different sequence for a non-contiguous tensor than for a contiguous one. So
        # fill a tensor with that same layout, [B, H, L] memory viewed as [B, L, H], to get the same numbers.
        normal = torch.empty(B, cfg.n_harmonic_channels, sines.shape[1], device=f0.device, dtype=f0.dtype)
        noise = noise_amp * normal.transpose(1, 2).normal_(generator=generator)
        sines = sines * voiced + noise
        # SourceModuleHnNSF2 also draws a noise signal it never uses; draw it too so that later random
        # numbers (next chunk, next request) match the official stream.
        torch.randn(voiced.shape, **kw)

        return torch.tanh(self.merge(sines.to(self.merge.weight.dtype))).transpose(1, 2)  # [B, 1, L]


# --------------------------------------------------------------------------------------------------
# Streaming state
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocoderStream:
    """Caller-owned state of one streamed utterance. Start with ``VocoderStream()``.

    Between chunks it holds the overlap of the previous chunk (C = stream_mel_cache_frames, N = C *
    samples_per_frame): ``mel`` [B, M, C] is re-vocoded with the next chunk, ``source`` [B, 1, N] replaces the
    next chunk's first N source samples (continuous excitation), ``speech`` [B, N] is the held-back tail that
    the next chunk's first N samples fade into.
    """

    mel: Tensor | None = None
    source: Tensor | None = None
    speech: Tensor | None = None
    done: bool = False  # set after the final chunk

    @property
    def has_cache(self) -> bool:
        return self.mel is not None


def crossfade_window(n_overlap: int, device: torch.device | None = None) -> Tensor:
    """Symmetric Hamming window of 2 * n_overlap samples, float64. [2 * n_overlap].

    Taken from ``np.hamming`` itself (the official window): torch.hamming_window differs in the last bits.
    """
    return torch.from_numpy(np.hamming(2 * n_overlap)).to(device)


def crossfade(new: Tensor, old_tail: Tensor) -> Tensor:
    """Fade ``new``'s first N samples in over the previous chunk's tail ``old_tail`` [B, N]. new [B, L>=N].

    The official code multiplies by a float64 numpy window, so the sum is formed in float64 and rounded
    once; we do the same (in float32 on devices without float64).
    """
    n = old_tail.shape[-1]
    dtype = torch.float32 if new.device.type == "mps" else torch.float64
    w = crossfade_window(n, new.device).to(dtype)
    head = new[:, :n].to(dtype) * w[:n] + old_tail.to(dtype) * w[n:]
    return torch.cat([head.to(new.dtype), new[:, n:]], dim=1)


# --------------------------------------------------------------------------------------------------
# The vocoder
# --------------------------------------------------------------------------------------------------


class HiFT(nn.Module):
    """HiFT vocoder: ``inference(mel [B, M, T]) -> (speech [B, L], source [B, 1, L])``.

    L = samples_per_frame * T. ``decode`` and ``f0`` are deterministic; ``stream_step`` joins chunks.
    """

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        n_up = len(cfg.upsample_rates)
        n_bins = cfg.istft_n_fft // 2 + 1  # K
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        self.source = SineSource(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, cfg.base_channels, 7, padding=3)

        chans = [cfg.base_channels // 2**i for i in range(n_up + 1)]
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(chans[i], chans[i + 1], k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        # The source STFT runs at the final rate; stage i sees it downsampled by the product of the
        # upsample rates still to come (e.g. 15, 3, 1 for rates 8, 5, 3).
        remaining = [math.prod(cfg.upsample_rates[i + 1 :]) for i in range(n_up)]
        self.source_downs = nn.ModuleList(
            nn.Conv1d(2 * n_bins, chans[i + 1], 1)
            if r == 1
            else nn.Conv1d(2 * n_bins, chans[i + 1], 2 * r, r, padding=r // 2)
            for i, r in enumerate(remaining)
        )
        src_blocks = zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)
        self.source_resblocks = nn.ModuleList(
            ResBlock(chans[i + 1], k, d) for i, (k, d) in enumerate(src_blocks)
        )
        # Flat list, stage-major: resblocks[i * n_kernels + j] (the official indexing).
        self.resblocks = nn.ModuleList(
            ResBlock(chans[i + 1], k, d)
            for i in range(n_up)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        # One extra sample on the left makes the conv output as long as the centred STFT (F = L/hop + 1).
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        self.conv_post = nn.Conv1d(chans[-1], 2 * n_bins, 7, padding=3)
        # scipy.signal.get_window("hann", n_fft) (periodic), computed in float64 like scipy, kept in float32.
        window = torch.hann_window(cfg.istft_n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)
        # Runtime choice, not a config (``engine.cast_hift_bf16``): the decoder's convolutions (all but the f0
        # predictor, the sine source and the (i)STFT, which stay float32) under CPU bf16 autocast.
        self.decode_bf16 = False

    # -- weight norm (training) -----------------------------------------------------------------

    def weight_norm_modules(self) -> Iterator[nn.Module]:
        """The convs the official model weight-normalises (everything but source_downs and the Linears)."""
        yield self.conv_pre
        yield from self.ups
        for block in [*self.source_resblocks, *self.resblocks]:
            yield from block.convs1
            yield from block.convs2
        yield self.conv_post
        yield from (m for m in self.f0_predictor.condnet if isinstance(m, nn.Conv1d))

    # -- deterministic parts --------------------------------------------------------------------

    def f0(self, mel: Tensor) -> Tensor:
        """mel [B, M, T] -> f0 [B, T] in Hz."""
        self._check_mel(mel)
        return self.f0_predictor(mel)

    def _stft(self, x: Tensor) -> Tensor:
        """x [B, L] -> [real ; imag] [B, 2K, F] (centred, reflect-padded)."""
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop
        spec = torch.stft(x, n_fft, hop, n_fft, window=self.stft_window, center=True, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, log_mag: Tensor, phase_in: Tensor) -> Tensor:
        """log magnitude, phase pre-activation [B, K, F] -> audio [B, L]."""
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop
        magnitude = torch.exp(log_mag).clamp(max=self.cfg.max_magnitude)
        # The official model squashes the phase with sin (redundant as a phase, but it is what was trained).
        phase = torch.sin(phase_in)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, n_fft, hop, n_fft, window=self.stft_window, center=True)

    def decode(self, mel: Tensor, source: Tensor) -> Tensor:
        """mel [B, M, T], source [B, 1, L] -> speech [B, L], clamped to +-audio_limit. Deterministic."""
        self._check_mel(mel)
        L = mel.shape[2] * self.cfg.samples_per_frame
        if tuple(source.shape) != (mel.shape[0], 1, L):
            raise InputError(
                f"source must be [{mel.shape[0]}, 1, {L}] for this mel, got {list(source.shape)}"
            )
        s_stft = self._stft(source.squeeze(1))  # [B, 2K, F]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.decode_bf16):
            x = self._convs(mel, s_stft).float()  # [B, 2K, F]
        n_bins = self.cfg.istft_n_fft // 2 + 1
        speech = self._istft(x[:, :n_bins], x[:, n_bins:])
        return speech.clamp(-self.cfg.audio_limit, self.cfg.audio_limit)

    def _convs(self, mel: Tensor, s_stft: Tensor) -> Tensor:
        """mel [B, M, T], source STFT [B, 2K, F] -> [log magnitude ; phase] pre-activations [B, 2K, F]."""
        n_kernels = len(self.cfg.resblock_kernel_sizes)
        x = self.conv_pre(mel)  # [B, C0, T]
        for i, (up, down, src_block) in enumerate(zip(self.ups, self.source_downs, self.source_resblocks)):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))  # [B, C_i+1, T * prod(rates[:i+1])]
            if i == len(self.ups) - 1:
                x = self.reflection_pad(x)  # [B, C, F]
            x = x + src_block(down(s_stft))
            blocks = self.resblocks[i * n_kernels : (i + 1) * n_kernels]
            x = sum(block(x) for block in blocks) / n_kernels
        return self.conv_post(F.leaky_relu(x, self.cfg.post_lrelu_slope))

    # -- full inference -------------------------------------------------------------------------

    @torch.no_grad()
    def inference(
        self,
        mel: Tensor,
        *,
        cache_source: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """mel [B, M, T] -> (speech [B, L], source [B, 1, L]), L = samples_per_frame * T.

        ``cache_source`` [B, 1, n <= L] replaces the first n source samples (streaming: the previous chunk's
        excitation for the re-vocoded overlap frames). ``generator`` drives every random draw; None uses
        torch's default generator, which matches the official code seeded with ``torch.manual_seed``.
        """
        self._check_mel(mel)
        source = self.source(self.f0_predictor(mel), generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            n = cache_source.shape[-1]
            if cache_source.dim() != 3 or cache_source.shape[:2] != source.shape[:2] or n > source.shape[2]:
                raise InputError(
                    f"cache_source must be [{source.shape[0]}, 1, n <= {source.shape[2]}], "
                    f"got {list(cache_source.shape)}"
                )
            source[:, :, :n] = cache_source
        return self.decode(mel, source), source

    @torch.no_grad()
    def stream_step(
        self,
        state: VocoderStream,
        mel_chunk: Tensor,
        final: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, VocoderStream]:
        """Vocode the next mel chunk [B, M, T] of a stream; returns (audio [B, n], new state).

        The official chunk rule: prepend the cached C mel frames, pass the cached N source samples as
        ``cache_source``, run ``inference``, cross-fade the first N samples with the cached tail. A
        non-final chunk then holds back its last N samples (and caches its last C mel frames and N source
        samples); the final chunk emits everything. Over a whole stream the emitted lengths add up to
        samples_per_frame * (total mel frames).
        """
        if state.done:
            raise InputError("this vocoder stream is finished; start a new VocoderStream()")
        if mel_chunk.dim() != 3:
            raise InputError(f"mel chunk must be [B, {self.cfg.in_channels}, T], got {list(mel_chunk.shape)}")
        mel = mel_chunk if state.mel is None else torch.cat([state.mel, mel_chunk], dim=2)
        n_cache_frames, n_cache = self.cfg.stream_mel_cache_frames, self.cfg.stream_cache_samples
        if mel.shape[2] == 0 and final:
            return mel_chunk.new_zeros(mel_chunk.shape[0], 0), VocoderStream(done=True)
        if mel.shape[2] < n_cache_frames and not final:
            # The official loop would keep a short cache here and then fail to cross-fade the next chunk.
            raise InputError(
                f"a non-final vocoder chunk needs at least {n_cache_frames} mel frames, got {mel.shape[2]}"
            )
        speech, source = self.inference(mel, cache_source=state.source, generator=generator)
        if state.speech is not None:
            speech = crossfade(speech, state.speech)
        if final:
            return speech, VocoderStream(done=True)
        # Copies, so the state neither aliases the caller's mel buffer nor pins whole chunks in memory.
        next_state = VocoderStream(
            mel=mel[:, :, -n_cache_frames:].clone(),
            source=source[:, :, -n_cache:].clone(),
            speech=speech[:, -n_cache:].clone(),
        )
        return speech[:, :-n_cache], next_state

    def _check_mel(self, mel: Tensor) -> None:
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels:
            raise InputError(f"mel must be [B, {self.cfg.in_channels}, T], got {list(mel.shape)}")
        if mel.shape[2] == 0:
            raise InputError("mel has no frames")


# --------------------------------------------------------------------------------------------------
# Weight norm for training
# --------------------------------------------------------------------------------------------------


def apply_weight_norm(model: HiFT) -> HiFT:
    """Re-parametrise the official set of convs as weight norm (g, v; dim 0) for training, in place.

    Folding is exact: the parametrisation is initialised with g = ||w||, v = w, and on every forward it
    evaluates w = g * v / ||v||, the same formula the converter applies to the official (g, v) pairs. So
    loaded-and-folded inference and weight-normed training see the same weights (up to float rounding).
    The parametrised state dict uses the official key names (``*.parametrizations.weight.original0/1``).
    """
    for module in model.weight_norm_modules():
        nn.utils.parametrizations.weight_norm(module, name="weight", dim=0)
    return model


def remove_weight_norm(model: HiFT) -> HiFT:
    """Fold weight norm back into plain weights (after training), in place."""
    for module in model.weight_norm_modules():
        if nn.utils.parametrize.is_parametrized(module, "weight"):
            nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


__all__ = [
    "HiFT",
    "HiFTConfig",
    "VocoderStream",
    "apply_weight_norm",
    "crossfade",
    "crossfade_window",
    "remove_weight_norm",
]
