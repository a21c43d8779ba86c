"""The serving engine on the fixture model: concurrent requests equal lone ones, cancellation frees the
LM row at once, async streaming, the prompt cache, the flow batcher, and the opt-in int8 modes.

Tolerance. The LM's tokens of concurrent requests are exactly their lone-run tokens. With flow batching
(``EngineOptions.flow_batch``, the default), fast-stream flow chunks of concurrent requests share
estimator calls and their GEMMs round differently than alone: measured on this model, the mel of a
batched chunk differs from its lone run by at most 3.1e-6 (mel values up to ~7.7), so ``MEL_TOL`` = 1e-4
(30x margin). The audio follows the mel through the vocoder: 4 concurrent streams differed from their lone
runs by at most 4.1e-5 (audio peaks ~0.08), so ``AUDIO_TOL`` = 1e-3. A lone request, offline synthesis
and ``flow_batch=False`` stay bit for bit.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import numpy as np
import pytest
import soundfile as sf
import torch

import cosyvoice2
from cosyvoice2.engine import FlowBatcher, PromptCache
from cosyvoice2.synthesis import Cancelled, CancelToken, RequestTrace, Synthesizer, new_generator

MEL_TOL = 1e-4
AUDIO_TOL = 1e-3

TEXTS = [
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech arrives in small pieces.",
    "Four requests share one language model.",
]


@pytest.fixture(scope="module")
def tts(fixtures):
    return cosyvoice2.load(fixtures / "e2e_small" / "model")


@pytest.fixture(scope="module")
def voice(tts, fixtures):
    x, sr = sf.read(fixtures / "e2e_small" / "prompt_24k.wav", dtype="float32")
    return tts.voice(x, text="This prompt was recorded in three seconds.", src_rate=sr)


def _stream(tts, voice, i, traces=None):
    trace = RequestTrace()
    audio = np.concatenate(list(tts.stream(TEXTS[i], voice=voice, seed=10 + i, trace=trace)))
    if traces is not None:
        traces[i] = trace
    return audio


def _in_threads(fn, n):
    out, errors = [None] * n, []

    def run(i):
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return out


def _wait_until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_requests_equal_lone_requests(tts, voice):
    alone_traces = [None] * 4
    alone = [_stream(tts, voice, i, alone_traces) for i in range(4)]
    offline_alone = [tts.synthesize(TEXTS[i], voice=voice, seed=20 + i) for i in range(2)]
    w = tts.engine.worker
    steps0, rows0 = w.steps, w.batched_rows
    traces = [None] * 4
    together = _in_threads(lambda i: _stream(tts, voice, i, traces), 4)
    for a, b, ta, tb in zip(alone, together, alone_traces, traces):
        assert tb.speech_tokens == ta.speech_tokens  # the LM: exactly the lone tokens
        assert a.shape == b.shape
        # The flow batcher shares estimator calls between the streams: equal up to GEMM rounding.
        print(f"concurrent vs lone audio: max |diff| {np.abs(a - b).max():.2e} of {np.abs(a).max():.2f}")
        np.testing.assert_allclose(b, a, rtol=0, atol=AUDIO_TOL)
    # Decode steps really were shared (several rows per backbone call on average), and flow chunks too.
    assert (w.batched_rows - rows0) / max(1, w.steps - steps0) > 1.3
    assert max(c.flow_batch for t in traces for c in t.chunks) >= 2
    assert all(t.lm_tokens > 0 and t.prompt_cache_hit for t in traces)
    offline_together = _in_threads(lambda i: tts.synthesize(TEXTS[i], voice=voice, seed=20 + i), 2)
    for a, b in zip(offline_alone, offline_together):
        np.testing.assert_array_equal(a, b)
    assert w.active_rows == 0


def test_batched_tokens_equal_plain_decode(tts, voice):
    """The engine's tokens are exactly the LM's own ``generate`` tokens for the same seed."""
    prompts = [tts.synth._prompt(tts.request(t, voice=voice)) for t in TEXTS[:3]]
    ids = [tts.models.frontend.encode(t) for t in TEXTS[:3]]
    plain = [
        list(tts.models.lm_generate(i, p.lm_text, p.lm_speech, new_generator(s)))
        for s, (i, p) in enumerate(zip(ids, prompts))
    ]
    batched = _in_threads(lambda s: list(tts.synth.lm.generate(ids[s], prompts[s], new_generator(s))), 3)
    assert batched == plain


def test_cancel_frees_row_at_once(tts, voice):
    w = tts.engine.worker
    more = threading.Event()

    def pieces():
        yield "Hello there, how are you doing today? "
        yield "I am fine, thank you very much for asking. "
        more.wait(30)  # the producer now waits for text: its row stays taken
        yield "Goodbye."

    prompt = tts.synth._prompt(tts.request("x", voice=voice))
    text_ids = tts.models.stream_text_ids(pieces())
    tokens = tts.synth.lm.generate_bistream(text_ids, prompt, new_generator(1))
    first = next(tokens)
    assert isinstance(first, int)
    deadline = time.monotonic() + 10
    while w.active_rows != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.active_rows == 1
    tokens.close()
    assert w.active_rows == 0  # freed before close() returned
    more.set()

    # Cancelling a public stream mid-way (LM still decoding a long text) frees everything too.
    long_text = " ".join(TEXTS * 4)
    gen = tts.stream(long_text, voice=voice, seed=5, schedule=cosyvoice2.synthesis.StreamSchedule(first=4))
    assert next(gen).size > 0
    gen.close()
    assert w.active_rows == 0
    # ... and the engine serves the next request normally.
    np.testing.assert_array_equal(_stream(tts, voice, 0), _stream(tts, voice, 0))


def test_hold_pauses_backbone_calls(tts, voice):
    """A stream's first flow chunk holds the LM thread (the cores are shared); tokens resume after."""
    w = tts.engine.worker
    prompt = tts.synth._prompt(tts.request(TEXTS[1], voice=voice))
    ids = tts.models.frontend.encode(TEXTS[1])
    with w.hold():
        tokens = tts.synth.lm.generate(ids, prompt, new_generator(0))
        got = []
        reader = threading.Thread(target=lambda: got.extend(tokens))
        reader.start()
        time.sleep(0.3)
        assert got == []  # nothing decoded while held
    reader.join(30)
    plain = list(tts.models.lm_generate(ids, prompt.lm_text, prompt.lm_speech, new_generator(0)))
    assert got == plain


