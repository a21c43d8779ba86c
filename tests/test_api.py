"""The public API and the CLI on the fixture model directory: modes, voices, and bad input.

Every bad input must end in a clear ``InputError`` (CLI: one line on stderr, exit status 2), never a
traceback, a hang or silent garbage.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import cosyvoice2
from cosyvoice2 import InputError, ModelLoadError, VoiceReference
from cosyvoice2.config import RATES


@pytest.fixture(scope="module")
def model_dir(fixtures):
    return fixtures / "e2e_small" / "model"


@pytest.fixture(scope="module")
def tts(model_dir):
    return cosyvoice2.load(model_dir)


@pytest.fixture(scope="module")
def prompt(fixtures):
    x, sr = sf.read(fixtures / "e2e_small" / "prompt_24k.wav", dtype="float32")
    return x, sr


@pytest.fixture(scope="module")
def voice(tts, prompt):
    x, sr = prompt
    return tts.voice(x, text="This prompt was recorded in three seconds.", src_rate=sr)


def _ok(audio: np.ndarray) -> None:
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


def test_modes_and_seed(tts, voice, prompt):
    x, sr = prompt
    text = "Hello there, how are you?"
    a = tts.synthesize(text, voice=voice, seed=3)
    b = tts.synthesize(text, voice=voice, seed=3)
    np.testing.assert_array_equal(a, b)
    _ok(a)
    cross = tts.voice(x, src_rate=sr)  # no transcript: cross-lingual
    _ok(tts.synthesize("今天天气很好。", voice=cross, seed=1))
    _ok(tts.synthesize(text, voice=voice, instruct="speak happily", seed=1))
    _ok(tts.synthesize(text, voice=voice, speed=1.5, seed=1))
    _ok(tts.convert(x, voice, src_rate=sr, seed=1))
    chunks = list(tts.stream(text, voice=voice, seed=1))
    assert chunks and all(c.dtype == np.float32 for c in chunks)
    streamed_text = list(tts.stream(iter(["Hello there, ", "how are ", "you?"]), voice=voice, seed=1))
    _ok(np.concatenate(streamed_text))


def test_voice_save_load_roundtrip(tts, voice, tmp_path):
    path = voice.save(tmp_path / "v.voice")
    again = VoiceReference.load(path)
    assert again.text == voice.text
    np.testing.assert_array_equal(again.mel.numpy(), voice.mel.numpy())
    a = tts.synthesize("Same voice.", voice=voice, seed=5)
    b = tts.synthesize("Same voice.", voice=str(path), seed=5)
    np.testing.assert_array_equal(a, b)
    # float16 storage (how the shipped model keeps its built-in voices): half the bytes, read back as
    # float32 within float16 rounding, tokens exact.
    half = VoiceReference.load(voice.save(tmp_path / "h.voice", dtype=torch.float16))
    assert (
        half.mel.dtype == torch.float32 and path.stat().st_size > 1.8 * (tmp_path / "h.voice").stat().st_size
    )
    torch.testing.assert_close(half.mel, voice.mel, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(half.embedding, voice.embedding, rtol=1e-3, atol=1e-3)
    assert torch.equal(half.speech_tokens, voice.speech_tokens)


@pytest.mark.parametrize("text", ["", "   \n\t", "?!...,;", "😀🎉", "——…"])
def test_unspeakable_text(tts, voice, text):
    with pytest.raises(InputError):
        tts.synthesize(text, voice=voice)


def test_long_text_is_split_not_refused(tts, voice):
    sentence = "This is a fairly ordinary sentence with some words in it. "
    text = (sentence * (20000 // len(sentence) + 1))[:20000]
    pieces = tts.models.frontend.text_pieces(text)
    assert len(pieces) > 10
    stream = tts.stream(text, voice=voice, seed=0)
    first = next(stream)  # accepted and started; closing the generator cancels the rest
    stream.close()
    assert first.size > 0


def test_bad_prompt_audio(tts):
    sr = RATES.sample_rate
    t = np.arange(int(0.3 * sr)) / sr
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    with pytest.raises(InputError, match="too short"):
        tts.voice(tone, src_rate=sr)
    long = np.tile(tone, 110)  # 33 s
    with pytest.raises(InputError, match="too long"):
        tts.voice(long, src_rate=sr)
    with pytest.raises(InputError, match="silent"):
        tts.voice(np.zeros(sr * 2, np.float32), src_rate=sr)
    with pytest.raises(InputError):
        tts.voice(b"this is not audio at all" * 100)
    bad = np.tile(tone, 5)
    bad[100] = np.nan
    with pytest.raises(InputError, match="NaN"):
        tts.voice(bad, src_rate=sr)
    bad[100] = np.inf
    with pytest.raises(InputError):
        tts.voice(bad, src_rate=sr)


def test_odd_but_valid_prompts(tts):
    sr8 = 8000
    t = np.arange(2 * sr8) / sr8
    x8 = (0.3 * np.sin(2 * np.pi * 180 * t) + 0.01 * np.sin(2 * np.pi * 900 * t)).astype(np.float32)
    v8 = tts.voice(x8, src_rate=sr8)  # 8 kHz telephone audio: upsampled
    assert v8.duration == pytest.approx(2.0, abs=0.05)
    stereo = np.stack([x8, 0.5 * x8], axis=1)
    buf = io.BytesIO()
    sf.write(buf, stereo, sr8, format="WAV")
    vs = tts.voice(buf.getvalue())
    assert vs.mel.shape == v8.mel.shape


def test_unknown_speaker_and_instruct_without_prompt(tts, voice):
    with pytest.raises(InputError, match="unknown speaker"):
        tts.synthesize("Hello.", voice="nobody-by-this-name")
    with pytest.raises(InputError, match="instruct"):
        tts.synthesize("Hello.", voice=None, instruct="speak happily")
    sft_like = VoiceReference(embedding=voice.embedding)
    with pytest.raises(InputError, match="instruct"):
        tts.synthesize("Hello.", voice=sft_like, instruct="speak happily")
    with pytest.raises(InputError, match="speed"):
        tts.synthesize("Hello.", voice=voice, speed=0)


def test_bad_model_dirs(tmp_path, model_dir):
    with pytest.raises(ModelLoadError):
        cosyvoice2.load(tmp_path / "missing")
    with pytest.raises(ModelLoadError):
        cosyvoice2.load(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cosyvoice2.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_speak_and_errors(model_dir, fixtures, tmp_path):
    out = tmp_path / "out.wav"
    prompt = fixtures / "e2e_small" / "prompt_24k.wav"
    r = _cli(
        "speak",
        "Hello from the command line.",
        "-o",
        str(out),
        "--model",
        str(model_dir),
        "--prompt-wav",
        str(prompt),
        "--prompt-text",
        "This prompt was recorded in three seconds.",
        "--seed",
        "1",
        "--stream",
    )
    assert r.returncode == 0, r.stderr
    audio, sr = sf.read(out)
    assert sr == RATES.sample_rate and len(audio) > 0
    r = _cli("speak", "   ", "-o", str(out), "--model", str(model_dir), "--prompt-wav", str(prompt))
    assert r.returncode == 2 and "error" in r.stderr and "Traceback" not in r.stderr
    r = _cli("speak", "Hello.", "-o", str(out), "--model", str(tmp_path / "nope"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _cli("speak", "Hello.", "-o", str(out), "--model", str(model_dir), "--voice", "nobody")
    assert r.returncode == 2 and "unknown speaker" in r.stderr
