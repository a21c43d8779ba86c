"""The flow sampler's speed levers (``FlowConfig.cfg_steps``, ``FlowConfig.first_chunk_steps``): off is exact
bit for bit, on they cut the estimator work they promise, and streaming keeps its guarantees.

Fixture model flow_small (random weights, official layout). The streaming tolerances are the ones of
tests/test_flow.py: static-chunk streaming equals the chunk-masked offline call within ``ATOL``; block-causal
streaming stays within twice the official chunked streaming's relative RMS from the offline mel.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import load_pt

import cosyvoice2
from cosyvoice2 import cpu
from cosyvoice2.api import load, speed_up
from cosyvoice2.convert import load_flow
from cosyvoice2.errors import InputError
from cosyvoice2.flow import Flow, FlowConfig, FlowStream

ATOL = 1e-4  # as tests/test_flow.py (FIXTURES.md)
BATCH_TOL = 1e-4  # batched vs lone estimator calls (tests/test_engine.py's MEL_TOL)


@pytest.fixture(scope="module")
def small(fixtures: Path) -> dict:
    root = fixtures / "flow_small"
    flow = Flow(FlowConfig.from_official(json.loads((root / "config.json").read_text()))).eval()
    load_flow(flow, root / "flow.pt")
    inputs = load_pt(root / "inputs.pt")
    meta = json.loads((root / "meta.json").read_text())
    prompt = (inputs["prompt_token"], inputs["prompt_feat"], inputs["embedding"])
    return {"flow": flow, "prompt": prompt, "tokens": inputs["token_all"], "meta": meta}


def _variant(small: dict, **changes) -> Flow:
    """The fixture flow's weights under a changed FlowConfig."""
    flow = Flow(dataclasses.replace(small["flow"].cfg, **changes)).eval()
    flow.load_state_dict(small["flow"].state_dict())
    return flow


def _stream(flow: Flow, state: FlowStream, tokens: torch.Tensor, hops: list[int]) -> list[torch.Tensor]:
    """``hops`` tokens per call with the real look-ahead, then the rest with final=True."""
    look, end, outs = flow.cfg.pre_lookahead_len, 0, []
    for hop in hops:
        ahead = tokens[:, end + hop : end + hop + look]
        mel, state = flow.stream_step(state, tokens[:, end : end + hop], ahead, final=False)
        outs.append(mel)
        end += hop
    mel, state = flow.stream_step(state, tokens[:, end:], None, final=True)
    return [*outs, mel]


def _official_hops(small: dict) -> list[int]:
    look = small["flow"].cfg.pre_lookahead_len
    calls = [c for c in small["meta"]["stream_schedule"] if not c["finalize"]]
    ends = [c["n_tokens"] - look for c in calls]
    return [b - a for a, b in zip([0, *ends[:-1]], ends)]


def _growing_hops(flow: Flow, n_tokens: int) -> list[int]:
    """The block-causal schedule of tests/test_flow.py (7, 12, 25, 50, 50, ...)."""
    schedule, hops = [7, 12, 25, 50], []
    while sum(hops) + schedule[min(len(hops), 3)] + flow.cfg.pre_lookahead_len <= n_tokens:
        hops.append(schedule[min(len(hops), 3)])
    return hops


class RowCounter:
    """Records the estimator rows (batch size) of every estimator call."""

    def __init__(self, flow: Flow) -> None:
        self.rows: list[int] = []
        hook = flow.estimator.final_proj.register_forward_hook
        self._hook = hook(lambda m, i, o: self.rows.append(o.shape[0]))

    def take(self) -> list[int]:
        rows, self.rows = self.rows, []
        return rows

    def close(self) -> None:
        self._hook.remove()


def _rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


# -- off == exact --------------------------------------------------------------------------------------


def test_levers_are_off_by_default_and_off_is_exact(small: dict) -> None:
    """Default None; and guiding every step / a first chunk of all steps is the official sampler bit for bit
    (offline, block-causal streaming, static-chunk streaming)."""
    flow, prompt, tokens = small["flow"], small["prompt"], small["tokens"]
    assert flow.cfg.cfg_steps is None and flow.cfg.first_chunk_steps is None
    n = flow.cfg.n_timesteps
    full = _variant(small, cfg_steps=n, first_chunk_steps=n)
    more = _variant(small, cfg_steps=n + 5)  # more guided steps than steps: all guided
    hops = _growing_hops(flow, tokens.shape[1])
    for static in (False, True):
        ref = flow.inference(tokens, *prompt, streaming=static, finalize=True)
        ref_stream = _stream(flow, flow.stream_start(*prompt, static_chunks=static), tokens, hops)
        for other in (full, more):
            assert torch.equal(other.inference(tokens, *prompt, streaming=static, finalize=True), ref)
            out = _stream(other, other.stream_start(*prompt, static_chunks=static), tokens, hops)
            assert all(torch.equal(a, b) for a, b in zip(out, ref_stream))
    assert full.stream_bytes_per_frame() == flow.stream_bytes_per_frame()