def test_astream_async_text_equals_sync(tts, voice):
    pieces = ["Hello there, ", "how are ", "you doing ", "today?"]
    want = np.concatenate(list(tts.stream(iter(pieces), voice=voice, seed=4)))

    async def text():
        for p in pieces:
            await asyncio.sleep(0.01)
            yield p

    async def main():
        got = [c async for c in tts.astream(text(), voice=voice, seed=4)]
        plain = [c async for c in tts.astream(TEXTS[0], voice=voice, seed=4)]
        return got, plain

    got, plain = asyncio.run(main())
    np.testing.assert_array_equal(np.concatenate(got), want)
    np.testing.assert_array_equal(np.concatenate(plain), _stream_seed(tts, voice, TEXTS[0], 4))


def _stream_seed(tts, voice, text, seed):
    return np.concatenate(list(tts.stream(text, voice=voice, seed=seed)))


def test_astream_cancel_and_errors(tts, voice):
    async def endless():
        while True:
            await asyncio.sleep(0.01)
            yield "more words to say, "

    async def main():
        agen = tts.astream(endless(), voice=voice, seed=1)
        chunk = await agen.__anext__()
        await agen.aclose()
        with pytest.raises(cosyvoice2.InputError):
            async for _ in tts.astream("", voice=voice):
                pass
        return chunk

    assert asyncio.run(main()).size > 0
    deadline = time.monotonic() + 10
    while tts.engine.worker.active_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tts.engine.worker.active_rows == 0


