"""fixtures/e2e_small: a whole official-layout model directory and official requests, end to end.

The directory is loaded exactly as a user's CosyVoice2-0.5B download would be. As FIXTURES.md explains, the
official run read the 16 kHz prompt from its own file instead of resampling, so the voices here are built
from both files with ``voice_from_waveforms``; everything else goes through the public API.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import fixture_root, load_pt

import cosyvoice2
from cosyvoice2.synthesis import StreamSchedule, new_generator
from cosyvoice2.voice import VoiceReference

SPEECH_ATOL = 5e-4
FEAT_ATOL = 1e-5


def _requests() -> list[str]:
    """The request folders, in the order of the official run (e2e_small/meta.json)."""
    meta = fixture_root() / "e2e_small" / "meta.json"
    return json.loads(meta.read_text())["requests_in_order"] if meta.is_file() else []


REQUESTS = _requests()


@pytest.fixture(scope="module")
def e2e(fixtures):
    root = fixtures / "e2e_small"
    # The official frontend it ran with: '' = neither ttsfrd nor wetext installed, rules-only normalisation.
    frontend = json.loads((root / "meta.json").read_text())["checks"]["frontend_text_frontend"]
    assert frontend in ("", "wetext"), frontend
    tts = cosyvoice2.load(root / "model", text_backend=frontend or "none")
    return tts, root


def test_every_request_folder_is_tested(fixtures):
    folders = sorted(p.parent.name for p in (fixtures / "e2e_small").glob("*/inputs.json"))
    assert folders and folders == sorted(REQUESTS)


def _wav(root, name: str) -> np.ndarray:
    x, _ = sf.read(root / name, dtype="float32")
    return x if x.ndim == 1 else x.mean(axis=1)


def _voice(tts, root, kwargs: dict, text: str | None):
    stem = kwargs["prompt_wav"].rsplit("_", 1)[0]
    return tts.models.frontend.voice_from_waveforms(
        _wav(root, f"{stem}_24k.wav"), _wav(root, f"{stem}_16k.wav"), text
    )


def _case(root, name):
    inputs = json.loads((root / name / "inputs.json").read_text())
    return inputs, load_pt(root / name / "model_input.pt"), load_pt(root / name / "outputs.pt")


def _speech_chunks(outputs) -> list[torch.Tensor]:
    keys = sorted((k for k in outputs if k.startswith("tts_speech_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    return [outputs[k][0] for k in keys]


def _voice_for(tts, root, inputs):
    kw = inputs["kwargs"]
    if kw.get("zero_shot_spk_id"):
        spk = load_pt(root / "zero_shot_spk" / "spk2info.pt")
        return VoiceReference.from_official_spk2info(kw["zero_shot_spk_id"], spk[kw["zero_shot_spk_id"]])
    text = kw.get("prompt_text") if "prompt_text" in kw else None
    return _voice(tts, root, kw, text)


def test_frontend_features(e2e):
    tts, root = e2e
    ref = load_pt(root / "frontend.pt")
    inputs, mi, _ = _case(root, "zero_shot")
    voice = _voice_for(tts, root, inputs)
    torch.testing.assert_close(voice.mel[None], ref["prompt_speech_feat"], atol=FEAT_ATOL, rtol=FEAT_ATOL)
    assert voice.speech_tokens.tolist() == ref["prompt_speech_token"][0].tolist()
    torch.testing.assert_close(voice.embedding[None], ref["prompt_embedding"], atol=FEAT_ATOL, rtol=FEAT_ATOL)
    tokens, mel = voice.aligned()
    assert tokens.tolist() == mi["flow_prompt_speech_token"][0].tolist()
    torch.testing.assert_close(mel[None], mi["prompt_speech_feat"], atol=FEAT_ATOL, rtol=FEAT_ATOL)


@pytest.mark.parametrize("name", REQUESTS)
def test_request(e2e, name):
    tts, root = e2e
    inputs, mi, out = _case(root, name)
    kw, seed = inputs["kwargs"], inputs["seed"]
    voice = _voice_for(tts, root, inputs)
    want = _speech_chunks(out)

    if inputs["api"].endswith(".inference_vc"):
        tokens = tts.models.frontend.source_tokens_from_waveform(_wav(root, kw["source_wav"]))
        assert tokens.tolist() == mi["source_speech_token"][0].tolist()
        got = tts.convert(_wav(root, kw["source_wav"]), voice, seed=seed, src_rate=16000)
        torch.testing.assert_close(torch.from_numpy(got), want[0], atol=SPEECH_ATOL, rtol=0)
        return

    # Text pieces, their ids and the prompt the LM sees are the official frontend output.
    meta = json.loads((root / name / "meta.json").read_text())
    (split,) = [c["out"] for c in meta["text_normalize_calls"] if c["split"] and c["in"] == kw["tts_text"]]
    pieces = tts.models.frontend.text_pieces(kw["tts_text"])
    assert pieces == split
    assert len(pieces) == 1  # the request files hold one LM run (FIXTURES.md: every e2e text is one piece)
    assert tts.models.frontend.encode(pieces[0]) == mi["text"][0].tolist()
    instruct = kw.get("instruct_text")
    req = tts.request(kw["tts_text"], voice=voice, instruct=instruct, seed=seed)
    prompt = tts.synth._prompt(req)
    if "prompt_text" in mi:
        assert prompt.lm_text == mi["prompt_text"][0].tolist()
    else:
        assert prompt.lm_text == []
    want_llm_speech = mi.get("llm_prompt_speech_token", torch.zeros(1, 0, dtype=torch.int32))[0]
    assert prompt.lm_speech.tolist() == want_llm_speech.tolist()
    assert prompt.flow_tokens[0].tolist() == mi["flow_prompt_speech_token"][0].tolist()
    torch.testing.assert_close(prompt.flow_mel, mi["prompt_speech_feat"], atol=FEAT_ATOL, rtol=FEAT_ATOL)
    torch.testing.assert_close(prompt.embedding, mi["flow_embedding"], atol=FEAT_ATOL, rtol=FEAT_ATOL)

    # LM tokens: identical for the same seed.
    gen = new_generator(seed)
    tokens = list(tts.models.lm_generate(mi["text"][0].tolist(), prompt.lm_text, prompt.lm_speech, gen))
    assert tokens == out["speech_token"].tolist()

    if not kw["stream"]:
        got = tts.synthesize(kw["tts_text"], voice=voice, instruct=instruct, seed=seed)
        assert got.shape[0] == want[0].shape[0]
        torch.testing.assert_close(torch.from_numpy(got), want[0], atol=SPEECH_ATOL, rtol=0)
    else:
        # The official run finished the LM before the first chunk; its vocoder draws start from the RNG
        # state recorded before the first token2wav call.
        vgen = torch.Generator()
        vgen.set_state(out["rng_state_call0"])
        got = list(tts.synth.stream_official(iter(tokens), prompt, StreamSchedule.official(), 1.0, vgen))
        assert [g.shape[0] for g in got] == [w.shape[0] for w in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=SPEECH_ATOL, rtol=0)


def test_streaming_public_api_is_reproducible(e2e):
    tts, root = e2e
    inputs, _, _ = _case(root, "zero_shot")
    voice = _voice_for(tts, root, inputs)
    text = inputs["kwargs"]["tts_text"]
    a = np.concatenate(list(tts.stream(text, voice=voice, seed=7, schedule="official")))
    b = np.concatenate(list(tts.stream(text, voice=voice, seed=7, schedule="official")))
    np.testing.assert_array_equal(a, b)