def test_config_and_load_options_validate() -> None:
    with pytest.raises(ValueError, match="cfg_steps"):
        FlowConfig(cfg_steps=-1)
    with pytest.raises(ValueError, match="first_chunk_steps"):
        FlowConfig(first_chunk_steps=0)
    assert FlowConfig(cfg_steps=4).cfg_rows(10) == (2,) * 4 + (1,) * 6
    assert FlowConfig(cfg_steps=4).cfg_rows(5) == (2,) * 2 + (1,) * 3  # the same share: ceil(4 * 5 / 10)
    assert FlowConfig(cfg_steps=0).cfg_rows(3) == (1,) * 3
    assert FlowConfig().cfg_rows(3) == (2,) * 3

    class Only:
        lm = None

        def __init__(self, flow):
            self.flow = flow

    models = Only(Flow(FlowConfig(estimator=dataclasses.replace(FlowConfig().estimator, n_mid=1))))
    speed_up(models, cfg_steps=5, first_chunk_steps=3)
    cfg = models.flow.cfg
    assert (cfg.cfg_steps, cfg.first_chunk_steps, cfg.n_timesteps) == (5, 3, 10)
    for bad in ({"cfg_steps": -1}, {"first_chunk_steps": 0}, {"cfg_steps": 2.5}):
        with pytest.raises(InputError):
            speed_up(models, **bad)


# -- partial classifier-free guidance -----------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3, 7])
def test_cfg_steps_halves_the_rows_of_unguided_steps(small: dict, k: int) -> None:
    flow, prompt, tokens = _variant(small, cfg_steps=k), small["prompt"], small["tokens"]
    n = flow.cfg.n_timesteps
    counter = RowCounter(flow)
    try:
        mel = flow.inference(tokens, *prompt, streaming=False, finalize=True)
        assert counter.take() == [2] * k + [1] * (n - k)
        state = flow.stream_start(*prompt)
        counter.take()
        _stream(flow, state, tokens, [9])
        assert counter.take() == ([2] * k + [1] * (n - k)) * 2  # two blocks, each the same row plan
    finally:
        counter.close()
    exact = small["flow"].inference(tokens, *prompt, streaming=False, finalize=True)
    assert (mel - exact).abs().mean() > 1e-4  # the option really changes the sampler
    if k == 0:  # no guidance at all is the sampler with cfg_rate 0 (up to the GEMMs' batch rounding)
        unguided = _variant(small, cfg_rate=0.0).inference(tokens, *prompt, streaming=False, finalize=True)
        torch.testing.assert_close(mel, unguided, atol=1e-5, rtol=0)
    # the estimator cache holds one row on unguided steps
    assert flow.stream_bytes_per_frame() < small["flow"].stream_bytes_per_frame() or k == n


@pytest.mark.parametrize("k", [0, 4])
def test_cfg_steps_stream_equals_offline(small: dict, k: int) -> None:
    """With the option on both sides: static-chunk streaming == the chunk-masked offline call (ATOL), and
    block-causal streaming within twice the static-chunk streaming's distance from the offline mel."""
    flow, prompt, tokens = _variant(small, cfg_steps=k), small["prompt"], small["tokens"]
    chunked = flow.inference(tokens, *prompt, streaming=True, finalize=True)
    outs = _stream(flow, flow.stream_start(*prompt, static_chunks=True), tokens, _official_hops(small))
    torch.testing.assert_close(torch.cat(outs, -1), chunked, atol=ATOL, rtol=0)

    offline = flow.inference(tokens, *prompt, streaming=False, finalize=True)
    hops = _growing_hops(flow, tokens.shape[1])
    mel = torch.cat(_stream(flow, flow.stream_start(*prompt), tokens, hops), -1)
    assert mel.shape == offline.shape
    assert _rel_rms(mel, offline) <= 2 * _rel_rms(chunked, offline)