def test_astream_and_synthesize_cancel_mid_chunk(tts, voice, monkeypatch):
    """Cancelling ``astream`` (its task) or a ``cancel`` token while a flow chunk is being made stops the
    request at once: the chunk leaves the batcher before it was solved, the synthesis thread ends, the LM
    row is free. ``synthesize`` with a cancelled token raises ``Cancelled`` rather than returning the audio
    made so far."""
    engine, batcher = tts.engine, tts.engine.flow_batcher
    gate = threading.Lock()
    monkeypatch.setattr(batcher, "slot", lambda: gate)  # held: every estimator call waits

    async def main():
        agen = tts.astream(TEXTS[0], voice=voice, seed=4)
        task = asyncio.ensure_future(agen.__anext__())
        deadline = time.monotonic() + 60
        while batcher.pending != 1:  # the first chunk is inside the flow, waiting for its first ODE step
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batcher.pending == 0  # dropped at once, while the gate still blocks every call

    calls0 = batcher.calls
    with gate:
        asyncio.run(main())
        _wait_until(lambda: engine.worker.active_rows == 0)
        # the thread frees its LM row, then returns: on a loaded machine it can still be alive for a moment
        _wait_until(
            lambda: not any(t.name == "cosyvoice2-astream" and t.is_alive() for t in threading.enumerate())
        )
        assert batcher.calls == calls0

        cancel, got = CancelToken(), {}

        def run():
            try:
                got["audio"] = tts.synthesize(TEXTS[1], voice=voice, seed=4, schedule="fast", cancel=cancel)
            except Cancelled as e:
                got["error"] = e

        thread = threading.Thread(target=run)
        thread.start()
        _wait_until(lambda: batcher.pending == 1)
        cancel.cancel()
        thread.join(30)
        assert not thread.is_alive() and "audio" not in got and isinstance(got["error"], Cancelled)
        assert batcher.pending == 0 and batcher.calls == calls0
    monkeypatch.undo()
    _wait_until(lambda: engine.worker.active_rows == 0)
    assert cosyvoice2.CancelToken is CancelToken and cosyvoice2.Cancelled is Cancelled


def test_batched_flow_chunks_equal_lone_chunks(tts, voice, fixtures):
    """Flow blocks of 3 streams solved together (one estimator call per ODE step for all) equal each
    stream's lone ``stream_step`` within MEL_TOL. Covers prompt heads of different lengths (two voices),
    blocks of different lengths (padding), a final block, blocks at different ODE steps in one call, and
    later chunks reading key/value tails that batched calls wrote."""
    flow = tts.models.flow
    x, sr = sf.read(fixtures / "e2e_small" / "prompt_24k.wav", dtype="float32")
    short = tts.voice(x[: 2 * sr], src_rate=sr)  # a shorter prompt: a shorter shared head
    starts = [
        tts.models.flow_stream_start(tts.synth._prompt(tts.request("x", voice=v)))
        for v in (voice, short, voice)
    ]
    assert starts[0].n_tokens != starts[1].n_tokens
    look = flow.cfg.pre_lookahead_len
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, flow.cfg.vocab_size, (1, 70), generator=g) for _ in range(3)]
    hops = [[8, 16, 25], [10, 12, 30], [5, 20, 25]]  # then a final block with the rest

    def plan(i):  # [(tokens, look-ahead, final)] of stream i
        out, p = [], 0
        for h in hops[i]:
            out.append((tokens[i][:, p : p + h], tokens[i][:, p + h : p + h + look], False))
            p += h
        return [*out, (tokens[i][:, p:], None, True)]

    plans = [plan(i) for i in range(3)]
    lone = []
    for i in range(3):
        state, mels = starts[i], []
        for tok, ahead, final in plans[i]:
            mel, state = flow.stream_step(state, tok, ahead, final=final)
            mels.append(mel)
        lone.append(torch.cat(mels, dim=2))

    gate = threading.Lock()  # the batcher's compute slot: while held, its next estimator call waits
    batcher = FlowBatcher(flow, max_blocks=3, slot=lambda: gate)
    states, mels = list(starts), [[], [], []]
    try:
        for c in range(4):
            blocks = [
                flow.stream_prepare(states[i], *plans[i][c][:2], final=plans[i][c][2]) for i in range(3)
            ]
            if c == 1:  # stream 0 two ODE steps ahead, then one call for all three (rows at different t)
                flow.euler_step(blocks[:1])
                flow.euler_step(blocks[:1])
                while not all(b.done for b in blocks):
                    flow.euler_step([b for b in blocks if not b.done])
            else:  # through the batcher: the three blocks are waiting when its first call starts
                with gate:
                    threads = [threading.Thread(target=batcher.solve, args=(b,)) for b in blocks]
                    for t in threads:
                        t.start()
                    _wait_until(lambda: batcher.pending == 3)
                for t in threads:
                    t.join(60)
                assert all(b.done for b in blocks)
            for i, b in enumerate(blocks):
                mel, states[i] = flow.stream_finish(b)
                mels[i].append(mel)
    finally:
        batcher.shutdown()
    assert batcher.calls == 3 * flow.cfg.n_timesteps and batcher.rows == 3 * batcher.calls
    for i in range(3):
        got = torch.cat(mels[i], dim=2)
        assert got.shape == lone[i].shape
        diff = float((got - lone[i]).abs().max())
        print(f"stream {i}: batched vs lone mel max |diff| {diff:.2e}")
        assert diff <= MEL_TOL, (i, diff)


