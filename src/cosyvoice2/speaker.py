"""Speaker embedding for the flow: a GE2E d-vector LSTM, architecture of Resemblyzer's voice encoder.

The shipped weights are Resemblyzer's bundled ``pretrained.pt`` (resemble-ai/Resemblyzer 0.1.4,
Apache-2.0, Copyright Resemble AI / Corentin Jemine), converted once by ``convert_resemblyzer`` into our own
safetensors file; nothing here imports or needs the resemblyzer package at run time. The licence notice
(``RESEMBLYZER_NOTICE``) travels with the weights: in the safetensors metadata and as ``NOTICE`` in a
native model directory.

Pipeline for one utterance (16 kHz float samples), following Resemblyzer's ``preprocess_wav`` and
``embed_utterance``:

1. raise the volume to -30 dBFS RMS if it is quieter (never lowered);
2. shorten silences longer than a few 30-ms windows. Resemblyzer uses webrtcvad for the voiced/unvoiced
   decision; we use an energy threshold instead (same windows, smoothing and dilation), which is close
   on clean speech and keeps the dependency list short;
3. 40-bin *power* (not log) mel spectrogram: periodic-Hann STFT, n_fft 400 (25 ms), hop 160 (10 ms),
   centred with zero padding (librosa >= 0.10 ``melspectrogram`` defaults), Slaney mel bank;
4. 1.6-s windows (160 frames) every ~0.77 s (1.3 windows per second), the last one kept when it is at
   least 75 % covered by audio (zero-padded);
5. each window -> 3-layer LSTM (40 -> 256) -> last hidden state -> Linear 256 -> ReLU -> L2 normalise;
6. the utterance embedding is the L2-normalised mean of the window embeddings: a [256] vector.

Shape legend: B windows, T mel frames, M mel bins (40), H LSTM width, E embedding size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio import slaney_mel_filterbank
from .config import RATES
from .errors import InputError, ModelLoadError

RESEMBLYZER_NOTICE = (
    "The speaker encoder weights (speaker_encoder.safetensors) are converted from the voice encoder bundled "
    "with Resemblyzer 0.1.4 (https://github.com/resemble-ai/Resemblyzer), Copyright (c) Resemble AI, "
    "licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0). "
    "The weights were converted to safetensors (float16) without other changes."
)


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    sample_rate: int = RATES.tokenizer_sample_rate
    n_mels: int = 40
    window_ms: int = 25
    hop_ms: int = 10
    hidden_size: int = 256
    num_layers: int = 3
    embedding_size: int = 256
    partial_frames: int = 160  # 1.6 s windows
    partials_per_second: float = 1.3
    min_coverage: float = 0.75
    target_dbfs: float = -30.0  # volume normalisation (increase only)
    trim_silence: bool = True
    vad_window_ms: int = 30
    vad_smoothing: int = 8  # moving-average width in VAD windows
    vad_max_silence: int = (
        6  # dilation of the voiced windows: a (vad_max_silence + 1)-wide structuring element
    )
    vad_threshold_db: float = 40.0  # our energy VAD: a window is voiced within this many dB of the loudest

    @property
    def n_fft(self) -> int:
        return self.sample_rate * self.window_ms // 1000

    @property
    def hop(self) -> int:
        return self.sample_rate * self.hop_ms // 1000


# --------------------------------------------------------------------------------------------------
# Preprocessing (numpy, one utterance)
# --------------------------------------------------------------------------------------------------


def normalize_volume(wav: np.ndarray, target_dbfs: float) -> np.ndarray:
    """Scale up to ``target_dbfs`` RMS (dB relative to full scale); louder audio is left as is."""
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms == 0.0:
        return wav
    change = target_dbfs - 20.0 * math.log10(rms)
    return wav if change < 0 else (wav * 10.0 ** (change / 20.0)).astype(np.float32)


def trim_long_silences(wav: np.ndarray, cfg: SpeakerEncoderConfig) -> np.ndarray:
    """Drop long silent stretches, keeping a margin around speech (energy VAD; Resemblyzer: webrtcvad)."""
    win = cfg.sample_rate * cfg.vad_window_ms // 1000
    n = len(wav) // win
    if n == 0:
        return wav
    frames = wav[: n * win].reshape(n, win).astype(np.float64)
    db = 10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    voiced = (db > db.max() - cfg.vad_threshold_db).astype(np.float64)
    # centred moving average (width w: (w-1)//2 zeros before, w//2 after), rounded back to a flag
    w = cfg.vad_smoothing
    padded = np.concatenate([np.zeros((w - 1) // 2), voiced, np.zeros(w // 2)])
    smooth = np.convolve(padded, np.ones(w) / w, mode="valid")
    mask = np.round(smooth) > 0
    # dilate the voiced windows (binary dilation with a flat element of vad_max_silence + 1 windows)
    mask = np.convolve(mask.astype(np.float64), np.ones(cfg.vad_max_silence + 1), mode="same") > 0
    keep = np.repeat(mask, win)
    out = wav[: n * win][keep]
    return out if out.size else wav


def power_mel(wav: Tensor, cfg: SpeakerEncoderConfig) -> Tensor:
    """[N] float32 -> [T, M] power mel, T = 1 + N // hop (centred frames, zero padding)."""
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=wav.dtype, device=wav.device)
    spec = torch.stft(
        wav, cfg.n_fft, cfg.hop, window=window, center=True, pad_mode="constant", return_complex=True
    )
    power = spec.abs() ** 2  # [K, T]
    bank = torch.from_numpy(slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, 0.0, None).copy())
    return (bank.to(wav.device, wav.dtype) @ power).T


