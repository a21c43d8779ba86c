"""Audio in and out, and the three feature extractors of the CosyVoice 2 frontend.

Reads top to bottom:

1. ``load_audio`` / ``resample``: any user audio (path, bytes, file-like, array) -> float32 mono at a
   requested rate, with clear ``InputError``s instead of decoder tracebacks.
2. Filterbanks: the librosa "Slaney" mel filterbank (flow prompt mel, whisper) and the Kaldi mel
   filterbank (CAM++ fbank), computed here so neither librosa nor torchaudio is needed.
3. Features:
   * ``prompt_mel``      24 kHz [B, N]  -> [B, T, 80]    Matcha ``mel_spectrogram`` (flow prompt, 50 Hz)
   * ``whisper_log_mel`` 16 kHz [1, N]  -> [1, 128, T]   speech-tokenizer input (100 Hz)
   * ``kaldi_fbank``     16 kHz [1, N]  -> [T, 80]       CAM++ input before mean normalisation (100 Hz)
4. Output: ``encode_audio`` (one shot), ``AudioStreamEncoder`` (chunk by chunk, for HTTP streaming),
   ``content_type`` and ``write_audio_atomic``.

Shape letters: B batch, N samples, C channels, T frames, F frequency bins, M mel bins.
"""

from __future__ import annotations

import fractions
import functools
import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from torch import Tensor

from cosyvoice2.config import RATES
from cosyvoice2.errors import InputError
from cosyvoice2.fileio import atomic_write_bytes

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray | Tensor

SILENCE_PEAK = 1e-4  # below this peak a prompt carries no usable voice (about -80 dBFS)
MAX_CHANNELS = 32  # a 2-D array with more "channels" than this is not [C, N] / [N, C] audio


# ---------------------------------------------------------------------------------------------------
# 1. Loading and resampling
# ---------------------------------------------------------------------------------------------------


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample ``x`` ([N] or [N, C]) from ``orig_sr`` to ``target_sr`` with soxr (high quality).

    Returns ``x`` itself, untouched, when the rates are equal. Otherwise the output has about
    ``N * target_sr / orig_sr`` samples (exactly that when it is a whole number).
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise InputError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return x
    return soxr.resample(np.ascontiguousarray(x, dtype=np.float32), orig_sr, target_sr, quality="HQ")


def load_audio(
    src: AudioSource,
    sample_rate: int,
    *,
    src_rate: int | None = None,
    min_seconds: float | None = None,
    max_seconds: float | None = None,
    check_silence: bool = True,
) -> np.ndarray:
    """Decode ``src`` into float32 mono samples at ``sample_rate``: [N].

    ``src`` is a path, raw encoded bytes, a binary file-like object, or a numpy array / torch tensor of
    samples ([N], [C, N] or [N, C]; the smaller axis is taken as channels) whose rate ``src_rate`` must
    be given. For encoded input the container's own rate is used and ``src_rate`` is ignored. Integer
    arrays are scaled to [-1, 1] by their type's full scale.

    Like the official ``load_wav``: channels are mixed down by their mean, then the signal is
    resampled (here with soxr HQ instead of torchaudio's sinc resampler) when the rates differ. When the
    source is already at ``sample_rate`` the samples are returned bit-exactly. The official loader
    refuses sources below 16 kHz; we accept them (8 kHz telephone prompts are upsampled), but the
    missing 4-8 kHz band means the cloned voice will sound muffled.

    Samples are peak-normalised only when the peak exceeds 1 (as the official training pipeline);
    otherwise they are left untouched.

    Raises ``InputError`` for a missing file, undecodable or empty audio, NaN/inf samples, a duration
    outside ``[min_seconds, max_seconds]`` and, with ``check_silence``, all-silent audio. For encoded
    input ``max_seconds`` is also the decoders' budget: they stop, and refuse the audio, as soon as they
    have decoded more than that, whatever the container's header claims (a small compressed file can
    hold hours of audio, and its header can say it holds less than a second).
    """
    if sample_rate <= 0:
        raise InputError(f"target sample rate must be positive, got {sample_rate}")
    if isinstance(src, np.ndarray | Tensor):
        x, rate = _from_array(src, src_rate)
    else:
        x, rate = _decode(*_read_bytes(src), max_seconds=max_seconds)  # [N, C]

    if x.size == 0:
        raise InputError("the audio is empty (no samples)")
    if not np.isfinite(x).all():
        raise InputError("the audio contains NaN or infinite samples")
    # Mono by channel mean, as torchaudio.load(...).mean(0) in the official loader; a single channel is
    # taken as is so that mono files stay bit-exact.
    x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)

    seconds = x.shape[0] / rate
    if min_seconds is not None and seconds < min_seconds:
        raise InputError(f"the audio is too short: {seconds:.2f} s, at least {min_seconds:g} s is required")
    if max_seconds is not None and seconds > max_seconds:
        raise InputError(f"the audio is too long: {seconds:.2f} s, at most {max_seconds:g} s is allowed")
    peak = float(np.abs(x).max())
    if check_silence and peak < SILENCE_PEAK:
        raise InputError(f"the audio is silent (peak amplitude {peak:.2e} < {SILENCE_PEAK:g})")
    if peak > 1.0:
        x = x / np.float32(peak)

    return np.ascontiguousarray(resample(x, rate, sample_rate), dtype=np.float32)