def test_cancel_during_batched_flow_frees_state(tts, voice, monkeypatch):
    """Closing a request from another thread while its flow chunk waits in the batcher drops the chunk at
    once: the request stops without the batcher making a call, its chunk's state is freed, its LM row is
    given back, and the engine goes on serving (a lone request still gets its exact lone audio)."""
    engine, batcher = tts.engine, tts.engine.flow_batcher
    want = _stream(tts, voice, 2)
    gate = threading.Lock()
    monkeypatch.setattr(batcher, "slot", lambda: gate)  # held: the batcher's next call waits
    calls0, got = batcher.calls, {}
    with gate:
        stream = engine.run(tts.request(TEXTS[0], voice=voice, seed=10, stream=True))
        thread = threading.Thread(target=lambda: got.setdefault("audio", list(stream)))
        thread.start()
        _wait_until(lambda: batcher.pending == 1)  # its first chunk waits for the batcher
        block = weakref.ref(batcher._queue[0].block)
        stream.close()  # from this thread, while the request's thread waits in the batcher
        assert batcher.pending == 0
        thread.join(30)
        assert not thread.is_alive() and got["audio"] == [] and stream.cancelled
        gc.collect()
        assert block() is None  # the chunk's ODE state went with it
        assert batcher.calls == calls0
        _wait_until(lambda: engine.worker.active_rows == 0)
    monkeypatch.undo()
    np.testing.assert_array_equal(_stream(tts, voice, 2), want)

    # Two blocks waiting together; one is cancelled: the other is solved alone, as if it had been alone.
    flow = tts.models.flow
    state = tts.models.flow_stream_start(tts.synth._prompt(tts.request("x", voice=voice)))
    toks = torch.arange(11)[None] * 37 % flow.cfg.vocab_size
    ref, _ = flow.stream_step(state, toks[:, :8], toks[:, 8:], final=False)
    blocks = [flow.stream_prepare(state, toks[:, :8], toks[:, 8:], final=False) for _ in range(2)]
    mine = FlowBatcher(flow, slot=lambda: gate)
    cancel, errors = CancelToken(), []

    def solve(b, token):
        try:
            mine.solve(b, token)
        except Cancelled as e:
            errors.append(e)

    try:
        with gate:
            threads = [threading.Thread(target=solve, args=(b, t)) for b, t in zip(blocks, (cancel, None))]
            for t in threads:
                t.start()
            _wait_until(lambda: mine.pending == 2)
            cancel.cancel()
            threads[0].join(30)
            assert len(errors) == 1 and mine.pending == 1
        threads[1].join(60)
    finally:
        mine.shutdown()
    assert not blocks[0].done and blocks[1].done and mine.max_rows == 1
    torch.testing.assert_close(flow.stream_finish(blocks[1])[0], ref, rtol=0, atol=0)