def test_cfg_steps_cache_grows_by_its_per_frame_cost(small: dict) -> None:
    flow, prompt, tokens = _variant(small, cfg_steps=3), small["prompt"], small["tokens"]
    look, r = flow.cfg.pre_lookahead_len, flow.cfg.token_mel_ratio
    state = flow.stream_start(*prompt)
    _, state = flow.stream_step(state, tokens[:, :6], tokens[:, 6 : 6 + look], final=False)
    before = state.nbytes
    _, state = flow.stream_step(state, tokens[:, 6:16], tokens[:, 16 : 16 + look], final=False)
    assert state.nbytes - before == pytest.approx(r * 10 * flow.stream_bytes_per_frame())


def test_batched_steps_mix_guided_and_unguided_rows(small: dict) -> None:
    """The engine's batcher runs blocks at different ODE steps in one call: one block on a guided step
    (2 rows) beside one on an unguided step (1 row) gives each block's lone result."""
    flow, prompt, tokens = _variant(small, cfg_steps=3), small["prompt"], small["tokens"]
    look = flow.cfg.pre_lookahead_len
    state = flow.stream_start(*prompt)

    def blocks():
        return [
            flow.stream_prepare(state, tokens[:, :8], tokens[:, 8 : 8 + look], final=False),
            flow.stream_prepare(state, tokens[:, 4:15], tokens[:, 15 : 15 + look], final=False),
        ]

    lone = blocks()
    for b in lone:
        while not b.done:
            flow.euler_step([b])
    together = blocks()
    for _ in range(4):  # the first block 4 steps ahead: steps 4.. (1 row) beside steps 0..3 (2 rows)
        flow.euler_step([together[0]])
    counter = RowCounter(flow)
    try:
        while not all(b.done for b in together):
            flow.euler_step([b for b in together if not b.done])
        assert counter.take()[:4] == [3, 3, 3, 2]  # 1 + 2 rows while both run, then the second one alone
    finally:
        counter.close()
    for a, b in zip(lone, together):
        torch.testing.assert_close(flow.stream_finish(b)[0], flow.stream_finish(a)[0], atol=BATCH_TOL, rtol=0)


# -- fewer steps for the first chunk ------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5])
def test_first_chunk_steps_cut_the_first_chunk_only(small: dict, k: int) -> None:
    """The first chunk runs k estimator calls; its exact ODE (for the stream's state) runs in the next call,
    off the first packet's path; offline synthesis has no first chunk and stays exact."""
    flow, prompt, tokens = _variant(small, first_chunk_steps=k), small["prompt"], small["tokens"]
    n, look = flow.cfg.n_timesteps, flow.cfg.pre_lookahead_len
    exact = small["flow"].inference(tokens, *prompt, streaming=False, finalize=True)
    assert torch.equal(flow.inference(tokens, *prompt, streaming=False, finalize=True), exact)
    counter = RowCounter(flow)
    try:
        state0 = flow.stream_start(*prompt)
        assert len(counter.take()) == n  # the shared prompt state: every step
        calls, state, end = [], state0, 0
        for hop in (8, 12, 20):
            ahead = tokens[:, end + hop : end + hop + look]
            _, state = flow.stream_step(state, tokens[:, end : end + hop], ahead, final=False)
            end += hop
            calls.append(len(counter.take()))
        _, done = flow.stream_step(state0, tokens[:, :8], None, final=True)  # a one-chunk utterance
        assert len(counter.take()) == k and done.redo is None
    finally:
        counter.close()
    assert calls == [k, n + n, n]
    assert state.blocks == 3 and state0.blocks == 0


@pytest.mark.parametrize("k", [3, 5])
def test_first_chunk_steps_stream_vs_offline(small: dict, k: int) -> None:
    """Only the first chunk moves: every later chunk equals exact streaming bit for bit, and the whole
    stream stays within the streaming tolerance of tests/test_flow.py (twice the official chunked
    streaming's relative RMS from the offline mel)."""
    flow, prompt, tokens = _variant(small, first_chunk_steps=k), small["prompt"], small["tokens"]
    exact = small["flow"]
    offline = flow.inference(tokens, *prompt, streaming=False, finalize=True)
    chunked = flow.inference(tokens, *prompt, streaming=True, finalize=True)
    hops = _growing_hops(flow, tokens.shape[1])
    outs = _stream(flow, flow.stream_start(*prompt), tokens, hops)
    ref = _stream(exact, exact.stream_start(*prompt), tokens, hops)
    assert all(torch.equal(a, b) for a, b in zip(outs[1:], ref[1:]))
    first = float((outs[0] - ref[0]).abs().mean())
    assert first > 1e-4
    mel = torch.cat(outs, -1)
    assert mel.shape == offline.shape
    ours, official = _rel_rms(mel, offline), _rel_rms(chunked, offline)
    print(f"first_chunk_steps={k}: rel-RMS {ours:.3f} (official {official:.3f}); first chunk {first:.4f}")
    assert ours <= 2 * official
    # with static chunks too: the later chunks are the chunk-masked offline call's (ATOL, as without)
    outs = _stream(flow, flow.stream_start(*prompt, static_chunks=True), tokens, _official_hops(small))
    ratio, n_first = flow.cfg.token_mel_ratio, outs[0].shape[-1]
    torch.testing.assert_close(torch.cat(outs[1:], -1), chunked[..., n_first:], atol=ATOL, rtol=0)
    assert ratio * _official_hops(small)[0] == n_first


