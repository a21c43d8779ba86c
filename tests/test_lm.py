"""LM parity with the official Qwen2LM (fixtures/llm_small), KV-cache batching, converter and training.

Every shape, id, seed and length comes from the fixture files and their JSON, never from literals.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import load_pt

from cosyvoice2 import convert
from cosyvoice2.errors import InputError, ModelLoadError
from cosyvoice2.lm import (
    BistreamTrace,
    CosyVoice2LM,
    LMConfig,
    SamplingState,
    quantize_backbone_int8,
)

ATOL = 1e-4  # FIXTURES.md tolerance for LLM log-probs
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def llm_dir(fixtures: Path) -> Path:
    return fixtures / "llm_small"


@pytest.fixture(scope="module")
def official_cfg(llm_dir: Path) -> dict:
    return json.loads((llm_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def meta(llm_dir: Path) -> dict:
    return json.loads((llm_dir / "meta.json").read_text())


@pytest.fixture(scope="module")
def model(llm_dir: Path, official_cfg: dict) -> CosyVoice2LM:
    m = CosyVoice2LM(LMConfig.from_official(official_cfg, official_cfg["qwen2_config"])).eval()
    return convert.load_llm(m, llm_dir / "llm.pt")


def _prefix_embeds(model: CosyVoice2LM, tf: dict) -> torch.Tensor:
    return model.build_input(tf["text"], tf["prompt_text"], tf["prompt_speech_token"])


# ---- config ------------------------------------------------------------------------------------


def test_config_from_official(official_cfg: dict) -> None:
    q, llm, smp = (
        official_cfg["qwen2_config"],
        official_cfg["llm"]["args"],
        official_cfg["llm.sampling"]["args"],
    )
    cfg = LMConfig.from_official(official_cfg, q)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (
        q["vocab_size"],
        q["hidden_size"],
        q["num_hidden_layers"],
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        q["num_attention_heads"],
        q["num_key_value_heads"],
        q["hidden_size"] // q["num_attention_heads"],
    )
    assert cfg.speech_token_size == llm["speech_token_size"] and list(cfg.mix_ratio) == llm["mix_ratio"]
    assert (cfg.top_p, cfg.top_k, cfg.win_size, cfg.tau_r) == (
        smp["top_p"],
        smp["top_k"],
        smp["win_size"],
        smp["tau_r"],
    )
    bad = copy.deepcopy(official_cfg)
    bad["llm"]["args"]["llm_input_size"] = q["hidden_size"] + 1
    with pytest.raises(ModelLoadError, match="llm_input_size"):
        LMConfig.from_official(bad, q)


def test_full_size_key_map_matches_manifest(fixtures: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every official full-size key converts to our full-size model with the right shape."""
    # normal_ on a meta tensor first warms up torch's decomposition machinery (seconds); init values
    # are irrelevant on meta, so skip it.
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *args, **kwargs: t)
    manifest = fixtures.parent / "reference" / "manifest_llm.tsv"
    if not manifest.is_file():
        pytest.skip("reference manifest not available")
    sd = {}
    for line in manifest.read_text().splitlines()[1:]:
        key, shape = line.split("\t")[:2]
        sd[key] = torch.empty(json.loads(shape), device="meta")
    with torch.device("meta"):
        ours = CosyVoice2LM(LMConfig.cosyvoice2_0_5b()).state_dict()
    converted = convert.rename(sd, convert.LLM_RULES, "manifest")
    for t in convert.LLM_TRANSFORMS:
        converted = t(converted)
    assert sorted(converted) == sorted(ours)
    assert all(converted[k].shape == v.shape for k, v in ours.items())


# ---- teacher forcing -------------------------------------------------------------------------------