def test_lone_request_is_not_delayed(tts, voice):
    """No batching delay by default: a lone stream's flow chunks start their first estimator call at once
    (the trace's ``flow_wait_s``: thread hand-off only), and its audio is bit for bit the unbatched path's
    (one block per call is exactly ``Flow.stream_step``)."""
    assert tts.engine.options.flow_batch and tts.engine.options.flow_batch_wait_ms == 0
    # Two sentences: their text tokens hold EOS back for long enough that the fast schedule (8, 16, ...)
    # makes at least three chunks, however early the fixture model would stop.
    text = f"{TEXTS[1]} {TEXTS[2]}"
    trace = RequestTrace()
    audio = np.concatenate(list(tts.stream(text, voice=voice, seed=3, trace=trace)))
    assert len(trace.chunks) >= 3
    waits = [c.flow_wait_s for c in trace.chunks]
    print(f"lone stream: flow waits {[round(w * 1000, 1) for w in waits]} ms")
    for c in trace.chunks:
        assert c.flow_batch == 1
        assert c.flow_wait_s <= 0.05 + 0.05 * c.flow_s, (c.flow_wait_s, c.flow_s)
    unbatched = Synthesizer(tts.models, lm=tts.synth.lm)  # the flow in the request's own thread
    req = tts.request(text, voice=voice, seed=3, stream=True)
    np.testing.assert_array_equal(np.concatenate([c.numpy() for c in unbatched.run(req)]), audio)


def test_prompt_cache_lru_by_bytes():
    cache = PromptCache(max_bytes=100)
    calls = []

    def make(v, size):
        def compute():
            calls.append(v)
            time.sleep(0.05)
            return (v, size)

        return compute

    size = lambda v: v[1]  # noqa: E731
    assert cache.get("a", make("a", 40), size) == (("a", 40), False)
    assert cache.get("b", make("b", 40), size)[1] is False
    assert cache.get("a", make("a2", 40), size) == (("a", 40), True)  # hit, and now most recent
    cache.get("c", make("c", 40), size)  # evicts b (least recent)
    assert cache.get("b", make("b2", 40), size) == (("b2", 40), False)
    assert cache.nbytes <= 100
    assert cache.get("huge", make("huge", 1000), size)[1] is False and "huge" not in calls[:-1]
    assert len(cache) <= 2
    # Concurrent misses of one key compute it once.
    calls.clear()
    _in_threads(lambda i: cache.get("d", make("d", 10), size), 4)
    assert calls == ["d"]


def test_int8_modes_are_opt_in_and_close(fixtures, tts, voice):
    q = cosyvoice2.load(fixtures / "e2e_small" / "model", lm_quant="int8", flow_quant="int8")
    prompt = tts.synth._prompt(tts.request(TEXTS[0], voice=voice))
    ids = tts.models.frontend.encode(TEXTS[0])
    with torch.inference_mode():
        x = tts.models.lm.build_input(ids, prompt.lm_text, prompt.lm_speech)
        ref = tts.models.lm.step(x, tts.models.lm.new_cache(1, 256))
        got = q.models.lm.step(x, q.models.lm.new_cache(1, 256))
    # The int8 LM's next-token distribution stays close to fp32 (total variation distance; 0.06 on this
    # 16-wide model, whose rows of 16 weights are a worst case for per-row scales; full-size numbers are
    # in bench/README.md).
    tv = 0.5 * float((ref.exp() - got.exp()).abs().sum())
    assert tv < 0.15, tv
    audio = q.synthesize(TEXTS[0], voice=voice, seed=1)
    assert audio.size > 0 and np.isfinite(audio).all()
    with pytest.raises(cosyvoice2.InputError):
        cosyvoice2.load(fixtures / "e2e_small" / "model", lm_quant="int4")
    q.close()