def _from_array(src: np.ndarray | Tensor, src_rate: int | None) -> tuple[np.ndarray, int]:
    """A sample array -> ([N, C] float32, rate)."""
    if src_rate is None:
        raise InputError("src_rate is required when the audio is given as an array")
    if src_rate <= 0:
        raise InputError(f"src_rate must be positive, got {src_rate}")
    x = src.detach().cpu().numpy() if isinstance(src, Tensor) else np.asarray(src)
    while x.ndim > 2 and x.shape[0] == 1:  # [1, C, N] -> [C, N]
        x = x[0]
    if x.ndim == 0 or x.ndim > 2:
        raise InputError(f"audio arrays must be [N], [C, N] or [N, C], got shape {list(x.shape)}")
    x = _to_float32(x)
    if x.ndim == 1:
        return x[:, None], src_rate
    if min(x.shape) > MAX_CHANNELS:
        raise InputError(f"audio array of shape {list(x.shape)} does not look like [C, N] or [N, C]")
    return (x.T if x.shape[0] <= x.shape[1] else x), src_rate


def _to_float32(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)  # always a copy: the result must not alias the caller's array
    if x.dtype == np.uint8:  # unsigned 8-bit PCM is centred on 128
        return (x.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(x.dtype, np.signedinteger):
        return x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
    raise InputError(f"unsupported audio array dtype {x.dtype}")


def _read_bytes(src: AudioSource) -> tuple[bytes, str]:
    """Everything that is not an array becomes (encoded bytes, a name for messages). Prompts are small,
    so reading it all is fine, and both decoders can then retry from the start."""
    name = "the audio"
    if isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
    elif isinstance(src, str | os.PathLike):
        path = Path(src)
        if not path.is_file():
            raise InputError(f"audio file not found: {path}")
        data, name = path.read_bytes(), str(path)
    elif hasattr(src, "read"):
        data = src.read()
        if not isinstance(data, bytes | bytearray):
            raise InputError("the audio file object must be opened in binary mode")
        data = bytes(data)
    else:
        raise InputError(f"unsupported audio source of type {type(src).__name__}")
    if not data:
        raise InputError(f"{name} is empty (0 bytes)")
    return data, name


def _prefer_pyav(head: bytes) -> bool:
    """Formats the brief routes to PyAV even though libsndfile might read some of them."""
    mp3_or_adts = head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    mp4 = head[4:8] == b"ftyp"
    ogg_opus = head[:4] == b"OggS" and b"OpusHead" in head
    matroska = head[:4] == b"\x1aE\xdf\xa3"
    return mp3_or_adts or mp4 or ogg_opus or matroska


def _decode(data: bytes, name: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Encoded bytes -> ([N, C] float32, rate): soundfile for wav/flac/ogg, PyAV for the rest.

    ``max_seconds`` (None: no limit) bounds what either decoder produces; past it ``InputError``."""
    backends = [_decode_soundfile, _decode_pyav]
    if _prefer_pyav(data[:64]):
        backends.reverse()
    reasons = []
    for backend in backends:
        try:
            return backend(data, max_seconds)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure means "try the next one / not audio"
            reasons.append(_reason(e))
    detail = "; ".join(dict.fromkeys(reasons))
    raise InputError(f"could not decode {name}: not a supported audio format, or corrupt data ({detail})")


def _reason(e: Exception) -> str:
    """The decoder's own words, without object reprs or errno noise."""
    for attr in ("error_string", "strerror"):  # soundfile.LibsndfileError, av.FFmpegError
        text = getattr(e, attr, None)
        if isinstance(text, str) and text:
            return text.rstrip(".")
    return str(e) or type(e).__name__


_DECODE_BLOCK = 1 << 16  # frames per soundfile read when a budget applies


def _sample_budget(max_seconds: float | None, rate: int) -> int | None:
    """The most samples (per channel) at ``rate`` that still fit in ``max_seconds``: n / rate <= max_seconds
    exactly when n <= floor(max_seconds * rate), so stopping past it refuses nothing load_audio accepts."""
    if max_seconds is None:
        return None
    return max(0, math.floor(max_seconds * max(rate, 1)))


def _too_long(max_seconds: float | None) -> InputError:
    return InputError(f"the audio is too long: over {max_seconds:g} s, at most {max_seconds:g} s is allowed")


def _decode_soundfile(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, channels = int(f.samplerate), int(f.channels)
        budget = _sample_budget(max_seconds, rate)
        if budget is None:
            return f.read(dtype="float32", always_2d=True), rate  # [N, C]
        # Read in blocks and count, rather than trust the header's frame count.
        blocks: list[np.ndarray] = []
        n = 0
        while True:
            block = f.read(_DECODE_BLOCK, dtype="float32", always_2d=True)
            if block.shape[0] == 0:
                break
            n += block.shape[0]
            if n > budget:
                raise _too_long(max_seconds)
            blocks.append(block)
    if not blocks:
        return np.zeros((0, channels), dtype=np.float32), rate
    return (blocks[0] if len(blocks) == 1 else np.concatenate(blocks)), rate


def _av():
    # PyAV (FFmpeg) is imported on first use: only compressed formats need it, and the training entry
    # points (which read FLAC through soundfile) then run where PyAV is not installed.
    import av

    return av


def _decode_pyav(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    av = _av()
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise ValueError("no audio stream")
        # Planar float keeps [C, n] per frame whatever the codec's native sample format is.
        to_float = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        rate = stream.rate
        decoded = 0  # samples per channel, counted as frames come out of the decoder
        for frame in container.decode(stream):
            rate = frame.sample_rate
            decoded += frame.samples
            budget = _sample_budget(max_seconds, rate)
            if budget is not None and decoded > budget:
                raise _too_long(max_seconds)
            chunks.extend(f.to_ndarray() for f in to_float.resample(frame))
        chunks.extend(f.to_ndarray() for f in to_float.resample(None))
    if not chunks:
        return np.zeros((0, 1), dtype=np.float32), int(rate or 1)
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), int(rate)


# ---------------------------------------------------------------------------------------------------
# 2. Filterbanks
# ---------------------------------------------------------------------------------------------------

# Slaney's auditory-toolbox mel scale (librosa's default, htk=False): linear below 1 kHz, log above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_LOG_HZ = 1000.0
_SLANEY_LOG_MEL = _SLANEY_LOG_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_slaney_mel(hz: float) -> float:
    if hz < _SLANEY_LOG_HZ:
        return hz / _SLANEY_HZ_PER_MEL
    return _SLANEY_LOG_MEL + math.log(hz / _SLANEY_LOG_HZ) / _SLANEY_LOG_STEP


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear = _SLANEY_HZ_PER_MEL * mel
    log = _SLANEY_LOG_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_LOG_MEL))
    return np.where(mel >= _SLANEY_LOG_MEL, log, linear)


@functools.lru_cache(maxsize=16)
def slaney_mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax) with its defaults: [M, n_fft//2 + 1] float32.

    Triangles on the Slaney mel scale, each scaled to unit area ("slaney" norm). The arithmetic
    follows librosa's order (float64 triangles stored as float32, then the area scale applied and
    stored as float32 again) so the bank matches whisper's ``mel_filters.npz`` and Matcha's to float32
    rounding. Cached: treat the returned array as read-only.
    """
    fmax = sr / 2.0 if fmax is None else float(fmax)
    fft_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)  # [F]
    mel_edges = np.linspace(_hz_to_slaney_mel(float(fmin)), _hz_to_slaney_mel(fmax), n_mels + 2)
    hz_edges = _slaney_mel_to_hz(mel_edges)  # [M + 2]: left edge, centres, right edge
    widths = np.diff(hz_edges)  # [M + 1]
    ramps = hz_edges[:, None] - fft_hz[None, :]  # [M + 2, F]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)  # [M, F]
    area_norm = 2.0 / (hz_edges[2:] - hz_edges[:-2])
    weights = (weights * area_norm[:, None]).astype(np.float32)
    weights.flags.writeable = False
    return weights


@functools.lru_cache(maxsize=16)
def _slaney_bank_tensor(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> Tensor:
    return torch.tensor(slaney_mel_filterbank(sr, n_fft, n_mels, fmin, fmax))  # a copy: numpy's is read-only


def _kaldi_mel(hz: Tensor) -> Tensor:
    return 1127.0 * (1.0 + hz / 700.0).log()


@functools.lru_cache(maxsize=4)
def kaldi_mel_filterbank(n_mels: int, padded_window: int, sr: float, low_hz: float, high_hz: float) -> Tensor:
    """Kaldi's triangular mel bins (``MelBanks``, no VTLN): [M, padded_window//2 + 1] float32.

    Triangles are linear in Kaldi mel (1127 ln(1 + f/700)) between ``low_hz`` and ``high_hz``
    (<= 0 means relative to Nyquist). Computed in float32 torch like torchaudio's port so the CAM++
    input matches the official one bit for bit in practice. The Nyquist bin gets weight 0.
    """
    if high_hz <= 0.0:
        high_hz += 0.5 * sr
    mel_low, mel_high = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_hz, high_hz))
    delta = (mel_high - mel_low) / (n_mels + 1)
    index = torch.arange(n_mels).unsqueeze(1)  # [M, 1]
    left = mel_low + index * delta
    centre = mel_low + (index + 1.0) * delta
    right = mel_low + (index + 2.0) * delta
    bin_mel = _kaldi_mel((sr / padded_window) * torch.arange(padded_window // 2, dtype=torch.float32))[None]
    up = (bin_mel - left) / (centre - left)
    down = (right - bin_mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # [M, padded/2]
    return F.pad(banks, (0, 1))  # [M, padded/2 + 1]


@functools.lru_cache(maxsize=8)
def _hann(win_length: int, periodic: bool) -> Tensor:
    return torch.hann_window(win_length, periodic=periodic)


# ---------------------------------------------------------------------------------------------------
# 3. Features
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MelSpec:
    """Matcha-style log-mel settings. ``FLOW_MEL`` is the flow prompt feature; the GAN loss mel is
    ``dataclasses.replace(FLOW_MEL, fmax=None)`` (up to Nyquist)."""

    sample_rate: int = RATES.sample_rate
    n_fft: int = 4 * RATES.hop_length  # 80 ms window: 1920 at 24 kHz
    hop_length: int = RATES.hop_length
    win_length: int = 4 * RATES.hop_length
    n_mels: int = RATES.n_mels
    fmin: float = 0.0
    fmax: float | None = 8000.0  # None -> sample_rate / 2
    mag_eps: float = 1e-9  # inside the sqrt: keeps the gradient of |X| finite at 0
    log_floor: float = 1e-5


FLOW_MEL = MelSpec()


def prompt_mel(wav: Tensor, spec: MelSpec = FLOW_MEL) -> Tensor:
    """Matcha ``mel_spectrogram(center=False)``: [B, N] (or [N]) float32 -> [B, T, M] natural-log mel.

    The signal is reflect-padded by (n_fft - hop) / 2 on both sides and framed without centring, so
    T = N // hop when N is a multiple of hop (150 frames for 3 s at 24 kHz). Magnitude is
    sqrt(re^2 + im^2 + eps), then the Slaney mel bank, then log(max(x, 1e-5)).
    """
    x = _batched(wav)  # [B, N]
    pad = (spec.n_fft - spec.hop_length) // 2
    if x.shape[-1] <= pad:
        raise InputError(f"audio too short for a mel frame: {x.shape[-1]} samples, need more than {pad}")
    x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    window = _hann(spec.win_length, True).to(x.device, x.dtype)
    n_fft, hop, win = spec.n_fft, spec.hop_length, spec.win_length
    stft = torch.stft(x, n_fft, hop, win, window=window, center=False, return_complex=True)
    stft = torch.view_as_real(stft)  # [B, F, T, 2]
    magnitude = torch.sqrt(stft.pow(2).sum(-1) + spec.mag_eps)  # [B, F, T]
    bank = _slaney_bank_tensor(spec.sample_rate, spec.n_fft, spec.n_mels, spec.fmin, spec.fmax)
    mel = torch.matmul(bank.to(x.device, x.dtype), magnitude)  # [B, M, T]
    return torch.log(torch.clamp(mel, min=spec.log_floor)).transpose(1, 2)


def griffin_lim(mel: Tensor, spec: MelSpec = FLOW_MEL, iters: int = 32, seed: int = 0) -> Tensor:
    """An analysis vocoder: natural-log mel [M, T] (``prompt_mel``'s, transposed) -> audio [T * hop].

    The magnitude comes back through the mel bank's pseudo-inverse and its phase from ``iters`` rounds of
    Griffin-Lim. It is slow and sounds phasey, but it has no trained weights, so it tells whether a mel
    carries the words (``cosyvoice2 eval --resynth``) independently of how well the vocoder is trained.
    The output is peak-normalised to 0.5 (its level is not meaningful).
    """
    bank = _slaney_bank_tensor(spec.sample_rate, spec.n_fft, spec.n_mels, spec.fmin, spec.fmax)
    mag = (torch.linalg.pinv(bank) @ mel.float().exp()).clamp(min=1e-5)  # [F, T]
    window = _hann(spec.win_length, True)
    n = mag.shape[1] * spec.hop_length
    phase = 2 * math.pi * torch.rand(mag.shape, generator=torch.Generator().manual_seed(seed))

    def synth(phase: Tensor) -> Tensor:
        return torch.istft(torch.polar(mag, phase), spec.n_fft, spec.hop_length, spec.win_length, window)

    for _ in range(iters):
        stft = torch.stft(
            synth(phase), spec.n_fft, spec.hop_length, spec.win_length, window, return_complex=True
        )
        stft = stft[:, : mag.shape[1]]
        phase = F.pad(stft.angle(), (0, mag.shape[1] - stft.shape[1]))
    y = synth(phase)
    y = F.pad(y, (0, max(0, n - y.shape[0])))[:n]
    return 0.5 * y / y.abs().max().clamp(min=1e-6)


@dataclass(frozen=True)
class WhisperMelSpec:
    """openai-whisper ``log_mel_spectrogram`` settings (25 ms window, 10 ms hop at 16 kHz)."""

    sample_rate: int = RATES.tokenizer_sample_rate
    n_fft: int = RATES.tokenizer_sample_rate // 40  # 25 ms: 400
    hop_length: int = RATES.tokenizer_sample_rate // 100  # 10 ms: 160
    log_floor: float = 1e-10
    dynamic_range: float = 8.0  # log10 units kept below the loudest bin (80 dB)
    offset: float = 4.0  # whisper's (x + 4) / 4 scaling to roughly [-1, 1]


WHISPER_MEL = WhisperMelSpec()


def whisper_log_mel(wav: Tensor, n_mels: int = 128, spec: WhisperMelSpec = WHISPER_MEL) -> Tensor:
    """Whisper log-mel: [B, N] (or [N]) 16 kHz -> [B, n_mels, N // 160], no 30-s padding.

    ``speech_tokenizer_v2`` takes 128 bins (the whisper-large-v3 front end), hence the default.

    Centred periodic-Hann STFT (reflect pad), last frame dropped, power spectrum, Slaney mel bank,
    log10 floored at the utterance's max - 8, then (x + 4) / 4. Whisper takes the max over the whole
    batch; we take it per utterance, which is the same for the B = 1 the frontend uses.
    """
    x = _batched(wav)
    if x.shape[-1] <= spec.n_fft // 2:
        raise InputError(f"audio too short for whisper features: {x.shape[-1]} samples")
    window = _hann(spec.n_fft, True).to(x.device, x.dtype)
    stft = torch.stft(x, spec.n_fft, spec.hop_length, window=window, return_complex=True)  # [B, F, T + 1]
    power = stft[..., :-1].abs() ** 2  # [B, F, T]
    bank = _slaney_bank_tensor(spec.sample_rate, spec.n_fft, n_mels, 0.0, None)
    mel = bank.to(x.device, x.dtype) @ power  # [B, M, T]
    log_mel = torch.clamp(mel, min=spec.log_floor).log10()
    log_mel = torch.maximum(log_mel, log_mel.amax(dim=(1, 2), keepdim=True) - spec.dynamic_range)
    return (log_mel + spec.offset) / spec.offset


@dataclass(frozen=True)
class FbankSpec:
    """Kaldi ``compute-fbank-feats`` defaults with 80 bins and no dither (CAM++ input)."""

    sample_rate: int = RATES.tokenizer_sample_rate
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    n_mels: int = RATES.n_mels
    low_hz: float = 20.0
    high_hz: float = 0.0  # <= 0: relative to Nyquist
    preemphasis: float = 0.97
    povey_power: float = 0.85  # Povey window = Hann ** 0.85 (non-periodic)

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def padded_window_size(self) -> int:
        return 1 << (self.window_size - 1).bit_length()  # next power of two: 512


KALDI_FBANK = FbankSpec()


def kaldi_fbank(wav: Tensor, spec: FbankSpec = KALDI_FBANK) -> Tensor:
    """Kaldi fbank (torchaudio.compliance.kaldi.fbank with dither 0): [1, N] or [N] in [-1, 1] -> [T, M].

    snip_edges framing (T = 1 + (N - 400) // 160), per-frame DC removal, pre-emphasis 0.97 (the first
    sample is pre-emphasised against itself), Povey window, zero pad to 512, |rfft|^2, Kaldi mel bank,
    log with a float32-eps floor. Only the first channel of a [C, N] input is used, like Kaldi.
    """
    x = wav.reshape(-1) if wav.dim() == 1 else wav[0]  # [N]
    size, shift = spec.window_size, spec.window_shift
    if x.shape[0] < size:
        raise InputError(f"audio too short for fbank: {x.shape[0]} samples, need at least {size}")
    frames = x.unfold(0, size, shift)  # [T, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
    frames = frames - spec.preemphasis * previous
    window = _hann(size, False).to(x.device, x.dtype).pow(spec.povey_power)
    frames = F.pad(frames * window, (0, spec.padded_window_size - size))  # [T, 512]
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [T, 257]
    bank = kaldi_mel_filterbank(
        spec.n_mels, spec.padded_window_size, float(spec.sample_rate), spec.low_hz, spec.high_hz
    ).to(x.device, x.dtype)
    mel = torch.mm(power, bank.T)  # [T, M]
    eps = torch.tensor(torch.finfo(torch.float32).eps, device=x.device, dtype=x.dtype)
    return torch.maximum(mel, eps).log()


def campplus_features(wav: Tensor) -> Tensor:
    """CAM++ input: Kaldi fbank minus its mean over time, [1, N] 16 kHz -> [1, T, 80]."""
    fbank = kaldi_fbank(wav)
    return (fbank - fbank.mean(dim=0, keepdim=True)).unsqueeze(0)


def _batched(wav: Tensor) -> Tensor:
    if wav.dim() == 1:
        return wav.unsqueeze(0)
    if wav.dim() != 2:
        raise InputError(f"expected audio of shape [N] or [B, N], got {list(wav.shape)}")
    return wav


# ---------------------------------------------------------------------------------------------------
# 4. Output encoding
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Codec:
    """How one output format is produced; PyAV-backed formats name their container and encoder."""

    mime: str
    container: str | None = None
    encoder: str | None = None
    bit_rate: int | None = None
    container_options: tuple[tuple[str, str], ...] = ()


_CODECS: dict[str, _Codec] = {
    "wav": _Codec("audio/wav"),
    "pcm": _Codec("audio/pcm"),  # raw s16le mono at the stream's sample rate
    "flac": _Codec("audio/flac", "flac", "flac"),
    "mp3": _Codec("audio/mpeg", "mp3", "libmp3lame", 64_000),
    # Ogg pages are normally cut every second; one page per 20 ms opus packet keeps streaming latency low.
    "opus": _Codec("audio/ogg; codecs=opus", "ogg", "libopus", 48_000, (("page_duration", "20000"),)),
    "aac": _Codec("audio/aac", "adts", "aac", 64_000),
}
AUDIO_FORMATS: tuple[str, ...] = tuple(_CODECS)
_SUFFIX_FORMATS = {f".{fmt}": fmt for fmt in AUDIO_FORMATS} | {".ogg": "opus", ".raw": "pcm"}
_PCM16_SCALE = 32767.0  # libsndfile's float -> PCM_16 scale, so our pcm/wav-stream bytes match soundfile's


def _codec(fmt: str) -> _Codec:
    try:
        return _CODECS[fmt.lower()]
    except KeyError:
        raise InputError(f"unknown audio format {fmt!r}; choose one of {', '.join(AUDIO_FORMATS)}") from None


def content_type(fmt: str) -> str:
    """MIME type for an output format (``pcm`` is raw 16-bit little-endian mono)."""
    return _codec(fmt).mime


def _mono_f32(x: np.ndarray | Tensor) -> np.ndarray:
    """Output samples -> clipped float32 [N] (encoders wrap around, rather than clip, above full scale)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    return np.clip(x, -1.0, 1.0)


def _pcm16(x: np.ndarray) -> bytes:
    return np.rint(x * _PCM16_SCALE).astype("<i2").tobytes()


def _streaming_wav_header(sample_rate: int) -> bytes:
    """44-byte PCM-16 mono WAV header whose RIFF and data sizes are 0xFFFFFFFF ("unknown, read to EOF").

    The total length is not known while streaming; ffmpeg, browsers and libsndfile treat the maximal
    size as "until the end of the stream"."""
    unknown = 0xFFFFFFFF
    block_align = 2
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * block_align, block_align, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )


class _ChunkSink:
    """Write-only byte sink. Having no seek() makes FFmpeg treat the output as a pipe, so muxers never
    go back to patch headers that were already sent (mp3 Xing, FLAC STREAMINFO)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class _PyAVWriter:
    """One PyAV output container with a single mono audio stream; feed float32 chunks, read bytes."""

    def __init__(self, codec: _Codec, sample_rate: int, sink: _ChunkSink | io.BytesIO) -> None:
        av = _av()
        self._sink = sink
        self._container = av.open(
            sink,
            mode="w",
            format=codec.container,
            buffer_size=4096,
            container_options={"flush_packets": "1", **dict(codec.container_options)},
        )
        rates = av.codec.Codec(codec.encoder, "w").audio_rates
        # Encoders with a fixed rate list (opus: 8/12/16/24/48 kHz) get the nearest rate above ours;
        # PyAV's encode() resamples the frames to it.
        codec_rate = sample_rate
        if rates and sample_rate not in rates:
            codec_rate = min((r for r in rates if r >= sample_rate), default=max(rates))
        self._stream = self._container.add_stream(codec.encoder, rate=codec_rate, layout="mono")
        if codec.bit_rate:
            self._stream.bit_rate = codec.bit_rate
        self._sample_rate = sample_rate
        self._pts = 0

    def encode(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        frame = _av().AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = self._sample_rate
        frame.time_base = fractions.Fraction(1, self._sample_rate)
        frame.pts = self._pts
        self._pts += x.shape[0]
        self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        self._container.mux(self._stream.encode(None))
        self._container.close()


def encode_audio(x: np.ndarray | Tensor, sample_rate: int, fmt: str) -> bytes:
    """Encode mono samples in [-1, 1] ([N], or any shape with N elements) as a complete file.

    wav: 16-bit PCM (soundfile); flac: 16-bit (soundfile); mp3, opus (Ogg), aac (ADTS): PyAV; pcm:
    raw s16le. Samples beyond full scale are clipped.
    """
    codec = _codec(fmt)
    fmt = fmt.lower()
    samples = _mono_f32(x)
    if fmt == "pcm":
        return _pcm16(samples)
    if fmt in ("wav", "flac"):
        buffer = io.BytesIO()
        sf.write(buffer, samples, sample_rate, format=fmt.upper(), subtype="PCM_16")
        return buffer.getvalue()
    # A seekable buffer lets the muxer finish its headers (the mp3 LAME tag stores the encoder delay
    # and padding, so decoders can trim them).
    buffer = io.BytesIO()
    writer = _PyAVWriter(codec, sample_rate, buffer)
    writer.encode(samples)
    writer.close()
    return buffer.getvalue()


class AudioStreamEncoder:
    """Encode audio chunk by chunk so it can be sent while it is being synthesised.

    ``encode(chunk)`` returns the bytes ready so far (possibly empty: codecs buffer a frame or two),
    ``close()`` flushes the rest. Concatenating every return value gives one valid stream.
    pcm is raw s16le; wav is a header with unknown (0xFFFFFFFF) sizes followed by s16le samples;
    flac, mp3, opus (Ogg) and aac (ADTS) are muxed by PyAV into a non-seekable sink, so their
    headers carry no total length.
    """

    def __init__(self, fmt: str, sample_rate: int) -> None:
        self.codec = _codec(fmt)
        self.format = fmt.lower()
        self.sample_rate = sample_rate
        self._header_sent = False
        self._closed = False
        self._sink = _ChunkSink()
        self._writer = None
        if self.codec.container is not None:
            self._writer = _PyAVWriter(self.codec, sample_rate, self._sink)

    @property
    def content_type(self) -> str:
        return self.codec.mime

    def encode(self, chunk: np.ndarray | Tensor) -> bytes:
        if self._closed:
            raise RuntimeError("AudioStreamEncoder is closed")
        samples = _mono_f32(chunk)
        if self._writer is not None:
            self._writer.encode(samples)
            return self._sink.take()
        return self._header() + _pcm16(samples)

    def close(self) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            return self._sink.take()
        return self._header()  # a stream with no chunks is still a valid (empty) wav

    def _header(self) -> bytes:
        if self.format != "wav" or self._header_sent:
            return b""
        self._header_sent = True
        return _streaming_wav_header(self.sample_rate)


def write_audio_atomic(path: str | os.PathLike, x: np.ndarray | Tensor, sample_rate: int) -> Path:
    """Write ``x`` to ``path`` in the format named by its suffix (no suffix: wav), atomically.

    The bytes go to a temporary file in the same directory, which then replaces ``path`` with
    ``os.replace``, so readers never see a half-written file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix and suffix not in _SUFFIX_FORMATS:
        known = ", ".join(sorted(_SUFFIX_FORMATS))
        raise InputError(f"unknown audio file suffix {suffix!r}; use one of {known}")
    data = encode_audio(x, sample_rate, _SUFFIX_FORMATS.get(suffix, "wav"))
    return atomic_write_bytes(path, data)
