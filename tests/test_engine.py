"""The serving engine on the fixture model: concurrent requests equal lone ones, cancellation frees the
LM row at once, async streaming, the prompt cache, and the opt-in int8 modes."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import cosyvoice2
from cosyvoice2.engine import PromptCache
from cosyvoice2.synthesis import RequestTrace, new_generator

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
        t.join(120)
    assert not errors, errors
    return out


def test_concurrent_requests_equal_lone_requests(tts, voice):
    alone = [_stream(tts, voice, i) for i in range(4)]
    offline_alone = [tts.synthesize(TEXTS[i], voice=voice, seed=20 + i) for i in range(2)]
    w = tts.engine.worker
    steps0, rows0 = w.steps, w.batched_rows
    traces = [None] * 4
    together = _in_threads(lambda i: _stream(tts, voice, i, traces), 4)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
    # Decode steps really were shared (several rows per backbone call on average).
    assert (w.batched_rows - rows0) / max(1, w.steps - steps0) > 1.3
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