def partial_slices(n_samples: int, cfg: SpeakerEncoderConfig) -> list[tuple[int, int]]:
    """Mel-frame windows [(start, stop)] covering ``n_samples`` samples (Resemblyzer's partial utterances)."""
    hop = cfg.hop
    n_frames = math.ceil((n_samples + 1) / hop)
    step = round(cfg.sample_rate / cfg.partials_per_second / hop)
    if not 0 < step <= cfg.partial_frames:
        raise ModelLoadError(f"speaker encoder: partials_per_second {cfg.partials_per_second} out of range")
    count = max(1, n_frames - cfg.partial_frames + step + 1)
    slices = [(i, i + cfg.partial_frames) for i in range(0, count, step)]
    start = slices[-1][0] * hop
    coverage = (n_samples - start) / (cfg.partial_frames * hop)
    if coverage < cfg.min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class SpeakerEncoderModel(nn.Module):
    """3-layer LSTM d-vector encoder. ``embed(wav16k [1, N]) -> [E]`` (L2-normalised, non-negative)."""

    def __init__(self, cfg: SpeakerEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.n_mels, cfg.hidden_size, cfg.num_layers, batch_first=True)
        self.linear = nn.Linear(cfg.hidden_size, cfg.embedding_size)

    def forward(self, mels: Tensor) -> Tensor:
        """Windows of power mel [B, T, M] -> window embeddings [B, E], each L2-normalised."""
        _, (hidden, _) = self.lstm(mels)
        return F.normalize(F.relu(self.linear(hidden[-1])), dim=1)

    def preprocess(self, wav16k: Tensor | np.ndarray) -> np.ndarray:
        wav = np.asarray(wav16k.detach().cpu() if isinstance(wav16k, Tensor) else wav16k, dtype=np.float32)
        wav = normalize_volume(wav.reshape(-1), self.cfg.target_dbfs)
        return trim_long_silences(wav, self.cfg) if self.cfg.trim_silence else wav

    @torch.inference_mode()
    def embed(self, wav16k: Tensor | np.ndarray) -> Tensor:
        """One utterance of 16 kHz audio [1, N] (or [N]) -> embedding [E] float32."""
        wav = self.preprocess(wav16k)
        if wav.size == 0:
            raise InputError("the audio is empty; cannot compute a speaker embedding")
        slices = partial_slices(len(wav), self.cfg)
        need = slices[-1][1] * self.cfg.hop
        if need >= len(wav):
            wav = np.pad(wav, (0, need - len(wav)))
        dev = self.linear.weight.device
        mel = power_mel(torch.from_numpy(wav).to(dev), self.cfg)  # [T, M]
        windows = torch.stack([mel[a:b] for a, b in slices])  # [B, T, M]
        partial = self(windows.to(self.linear.weight.dtype)).float()
        return F.normalize(partial.mean(0), dim=0).cpu()


def convert_resemblyzer(path: str | Path, cfg: SpeakerEncoderConfig | None = None) -> dict[str, Tensor]:
    """Resemblyzer's ``pretrained.pt`` -> a state dict for ``SpeakerEncoderModel`` (float32).

    The checkpoint also holds GE2E similarity scalars and an optimizer state; only the LSTM and the
    projection are kept. Shapes are checked against ``cfg`` (default: Resemblyzer's hyper-parameters).
    """
    cfg = cfg or SpeakerEncoderConfig()
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
        state = ckpt["model_state"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is a load error
        raise ModelLoadError(f"cannot read a Resemblyzer checkpoint from {path}: {e}") from None
    model = SpeakerEncoderModel(cfg)
    want = model.state_dict()
    out = {}
    for key, ref in want.items():
        if key not in state:
            raise ModelLoadError(f"{path}: missing {key}")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ModelLoadError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )
        out[key] = state[key].float().contiguous()
    return out


__all__ = [
    "RESEMBLYZER_NOTICE",
    "SpeakerEncoderConfig",
    "SpeakerEncoderModel",
    "convert_resemblyzer",
    "partial_slices",
    "power_mel",
]
