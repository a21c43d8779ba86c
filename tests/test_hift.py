"""HiFT vocoder vs the official golden fixtures (fixtures/hift_small), converter rules and streaming joins.

Every size, seed and length is read from the fixture files and their config/meta JSON.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_pt

from cosyvoice2 import convert
from cosyvoice2.errors import InputError, ModelLoadError
from cosyvoice2.hift import HiFT, HiFTConfig, VocoderStream, apply_weight_norm, remove_weight_norm

ATOL_F0 = 1e-3  # FIXTURES.md "Observed tolerances"
ATOL_AUDIO = 5e-4


@pytest.fixture(scope="module")
def hift_dir(fixtures: Path) -> Path:
    return fixtures / "hift_small"


@pytest.fixture(scope="module")
def official_cfg(hift_dir: Path) -> dict:
    return json.loads((hift_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def seeds(hift_dir: Path) -> dict[str, int]:
    return json.loads((hift_dir / "meta.json").read_text())["seeds"]


@pytest.fixture(scope="module")
def hift(hift_dir: Path, official_cfg: dict) -> HiFT:
    model = HiFT(HiFTConfig.from_official(official_cfg)).eval()
    convert.load_hift(model, hift_dir / "hift.pt")
    return model


def official_join(chunks: list[torch.Tensor], n_overlap: int) -> list[torch.Tensor]:
    """The official emission rule written out independently: fade each new output's head over the
    previous tail with np.hamming (float64 maths, like the official numpy window); hold back the tail
    unless final."""
    window = torch.from_numpy(np.hamming(2 * n_overlap))
    out, tail = [], None
    for i, speech in enumerate(chunks):
        if tail is not None:
            speech = speech.clone()
            head = speech[:, :n_overlap].double() * window[:n_overlap] + tail.double() * window[n_overlap:]
            speech[:, :n_overlap] = head.float()
        if i == len(chunks) - 1:
            out.append(speech)
        else:
            tail = speech[:, -n_overlap:]
            out.append(speech[:, :-n_overlap])
    return out


# -- config -----------------------------------------------------------------------------------------


def test_config_from_official(official_cfg: dict):
    cfg = HiFTConfig.from_official(official_cfg)
    a = official_cfg["hift"]["args"]
    assert cfg.base_channels == a["base_channels"]
    assert cfg.upsample_rates == tuple(a["upsample_rates"])
    assert cfg.resblock_dilation_sizes == tuple(tuple(d) for d in a["resblock_dilation_sizes"])
    assert cfg.f0_cond_channels == official_cfg["hift.f0_predictor"]["args"]["cond_channels"]
    assert cfg.samples_per_frame == int(np.prod(a["upsample_rates"])) * a["istft_params"]["hop_len"]
    broken = json.loads(json.dumps(official_cfg))
    del broken["hift"]["args"]["upsample_rates"]
    with pytest.raises(ModelLoadError, match="upsample_rates"):
        HiFTConfig.from_official(broken)


def test_full_size_keys_and_shapes_match_manifest(fixtures: Path):
    """The released hift.pt layout (every key and shape) converts into cosyvoice2_0_5b()."""
    manifest = fixtures.parent / "reference" / "manifest_hift.tsv"
    if not manifest.is_file():
        pytest.skip(f"no manifest at {manifest}")
    with manifest.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    sd = {r["key"]: torch.empty(json.loads(r["shape"]), device="meta") for r in rows}  # shapes only
    model = HiFT(HiFTConfig.cosyvoice2_0_5b()).to("meta")
    convert.load_into(model, sd, "manifest_hift.tsv", convert.HIFT_RULES, convert.HIFT_TRANSFORMS)


# -- deterministic parts ----------------------------------------------------------------------------


def test_f0(hift: HiFT, hift_dir: Path):
    d = load_pt(hift_dir / "f0.pt")
    with torch.no_grad():
        f0 = hift.f0(d["mel"])
    torch.testing.assert_close(f0, d["f0"], atol=ATOL_F0, rtol=0)


def test_decode(hift: HiFT, hift_dir: Path):
    d = load_pt(hift_dir / "decode.pt")
    with torch.no_grad():
        for src, ref in [("source_from_inference", "speech_from_inference_source"),
                         ("source_synthetic", "speech_from_synthetic_source")]:  # fmt: skip
            torch.testing.assert_close(hift.decode(d["mel"], d[src]), d[ref], atol=ATOL_AUDIO, rtol=0)


# -- random parts -----------------------------------------------------------------------------------


def test_inference_seeded(hift: HiFT, hift_dir: Path, seeds: dict[str, int]):
    d = load_pt(hift_dir / "inference.pt")
    torch.manual_seed(seeds["hift_inference"])
    speech, source = hift.inference(d["mel"])
    torch.testing.assert_close(source, d["source"], atol=ATOL_AUDIO, rtol=0)
    torch.testing.assert_close(speech, d["speech"], atol=ATOL_AUDIO, rtol=0)
    assert speech.shape[-1] == d["mel"].shape[-1] * hift.cfg.samples_per_frame
    assert speech.abs().max() <= hift.cfg.audio_limit


def test_explicit_generator_equals_global_seed(hift: HiFT, hift_dir: Path, seeds: dict[str, int]):
    mel = load_pt(hift_dir / "inference.pt")["mel"]
    seed = seeds["hift_inference"]
    torch.manual_seed(seed)
    speech_a, source_a = hift.inference(mel)
    torch.manual_seed(seed + 1)  # the global state must not matter when a generator is given
    speech_b, source_b = hift.inference(mel, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(source_a, source_b) and torch.equal(speech_a, speech_b)
    # ... and the draws consume the generator exactly like the global one (next call stays in step).
    g = torch.Generator().manual_seed(seed)
    hift.inference(mel, generator=g)
    torch.manual_seed(seed)
    hift.inference(mel)
    assert torch.equal(g.get_state(), torch.get_rng_state())


def test_stream_cache_source(hift: HiFT, hift_dir: Path, seeds: dict[str, int]):
    d = load_pt(hift_dir / "stream_cache_source.pt")
    torch.manual_seed(seeds["hift_stream_chunk1"])
    speech1, source1 = hift.inference(d["mel_chunk1"])
    torch.testing.assert_close(speech1, d["speech_chunk1"], atol=ATOL_AUDIO, rtol=0)
    torch.testing.assert_close(source1, d["source_chunk1"], atol=ATOL_AUDIO, rtol=0)

    n = d["cache_source"].shape[-1]
    torch.manual_seed(seeds["hift_stream_chunk2"])
    speech2, source2 = hift.inference(d["mel_chunk2"], cache_source=d["cache_source"])
    assert torch.equal(source2[..., :n], d["cache_source"])
    torch.testing.assert_close(source2, d["source_chunk2"], atol=ATOL_AUDIO, rtol=0)
    torch.testing.assert_close(speech2, d["speech_chunk2"], atol=ATOL_AUDIO, rtol=0)


# -- streaming --------------------------------------------------------------------------------------


def test_stream_step_reproduces_fixture_chunks(hift: HiFT, hift_dir: Path, seeds: dict[str, int]):
    """stream_step over the fixture's two chunks = the official joining of the fixture's chunk outputs."""
    d = load_pt(hift_dir / "stream_cache_source.pt")
    n_overlap = d["cache_source"].shape[-1]
    assert hift.cfg.stream_cache_samples == n_overlap
    n_frames = hift.cfg.stream_mel_cache_frames
    assert torch.equal(d["mel_chunk2"][..., :n_frames], d["mel_chunk1"][..., -n_frames:])

    state = VocoderStream()
    audio1, state = hift.stream_step(
        state,
        d["mel_chunk1"],
        final=False,
        generator=torch.Generator().manual_seed(seeds["hift_stream_chunk1"]),
    )
    assert torch.equal(state.mel, d["mel_chunk1"][..., -n_frames:])
    torch.testing.assert_close(state.source, d["cache_source"], atol=ATOL_AUDIO, rtol=0)
    audio2, state = hift.stream_step(
        state,
        d["mel_chunk2"][..., n_frames:],
        final=True,
        generator=torch.Generator().manual_seed(seeds["hift_stream_chunk2"]),
    )
    assert state.done
    expected = official_join([d["speech_chunk1"], d["speech_chunk2"]], n_overlap)
    torch.testing.assert_close(audio1, expected[0], atol=ATOL_AUDIO, rtol=0)
    torch.testing.assert_close(audio2, expected[1], atol=ATOL_AUDIO, rtol=0)


def test_stream_step_follows_official_rule(hift: HiFT, hift_dir: Path, seeds: dict[str, int]):
    """Several chunks: same as a direct chunk-by-chunk computation, full length, no spikes at the joins."""
    d = load_pt(hift_dir / "stream_cache_source.pt")
    n_frames = hift.cfg.stream_mel_cache_frames
    n_overlap = hift.cfg.stream_cache_samples
    mel = torch.cat([d["mel_chunk1"], d["mel_chunk2"][..., n_frames:]], dim=2)  # [1, M, T]
    T = mel.shape[-1]
    bounds = [0, max(n_frames, T // 4), T // 2, (3 * T) // 4, T]
    pieces = [mel[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    seed = seeds["hift_stream_chunk1"]

    # Direct: the official token2wav rule with inference() calls, drawing from one generator in order.
    g = torch.Generator().manual_seed(seed)
    outputs, cache_mel, cache_source = [], None, None
    for piece in pieces:
        chunk = piece if cache_mel is None else torch.cat([cache_mel, piece], dim=2)
        speech, source = hift.inference(chunk, cache_source=cache_source, generator=g)
        cache_mel, cache_source = chunk[..., -n_frames:], source[..., -n_overlap:]
        outputs.append(speech)
    expected = official_join(outputs, n_overlap)

    g = torch.Generator().manual_seed(seed)
    state, emitted = VocoderStream(), []
    for i, piece in enumerate(pieces):
        audio, state = hift.stream_step(state, piece, final=i == len(pieces) - 1, generator=g)
        emitted.append(audio)
    for got, want in zip(emitted, expected):
        assert torch.equal(got, want)
    audio = torch.cat(emitted, dim=1)[0]
    assert audio.shape[0] == T * hift.cfg.samples_per_frame

    # No discontinuity: the sample steps across each join stay within the signal's own largest step.
    steps = audio.diff().abs()
    joins = np.cumsum([a.shape[1] for a in emitted[:-1]])
    at_joins = steps[joins - 1]
    mask = torch.ones_like(steps, dtype=torch.bool)
    mask[joins - 1] = False
    assert at_joins.max() <= steps[mask].max()


def test_stream_step_input_errors(hift: HiFT, hift_dir: Path):
    mel = load_pt(hift_dir / "f0.pt")["mel"]
    n_frames = hift.cfg.stream_mel_cache_frames
    with pytest.raises(InputError, match="at least"):
        hift.stream_step(VocoderStream(), mel[..., : n_frames - 1], final=False)
    empty, state = hift.stream_step(VocoderStream(), mel[..., :0], final=True)
    assert empty.shape == (mel.shape[0], 0) and state.done
    with pytest.raises(InputError, match="finished"):
        hift.stream_step(state, mel, final=True)
    with pytest.raises(InputError, match="mel must be"):
        hift.inference(mel[:, :-1])
    with pytest.raises(InputError, match="cache_source"):
        too_long = torch.zeros(mel.shape[0], 1, mel.shape[-1] * hift.cfg.samples_per_frame + 1)
        hift.inference(mel, cache_source=too_long)


# -- converter and weight norm ----------------------------------------------------------------------


def _legacy_form(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    suffix = {
        ".parametrizations.weight.original0": ".weight_g",
        ".parametrizations.weight.original1": ".weight_v",
    }
    out = {}
    for k, v in sd.items():
        for old, new in suffix.items():
            if k.endswith(old):
                k = k[: -len(old)] + new
        out[k] = v
    return out


def test_converter_accepts_legacy_weight_norm(hift: HiFT, hift_dir: Path, tmp_path: Path):
    sd = load_pt(hift_dir / "hift.pt")
    legacy = _legacy_form(sd)
    assert legacy.keys() != sd.keys() and any(k.endswith(".weight_g") for k in legacy)
    path = tmp_path / "hift_legacy.pt"
    torch.save({f"generator.{k}": v for k, v in legacy.items()}, path)  # + a HiFiGan training prefix
    model = HiFT(hift.cfg).eval()
    convert.load_hift(model, path)
    ref = hift.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("damage", ["missing", "extra", "shape", "half_pair"])
def test_converter_rejects_bad_checkpoint(hift: HiFT, hift_dir: Path, tmp_path: Path, damage: str):
    sd = dict(load_pt(hift_dir / "hift.pt"))
    if damage == "missing":
        key = next(k for k in sd if k.startswith("source_downs.") and k.endswith(".bias"))
        del sd[key]
    elif damage == "extra":
        key = "ups.0.unexpected_buffer"
        sd[key] = torch.zeros(1)
    elif damage == "shape":
        key = next(k for k in sd if k.startswith("conv_post.") and k.endswith(".bias"))
        sd[key] = torch.zeros(sd[key].shape[0] + 1)
    else:
        wn = next(k for k in sd if k.endswith(".parametrizations.weight.original0"))
        del sd[wn]
        key = wn.split(".parametrizations")[0]
    path = tmp_path / f"{damage}.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        convert.load_hift(HiFT(hift.cfg), path)


def test_weight_norm_round_trip(hift: HiFT, hift_dir: Path):
    """Training weight norm reproduces the folded weights, uses the official key names, and folds back."""
    model = HiFT(hift.cfg).eval()
    model.load_state_dict(hift.state_dict())
    apply_weight_norm(model)
    official = {k.replace("m_source.l_linear", "source.merge") for k in load_pt(hift_dir / "hift.pt")}
    assert set(model.state_dict()) == official
    d = load_pt(hift_dir / "decode.pt")
    with torch.no_grad():
        ref = hift.decode(d["mel"], d["source_synthetic"])
        torch.testing.assert_close(model.decode(d["mel"], d["source_synthetic"]), ref, atol=1e-5, rtol=0)
    remove_weight_norm(model)
    assert set(model.state_dict()) == set(hift.state_dict())
