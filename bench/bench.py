"""CPU benchmark of the serving path: first-packet latency, real-time factor, LM ms/token, peak RSS, at
concurrency 1 and 4. Prints one JSON document.

    python bench/bench.py                 # full run (several minutes on a 2-core machine)
    python bench/bench.py --quick         # short utterances, fewer repeats
    python bench/bench.py --variants exact,fast,compute-quality --out result.json   # exact vs fast
    python bench/bench.py --variants int8 --threads 2 --out result.json

Models:
* ``full-size random``: the dimensions of CosyVoice2-0.5B (``LMConfig/FlowConfig/HiFTConfig
  .cosyvoice2_0_5b()``) with random weights (the LM is built on the meta device and filled cheaply; its
  stop ids get a -30 bias so every utterance runs to its full length, as the fixtures' models do). A
  stand-in text frontend maps each character to one text id, so an utterance of n characters decodes
  exactly 20 n speech tokens (``max_token_text_ratio``). The voice is a random 3 s prompt (75 tokens,
  150 mel frames, a 30-id transcript): "fresh" = nothing cached, "saved" = its prompt work cached.
* ``default model``: the shipped model (``cosyvoice2.load()``) with its default voice, when it exists.

Each variant runs in its own process (so peak RSS is per variant). The default run compares the two
``compute`` choices of ``cosyvoice2.load`` side by side: ``exact`` (float32, official parity; ``fp32`` is
the same) and ``fast`` (the plan ``cosyvoice2.cpu.plan("fast")`` picks for this CPU), plus
``compute-quality`` (each reduced precision's deviation from exact on the same random weights: LM
next-token distributions teacher-forced, flow mel, audio through the float32 vocoder) and the default
model in both (``default-model``, ``default-model-fast``, ``default-model-quality``). ``kernels`` times
the GEMM shapes that decide the plan, and one estimator ODE step, in fp32, bf16 and int8. Other variants:
``int8`` (``lm_quant="int8", flow_quant="int8"``), ``bf16`` (both bf16), ``fast-flow-int8`` (``fast`` with
an int8 flow: the A/B of the flow's precision on a bf16 CPU), ``int8-steps5``/``fast-steps5``
(``flow_steps=5``: half the flow work, a quality trade-off random weights cannot measure),
``int8-quality`` (the older fp32-vs-int8 report), ``flow-levers`` (not in the default list: the flow
sampler's levers ``cfg_steps`` and ``first_chunk_steps`` on the shipped model, CPU time and mel deviation
from exact, and one full-size estimator step guided vs unguided). The JSON's ``machine`` records the
CPU's flags, its kind and the plan of each ``compute`` choice; every timed variant records the
precisions it ran. Timings are wall-clock medians; the machine may be shared, so ``load_before``/
``load_after`` (1-minute load average) are recorded with them.

The concurrency section runs 4 streams with the engine's flow batcher (the default) and again with
``flow_batch=False``. ``flow-batch`` (not in the default list: ``--variants flow-batch``) measures the
batcher's core alone on the full-size flow: ODE steps of 4 streams' blocks one call per block vs one
call for all, in wall and process CPU seconds (CPU seconds stay meaningful on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SAMPLE_RATE = 24000
HERE = Path(__file__).resolve()
VARIANTS = {  # (compute choice, explicit speed options) of each timed variant (cosyvoice2.api.load)
    "exact": ("exact", {}),
    "fp32": ("exact", {}),
    "fast": ("fast", {}),
    "fast-steps5": ("fast", {"flow_steps": 5}),
    "fast-flow-int8": ("fast", {"flow_quant": "int8"}),  # A/B of the flow's precision on bf16 CPUs
    "fast-flow-fp32": ("fast", {"flow_quant": "fp32"}),  # fast's LM, the flow as exact's
    "fast-vocoder-fp32": ("fast", {"vocoder_quant": "fp32"}),  # A/B of the vocoder's precision
    # fast's first streamed chunk takes 3 Euler steps (cpu.FAST_FIRST_CHUNK_STEPS) since 2026-12-07; these
    # vary it (10: the first chunk as exact's); later chunks stay exact (bench/README "Flow sampler levers")
    "fast-first10": ("fast", {"first_chunk_steps": 10}),
    "fast-first4": ("fast", {"first_chunk_steps": 4}),
    "fast-first3": ("fast", {"first_chunk_steps": 3}),
    "int8": ("exact", {"lm_quant": "int8", "flow_quant": "int8"}),
    "bf16": ("exact", {"lm_quant": "bf16", "flow_quant": "bf16"}),
    "int8-steps5": ("exact", {"lm_quant": "int8", "flow_quant": "int8", "flow_steps": 5}),
}
DEFAULT_VARIANTS = (
    "exact", "fast", "compute-quality", "kernels",
    "default-model", "default-model-fast", "default-model-quality",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class CharFrontend:
    """Stand-in text frontend for random-weight models: one text id per character, no normalisation."""

    text_backend = "none"

    def text_pieces(self, text: str) -> list[str]:
        return [text]

    def encode(self, text: str) -> list[int]:
        return [1000 + (ord(c) % 5000) for c in text]

    def instruct_ids(self, text: str) -> list[int]:
        return self.encode(text)


def random_full_size():
    """Models with CosyVoice2-0.5B dimensions and random weights (seconds, not minutes, to build)."""
    from cosyvoice2.flow import Flow, FlowConfig
    from cosyvoice2.hift import HiFT, HiFTConfig
    from cosyvoice2.lm import CosyVoice2LM, LMConfig
    from cosyvoice2.model_dir import Models

    torch.manual_seed(0)
    with torch.device("meta"):
        lm = CosyVoice2LM(LMConfig.cosyvoice2_0_5b())
    lm = lm.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.02)
        for norm in (m for m in lm.modules() if type(m).__name__ == "RMSNorm"):
            norm.weight.fill_(1.0)
        lm.speech_head.bias[lm.cfg.speech_token_size :] = -30.0  # never stop early (as the fixture models)
    flow = Flow(FlowConfig.cosyvoice2_0_5b()).eval()
    hift = HiFT(HiFTConfig.cosyvoice2_0_5b()).eval()
    return Models(lm, flow, hift, CharFrontend())


def random_voice(seed: int = 0):
    from cosyvoice2.voice import VoiceReference

    g = torch.Generator().manual_seed(seed)
    return VoiceReference(
        embedding=torch.randn(192, generator=g),
        speech_tokens=torch.randint(0, 6561, (75,), generator=g),
        mel=torch.randn(150, 80, generator=g) * 2 - 5,
        text_tokens=torch.randint(1000, 6000, (30,), generator=g).tolist(),
        name=f"random-{seed}",
    )


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def lm_ms_per_token(lm, batch: int, steps: int, prefix: int = 120) -> float:
    """Median ms per backbone decode step for ``batch`` rows after a ``prefix``-position prefill."""
    cache = lm.new_cache(batch, prefix + steps + 8)
    with torch.inference_mode():
        x = torch.randn(1, prefix, lm.cfg.hidden_size) * 0.1
        for b in range(batch):
            lm.step(x, cache, rows=[b])
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            lm.decode_step([1] * batch, cache)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def prefill_ms(lm, positions: int) -> float:
    with torch.inference_mode():
        x = torch.randn(1, positions, lm.cfg.hidden_size) * 0.1
        t = time.perf_counter()
        lm.step(x, lm.new_cache(1, positions))
        return 1000 * (time.perf_counter() - t)


def profile_of(trace, wall: float) -> dict:
    flow = sum(c.flow_s for c in trace.chunks)
    voc = sum(c.vocoder_s for c in trace.chunks)
    return {
        "lm_tokens": trace.lm_tokens,
        "flow_s": round(flow, 3),
        "vocoder_s": round(voc, 3),
        "lm_and_other_s": round(wall - flow - voc, 3),
        "chunks": len(trace.chunks),
    }


def synthesize_once(tts, text, voice, seed, schedule=None) -> dict:
    from cosyvoice2.synthesis import RequestTrace

    trace = RequestTrace()
    t = time.perf_counter()
    audio = tts.synthesize(text, voice=voice, seed=seed, schedule=schedule, trace=trace)
    wall = time.perf_counter() - t
    secs = audio.size / SAMPLE_RATE
    return {"audio_s": round(secs, 2), "wall_s": round(wall, 2), "rtf": round(wall / secs, 3)} | {
        "profile": profile_of(trace, wall)
    }


def first_packet(tts, text, voice, seed, schedule="fast") -> dict:
    """Seconds until the first non-empty chunk; the request is then cancelled."""
    from cosyvoice2.synthesis import RequestTrace

    trace = RequestTrace()
    t = time.perf_counter()
    gen = tts.stream(text, voice=voice, seed=seed, schedule=schedule, trace=trace)
    chunk = next(c for c in gen if c.size)
    latency = time.perf_counter() - t
    gen.close()
    c0 = trace.chunks[0]
    return {
        "first_packet_s": round(latency, 3),
        "first_chunk_audio_s": round(chunk.size / SAMPLE_RATE, 3),
        "lm_tokens_before": c0.tokens + 3,
        "first_flow_s": round(c0.flow_s, 3),
        "first_vocoder_s": round(c0.vocoder_s, 3),
        "prompt_cache_hit": trace.prompt_cache_hit,
    }


def concurrent_streams(tts, texts, voice) -> dict:
    """Run one stream per text at once (threads, as a server does); aggregate audio seconds per second."""
    results = [None] * len(texts)

    def run(i):
        t = time.perf_counter()
        first, total = None, 0
        for chunk in tts.stream(texts[i], voice=voice, seed=100 + i):
            if first is None and chunk.size:
                first = time.perf_counter() - t
            total += chunk.size
        results[i] = (first, total / SAMPLE_RATE, time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    audio = sum(r[1] for r in results)
    return {
        "streams": len(texts),
        "audio_s": round(audio, 2),
        "wall_s": round(wall, 2),
        "audio_s_per_s": round(audio / wall, 3),
        "first_packet_s": [round(r[0], 3) for r in results],
    }


def int8_quality(models) -> dict:
    """fp32 vs int8 on the same weights: LM next-token distributions and flow mel (before quantising)."""
    from cosyvoice2.engine import quantize_flow_int8
    from cosyvoice2.lm import quantize_backbone_int8

    lm, flow = models.lm, models.flow
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 140, lm.cfg.hidden_size, generator=g) * 0.1
    tokens = torch.randint(0, 6561, (1, 50), generator=g)
    prompt = torch.randint(0, 6561, (1, 75), generator=g)
    pmel, emb = torch.randn(1, 150, 80, generator=g) * 2 - 5, torch.randn(1, 192, generator=g)
    with torch.inference_mode():
        ref_lp = lm.speech_logp(lm.forward_embeds(x))[0]  # [T, V] teacher-forced
        ref_mel = flow.inference(tokens, prompt, pmel, emb, streaming=False, finalize=True)
        quantize_backbone_int8(lm)
        quantize_flow_int8(flow)
        lp = lm.speech_logp(lm.forward_embeds(x))[0]
        mel = flow.inference(tokens, prompt, pmel, emb, streaming=False, finalize=True)
    p, q = ref_lp.exp(), lp.exp()

    def _r(d):
        return round(float(d.abs().max()), 4)

    top = ref_lp.topk(25, dim=-1).indices
    return {
        "lm_logp_max_abs_diff_top25": _r(ref_lp.gather(1, top) - lp.gather(1, top)),
        "lm_total_variation_mean": round(float(0.5 * (p - q).abs().sum(-1).mean()), 5),
        "lm_top1_agreement": round(float((ref_lp.argmax(-1) == lp.argmax(-1)).float().mean()), 4),
        "flow_mel_mean_abs_diff": round(float((ref_mel - mel).abs().mean()), 5),
        "flow_mel_mean_abs": round(float(ref_mel.abs().mean()), 4),
        "note": "random weights: trained weights have outlier channels that per-row int8 scales handle worse",
    }


def compute_quality(models, voice, text_ids: list[int], target: torch.Tensor, prompt_text: list[int]) -> dict:
    """Deviation from exact of every reduced precision (and of this CPU's ``fast`` plan), same weights.

    ``models``: float32 models (left unchanged; each variant works on a copy). The LM is teacher-forced on
    ``[SOS] prompt_text text [TASK] prompt_speech target`` and its next-token distributions over ``target``
    [N] are compared (total variation, top-1 agreement); the flow runs offline on ``target`` after the
    voice's prompt (mel: mean and max |delta|, beside mean |mel|); the audio is each mel through the same
    float32 vocoder with the same noise seed, compared as log mel (``audio_mel``) beside exact's own
    audio with another vocoder seed.
    """
    import copy

    from cosyvoice2.api import speed_up
    from cosyvoice2.cpu import plan

    fast = plan("fast").load_options()
    settings = {
        "lm int8": {"lm_quant": "int8"},
        "lm bf16": {"lm_quant": "bf16"},
        "flow int8": {"flow_quant": "int8"},
        "flow bf16": {"flow_quant": "bf16"},
        f"fast (lm {fast['lm_quant'] or 'fp32'}, flow {fast['flow_quant'] or 'fp32'})": fast,
        "flow 5 steps (fp32)": {"flow_steps": 5},  # the steps lever, for scale: not part of fast
    }
    prompt_tokens = voice.speech_tokens.long()
    x = None
    if models.lm is not None:
        x = models.lm.build_input(text_ids, prompt_text, torch.cat([prompt_tokens, target.long()]))

    def outputs(m) -> dict:
        out = {}
        with torch.inference_mode():
            if x is not None:
                h = m.lm.forward_embeds(x)[0, -target.numel() - 1 : -1]  # predicts each target token
                out["logp"] = m.lm.speech_logp(h)[:, : m.lm.cfg.speech_token_size]
            mel = m.flow.inference(
                target[None], prompt_tokens[None], voice.mel[None], voice.embedding[None],
                streaming=False, finalize=True,
            )  # fmt: skip
            out["mel"] = mel
            out["audio_mel"] = audio_mel(models.hift, mel, seed=0)
        return out

    ref = outputs(models)
    with torch.inference_mode():
        reseeded = audio_mel(models.hift, ref["mel"], seed=1)
    report = {
        "target_tokens": int(target.numel()),
        "mel_mean_abs": round(float(ref["mel"].abs().mean()), 4),
        # the yardstick for audio: exact's own mel, vocoded with another noise seed
        "audio_logmel_mean_abs_diff_other_vocoder_seed": round(
            float((reseeded - ref["audio_mel"]).abs().mean()), 4
        ),
    }
    for name, options in settings.items():
        if models.lm is None and name.startswith("lm "):
            continue
        m = copy.deepcopy(models)
        speed_up(m, **options)
        out, r = outputs(m), {}
        if "logp" in ref and options.get("lm_quant"):
            p, q = ref["logp"].exp(), out["logp"].exp()
            r["lm_total_variation_mean"] = round(float(0.5 * (p - q).abs().sum(-1).mean()), 5)
            r["lm_top1_agreement"] = round(float((p.argmax(-1) == q.argmax(-1)).float().mean()), 4)
        if options.get("flow_quant") or options.get("flow_steps"):
            d = out["mel"] - ref["mel"]
            r["mel_mean_abs_diff"] = round(float(d.abs().mean()), 5)
            r["mel_max_abs_diff"] = round(float(d.abs().max()), 4)
            a = (out["audio_mel"] - ref["audio_mel"]).abs().mean()
            r["audio_logmel_mean_abs_diff"] = round(float(a), 4)
        report[name] = r
    return report


def audio_mel(hift, mel: torch.Tensor, seed: int) -> torch.Tensor:
    """Vocode mel [1, 80, T] (float32 HiFT, noise seeded) and measure the audio's log mel [T', 80].

    Audio is compared as a log mel, not sample by sample: the vocoder's sine source integrates f0 into a
    phase, so a tiny f0 difference shifts the phase of everything after it, and two waveforms that sound
    the same differ sample by sample by about their own RMS (measured: relative RMS difference 1.0-1.5 for
    a mel deviation of 0.006).
    """
    from cosyvoice2.audio import prompt_mel

    audio = hift.inference(mel, generator=torch.Generator().manual_seed(seed))[0]
    return prompt_mel(audio.reshape(-1))[0]


def random_quality() -> dict:
    """``compute_quality`` on the full-size random models: a random 3 s voice and 100 random tokens."""
    models = random_full_size()
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 6561, (100,), generator=g)
    v = random_voice()
    return compute_quality(models, v, list(range(1000, 1030)), target, v.text_tokens) | {
        "note": "random weights: trained weights have outlier channels; see default-model-quality"
    }


def default_model_quality() -> dict:
    """``compute_quality`` on the shipped model: voice B's recorded tokens spoken in voice A's timbre."""
    from cosyvoice2.default_model import default_model_dir, load_native_dir

    models = load_native_dir(default_model_dir())
    names = sorted(models.speakers)
    a, b = models.speakers[names[1]], models.speakers[names[0]]
    fe = models.frontend
    return compute_quality(models, a, fe.encode(b.text), b.speech_tokens, fe.encode(a.text)) | {
        "voices": [a.name or names[1], b.name or names[0]]
    }


def flow_levers(quick: bool) -> dict:
    """The flow's sampler levers on the shipped model (``cosyvoice2.load()``), fp32, 1 voice: time and mel
    deviation from exact (the official sampler) of each setting.

    Input: voice A speaking voice B's recorded tokens (as ``default-model-quality``). ``offline``: one
    ``Flow.inference`` per setting: partial classifier-free guidance (``cfg_steps``: guided steps of 10),
    and for scale uniformly fewer Euler steps (``flow_steps``) at about the same estimator work (k guided
    of 10 costs (10 + k) / 20 of exact's rows). ``first_chunk``: a fast stream (saved voice state, the
    ``fast`` schedule's hops 8, 16, 32, 50, ...) with ``first_chunk_steps``: the first chunk's flow time
    and its mel deviation, and the deviation of the chunks after it, all from exact streaming. Times are
    process CPU seconds (medians; 1 thread, so a busy machine stretches wall time, not CPU time, much);
    deviations are mean |delta| of the log mel (mean |mel| given as the scale), beside the deviation of
    exact's own streamed mel from its offline mel (what streaming already moves) and audio log-mel
    deviations through the float32 vocoder beside exact's own audio with another vocoder seed.
    """
    import dataclasses

    import cosyvoice2

    tts = cosyvoice2.load()
    models, flow = tts.models, tts.models.flow
    names = sorted(models.speakers)
    a, b = models.speakers[names[1]], models.speakers[names[0]]
    target = b.speech_tokens.long()[None]
    prompt = (a.speech_tokens.long()[None], a.mel[None], a.embedding[None])
    base = flow.cfg
    reps = 2 if quick else 3
    rows: list[int] = []
    hook = flow.estimator.final_proj.register_forward_hook(
        lambda m, i, o: rows.append(o.shape[0] * o.shape[-1])
    )

    def cpu_s(fn):
        times, out = [], None
        for _ in range(reps):
            c = time.process_time()
            out = fn()
            times.append(time.process_time() - c)
        return out, statistics.median(times)

    def offline():
        return flow.inference(target, *prompt, streaming=False, finalize=True)

    hops, n = [], 0
    look = base.pre_lookahead_len
    while True:
        hop = 8 if not hops else min(2 * hops[-1], 50)
        if n + hop + look > target.shape[1]:
            break
        hops.append(hop)
        n += hop
    state0 = flow.stream_start(*prompt)

    def streamed():
        outs, state, end = [], state0, 0
        times = []
        for hop in [*hops, None]:
            c = time.process_time()
            if hop is None:
                mel, state = flow.stream_step(state, target[:, end:], None, final=True)
            else:
                ahead = target[:, end + hop : end + hop + look]
                mel, state = flow.stream_step(state, target[:, end : end + hop], ahead, final=False)
                end += hop
            times.append(time.process_time() - c)
            outs.append(mel)
        return outs, times

    def vocoded(mel, seed=0):
        with torch.inference_mode():
            return audio_mel(models.hift, mel, seed)

    def dev(x, ref) -> float:
        return round(float((x - ref).abs().mean()), 5)

    try:
        with torch.inference_mode():
            ref, ref_s = cpu_s(offline)
            ref_rows = sum(rows)  # estimator rows x frames of exact's calls (all repetitions)
            ref_audio = vocoded(ref)
            report: dict = {
                "voices": [a.name or names[1], b.name or names[0]],
                "target_tokens": int(target.shape[1]),
                "n_timesteps": base.n_timesteps,
                "mel_mean_abs": round(float(ref.abs().mean()), 3),
                "audio_logmel_exact_other_vocoder_seed": dev(vocoded(ref, 1), ref_audio),
                "offline": {"exact": {"cpu_s": round(ref_s, 3)}},
            }
            settings = [("cfg_steps", k) for k in (8, 6, 5, 4, 2, 0)] + [
                ("n_timesteps", k) for k in (8, 7, 5)
            ]
            for key, k in settings:
                flow.cfg = dataclasses.replace(base, **{key: k})
                rows.clear()
                mel, t = cpu_s(offline)
                name = f"cfg_steps={k}" if key == "cfg_steps" else f"flow_steps={k}"
                report["offline"][name] = {
                    "cpu_s": round(t, 3),
                    "cpu_ratio": round(t / ref_s, 3),
                    "estimator_rows_ratio": round(sum(rows) / ref_rows, 3),
                    "mel_mean_abs_diff": dev(mel, ref),
                    "mel_max_abs_diff": round(float((mel - ref).abs().max()), 3),
                    "audio_logmel_mean_abs_diff": dev(vocoded(mel), ref_audio),
                }

            def chunk_times():  # per-chunk medians over the repetitions, and the last run's mels
                runs = [streamed() for _ in range(reps)]
                return runs[-1][0], [statistics.median(ts) for ts in zip(*(r[1] for r in runs))]

            flow.cfg = base
            outs, times = chunk_times()
            exact_stream = torch.cat(outs, -1)
            exact_audio = vocoded(exact_stream)
            report["first_chunk"] = {
                "hops": hops,
                "exact": {
                    "first_chunk_cpu_s": round(times[0], 3),
                    "second_chunk_cpu_s": round(times[1], 3),
                    "stream_cpu_s": round(sum(times), 3),
                    "stream_vs_offline_mel": dev(exact_stream, ref),
                },
            }
            for k in (5, 3, 2):
                flow.cfg = dataclasses.replace(base, first_chunk_steps=k)
                o, ts = chunk_times()
                report["first_chunk"][f"first_chunk_steps={k}"] = {
                    "first_chunk_cpu_s": round(ts[0], 3),
                    "first_chunk_cpu_ratio": round(ts[0] / times[0], 3),
                    # the second call also solves the first block's exact ODE (the stream's state)
                    "second_chunk_cpu_ratio": round(ts[1] / times[1], 3),
                    "stream_cpu_ratio": round(sum(ts) / sum(times), 3),
                    "first_chunk_mel_mean_abs_diff": dev(o[0], outs[0]),
                    "later_chunks_mel_mean_abs_diff": dev(torch.cat(o[1:], -1), torch.cat(outs[1:], -1)),
                    "stream_vs_offline_mel": dev(torch.cat(o, -1), ref),
                    "audio_logmel_vs_exact_stream": dev(vocoded(torch.cat(o, -1)), exact_audio),
                }
            # Through the engine (LM, flow batcher, vocoder): the default voice, its prompt state cached.
            text = "Streaming speech synthesis turns text into audio while the text is still arriving."
            packets = {}
            for k in (None, 5, 3):
                flow.cfg = dataclasses.replace(base, first_chunk_steps=k)
                first_packet(tts, text, None, 1)  # warms the voice's prompt state (shared by the settings)
                runs = [first_packet(tts, text, None, 1) for _ in range(reps + 1)]
                packets["exact" if k is None else f"first_chunk_steps={k}"] = {
                    key: round(statistics.median(r[key] for r in runs), 3)
                    for key in ("first_packet_s", "first_flow_s")
                }
            report["first_packet_wall_saved_voice"] = packets
            flow.cfg = base
            report["full_size_estimator_step"] = full_size_rows(reps)
    finally:
        flow.cfg = base
        hook.remove()
        tts.close()
    report["torch_threads"] = torch.get_num_threads()
    return report


def full_size_rows(reps: int) -> dict:
    """CPU seconds of one full-size (CosyVoice2-0.5B dimensions, random weights) estimator ODE step over a
    56-frame block, guided (2 rows) and unguided (1 row, ``cfg_steps``): does halving the rows halve the
    time at full size too?"""
    import dataclasses

    from cosyvoice2.flow import Flow, FlowConfig

    torch.manual_seed(0)
    flow = Flow(FlowConfig.cosyvoice2_0_5b()).eval()
    ids = torch.randint(0, 6561, (1, 31), generator=torch.Generator().manual_seed(1))
    empty = (ids[:, :0], torch.zeros(1, 0, 80), torch.randn(1, 192))
    out = {}
    with torch.inference_mode():
        for name, cfg_steps in (("guided_2_rows", None), ("unguided_1_row", 0)):
            flow.cfg = dataclasses.replace(flow.cfg, cfg_steps=cfg_steps)
            block = flow.stream_prepare(flow.stream_start(*empty), ids[:, :28], ids[:, 28:], final=False)
            flow.euler_step([block])
            c = time.process_time()
            for _ in range(reps):
                flow.euler_step([block])
            out[f"{name}_cpu_s"] = round((time.process_time() - c) / reps, 3)
    out["ratio"] = round(out["unguided_1_row_cpu_s"] / out["guided_2_rows_cpu_s"], 3)
    return out


KERNEL_SHAPES = {  # the shapes the plan is about
    "lm_decode_row [1,896]x[896,4864]": (1, 896, 4864),
    "flow_block [512,256]x[256,1024]": (512, 256, 1024),
}


def kernels(repeats: int = 20) -> dict:
    """Median ms of one GEMM per precision (fp32, bf16, int8 dynamic) at the shapes of the LM decode and
    the flow estimator, and of one full-size estimator ODE step over a 56-frame block after a 3 s prompt
    (median of 3) per flow precision: what ``cosyvoice2.cpu.plan`` should choose on this CPU."""
    import warnings

    import torch.nn.functional as F

    from cosyvoice2.lm import Int8DynamicLinear

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(1000 * statistics.median(times), 3)

    out: dict = {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (m, k, n) in KERNEL_SHAPES.items():
            x, lin = torch.randn(m, k), torch.nn.Linear(k, n)
            xb, wb = x.bfloat16(), lin.weight.detach().bfloat16()
            q = Int8DynamicLinear(lin)
            out[name] = {
                "fp32_ms": median_ms(lambda: lin(x)),  # noqa: B023 - called within the iteration
                "bf16_ms": median_ms(lambda: F.linear(xb, wb)),  # noqa: B023
                "int8_ms": median_ms(lambda: q(x)),  # noqa: B023
            }
        v = random_voice()
        ids = torch.randint(0, 6561, (1, 28), generator=torch.Generator().manual_seed(1))
        flows = _precision_flows()
        step = {f"{p}_ms": _flow_step_ms(f, v, ids, 25, 3) for p, f in flows.items()}
        out["flow_estimator_step_56_frames"] = step
    out["torch_threads"] = torch.get_num_threads()
    return out


def flow_blocks(repeats: int = 3) -> dict:
    """Median ms of one full-size estimator ODE step (2 CFG rows) on a streamed block of n tokens (2n
    frames) after a 3 s prompt, fp32 vs bf16 vs int8, n from a first packet's few tokens to a long chunk's:
    where reduced precision starts to pay (a small block is bound by its count of small ops)."""
    import warnings

    out: dict = {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flows = _precision_flows()
        v = random_voice()
        ids = torch.randint(0, 6561, (1, 103), generator=torch.Generator().manual_seed(1))
        for n in (3, 6, 11, 25, 50, 100):
            out[f"{n}_tokens"] = {f"{p}_ms": _flow_step_ms(f, v, ids, n, repeats) for p, f in flows.items()}
    out["torch_threads"] = torch.get_num_threads()
    return out


def _precision_flows() -> dict:
    """The full-size random flow (seed 0) as fp32, and copies made bf16 and int8 by ``speed_up``."""
    import copy

    from cosyvoice2.api import speed_up
    from cosyvoice2.flow import Flow, FlowConfig

    torch.manual_seed(0)
    base = Flow(FlowConfig.cosyvoice2_0_5b()).eval()
    flows = {"fp32": base}
    for precision in ("bf16", "int8"):
        flows[precision] = speed_up(_FlowOnly(copy.deepcopy(base)), flow_quant=precision).flow
    return flows


def _flow_step_ms(flow, voice, ids: torch.Tensor, n: int, repeats: int) -> float:
    """Median ms of one ODE step on the streamed block ids[:, :n] (3 look-ahead tokens) after ``voice``."""
    state = flow.stream_start(voice.speech_tokens[None], voice.mel[None], voice.embedding[None])
    block = flow.stream_prepare(state, ids[:, :n], ids[:, n : n + 3], final=False)
    flow.euler_step([block])  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        flow.euler_step([block])
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 1)


class _FlowOnly:
    """What ``speed_up`` needs to change only a flow (no LM)."""

    lm = None

    def __init__(self, flow) -> None:
        self.flow = flow


def flow_batch_gain(streams: int = 4, tokens: int = 25, steps: int = 3) -> dict:
    """ODE steps of ``streams`` fast-stream blocks (``tokens`` each, after a 3 s voice prompt), full-size
    random flow: one estimator call per block (as without the batcher) vs one call for all (the batcher).

    Only ``steps`` of the 10 ODE steps are timed (every step costs the same). Returns wall and process CPU
    seconds per step, and the largest mel difference of the batched blocks from their lone runs.
    """
    from cosyvoice2.flow import Flow, FlowConfig

    torch.manual_seed(0)
    flow = Flow(FlowConfig.cosyvoice2_0_5b()).eval()
    v = random_voice()
    state = flow.stream_start(v.speech_tokens[None], v.mel[None], v.embedding[None])
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 6561, (1, tokens + 3), generator=g) for _ in range(streams)]

    def blocks():
        return [flow.stream_prepare(state, t[:, :tokens], t[:, tokens:], final=False) for t in ids]

    def timed(fn) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        fn()
        return (time.perf_counter() - w) / steps, (time.process_time() - c) / steps

    lone, batched = blocks(), blocks()
    one = timed(lambda: [flow.euler_step([b]) for _ in range(steps) for b in lone])
    together = timed(lambda: [flow.euler_step(batched) for _ in range(steps)])
    diff = max(float((a.ode.x - b.ode.x).abs().max()) for a, b in zip(lone, batched))
    return {
        "streams": streams,
        "frames_per_block": lone[0].frames,
        "context_frames": 2 * state.n_tokens,
        "per_step_one_call_per_block": {"wall_s": round(one[0], 3), "cpu_s": round(one[1], 3)},
        "per_step_one_call_for_all": {"wall_s": round(together[0], 3), "cpu_s": round(together[1], 3)},
        "cpu_speedup": round(one[1] / together[1], 2),
        "mel_max_abs_diff_batched_vs_lone": diff,
        "torch_threads": torch.get_num_threads(),
    }


GEMM_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "quantized::linear_dynamic",
    "aten::convolution_overrideable",
    "aten::mkldnn_convolution",
)


def op_share() -> dict:
    """Where eager time goes: the share of self CPU time in GEMM/attention/conv kernels for a full-size LM
    decode step (batch 1, 120 cached positions) and one offline flow call (encoder and 10 ODE steps of the
    CFG pair, 3 s prompt + 4 s of speech). The rest (norms, activations, RoPE, copies, dispatch) is what
    operator fusion (``torch.compile``) could shrink; the GEMM kernels are the same library calls either way.
    """
    from torch.profiler import ProfilerActivity, profile

    models = random_full_size()
    lm, flow = models.lm, models.flow
    cache = lm.new_cache(1, 200)
    out = {}
    with torch.inference_mode():
        lm.step(torch.randn(1, 120, lm.cfg.hidden_size) * 0.1, cache, rows=[0])
        for _ in range(3):
            lm.decode_step([1], cache)
        v = random_voice()
        tokens = torch.randint(0, 6561, (1, 100))

        def flow_call():
            flow.inference(
                tokens, v.speech_tokens[None], v.mel[None], v.embedding[None], streaming=False, finalize=True
            )

        for name, fn, n in (
            ("lm_decode_step", lambda: lm.decode_step([1], cache), 20),
            ("flow_offline_4s_10_steps", flow_call, 1),
        ):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(n):
                    fn()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
            out[name] = {
                "ms_per_call": round(total / n / 1000, 2),
                "gemm_attention_conv_share": round(gemm / max(total, 1), 3),
                "top_ops": {e.key: round(e.self_cpu_time_total / max(total, 1), 3) for e in top},
            }
    return out


def run_variant(variant: str, quick: bool) -> dict:
    import cosyvoice2
    from cosyvoice2.api import CosyVoice2, speed_up
    from cosyvoice2.cpu import plan
    from cosyvoice2.engine import EngineOptions
    from cosyvoice2.errors import ModelLoadError

    out: dict = {"variant": variant}
    t = time.perf_counter()
    if variant == "default-model-quality":
        return out | {"compute_quality": default_model_quality()}
    if variant.startswith("default-model"):
        compute = "fast" if variant == "default-model-fast" else "exact"
        try:
            tts = cosyvoice2.load(compute=compute)
        except ModelLoadError as e:
            return {"variant": variant, "skipped": f"no default model: {e}"}
        voice = None
        texts = ["Hello, this is a quick test of the default voice.", "The weather is lovely today."]
        long_text = "Streaming speech synthesis turns text into audio while the text is still arriving."
    else:
        if variant == "flow-batch":
            return out | {"flow_batch": flow_batch_gain()}
        if variant == "op-share":
            return out | {"op_share": op_share()}
        if variant == "flow-levers":
            return out | {"flow_levers": flow_levers(quick)}
        if variant == "kernels":
            return out | {"kernels": kernels(5 if quick else 20)}
        if variant == "flow-blocks":
            return out | {"flow_blocks": flow_blocks(3 if quick else 7)}
        if variant == "compute-quality":
            return out | {"compute_quality": random_quality()}
        if variant not in VARIANTS and variant != "int8-quality":
            known = [*VARIANTS, *DEFAULT_VARIANTS, "int8-quality", "flow-batch", "op-share", "flow-levers"]
            known += ["flow-blocks"]
            raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(dict.fromkeys(known))}")
        models = random_full_size()
        if variant == "int8-quality":
            return out | {"int8_quality": int8_quality(models)}
        compute, options = VARIANTS[variant]
        chosen = plan(compute).with_overrides(options.get("lm_quant"), options.get("flow_quant"),
                                              options.get("flow_steps"), options.get("cfg_steps"),
                                              options.get("first_chunk_steps"),
                                              options.get("vocoder_quant"))  # fmt: skip
        speed_up(models, **chosen.load_options())
        tts = CosyVoice2(models, compute_plan=chosen)
        voice = random_voice()
        n = 4 if quick else 13  # characters -> 20 n speech tokens: 3.2 s / 10.4 s of speech
        long_text = "abcdefghijklmnopqrstuvwxyz"[:n]
        texts = ["abcdefgh"[: 3 if quick else 8], "ijklmnop"[: 3 if quick else 8]]  # 2.4 s / 6.4 s each
    out["build_s"] = round(time.perf_counter() - t, 1)
    out["plan"] = tts.compute_plan.as_dict() if tts.compute_plan is not None else None

    if tts.models.lm is not None:
        lm = tts.models.lm
        steps = 10 if quick else 30
        out["lm_ms_per_token"] = {
            "batch1": round(lm_ms_per_token(lm, 1, steps), 1),
            "batch4_per_step": round(lm_ms_per_token(lm, 4, steps), 1),
        }
        out["lm_ms_per_token"]["batch4_per_token"] = round(out["lm_ms_per_token"]["batch4_per_step"] / 4, 1)
        out["lm_prefill_ms_136_positions"] = round(prefill_ms(lm, 136), 1)

    # First packet: fresh voice (nothing cached) vs saved voice (prompt work cached), fast schedule.
    tts.engine.prompts.clear()
    fresh = first_packet(tts, long_text, voice, 1)
    saved = [first_packet(tts, long_text, voice, 2 + i) for i in range(1 if quick else 3)]
    out["first_packet"] = {
        "fresh_voice": fresh,
        "saved_voice": min(saved, key=lambda r: r["first_packet_s"])
        | {"all_s": [r["first_packet_s"] for r in saved]},
        "official_schedule_saved_voice": first_packet(tts, long_text, voice, 5, schedule="official"),
    }

    # Non-streaming: official offline flow (parity) and the fast path (cached prompt, chunked flow).
    out["synthesize_official_offline"] = synthesize_once(tts, long_text, voice, 1)
    out["synthesize_fast_saved_voice"] = synthesize_once(tts, long_text, voice, 1, schedule="fast")

    # Concurrency: the same kind of streams, 1 at a time vs 4 at once; 4 at once again without the flow
    # batcher (a second engine on the same models, its voice state computed before the run).
    texts4 = [texts[i % 2] for i in range(4)]
    c1 = concurrent_streams(tts, texts4[:1], voice)
    c4 = concurrent_streams(tts, texts4, voice)
    ratio = round(c4["audio_s_per_s"] / c1["audio_s_per_s"], 2)
    out["engine"] = tts.engine.stats()
    plain = CosyVoice2(tts.models, EngineOptions(flow_batch=False))
    plain.engine.warm_voice(plain.request(texts4[0], voice=voice))
    c4_plain = concurrent_streams(plain, texts4, voice)
    plain.close()
    out["concurrency"] = {
        "c1": c1,
        "c4": c4,
        "c4_over_c1": ratio,
        "c4_flow_batch_off": c4_plain,
        "c4_batched_over_unbatched": round(c4["audio_s_per_s"] / c4_plain["audio_s_per_s"], 2),
    }
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    tts.close()
    return out


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from cosyvoice2.cpu import detect, plan

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cpu_features": detect().as_dict(),
        "plans": {compute: plan(compute).as_dict() for compute in ("exact", "fast")},
        "cores": os.cpu_count(),
        "ram_gb": round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short utterances, fewer repeats")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.quick)))
        return

    report = {
        "machine": machine(),
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": [],
    }
    for variant in args.variants.split(","):
        load = os.getloadavg()[0]
        cmd = [sys.executable, str(HERE), "--worker", variant, "--threads", str(args.threads)]
        cmd += ["--quick"] if args.quick else []
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            result = {"variant": variant, "error": proc.stderr.strip().splitlines()[-5:]}
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        result |= {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
        result["process_s"] = round(time.perf_counter() - t, 1)
        report["results"].append(result)
        print(f"{variant}: done in {result['process_s']} s", file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
