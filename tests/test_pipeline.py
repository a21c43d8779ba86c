"""fixtures/pipeline_small: the official CosyVoice2Model token->audio loop (offline, streamed, speed)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import load_pt

from cosyvoice2 import convert
from cosyvoice2.flow import Flow, FlowConfig
from cosyvoice2.hift import HiFT, HiFTConfig
from cosyvoice2.model_dir import Models
from cosyvoice2.synthesis import Request, StreamSchedule, Synthesizer, _Prompt
from cosyvoice2.voice import VoiceReference

SPEECH_ATOL = 5e-4  # FIXTURES.md: HiFT source and speech


@pytest.fixture(scope="module")
def setup(fixtures):
    flow_cfg = json.loads((fixtures / "flow_small" / "config.json").read_text())
    hift_cfg = json.loads((fixtures / "hift_small" / "config.json").read_text())
    flow = convert.load_flow(
        Flow(FlowConfig.from_official(flow_cfg)), fixtures / "flow_small" / "flow.pt"
    ).eval()
    hift = convert.load_hift(
        HiFT(HiFTConfig.from_official(hift_cfg)), fixtures / "hift_small" / "hift.pt"
    ).eval()
    models = Models(lm=None, flow=flow, hift=hift, frontend=None)
    inputs = load_pt(fixtures / "pipeline_small" / "inputs.pt")
    meta = json.loads((fixtures / "pipeline_small" / "meta.json").read_text())
    voice = VoiceReference(
        embedding=inputs["flow_embedding"],
        speech_tokens=inputs["flow_prompt_speech_token"],
        mel=inputs["prompt_speech_feat"],
    )
    return Synthesizer(models), inputs, meta, voice


def _prompt(inputs) -> _Prompt:
    return _Prompt(
        lm_text=[],
        lm_speech=torch.zeros(0, dtype=torch.int32),
        flow_tokens=inputs["flow_prompt_speech_token"],
        flow_mel=inputs["prompt_speech_feat"],
        embedding=inputs["flow_embedding"],
    )


def test_offline_matches_official(setup, fixtures):
    synth, inputs, meta, voice = setup
    want = load_pt(fixtures / "pipeline_small" / "nonstream.pt")["tts_speech"][0]
    req = Request(
        source_tokens=inputs["speech_token"][0], voice=voice, seed=meta["seeds"]["pipeline_nonstream"]
    )
    (got,) = list(synth.run(req))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=SPEECH_ATOL, rtol=0)


def test_speed_matches_official(setup, fixtures):
    synth, inputs, meta, voice = setup
    (path,) = (fixtures / "pipeline_small").glob("nonstream_speed*_first*.pt")
    speed = float(re.fullmatch(r"nonstream_speed([0-9.]+)_first\d+\.pt", path.name).group(1))
    ref = load_pt(path)
    req = Request(
        source_tokens=ref["speech_token"][0], voice=voice, speed=speed, seed=meta["seeds"]["pipeline_speed"]
    )
    (got,) = list(synth.run(req))
    want = ref["tts_speech"][0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=SPEECH_ATOL, rtol=0)


def test_official_stream_chunk_for_chunk(setup, fixtures):
    """Same chunk boundaries and samples as the official loop (fresh object: hop 25 -> 50 -> 100)."""
    synth, inputs, meta, _ = setup
    want = load_pt(fixtures / "pipeline_small" / "stream.pt")
    want_chunks = [want[k][0] for k in sorted(want, key=lambda k: int(k.removeprefix("chunk")))]
    gen = torch.Generator().manual_seed(meta["seeds"]["pipeline_stream"])
    tokens = iter(inputs["speech_token"][0].tolist())
    got = list(synth.stream_official(tokens, _prompt(inputs), StreamSchedule.official(), 1.0, gen))
    assert [g.shape[0] for g in got] == [w.shape[0] for w in want_chunks]
    assert [c["out_samples"] for c in meta["token2wav_calls"]["stream"]] == [g.shape[0] for g in got]
    for g, w in zip(got, want_chunks):
        torch.testing.assert_close(g, w, atol=SPEECH_ATOL, rtol=0)


def test_official_schedule_does_not_leak_between_requests(setup, fixtures):
    """SPEC §16.1: the official object keeps its grown hop for the next request. Ours starts fresh."""
    synth, inputs, meta, _ = setup
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(meta["seeds"]["pipeline_stream"])
        tokens = iter(inputs["speech_token"][0].tolist())
        runs.append(
            [
                c.shape[0]
                for c in synth.stream_official(tokens, _prompt(inputs), StreamSchedule.official(), 1.0, gen)
            ]
        )
    assert runs[0] == runs[1]
    assert len(runs[1]) == len(meta["token2wav_calls"]["stream"])