def test_first_chunk_steps_keep_the_prompt_state_shared_and_immutable(small: dict) -> None:
    flow, prompt, tokens = _variant(small, first_chunk_steps=4, cfg_steps=6), small["prompt"], small["tokens"]
    state0 = flow.stream_start(*prompt)
    snapshot = [t.clone() for t in (*state0.encoder, *(t for step in state0.estimator for t in step))]
    a = tokens[:, : tokens.shape[1] // 2]
    hops = [5, 9]
    first = _stream(flow, state0, a, hops)
    _stream(flow, state0, a.flip(1), hops[1:])  # another request on the same prompt state
    again = _stream(flow, state0, a, hops)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    after = [*state0.encoder, *(t for step in state0.estimator for t in step)]
    assert all(torch.equal(x, y) for x, y in zip(snapshot, after))


def test_levers_through_load_and_the_engine(fixtures: Path) -> None:
    """``cosyvoice2.load(cfg_steps=..., first_chunk_steps=...)`` sets the flow's sampler and the plan; a fast
    stream through the engine (flow batcher) runs its first chunk in fewer estimator calls."""
    tts = cosyvoice2.load(fixtures / "e2e_small" / "model", cfg_steps=4, first_chunk_steps=3)
    try:
        cfg = tts.models.flow.cfg
        assert (cfg.cfg_steps, cfg.first_chunk_steps) == (4, 3)
        assert (tts.compute_plan.cfg_steps, tts.compute_plan.first_chunk_steps) == (4, 3)
        assert tts.compute_plan.reasons["cfg_steps"] == "set by the caller"
        counter = RowCounter(tts.models.flow)
        try:
            x, sr = sf.read(fixtures / "e2e_small" / "prompt_24k.wav", dtype="float32")
            voice = tts.voice(x, text="This prompt was recorded in three seconds.", src_rate=sr)
            tts.engine.warm_voice(tts.request("Hi.", voice=voice))
            counter.take()
            chunks = list(tts.stream("Hello there, how are you today?", voice=voice, seed=1))
            rows = counter.take()
        finally:
            counter.close()
        assert chunks and all(torch.isfinite(torch.as_tensor(c)).all() for c in chunks)
        n = cfg.n_timesteps
        assert rows[:3] == [2, 2, 1]  # first chunk: 3 steps, ceil(4 * 3 / 10) = 2 of them guided
        assert rows[3 : 3 + n] == [2] * 4 + [1] * (n - 4)
    finally:
        tts.close()
    defaults = inspect.signature(load).parameters
    assert defaults["cfg_steps"].default is None and defaults["first_chunk_steps"].default is None
    for compute in ("exact", "fast"):  # partial guidance is in neither plan (bench/README.md: why)
        assert cpu.plan(compute).load_options()["cfg_steps"] is None
    # the first chunk's steps: exact keeps the official sampler; fast cuts them (measured, bench/README.md)
    assert cpu.plan("exact").load_options()["first_chunk_steps"] is None
    assert cpu.plan("fast").load_options()["first_chunk_steps"] == cpu.FAST_FIRST_CHUNK_STEPS


# -- ode_weight and temperature (model settings of the default model, not speed levers) ------------------


def test_ode_weight_blends_the_sampler_with_the_encoder_mean(small: dict) -> None:
    """0: the encoder's mean mu, no estimator call, offline and streamed; w: the affine blend of the two
    (the mel scale is affine, so mel_w = (1 - w) mel_0 + w mel_1); 1 is the default and exact."""
    flow, prompt, tokens = small["flow"], small["prompt"], small["tokens"]
    assert flow.cfg.ode_weight == 1.0 and flow.cfg.temperature == 1.0
    prior, half = _variant(small, ode_weight=0.0), _variant(small, ode_weight=0.5)
    counter = RowCounter(prior)
    try:
        mel0 = prior.inference(tokens, *prompt, streaming=False, finalize=True)
        streamed0 = _stream(prior, prior.stream_start(*prompt), tokens, _growing_hops(prior, tokens.shape[1]))
        assert counter.take() == []  # the estimator never ran
    finally:
        counter.close()
    mel1 = flow.inference(tokens, *prompt, streaming=False, finalize=True)
    mel_half = half.inference(tokens, *prompt, streaming=False, finalize=True)
    torch.testing.assert_close(mel_half, 0.5 * (mel0 + mel1), atol=1e-5, rtol=0)
    assert (mel0 - mel1).abs().mean() > 1e-3
    assert prior.stream_bytes_per_frame() < half.stream_bytes_per_frame() == flow.stream_bytes_per_frame()
    for net in (prior, half):
        # static-chunk streaming equals the chunk-masked offline call, as for the official sampler
        chunked = net.inference(tokens, *prompt, streaming=True, finalize=True)
        outs = _stream(net, net.stream_start(*prompt, static_chunks=True), tokens, _official_hops(small))
        torch.testing.assert_close(torch.cat(outs, -1), chunked, atol=ATOL, rtol=0)
    # with no ODE there is nothing for the first-chunk lever to cut: fast's plan leaves the stream as it was
    quick = _variant(small, ode_weight=0.0, first_chunk_steps=3)
    hops = _growing_hops(prior, tokens.shape[1])
    out = _stream(quick, quick.stream_start(*prompt), tokens, hops)
    assert all(torch.equal(a, b) for a, b in zip(out, streamed0))
    # mu is block-causal in streaming as in the official encoder: within the same bound as its sampler
    offline = mel0
    chunked = prior.inference(tokens, *prompt, streaming=True, finalize=True)
    mel = torch.cat(streamed0, -1)
    assert mel.shape == offline.shape
    assert _rel_rms(mel, offline) <= 2 * max(_rel_rms(chunked, offline), 1e-6)


def test_temperature_scales_the_starting_noise(small: dict) -> None:
    cool = _variant(small, temperature=0.5)
    torch.testing.assert_close(cool._noise(0, 40), 0.5 * small["flow"]._noise(0, 40), atol=0, rtol=0)
    for bad in ({"ode_weight": 1.5}, {"ode_weight": -0.1}, {"temperature": -1.0}):
        with pytest.raises(ValueError):
            FlowConfig(**bad)


# -- speaker_mu (a model option of the default model, not official) --------------------------------------


def test_speaker_mu_starts_as_its_source_and_streams_like_offline(small: dict) -> None:
    """Zero-initialised, the FiLM leaves every output as the flow it warm-starts from; trained (here:
    random), it moves mu by speaker, and static-chunk streaming still equals the chunk-masked offline call."""
    flow, prompt, tokens = small["flow"], small["prompt"], small["tokens"]
    assert flow.mu_film is None and "mu_film.weight" not in flow.state_dict()  # official layout unchanged
    film = Flow(dataclasses.replace(flow.cfg, speaker_mu=True)).eval()
    missing, unexpected = film.load_state_dict(flow.state_dict(), strict=False)
    assert sorted(missing) == ["mu_film.bias", "mu_film.weight"] and not unexpected
    ref = flow.inference(tokens, *prompt, streaming=False, finalize=True)
    torch.testing.assert_close(
        film.inference(tokens, *prompt, streaming=False, finalize=True), ref, atol=0, rtol=0
    )
    with torch.no_grad():
        film.mu_film.weight.normal_(std=0.5)
        film.mu_film.bias.normal_(std=0.1)
    moved = film.inference(tokens, *prompt, streaming=False, finalize=True)
    assert (moved - ref).abs().mean() > 1e-3
    other = (prompt[0], prompt[1], -prompt[2])  # another speaker embedding: another mu
    assert (film.inference(tokens, *other, streaming=False, finalize=True) - moved).abs().mean() > 1e-3
    chunked = film.inference(tokens, *prompt, streaming=True, finalize=True)
    outs = _stream(film, film.stream_start(*prompt, static_chunks=True), tokens, _official_hops(small))
    torch.testing.assert_close(torch.cat(outs, -1), chunked, atol=ATOL, rtol=0)