def test_teacher_forced_kvcache(model: CosyVoice2LM, llm_dir: Path) -> None:
    tf = load_pt(llm_dir / "teacher_forced.pt")
    x = _prefix_embeds(model, tf)
    assert x.shape[1] == int(tf["prefix_len"])
    with torch.inference_mode():
        cache = model.new_cache(1, 4)  # deliberately small: exercises growth by doubling
        rows = [model.step(x, cache)[0]]
        for tok in tf["forced_speech_token"][0].tolist():
            rows.append(model.decode_step([tok], cache)[0])
    logp = torch.stack(rows)
    assert logp.shape == tf["logp_kvcache"].shape
    torch.testing.assert_close(logp, tf["logp_kvcache"], atol=ATOL, rtol=0)


def test_teacher_forced_full_forward(model: CosyVoice2LM, llm_dir: Path) -> None:
    tf = load_pt(llm_dir / "teacher_forced.pt")
    prefix_len = int(tf["prefix_len"])
    forced = model.embed_speech(tf["forced_speech_token"])
    with torch.inference_mode():
        x = torch.cat([_prefix_embeds(model, tf)[0], forced])[None]
        logp = model.speech_logp(model.forward_embeds(x))[0, prefix_len - 1 :]
    assert logp.shape == tf["logp_full_forward"].shape
    torch.testing.assert_close(logp, tf["logp_full_forward"], atol=ATOL, rtol=0)


# ---- sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["zero_shot", "no_prompt", "instruct2"])
def test_sampled_tokens_identical(model: CosyVoice2LM, llm_dir: Path, meta: dict, case: str) -> None:
    s = load_pt(llm_dir / "sampled.pt")
    rec = meta["sampled"][case]
    state = SamplingState.for_text(s["text"].numel(), model.cfg, torch.Generator().manual_seed(rec["seed"]))
    assert (state.min_len, state.max_len) == (rec["min_len"], rec["max_len"])
    out = list(
        model.generate(
            s["text"], s.get(f"prompt_text_{case}"), s.get(f"prompt_speech_token_{case}"), state=state
        )
    )
    assert out == s[f"out_{case}"].tolist() == rec["tokens"]
    assert state.redraws == rec["ras_redraws"]
    assert state.stopped_by_stop_id == (rec["stopped_by"] == "stop token")
    if rec["stopped_by"] == "max_len":
        assert len(out) == rec["max_len"]


def test_generator_matches_global_rng(model: CosyVoice2LM, llm_dir: Path, meta: dict) -> None:
    """No generator = the global one; both streams agree for the same seed (and the global is untouched)."""
    s = load_pt(llm_dir / "sampled.pt")
    rec = meta["sampled"]["zero_shot"]
    args = (s["text"], s["prompt_text_zero_shot"], s["prompt_speech_token_zero_shot"])
    torch.manual_seed(rec["seed"])
    from_global = list(model.generate(*args))
    assert from_global == rec["tokens"]
    torch.manual_seed(rec["seed"])
    before = torch.get_rng_state()
    list(model.generate(*args, generator=torch.Generator().manual_seed(rec["seed"])))
    assert torch.equal(before, torch.get_rng_state())


def test_bad_input_raises(model: CosyVoice2LM, official_cfg: dict) -> None:
    vocab = official_cfg["qwen2_config"]["vocab_size"]
    with pytest.raises(InputError, match="text"):
        list(model.generate([vocab]))
    with pytest.raises(InputError, match="no tokens"):
        list(model.generate([]))
    with pytest.raises(InputError, match="prompt_speech"):
        list(model.generate([0], prompt_speech=[model.cfg.speech_token_size]))


