"""Audio I/O, the three frontend feature extractors and the two ONNX wrappers.

Feature parity is checked against the official outputs in ``audio/`` and ``e2e_small/frontend.pt``; every
shape and rate is read from the fixtures, so another fixture set of the same structure works too.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import load_pt

from cosyvoice2.audio import (
    AUDIO_FORMATS,
    FLOW_MEL,
    AudioStreamEncoder,
    campplus_features,
    content_type,
    encode_audio,
    kaldi_fbank,
    load_audio,
    prompt_mel,
    resample,
    whisper_log_mel,
    write_audio_atomic,
)
from cosyvoice2.config import RATES
from cosyvoice2.errors import InputError, ModelLoadError
from cosyvoice2.onnx_models import MAX_TOKENIZER_SECONDS, WHISPER_FRAME_RATE, SpeakerEncoder, SpeechTokenizer

# FIXTURES.md gives 1e-5 for audio features, observed on one machine. The official float32 features carry
# their own rounding: the same features computed in float64 differ from them by up to 6e-5, and float32 on
# a CPU with other FFT/GEMM kernels (an Intel Xeon with AMX, 2026-12-05) by up to 5.6e-5. 1e-4 (the
# fixtures' mel tolerance) is the cross-machine bound.
FEATURE_TOL = {"atol": 1e-4, "rtol": 1e-5}
SR = RATES.sample_rate
SR16 = RATES.tokenizer_sample_rate


def tone(seconds: float, sample_rate: int, hz: float = 220.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Features vs audio/
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signal(fixtures):
    return load_pt(fixtures / "audio" / "signal.pt")


def test_prompt_mel_matches_official(fixtures, signal):
    ref = load_pt(fixtures / "audio" / "flow_prompt_mel.pt")
    mel = prompt_mel(signal["wav_24k"])
    torch.testing.assert_close(mel, ref["speech_feat"], **FEATURE_TOL)
    assert mel.shape[1] == int(ref["speech_feat_len"][0])


def test_whisper_log_mel_matches_official(fixtures, signal):
    ref = load_pt(fixtures / "audio" / "whisper_logmel.pt")
    feats = whisper_log_mel(signal["wav_16k"], n_mels=ref["feats"].shape[1])
    torch.testing.assert_close(feats, ref["feats"], **FEATURE_TOL)
    assert feats.shape[2] == int(ref["feats_length"][0])


def test_kaldi_fbank_and_cmn_match_official(fixtures, signal):
    ref = load_pt(fixtures / "audio" / "campplus_fbank.pt")
    torch.testing.assert_close(kaldi_fbank(signal["wav_16k"]), ref["fbank"], **FEATURE_TOL)
    torch.testing.assert_close(campplus_features(signal["wav_16k"]), ref["fbank_cmn"], **FEATURE_TOL)


def test_prompt_mel_batched_and_full_band(signal):
    wav = signal["wav_24k"][:, : 20 * RATES.hop_length]
    batch = torch.cat([wav, 0.5 * wav])  # [2, N]
    spec = dataclasses.replace(FLOW_MEL, fmax=None)  # the GAN-loss mel
    mel = prompt_mel(batch, spec)
    assert mel.shape == (2, wav.shape[1] // RATES.hop_length, RATES.n_mels)
    torch.testing.assert_close(mel[1:], prompt_mel(0.5 * wav, spec))
    assert not torch.allclose(mel[:1], prompt_mel(wav))  # fmax really changes the bank


# --------------------------------------------------------------------------------------------------
# e2e_small frontend: WAV files -> features -> stand-in ONNX models
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(fixtures):
    root = fixtures / "e2e_small"
    return root, load_pt(root / "frontend.pt")


def as_batch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).unsqueeze(0)


def test_griffin_lim_inverts_the_flow_mel():
    """The analysis vocoder: a harmonic signal's mel comes back with the right length and, after level
    matching, within 25 % spectral convergence of the original mel (phase retrieval halves the error of
    random phases: measured 0.41 with no iterations, 0.21 with 32)."""
    import math

    from cosyvoice2.audio import griffin_lim

    t = torch.arange(RATES.sample_rate) / RATES.sample_rate
    x = sum(torch.sin(2 * math.pi * 200 * k * t) / k for k in range(1, 12)) * (
        0.2 + 0.8 * torch.sin(math.pi * t)
    )
    mel = prompt_mel(0.3 * x / x.abs().max())[0].T  # [80, 50]

    def convergence(y: torch.Tensor) -> float:
        a, b = mel.exp(), prompt_mel(y)[0].T.exp()
        c = (a * b).sum() / (b * b).sum()
        return float(torch.linalg.norm(a - c * b) / torch.linalg.norm(a))

    y = griffin_lim(mel)
    assert y.shape == (mel.shape[1] * RATES.hop_length,) and abs(float(y.abs().max()) - 0.5) < 1e-6
    assert convergence(y) < 0.25 and convergence(y) < 0.7 * convergence(griffin_lim(mel, iters=0))
    assert torch.equal(griffin_lim(mel, seed=3), griffin_lim(mel, seed=3))


def test_load_audio_is_bit_exact_at_native_rate(e2e):
    root, _ = e2e
    for name in ("prompt_24k.wav", "prompt_16k.wav", "source_16k.wav"):
        raw, rate = sf.read(root / name, dtype="float32")
        loaded = load_audio(root / name, rate)
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, raw)


def test_frontend_features_from_wav_files(e2e):
    root, ref = e2e
    prompt_24k = as_batch(load_audio(root / "prompt_24k.wav", SR))
    prompt_16k = as_batch(load_audio(root / "prompt_16k.wav", SR16))
    source_16k = as_batch(load_audio(root / "source_16k.wav", SR16))
    torch.testing.assert_close(prompt_mel(prompt_24k), ref["prompt_speech_feat"], **FEATURE_TOL)
    torch.testing.assert_close(whisper_log_mel(prompt_16k), ref["prompt_whisper_feats"], **FEATURE_TOL)
    torch.testing.assert_close(campplus_features(prompt_16k), ref["prompt_campplus_input"], **FEATURE_TOL)
    torch.testing.assert_close(whisper_log_mel(source_16k), ref["source_whisper_feats"], **FEATURE_TOL)


def test_stand_in_onnx_models(e2e):
    root, ref = e2e
    tokenizer = SpeechTokenizer(root / "model" / "speech_tokenizer_v2.onnx")
    speaker = SpeakerEncoder(root / "model" / "campplus.onnx")
    prompt_16k = as_batch(load_audio(root / "prompt_16k.wav", SR16))
    source_16k = as_batch(load_audio(root / "source_16k.wav", SR16))

    prompt_tokens = tokenizer.tokens(whisper_log_mel(prompt_16k))
    assert prompt_tokens.dtype == torch.int32
    assert torch.equal(prompt_tokens, ref["prompt_speech_token"])
    assert torch.equal(tokenizer.tokens(whisper_log_mel(source_16k)), ref["source_speech_token"])
    # The official features fed straight in give the official raw output too.
    assert torch.equal(tokenizer.tokens(ref["prompt_whisper_feats"]).long(), ref["prompt_speech_token_onnx"])

    embedding = speaker.embed(campplus_features(prompt_16k))
    assert embedding.dtype == torch.float32
    torch.testing.assert_close(embedding, ref["prompt_embedding"], **FEATURE_TOL)


def test_onnx_bad_files_and_inputs(e2e, tmp_path):
    root, _ = e2e
    with pytest.raises(ModelLoadError, match="missing.onnx"):
        SpeechTokenizer(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ModelLoadError, match="corrupt.onnx"):
        SpeakerEncoder(corrupt)

    tokenizer = SpeechTokenizer(root / "model" / "speech_tokenizer_v2.onnx")
    too_long = int(MAX_TOKENIZER_SECONDS * WHISPER_FRAME_RATE) + 1
    with pytest.raises(InputError, match="at most"):
        tokenizer.tokens(torch.zeros(1, 128, too_long))
    with pytest.raises(InputError):
        tokenizer.tokens(torch.zeros(128, 10))
    with pytest.raises(InputError):
        SpeakerEncoder(root / "model" / "campplus.onnx").embed(torch.zeros(1, 10, 3))


# --------------------------------------------------------------------------------------------------
# load_audio: sources and bad input
# --------------------------------------------------------------------------------------------------


def test_sources_agree(tmp_path):
    x = tone(0.5, SR16)
    path = tmp_path / "a.wav"
    sf.write(path, x, SR16, subtype="FLOAT")
    data = path.read_bytes()
    expected = load_audio(path, SR16)
    np.testing.assert_array_equal(expected, x)
    np.testing.assert_array_equal(load_audio(str(path), SR16), expected)
    np.testing.assert_array_equal(load_audio(data, SR16), expected)
    np.testing.assert_array_equal(load_audio(io.BytesIO(data), SR16), expected)
    np.testing.assert_array_equal(load_audio(x, SR16, src_rate=SR16), expected)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(x)[None], SR16, src_rate=SR16), expected)


def test_integer_arrays_are_scaled():
    x = tone(0.1, SR16)
    pcm = np.rint(x * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm, SR16, src_rate=SR16), x, atol=1e-4)


def test_stereo_is_mixed_down_by_mean(tmp_path):
    left, right = tone(0.25, SR16, 220.0), tone(0.25, SR16, 330.0, 0.1)
    stereo = np.stack([left, right])  # [C, N]
    mean = stereo.mean(axis=0)
    np.testing.assert_allclose(load_audio(stereo, SR16, src_rate=SR16), mean, atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo.T, SR16, src_rate=SR16), mean, atol=1e-7)
    sf.write(tmp_path / "stereo.wav", stereo.T, SR16, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.wav", SR16), mean, atol=1e-7)


@pytest.mark.parametrize("target", [SR16, SR])
def test_8khz_is_upsampled(target):
    low_rate = 8000
    x = tone(0.5, low_rate, 440.0)
    y = load_audio(x, target, src_rate=low_rate)
    assert y.dtype == np.float32
    assert len(y) == len(x) * target // low_rate
    assert len(resample(x, low_rate, target)) == len(y)


def test_peak_normalised_only_above_full_scale():
    loud = tone(0.1, SR16, amplitude=2.0)
    assert np.abs(load_audio(loud, SR16, src_rate=SR16)).max() == pytest.approx(1.0)
    quiet = tone(0.1, SR16, amplitude=0.5)
    np.testing.assert_array_equal(load_audio(quiet, SR16, src_rate=SR16), quiet)


@pytest.mark.parametrize(
    "src, kwargs, message",
    [
        (b"this is plainly not audio" * 8, {}, "could not decode"),
        (np.random.default_rng(0).bytes(4096), {}, "could not decode"),
        (b"", {}, "empty"),
        (np.zeros(0, np.float32), {"src_rate": SR16}, "empty"),
        (np.array([0.1, np.nan] * 100, np.float32), {"src_rate": SR16}, "NaN"),
        (np.array([0.1, np.inf] * 100, np.float32), {"src_rate": SR16}, "infinite"),
        (np.zeros(SR16, np.float32), {"src_rate": SR16}, "silent"),
        (np.full(100, 0.1, np.float32), {}, "src_rate"),
        ("/nonexistent/prompt.wav", {}, "not found"),
    ],
)
def test_bad_input_raises_input_error(src, kwargs, message):
    with pytest.raises(InputError, match=message):
        load_audio(src, SR16, **kwargs)


def test_duration_limits_name_duration_and_limit():
    x = tone(0.5, SR16)
    with pytest.raises(InputError, match=r"0\.50 s.*at least 1 s"):
        load_audio(x, SR16, src_rate=SR16, min_seconds=1.0)
    with pytest.raises(InputError, match=r"0\.50 s.*at most 0\.25 s"):
        load_audio(x, SR16, src_rate=SR16, max_seconds=0.25)
    assert len(load_audio(x, SR16, src_rate=SR16, min_seconds=0.25, max_seconds=1.0)) == len(x)
    silent = np.zeros(100, np.float32)
    assert len(load_audio(silent, SR16, src_rate=SR16, check_silence=False)) == len(silent)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_decoders_stop_at_max_seconds(fmt, monkeypatch):
    """``max_seconds`` is the decoders' budget: encoded input stops decoding once it is over (at most one
    block or frame later), and what fits decodes exactly as without a budget."""
    import cosyvoice2.audio as audio

    monkeypatch.setattr(audio, "_DECODE_BLOCK", 4096)  # several soundfile blocks for a short file
    data = encode_audio(tone(2.0, SR16), SR16, fmt)
    whole = load_audio(data, SR16)
    assert np.array_equal(load_audio(data, SR16, max_seconds=2.5), whole)
    with pytest.raises(InputError, match=r"too long: over 1 s"):
        load_audio(data, SR16, max_seconds=1.0)
    seen: list = []  # soundfile blocks read / mp3 frames converted
    if fmt == "mp3":
        import av

        monkeypatch.setattr(av, "AudioResampler", _counting_resampler(av.AudioResampler, seen))
    else:
        read = audio.sf.SoundFile.read
        monkeypatch.setattr(audio.sf.SoundFile, "read", lambda f, *a, **k: seen.append(1) or read(f, *a, **k))
    with pytest.raises(InputError, match="too long"):
        load_audio(data, SR16, max_seconds=0.5)
    assert 0 < len(seen) < (4 if fmt != "mp3" else 20)  # 2 s would take 8 blocks / ~56 frames


def _counting_resampler(real, seen: list):
    class Counting:
        def __init__(self, **kwargs) -> None:
            self._inner = real(**kwargs)

        def resample(self, frame):
            seen.append(frame)
            return self._inner.resample(frame)

    return Counting


def test_a_header_that_lies_about_the_length_does_not_matter():
    """An mp3 whose Info header claims ~0.6 s while it holds 60 s (libsndfile believes the header)."""
    x = tone(60.0, SR)
    mp3 = bytearray(encode_audio(x, SR, "mp3"))
    at = mp3.find(b"Info")
    mp3[at + 8 : at + 12] = (25).to_bytes(4, "big")  # the frame count field (flags say it is present)
    assert sf.info(io.BytesIO(bytes(mp3))).duration < 1.0
    with pytest.raises(InputError, match="too long"):
        load_audio(bytes(mp3), SR, max_seconds=30.0)


def test_truncated_file_is_an_input_error():
    data = encode_audio(tone(0.2, SR16), SR16, "wav")
    with pytest.raises(InputError, match="could not decode"):
        load_audio(data[:30], SR16)


# --------------------------------------------------------------------------------------------------
# Output encoding
# --------------------------------------------------------------------------------------------------

# Lossy codecs add priming/padding samples (mp3 ~1.1k, aac 1k, opus pre-skip): allow 0.1 s.
CODEC_SLACK_SECONDS = 0.1


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "aac"])
def test_encode_round_trip(fmt):
    x = tone(0.5, SR)
    y = load_audio(encode_audio(x, SR, fmt), SR)
    assert abs(len(y) - len(x)) <= CODEC_SLACK_SECONDS * SR
    if fmt in ("wav", "flac"):  # 16-bit PCM: lossless up to quantisation
        np.testing.assert_allclose(y, x, atol=1.0 / 32767)
    else:
        rms_x, rms_y = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2))
        assert rms_y == pytest.approx(rms_x, rel=0.2)


def test_pcm_is_raw_s16le():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0], np.float32)
    samples = np.frombuffer(encode_audio(x, SR, "pcm"), dtype="<i2")
    np.testing.assert_array_equal(samples, [0, 16384, -16384, 32767, -32767, 32767])


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_stream_encoder_output_decodes(fmt):
    x = tone(0.6, SR)
    encoder = AudioStreamEncoder(fmt, SR)
    chunk = SR // 10
    parts = [encoder.encode(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    parts.append(encoder.close())
    data = b"".join(parts)
    assert any(parts[:-1]), "nothing was emitted before close()"
    if fmt == "pcm":
        assert data == encode_audio(x, SR, "pcm")
        return
    y = load_audio(data, SR)
    assert abs(len(y) - len(x)) <= CODEC_SLACK_SECONDS * SR
    if fmt in ("wav", "flac"):
        np.testing.assert_allclose(y[: len(x)], x, atol=1.0 / 32767)
    with pytest.raises(RuntimeError):
        encoder.encode(x)


def test_content_types_and_unknown_format():
    assert content_type("wav") == "audio/wav"
    assert content_type("mp3") == "audio/mpeg"
    assert all(content_type(fmt).startswith("audio/") for fmt in AUDIO_FORMATS)
    for call in (lambda: content_type("xyz"), lambda: encode_audio(tone(0.1, SR), SR, "xyz")):
        with pytest.raises(InputError, match="unknown audio format"):
            call()
    with pytest.raises(InputError):
        AudioStreamEncoder("xyz", SR)


def test_write_audio_atomic(tmp_path):
    x = tone(0.2, SR)
    for name in ("out.wav", "out.flac", "noext"):
        path = write_audio_atomic(tmp_path / name, x, SR)
        data, rate = sf.read(path, dtype="float32")
        assert rate == SR and len(data) == len(x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext", "out.flac", "out.wav"]  # no temp files
    with pytest.raises(InputError, match="suffix"):
        write_audio_atomic(tmp_path / "out.xyz", x, SR)