# ---- bistream ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["single", "grouped"])
def test_bistream_identical(model: CosyVoice2LM, llm_dir: Path, meta: dict, case: str) -> None:
    b = load_pt(llm_dir / "bistream.pt")
    rec = meta["bistream"][case]
    stream = b["stream_text"][0]
    bounds = torch.tensor([0, *rec["text_groups"]]).cumsum(0).tolist()
    chunks = [stream[i:j][None] for i, j in zip(bounds[:-1], bounds[1:])]  # [1, n] slices, like the fixture
    trace = BistreamTrace()
    gen = torch.Generator().manual_seed(rec["seed"])
    out = list(
        model.generate_bistream(iter(chunks), b["prompt_text"], b["prompt_speech_token"], gen, trace=trace)
    )
    assert out == b[f"out_{case}"].tolist()
    assert trace.decisions == b[f"decisions_{case}"].tolist() == rec["decisions_incl_fill_eos"]
    assert [i for i, d in enumerate(trace.decisions) if d == model.cfg.fill_id] == rec[
        "fill_positions_in_decisions"
    ]
    assert trace.calls == [(c["input_len"], c["past_len"]) for c in rec["backbone_calls"]]


def test_bistream_fill_after_text_end_is_drawn_again(model: CosyVoice2LM, llm_dir: Path) -> None:
    """The official loop raises when the model asks for more text after the text ended; we draw again
    among the allowed ids (speech ids, EOS), so a weak model does not fail the whole request."""
    b = load_pt(llm_dir / "bistream.pt")
    m = copy.deepcopy(model)
    with torch.no_grad():  # make FILL the most likely output everywhere: the tail would sample it
        m.speech_head.bias[m.cfg.fill_id] = 1e4
    chunks = [t[None] for t in b["stream_text"][0]]
    gen = torch.Generator().manual_seed(0)
    trace = BistreamTrace()
    out = list(
        m.generate_bistream(
            iter(chunks), b["prompt_text"], b["prompt_speech_token"], gen, max_tail_tokens=20, trace=trace
        )
    )
    assert out and all(0 <= t < m.cfg.speech_token_size for t in out)
    fills = [i for i, d in enumerate(trace.decisions) if d == m.cfg.fill_id]
    tail = trace.decisions[max(fills) + 1 :]  # the text phase ends on a FILL; after it, none
    assert tail and m.cfg.fill_id not in tail


def test_bistream_tail_cap(model: CosyVoice2LM, llm_dir: Path, meta: dict) -> None:
    b = load_pt(llm_dir / "bistream.pt")
    rec = meta["bistream"]["single"]
    chunks = [t[None] for t in b["stream_text"][0]]
    fills = rec["fill_positions_in_decisions"]
    emitted_before_tail = max(fills) + 1 - len(fills)  # the text phase always ends on a FILL decision
    gen = torch.Generator().manual_seed(rec["seed"])
    out = list(
        model.generate_bistream(
            iter(chunks), b["prompt_text"], b["prompt_speech_token"], gen, max_tail_tokens=1
        )
    )
    assert out == rec["tokens"][: emitted_before_tail + 1]


# ---- batched KV cache ------------------------------------------------------------------------------


def test_batched_decode_equals_single(model: CosyVoice2LM, llm_dir: Path) -> None:
    """3 rows with different prefix lengths decode together exactly like 3 separate requests."""
    tf = load_pt(llm_dir / "teacher_forced.pt")
    full = _prefix_embeds(model, tf)[0]
    forced = tf["forced_speech_token"][0].tolist()
    n = full.shape[0]
    cuts = [n, n - n // 3, n // 2]  # three different prefix lengths
    steps = len(forced) // 2
    with torch.inference_mode():
        singles = []
        for cut in cuts:
            cache = model.new_cache(1, cut + steps)
            rows = [model.step(full[None, :cut], cache)[0]]
            rows += [model.decode_step([t], cache)[0] for t in forced[:steps]]
            singles.append(torch.stack(rows))
        # batched: a stale row first (reset, then reused), prefills one row at a time, then joint decode
        cache = model.new_cache(len(cuts), 8)
        model.step(full[None, : n // 4], cache, rows=[1])
        cache.reset_row(1)
        first = [model.step(full[None, :cut], cache, rows=[r])[0] for r, cut in enumerate(cuts)]
        batched = [torch.stack(first)]
        for t in forced[:steps]:
            batched.append(model.decode_step([t] * len(cuts), cache))
        batched = torch.stack(batched, dim=1)  # [rows, steps+1, V]
        for r in range(len(cuts)):
            torch.testing.assert_close(batched[r], singles[r], atol=BATCH_ATOL, rtol=0)
        assert cache.lengths.tolist() == [cut + steps for cut in cuts]
        # a subset of rows in another order advances only those rows
        sub = model.decode_step([forced[steps]] * 2, cache, rows=[2, 0])
        ref = []
        for cut in (cuts[2], cuts[0]):
            c1 = model.new_cache(1, 2)
            model.step(torch.cat([full[:cut], model.embed_speech(forced[:steps])])[None], c1)
            ref.append(model.decode_step([forced[steps]], c1)[0])
        torch.testing.assert_close(sub, torch.stack(ref), atol=BATCH_ATOL, rtol=0)
        assert cache.lengths.tolist() == [cuts[0] + steps + 1, cuts[1] + steps, cuts[2] + steps + 1]


def test_batched_ragged_prefill(model: CosyVoice2LM, llm_dir: Path) -> None:
    """Several positions for several rows at once, each row at its own offset."""
    tf = load_pt(llm_dir / "teacher_forced.pt")
    full = _prefix_embeds(model, tf)[0]
    n, k = full.shape[0], 3
    starts = [n - k, n // 2]
    with torch.inference_mode():
        cache = model.new_cache(2, n)
        for r, s in enumerate(starts):
            model.step(full[None, :s], cache, rows=[r])
        h = model.forward_embeds(torch.stack([full[s : s + k] for s in starts]), cache)
        for r, s in enumerate(starts):
            ref = model.forward_embeds(full[None, : s + k])[0, s:]
            torch.testing.assert_close(h[r], ref, atol=BATCH_ATOL, rtol=0)


# ---- converter -------------------------------------------------------------------------------------


def _load(model: CosyVoice2LM, sd: dict) -> None:
    convert.load_into(copy.deepcopy(model), sd, "llm.pt", convert.LLM_RULES, convert.LLM_TRANSFORMS)


def test_converter_errors(model: CosyVoice2LM, llm_dir: Path) -> None:
    sd = convert.load_checkpoint(llm_dir / "llm.pt")
    plain = "llm_decoder.bias"  # a key that maps 1:1
    fused_part = next(k for k in sd if k.endswith("self_attn.k_proj.weight"))
    layer = fused_part.split(".layers.")[1].split(".")[0]

    missing = {k: v for k, v in sd.items() if k != plain}
    with pytest.raises(ModelLoadError, match="missing key 'speech_head.bias'"):
        _load(model, missing)
    missing = {k: v for k, v in sd.items() if k != fused_part}
    with pytest.raises(
        ModelLoadError, match=rf"missing key 'backbone\.layers\.{layer}\.attn\.k_proj\.weight'"
    ):
        _load(model, missing)

    with pytest.raises(ModelLoadError, match="unexpected key 'llm.extra.weight'"):
        _load(model, {**sd, "llm.extra.weight": torch.zeros(1)})

    bad = dict(sd)
    bad[plain] = torch.zeros(sd[plain].shape[0] + 1)
    with pytest.raises(ModelLoadError, match="key 'speech_head.bias' has shape"):
        _load(model, bad)
    bad = dict(sd)
    bad[fused_part] = torch.zeros(sd[fused_part].shape[0], sd[fused_part].shape[1] + 1)
    with pytest.raises(ModelLoadError, match=rf"'backbone\.layers\.{layer}\.attn\.k_proj\.weight' has shape"):
        _load(model, bad)
    bad = dict(sd)
    bad[fused_part] = torch.zeros(sd[fused_part].shape[0] + 1, sd[fused_part].shape[1])
    with pytest.raises(ModelLoadError, match=rf"backbone\.layers\.{layer}\.attn\.qkv\.weight' has shape"):
        _load(model, bad)


# ---- training --------------------------------------------------------------------------------------


def _tiny_cfg(cfg: LMConfig) -> LMConfig:
    return LMConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=1,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        speech_token_size=cfg.speech_token_size,
        mix_ratio=cfg.mix_ratio,
    )


def test_train_layouts(model: CosyVoice2LM) -> None:
    cfg = model.cfg
    n_txt, n_sp = cfg.mix_ratio
    n_text = 2 * n_txt + 2
    n_speech = (n_sp // n_txt + 1) * n_text
    text, speech = torch.arange(n_text), torch.arange(n_speech)
    with torch.no_grad():
        x, y, is_text = model.train_example(text, speech, bistream=False)
        assert x.shape == (n_text + n_speech + 2, cfg.hidden_size) and y.shape == (x.shape[0],)
        assert (y[: n_text + 1] == -1).all() and y[n_text + 1 :].tolist() == speech.tolist() + [cfg.eos_id]
        assert is_text.tolist() == [False] + [True] * n_text + [False] * (n_speech + 1)
        x, y, is_text = model.train_example(text, speech, bistream=True)
        assert x.shape == (n_text + n_speech + 2, cfg.hidden_size) and y.shape == (x.shape[0],)
        ys = y.tolist()
        assert ys.count(cfg.fill_id) == n_text // n_txt and ys[-1] == cfg.eos_id
        first_block = ys[1 : 1 + n_txt + n_sp]
        assert first_block == [-1] * (n_txt - 1) + speech[:n_sp].tolist() + [cfg.fill_id]
        torch.testing.assert_close(
            x[1 + n_txt], model.speech_embedding.weight[0]
        )  # first speech id of the first block
        assert sorted(t for t in ys if 0 <= t < cfg.speech_token_size) == speech.tolist()
        torch.testing.assert_close(x[is_text], model.backbone.embed_tokens(text))  # the text, in order


def test_forward_train_loss_decreases(model: CosyVoice2LM) -> None:
    torch.manual_seed(0)
    m = CosyVoice2LM(_tiny_cfg(model.cfg))
    n_txt, n_sp = m.cfg.mix_ratio
    B, lt = 3, 2 * n_txt
    ls = (n_sp // n_txt + 1) * lt
    text = torch.randint(0, m.cfg.vocab_size, (B, lt))
    speech = torch.randint(0, m.cfg.speech_token_size, (B, ls))
    text_len, speech_len = torch.tensor([lt, lt - 1, n_txt]), torch.tensor([ls, ls - 3, ls // 2])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        out = m.forward_train(text, text_len, speech, speech_len, rng=random.Random(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert out["n_tokens"] > 0 and 0.0 <= out["acc"].item() <= 1.0
    assert losses[-1] < losses[0] * 0.8, losses


def test_int8_speed_mode_stays_close(model: CosyVoice2LM, llm_dir: Path) -> None:
    """The opt-in int8 backbone keeps the next-token distributions close to fp32 (not identical)."""
    tf = load_pt(llm_dir / "teacher_forced.pt")
    q = quantize_backbone_int8(copy.deepcopy(model))
    with torch.inference_mode():
        x = torch.cat([_prefix_embeds(model, tf)[0], model.embed_speech(tf["forced_speech_token"])])[None]
        p_ref = model.speech_logp(model.forward_embeds(x))[0].exp()
        p_q = q.speech_logp(q.forward_embeds(x))[0].exp()
        total_variation = 0.5 * (p_ref - p_q).abs().sum(-1)
        assert total_variation.mean() < 0.2, total_variation
        cache = q.new_cache(1, 4)
        q.step(x, cache)
        assert q.decode_step([0], cache).isfinite().all()
