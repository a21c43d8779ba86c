"""Text frontend: the Qwen2 BPE tokenizer with CosyVoice 2's special tokens, text normalisation and splitting.

The file reads in four parts:

1. ``TextTokenizer``: byte-level BPE built with the ``tokenizers`` library from a CosyVoice-BlankEN directory
   (vocab.json, merges.txt, tokenizer_config.json), with the base added tokens and CosyVoice 2's extra
   specials appended in the official order so every id matches (SPEC §3.3).
2. ``normalize``: the official ``text_normalize`` reproduced rule for rule (SPEC §3.2): the ``<|…|>``
   switch, the Chinese and the non-Chinese branch, ``split_paragraph`` and the punctuation-only filter.
   The wetext backend reproduces the official pin, wetext 0.0.4 (it only rewrites text that contains a
   digit); wetext 0.1.8's own behaviour can be chosen instead.
3. ``prepare_text``: what the engine calls on user text. Same results as ``normalize`` on ordinary input,
   plus what the official code lacks: clear errors, control characters removed, tags kept whole, and
   over-long sentences cut so that no piece outgrows the limits of the official merge.
4. ``StreamingNormalizer``: text that arrives piece by piece (an LLM's output) is cut at sentence or clause
   boundaries and normalised per segment, so the concatenated output equals normalising the whole text.

Lengths: Chinese text is measured in characters, other text in Qwen tokens (as the official code does).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from cosyvoice2.errors import InputError, ModelLoadError

# ----------------------------------------------------------------------------------------------------------
# 1. Tokenizer
# ----------------------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, and whitespace that is not followed by a word.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
ENDOFPROMPT = "<|endofprompt|>"

# CosyVoice2Tokenizer's add_special_tokens: eos (= pad), then the additional specials in this order.
# Tokens that already exist keep their id; the rest get consecutive ids after the base vocabulary.
COSYVOICE2_SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    "<|im_start|>",
    "<|im_end|>",
    ENDOFPROMPT,
    "[breath]",
    "<strong>",
    "</strong>",
    "[noise]",
    "[laughter]",
    "[cough]",
    "[clucking]",
    "[accent]",
    "[quick_breath]",
    "<laughter>",
    "</laughter>",
    "[hissing]",
    "[sigh]",
    "[vocalized-noise]",
    "[lipsmack]",
    "[mn]",
)

# The paralinguistic tags a user may write in tts text (everything that is not a <|…|> control token).
FINE_GRAINED_TAGS: tuple[str, ...] = tuple(t for t in COSYVOICE2_SPECIAL_TOKENS if not t.startswith("<|"))

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")

# What the BPE reads. "bpe": the text itself (official directories: no ``text_units`` key). The other units
# are for this project's small default model only, whose LM learns from a few hours of speech:
#   "pinyin": runs of Chinese characters become toned pinyin syllables first. A small LM cannot learn a
#     pronunciation per character from byte pieces (2645 distinct characters in 2000 training utterances,
#     997 of them seen once), but ~400 syllables it can.
#   "phonemes": the whole text becomes the phonemes misaki's G2P gives (espeak-ng for English, pinyin -> IPA
#     with tone arrows for Chinese): what the Kokoro teacher of the default corpus spoke and what the default
#     speech tokenizer's CTC head was trained to read from its codes, so that the LM only has to learn
#     durations and voice, not English spelling.
TEXT_UNITS = ("bpe", "pinyin", "phonemes")
_HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_LATIN = re.compile(r"[A-Za-z]")


def _pinyin_module() -> Any:
    try:
        import pypinyin
    except ImportError as exc:  # a core dependency; only a broken install lacks it
        raise ModelLoadError(
            "this tokenizer reads pinyin (text_units = 'pinyin'): pip install pypinyin"
        ) from exc
    return pypinyin


@functools.cache
def misaki_g2p(lang: str, accent: str = "en-us") -> Callable[[str], tuple[str, Any]]:
    """misaki's phonemiser (one per process and language): espeak-ng for English in ``accent``, pinyin ->
    IPA with tone arrows for Chinese. Called as ``g2p(text) -> (phonemes, _)``."""
    try:
        if lang == "en":
            from misaki.espeak import EspeakG2P

            return EspeakG2P(language=accent)
        if lang == "zh":
            import logging

            import jieba

            jieba.setLogLevel(logging.WARNING)
            from misaki.zh import ZHG2P

            return ZHG2P()
    except ImportError as exc:  # core dependencies; only a broken install lacks them
        raise ModelLoadError(
            f"phoneme text units need misaki's {lang} G2P: "
            f"pip install misaki phonemizer-fork espeakng-loader jieba cn2an ({exc})"
        ) from exc
    raise ValueError(f"misaki G2P: unsupported language {lang!r}")


def _phonemes(text: str) -> str:
    """Plain text (no tags) -> phonemes: Han runs through the Chinese G2P, runs with Latin letters through
    the English one, anything else (spaces, punctuation, digits left by normalisation) unchanged."""
    out = []
    runs = _HAN_RUN.findall(text)
    for i, piece in enumerate(_HAN_RUN.split(text)):
        if i:  # Han run i - 1 preceded this piece
            out.append(misaki_g2p("zh")(runs[i - 1])[0])
        if not _LATIN.search(piece):
            out.append(piece)
            continue
        # espeak strips the whitespace around its input; word boundaries next to a Han run matter
        core = piece.strip()
        lead, trail = piece[: len(piece) - len(piece.lstrip())], piece[len(piece.rstrip()) :]
        out.append(lead + misaki_g2p("en")(core)[0] + trail)
    return "".join(out)


def to_units(text: str, units: str) -> str:
    """``text`` as the BPE of a tokenizer with these ``text_units`` reads it.

    "pinyin": each run of Han characters becomes its syllables with tone digits (neutral tone 5), spaced
    off from the text around it: "白日依山尽，" -> " bai2 ri4 yi1 shan1 jin4 ，". Whole runs go to pypinyin so
    that its phrase table picks the reading of polyphones; everything else, tags included, is unchanged.
    "phonemes": ``_phonemes`` between the special tokens and tags, which stay as they are.
    """
    if units == "phonemes":
        parts = _SPECIAL_SPLIT.split(text)  # tags at odd indices
        return "".join(p if i % 2 else _phonemes(p) for i, p in enumerate(parts))
    if units == "bpe" or not _HAN_RUN.search(text):
        return text
    pypinyin = _pinyin_module()

    def syllables(m: re.Match[str]) -> str:
        pys = pypinyin.lazy_pinyin(m.group(0), style=pypinyin.Style.TONE3, neutral_tone_with_five=True)
        return " " + " ".join(pys) + " "

    return _HAN_RUN.sub(syllables, text)


class TextTokenizer:
    """Qwen2 byte-level BPE plus CosyVoice 2's specials; ids identical to the official tokenizer."""

    def __init__(self, tokenizer: Tokenizer, units: str = "bpe") -> None:
        self._tk = tokenizer
        self.units = units  # TEXT_UNITS: what the BPE reads (``to_units``)
        specials = {}
        for token in COSYVOICE2_SPECIAL_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ModelLoadError(f"tokenizer lacks the CosyVoice 2 special token {token!r}")
            specials[token] = token_id
        self._specials = specials

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Build from a CosyVoice-BlankEN-style directory (vocab.json, merges.txt, tokenizer_config.json)."""
        root = Path(path)
        if not root.is_dir():
            raise ModelLoadError(f"tokenizer directory {root} does not exist")
        for name in _TOKENIZER_FILES:
            if not (root / name).is_file():
                raise ModelLoadError(f"tokenizer file {root / name} is missing")

        vocab = _read_json(root / "vocab.json")
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ModelLoadError(f"{root / 'vocab.json'} is not a token -> id mapping")
        merges = _read_merges(root / "merges.txt")
        config = _read_json(root / "tokenizer_config.json")
        if not isinstance(config, dict):
            raise ModelLoadError(f"{root / 'tokenizer_config.json'} is not a JSON object")

        try:
            bpe = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
        except Exception as exc:  # tokenizers raises plain Exceptions for merges that name unknown tokens
            raise ModelLoadError(
                f"{root / 'merges.txt'} does not match {root / 'vocab.json'}: {exc}"
            ) from exc
        tk = Tokenizer(bpe)
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
                # The split above already isolated words; this step only maps bytes to printable symbols.
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tk.decoder = decoders.ByteLevel()

        units = config.get("text_units", "bpe")
        if units not in TEXT_UNITS:
            raise ModelLoadError(
                f"{root / 'tokenizer_config.json'}: text_units {units!r} is not one of {TEXT_UNITS}"
            )
        if units == "pinyin":
            _pinyin_module()
        if units == "phonemes":
            misaki_g2p("en"), misaki_g2p("zh")  # a missing G2P fails at load, not on the first request
        _add_base_tokens(tk, config, root / "tokenizer_config.json")
        tk.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in COSYVOICE2_SPECIAL_TOKENS]
        )
        return cls(tk, units)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS); special tokens are matched atomically anywhere."""
        if not isinstance(text, str):
            raise InputError(f"text to tokenise must be a string, got {type(text).__name__}")
        return self._tk.encode(to_units(text, self.units), add_special_tokens=False).ids

    def count(self, text: str) -> int:
        """Number of tokens in ``text``: the length measure of non-Chinese text splitting."""
        return len(self.encode(text))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences become U+FFFD, as HF's ``errors='replace'``."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __len__(self) -> int:
        """Vocabulary size including added tokens (HF's ``len(tokenizer)``)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of one token (a vocabulary entry or a special token); KeyError if unknown."""
        token_id = self._tk.token_to_id(token)
        if token_id is None:
            raise KeyError(f"unknown token {token!r}")
        return token_id

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The CosyVoice 2 special tokens and their ids, in the official order."""
        return dict(self._specials)

    @property
    def endofprompt_id(self) -> int:
        """Id of ``<|endofprompt|>``, which ends instruct prompts."""
        return self._specials[ENDOFPROMPT]


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    merges = []
    for number, line in enumerate(lines, start=1):
        # GPT-2 style files start with a "#version" header; blank lines carry nothing.
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"{path} line {number} is not a merge of two tokens: {line!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ModelLoadError(f"{path} holds no merges")
    return merges


def _add_base_tokens(tk: Tokenizer, config: dict[str, Any], path: Path) -> None:
    """Add the tokens listed in tokenizer_config's ``added_tokens_decoder``, checking each lands on its id."""
    declared = config.get("added_tokens_decoder") or {}
    if not isinstance(declared, dict):
        raise ModelLoadError(f"{path}: added_tokens_decoder is not an object")
    try:
        entries = sorted((int(i), spec) for i, spec in declared.items())
        for token_id, spec in entries:
            special = bool(spec.get("special", True))
            token = AddedToken(
                spec["content"],
                single_word=bool(spec.get("single_word", False)),
                lstrip=bool(spec.get("lstrip", False)),
                rstrip=bool(spec.get("rstrip", False)),
                normalized=bool(spec.get("normalized", not special)),
                special=special,
            )
            if special:
                tk.add_special_tokens([token])
            else:
                tk.add_tokens([token])
            if tk.token_to_id(spec["content"]) != token_id:
                raise ModelLoadError(
                    f"{path}: added token {spec['content']!r} should have id {token_id}, "
                    f"got {tk.token_to_id(spec['content'])} (vocab.json and tokenizer_config.json disagree)"
                )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: malformed added_tokens_decoder entry: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# 2. Official normalisation (SPEC §3.2)
# ----------------------------------------------------------------------------------------------------------

Backend = Literal["auto", "wetext", "wetext-0.1.8", "none"]
_BACKENDS = ("auto", "wetext", "wetext-0.1.8", "none")

# split_paragraph's limits (token_max_n, token_min_n, merge_len): a piece is flushed once it is longer than
# PIECE_MIN_LEN and adding the next sentence would make it longer than PIECE_MAX_LEN; a last piece shorter
# than PIECE_MERGE_LEN joins the previous one.
PIECE_MAX_LEN = 80
PIECE_MIN_LEN = 60
PIECE_MERGE_LEN = 20
# With every sentence at most PIECE_MAX_LEN long, the merge above can still build a piece of up to
# PIECE_MIN_LEN + PIECE_MAX_LEN and then append a tail shorter than PIECE_MERGE_LEN: the hard bound that
# ``prepare_text`` guarantees for every piece.
PIECE_HARD_LIMIT = PIECE_MIN_LEN + PIECE_MAX_LEN + PIECE_MERGE_LEN

# Sentence marks of split_paragraph. Chinese text also cuts at ASCII marks and the enumeration comma.
_ZH_MARKS = frozenset("。？！；：、.?!;")
_EN_MARKS = frozenset(".?!;:")
_CLOSING_QUOTES = frozenset('"”')


def _has_chinese(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def _frontend_disabled(text: str) -> bool:
    # The official switch protecting SSML-like markup such as <|en|>: both halves anywhere disable everything.
    return "<|" in text and "|>" in text


def _only_punctuation(text: str) -> bool:
    """True for text made only of punctuation and symbols (\\p{P}, \\p{S}); the empty string included."""
    return all(unicodedata.category(c)[0] in "PS" for c in text)


def normalize(
    text: str, *, split: bool = True, tokenizer: TextTokenizer | None = None, backend: Backend = "auto"
) -> list[str] | str:
    """The official ``text_normalize``: a list of pieces to synthesise (``split``) or the normalised string.

    ``backend``: "wetext" (the official pin, wetext 0.0.4, run on the FSTs of the installed wetext),
    "wetext-0.1.8" (the installed wetext 0.1.8 itself), "none" (rules only) or "auto" ("wetext" if its FSTs
    can be loaded, else "none"). Splitting non-Chinese text needs ``tokenizer`` (lengths are token counts).
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    _check_backend(backend)
    if _frontend_disabled(text) or text == "":
        return [text] if split else text
    text, lang = _rewrite(text, backend)
    if not split:
        return text
    pieces = _split_paragraph(text, lang, _length_fn(lang, tokenizer))
    return [p for p in pieces if not _only_punctuation(p)]


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise InputError(f"unknown text normalisation backend {backend!r}; use one of {', '.join(_BACKENDS)}")


def _length_fn(lang: str, tokenizer: TextTokenizer | None) -> Callable[[str], int]:
    if lang == "zh":
        return len
    if tokenizer is None:
        raise ValueError("splitting non-Chinese text measures pieces in tokens: pass tokenizer=")
    return tokenizer.count


def _rewrite(
    text: str, backend: str, *, robust: bool = False, chinese: bool | None = None
) -> tuple[str, str]:
    """Whole-text rewriting of one branch; returns the text and its language ("zh" or "en").

    ``robust`` (prepare_text only) keeps tags whole through wetext and feeds it long text in chunks.
    ``chinese`` overrides the branch choice (streaming: a segment of a Chinese text without CJK characters).
    """
    text = text.strip()
    if _has_chinese(text) if chinese is None else chinese:
        text = _wetext(text, "zh", backend, robust)
        text = text.replace("\n", "")
        text = _replace_blank(text)
        text = text.replace("²", "平方").replace("³", "立方")
        text = text.replace(".", "。")
        text = text.replace(" - ", "，")
        text = _remove_bracket(text)
        text = re.sub(r"[，,、]+$", "。", text)  # a trailing comma run ends the sentence
        return text, "zh"
    text = _wetext(text, "en", backend, robust)
    return _spell_out_numbers(text), "en"


def _replace_blank(text: str) -> str:
    """Drop spaces in Chinese text unless both neighbours are non-space ASCII (keeps "ABC DEF" readable)."""
    out = []
    for i, c in enumerate(text):
        if c == " ":
            # The official code reads text[i - 1] (wrapping to the last char at i = 0) and text[i + 1];
            # the text is stripped, so a space never sits at either end unless a rule put it there.
            before = text[i - 1]
            after = text[i + 1] if i + 1 < len(text) else ""
            if not (after.isascii() and after not in ("", " ") and before.isascii() and before != " "):
                continue
        out.append(c)
    return "".join(out)


def _remove_bracket(text: str) -> str:
    for bracket in ("（", "）", "【", "】", "`"):
        text = text.replace(bracket, "")
    return text.replace("——", " ")


# -- number spelling (non-Chinese branch) ------------------------------------------------------------------

# The official code calls inflect's ``number_to_words`` on each digit run. Importing inflect costs seconds
# (typeguard instruments it), so the same wording is produced here: groups of three from the right,
# "hundred and", hyphenated tens, ", " between groups, and " and " before a last group below one hundred
# ("two thousand and twenty-four", "one thousand, one hundred"). tests/test_text.py checks it against inflect.
_ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = (
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = (
    "",
    " thousand",
    " million",
    " billion",
    " trillion",
    " quadrillion",
    " quintillion",
    " sextillion",
    " septillion",
    " octillion",
    " nonillion",
    " decillion",
)


def _below_hundred(tens: int, units: int) -> str:
    if tens == 1:
        return _TEENS[units]
    return _TENS[tens] + ("-" if tens and units else "") + _ONES[units]


def number_words(run: str) -> str:
    """English words for a run of digits, worded as inflect 7's ``number_to_words`` (official dependency).

    Like inflect, characters that are not decimal digits (superscripts such as "²") are dropped and an empty
    result reads "zero". Beyond inflect's range (36 digits), where the official code crashes, each digit is
    read on its own.
    """
    digits = "".join(str(unicodedata.decimal(c)) for c in run if c.isdecimal()).lstrip("0")
    if not digits:
        return "zero"
    if len(digits) > 3 * len(_SCALES):
        return " ".join(number_words(d) for d in digits)
    # Groups of three digits, most significant first; the first may be shorter.
    head = len(digits) % 3 or 3
    groups = [digits[:head]] + [digits[i : i + 3] for i in range(head, len(digits), 3)]
    phrases = []
    last_joins_with_and = False
    for index, group in enumerate(groups):
        hundreds, tens, units = (int(d) for d in group.rjust(3, "0"))
        if not (hundreds or tens or units):
            continue
        words = f"{_ONES[hundreds]} hundred" if hundreds else ""
        if tens or units:
            words += (" and " if hundreds else "") + _below_hundred(tens, units)
        phrases.append(words + _SCALES[len(groups) - 1 - index])
        # Only a last group of one word below a hundred is joined with "and" ("one thousand and one").
        last_joins_with_and = index == len(groups) - 1 and not hundreds
    if len(phrases) > 1 and last_joins_with_and:
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return ", ".join(phrases)


def _spell_out_numbers(text: str) -> str:
    """Replace every run of ``str.isdigit`` characters with words ("12.50" -> "twelve.fifty", as official)."""
    parts = []
    for is_digit, run in itertools.groupby(text, key=str.isdigit):
        chunk = "".join(run)
        parts.append(number_words(chunk) if is_digit else chunk)
    return "".join(parts)


# -- safe cut points ---------------------------------------------------------------------------------------
# Where text may be cut into independently normalised segments without splitting a word, a number or a tag
# (streaming input, chunked wetext). Each test looks at the characters on both sides of position p, so a
# cut is only ever made once the character after it is known.

_CUT_SENTENCE_MARKS = frozenset("。？！；：.?!;:")
_CUT_CLAUSE_MARKS = frozenset("，,、")
_CUT_TRAILERS = frozenset("\"'”’」』）)")  # closing quotes and brackets stay with their sentence


def _sentence_end(text: str, p: int) -> bool:
    """A sentence ends right before ``text[p]``: a mark, closing quotes, then a safe next character."""
    q = p
    while q > 0 and text[q - 1] in _CUT_TRAILERS:
        q -= 1
    if q == 0 or text[q - 1] not in _CUT_SENTENCE_MARKS:
        return False
    if text[q - 1].isascii():
        return text[p].isspace()  # "3.14", "10:30" and "e.g" are not ends
    return not (text[p] in _CUT_SENTENCE_MARKS or text[p] in _CUT_TRAILERS or text[p] in _CUT_CLAUSE_MARKS)


def _clause_end(text: str, p: int) -> bool:
    if text[p - 1] not in _CUT_CLAUSE_MARKS:
        return False
    if text[p - 1].isascii():
        return text[p].isspace()  # "1,000" is one number
    return not (text[p] in _CUT_CLAUSE_MARKS or text[p] in _CUT_SENTENCE_MARKS)


def _space_gap(text: str, p: int) -> bool:
    return not text[p - 1].isspace() and text[p].isspace()


def _cjk_gap(text: str, p: int) -> bool:
    # Between two non-ASCII characters: never inside an ASCII word, number or tag.
    return not (text[p - 1].isascii() or text[p].isascii())


def _chunks(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into consecutive chunks of about ``max_chars``, at the best safe cut points."""
    rules = (_sentence_end, _clause_end, _space_gap, _cjk_gap)
    chunks = []
    start = 0
    while len(text) - start > max_chars:
        window = range(start + max_chars, start, -1)
        cut = next((p for rule in rules for p in window if rule(text, p)), None)
        if cut is None:  # no safe point in the window: take the first one after it, if any
            cut = next(
                (p for p in range(start + max_chars, len(text)) if any(r(text, p) for r in rules)), None
            )
            if cut is None:
                break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


# -- wetext backends ---------------------------------------------------------------------------------------
#
# The official frontend pins wetext 0.0.4: backend "wetext". Its Normalizer is small: for text with a digit
# it runs the language's tagger FST, puts the tagged fields in a fixed order and runs the verbalizer FST;
# other text comes back untouched. That processing is reproduced below and run on the FST files bundled
# with the installed wetext package (0.0.4 itself downloads its FSTs from ModelScope at run time; the
# fixtures' ``wetext_004`` setup was made as here). Backend "wetext-0.1.8" calls the installed wetext 0.1.8,
# constructed as the official frontend constructs it. Where the two differ (tests/test_text.py pins each):
#  * English text without a digit: 0.0.4 leaves it alone; 0.1.8 runs the FSTs on every English text,
#    which rewrites abbreviations and symbols ("Mr." -> "Mister", "&" -> "and", "U.S." -> "US"), and so
#    also changes where split_paragraph cuts sentences.
#  * Text made only of digits (English branch): 0.1.8's lang="auto" reads it as Chinese.
#  * Quotes and backslashes: 0.1.8 escapes the tagged values a second time, so '"' comes out as '\"' and
#    '\' as '\\'; 0.0.4 gives them back as written.
#  * Reordering the tagged fields: 0.0.4 drops a field that the token's canonical order does not name;
#    0.1.8 appends it.
#  * Text the English tagger cannot read (two spaces in a row) makes both raise, 0.1.8 even without a
#    digit. Both backends here return such text unchanged instead.

WETEXT_018 = "wetext-0.1.8"

# wetext's canonical field order for text normalisation, per token name (identical in 0.0.4 and 0.1.8).
_TN_FIELD_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "zh": {
        "date": ("year", "month", "day"),
        "fraction": ("denominator", "numerator"),
        "measure": ("denominator", "numerator", "value"),
        "money": ("value", "currency"),
        "time": ("noon", "hour", "minute", "second"),
    },
    "en": {
        "date": ("preserve_order", "text", "day", "month", "year"),
        "money": ("integer_part", "fractional_part", "quantity", "currency_maj"),
    },
}
_TAGGED_NAME_RE = re.compile(r" *([A-Za-z_]+) *\{")
_TAGGED_FIELD_RE = re.compile(r' *([A-Za-z_]+): *"((?:[^"\\]|\\.)*)"', re.DOTALL)
_TAGGED_END_RE = re.compile(r" *\}")


def reorder_tagged(tagged: str, lang: str) -> str:
    """wetext 0.0.4's reordering of tagger output (``name { key: "value" ... } ...``) for the verbalizer.

    A token with a canonical order gets exactly the fields that order names, in that order, unless it
    carries ``preserve_order: "true"``; other tokens keep theirs. Values keep their escapes as written.
    ValueError if ``tagged`` is not tagger output.
    """
    orders = _TN_FIELD_ORDER[lang]
    tokens = []
    pos = 0
    while tagged[pos:].strip(" "):
        name = _TAGGED_NAME_RE.match(tagged, pos)
        if name is None:
            raise ValueError(f"not wetext tagger output at {pos}: {tagged!r}")
        pos = name.end()
        keys: list[str] = []
        values: dict[str, str] = {}
        while field := _TAGGED_FIELD_RE.match(tagged, pos):
            keys.append(field.group(1))
            values[field.group(1)] = field.group(2)
            pos = field.end()
        end = _TAGGED_END_RE.match(tagged, pos)
        if end is None:
            raise ValueError(f"unterminated token at {pos}: {tagged!r}")
        pos = end.end()
        if name.group(1) in orders and values.get("preserve_order") != "true":
            keys = [k for k in orders[name.group(1)] if k in values]
        tokens.append(name.group(1) + " {" + "".join(f' {k}: "{values[k]}"' for k in keys) + " }")
    return " ".join(tokens)


class _PinnedWetext:
    """wetext 0.0.4's ``Normalizer`` for one branch of the official frontend, on the given FST folder."""

    escapes = False  # its output carries no escaping of its own

    def __init__(self, fst_dir: Path, lang: str) -> None:
        import kaldifst

        self.lang = lang
        # The official zh normaliser passes remove_erhua=False: the plain verbalizer.
        self._tagger = kaldifst.TextNormalizer(str(fst_dir / lang / "tn" / "tagger.fst"))
        self._verbalizer = kaldifst.TextNormalizer(str(fst_dir / lang / "tn" / "verbalizer.fst"))

    def fst_lang(self, text: str) -> str | None:
        """FST language for ``text`` (0.0.4's lang="auto": the branch's), or None: text left unchanged."""
        return self.lang if _has_digit(text) else None

    def run(self, text: str, fst_lang: str) -> str:
        # fst_lang is always this branch's language; the FSTs run on the text as given (no strip).
        tagged = self._tagger.normalize(text)
        try:
            reordered = reorder_tagged(tagged, self.lang)
        except ValueError:
            reordered = ""
        if not reordered:  # the tagger found no reading; wetext 0.0.4 raises an AssertionError here
            return text
        return self._verbalizer.normalize(reordered) or text


class _Wetext018:
    """The installed wetext 0.1.8, built as the official frontend builds its two normalisers."""

    escapes = True  # '"' and '\' come out backslash-escaped

    def __init__(self, lang: str) -> None:
        version = importlib.metadata.version("wetext")
        if version != "0.1.8":
            raise ModuleNotFoundError(f"this backend needs wetext 0.1.8; wetext {version} is installed")
        import wetext

        self._normalizer = wetext.Normalizer(remove_erhua=False) if lang == "zh" else wetext.Normalizer()

    def fst_lang(self, text: str) -> str | None:
        # 0.1.8's lang="auto": Chinese for a CJK character or digits only; every English text is normalised.
        text = text.strip()
        lang = "zh" if _has_chinese(text) or text.isdigit() else "en"
        return lang if lang == "en" or _has_digit(text) else None

    def run(self, text: str, fst_lang: str) -> str:
        # The language is given so that every chunk of a long text is read as the whole text would be.
        try:
            return self._normalizer.normalize(text, lang=fst_lang)
        except AssertionError:  # its token parser asserts on an empty tagging: the tagger found no reading
            return text


def _wetext_fst_dir() -> Path:
    """The FST folder bundled with the installed wetext package, found without importing it."""
    spec = importlib.util.find_spec("wetext")
    if spec is None:
        raise ModuleNotFoundError("wetext is not installed")
    names = [f"{lang}/tn/{name}.fst" for lang in ("en", "zh") for name in ("tagger", "verbalizer")]
    for location in spec.submodule_search_locations or []:
        folder = Path(location) / "fsts"
        if all((folder / name).is_file() for name in names):
            return folder
    raise FileNotFoundError("the installed wetext bundles no FST files (wetext 0.1.8 does)")


# Normalisers are built on first use only, once per process (loading the FSTs takes about a second).
_wetext_lock = threading.Lock()
_wetext_normalizers: dict[tuple[str, str], Any] = {}
_wetext_errors: dict[str, str] = {}  # why a backend could not be loaded
_WETEXT_CHUNK_CHARS = 200


def _wetext_normalizer(backend: str, lang: str) -> Any | None:
    """The normaliser of one branch ("zh" or "en"); None when "auto" finds wetext unusable."""
    kind = WETEXT_018 if backend == WETEXT_018 else "wetext"
    with _wetext_lock:
        if (kind, lang) not in _wetext_normalizers and kind not in _wetext_errors:
            try:
                made = _Wetext018(lang) if kind == WETEXT_018 else _PinnedWetext(_wetext_fst_dir(), lang)
                _wetext_normalizers[kind, lang] = made
            except Exception as exc:  # ImportError, missing or broken FST files
                _wetext_errors[kind] = f"{type(exc).__name__}: {exc}"
        normalizer = _wetext_normalizers.get((kind, lang))
    if normalizer is None and backend != "auto":
        raise ModelLoadError(f"text normalisation backend {kind!r} is not usable: {_wetext_errors[kind]}")
    return normalizer


def warm_up(backend: Backend = "auto") -> None:
    """Load the wetext normalisers now (about a second) rather than on the first text that needs them."""
    _check_backend(backend)
    if backend != "none":
        for lang in ("zh", "en"):
            _wetext_normalizer(backend, lang)


def _wetext(text: str, lang: str, backend: str, robust: bool) -> str:
    """The branch's wetext normaliser on ``text`` (one branch: "zh" or "en"), or ``text`` without one."""
    if backend == "none":
        return text
    normalizer = _wetext_normalizer(backend, lang)
    # Whether and how wetext rewrites is decided on the whole text (0.0.4: only text with a digit).
    fst_lang = None if normalizer is None else normalizer.fst_lang(text)
    if fst_lang is None:
        return text
    if not robust:
        return _wetext_call(normalizer, text, fst_lang)
    # The FSTs slow down faster than linearly with length: long text goes through in sentence-sized chunks
    # (ordinary text is one chunk). wetext strips its output, so the spaces between chunks are put back.
    return "".join(
        _keep_spaces(chunk, lambda t: _wetext_keep_tags(normalizer, t, fst_lang))
        for chunk in _chunks(text, _WETEXT_CHUNK_CHARS)
    )


def _wetext_call(normalizer: Any, text: str, fst_lang: str, unescape: bool = False) -> str:
    with _wetext_lock:  # kaldifst makes no thread-safety promise
        out = normalizer.run(text, fst_lang)
    # wetext 0.1.8 leaves its escaping in the output ('"' -> '\"', '\' -> '\\'); the official code keeps it,
    # prepare_text undoes it so the LLM never sees stray backslashes.
    return re.sub(r'\\(["\\])', r"\1", out) if unescape and normalizer.escapes else out


def _wetext_keep_tags(normalizer: Any, text: str, fst_lang: str) -> str:
    out = _wetext_call(normalizer, text, fst_lang, unescape=True)
    if _TAG_RE.findall(out) == _TAG_RE.findall(text):
        return out
    # The FSTs rewrote a tag (e.g. read "<" as a word): normalise only the text between the tags.
    parts = _TAG_RE.split(text)
    tags = [*_TAG_RE.findall(text), ""]
    return "".join(
        _keep_spaces(part, lambda t: _wetext_call(normalizer, t, fst_lang, unescape=True)) + tag
        for part, tag in zip(parts, tags)
    )


def _keep_spaces(text: str, fn: Callable[[str], str]) -> str:
    """``fn`` applied to the stripped text, with the leading and trailing whitespace put back."""
    core = text.strip()
    if not core:
        return text
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()) :]
    return lead + fn(core) + trail


def _has_digit(text: str) -> bool:
    return re.search(r"\d", text) is not None


# -- split_paragraph ---------------------------------------------------------------------------------------

# Every special token, plus any <|…|> control markup; sorted longest first so "</strong>" wins over prefixes.
_TAG_RE = re.compile(
    "|".join(re.escape(t) for t in sorted(COSYVOICE2_SPECIAL_TOKENS, key=len, reverse=True))
    + r"|<\|[^<>|\s]*\|>"
)
_SPECIAL_SPLIT = re.compile(f"({_TAG_RE.pattern})")  # re.split keeps the tags (at odd indices)


def text_language(text: str) -> str | None:
    """ "zh" for text with Chinese characters, "en" for text with Latin letters and none, None for neither
    (digits, punctuation; tags such as ``[laughter]`` do not count). By script only: the two languages of
    the default model; official models are never switched by it (``Models.prompt_language``)."""
    text = _TAG_RE.sub("", text)
    if _HAN_RUN.search(text):
        return "zh"
    return "en" if _LATIN.search(text) else None


_SPAN_OPEN = ("<strong>", "<laughter>")
_SPAN_CLOSE = ("</strong>", "</laughter>")


def _split_paragraph(
    text: str, lang: str, length: Callable[[str], int], *, keep_spans: bool = False, cut_long: bool = False
) -> list[str]:
    """Cut ``text`` into sentences, then greedily pack them into pieces (the official ``split_paragraph``).

    ``keep_spans`` keeps ``<strong>…</strong>``/``<laughter>…</laughter>`` in one sentence; ``cut_long`` cuts
    sentences longer than PIECE_MAX_LEN at clause marks or spaces first. Both are off in the official code.
    """
    if not text:
        return []
    marks = _ZH_MARKS if lang == "zh" else _EN_MARKS
    if text[-1] not in marks:
        text += "。" if lang == "zh" else "."
    sentences = _sentences(text, marks, keep_spans)
    if cut_long:
        sentences = [chunk for s in sentences for chunk in _cut_long(s, length, PIECE_MAX_LEN)]

    pieces: list[str] = []
    current = ""
    for sentence in sentences:
        if length(current + sentence) > PIECE_MAX_LEN and length(current) > PIECE_MIN_LEN:
            pieces.append(current)
            current = ""
        current += sentence
    if current:
        if length(current) < PIECE_MERGE_LEN and pieces:
            pieces[-1] += current
        else:
            pieces.append(current)
    return pieces


def _sentences(text: str, marks: frozenset[str], keep_spans: bool) -> list[str]:
    """Cut after each mark; a closing quote right after a mark stays with its sentence.

    A mark directly after another mark starts no sentence, so "Wow!!!" becomes "Wow!" (official behaviour).
    """
    sentences: list[str] = []
    start = 0
    depth = 0  # open <strong>/<laughter> spans (keep_spans only)
    i = 0
    while i < len(text):
        if keep_spans and text[i] == "<":
            opening = next((t for t in _SPAN_OPEN if text.startswith(t, i)), None)
            closing = next((t for t in _SPAN_CLOSE if text.startswith(t, i)), None)
            if opening or closing:
                depth = depth + 1 if opening else max(depth - 1, 0)
                i += len(opening or closing or "")
                continue
        if text[i] in marks and depth == 0:
            if i > start:
                sentences.append(text[start : i + 1])
            if i + 1 < len(text) and text[i + 1] in _CLOSING_QUOTES:
                # The quote joins the last sentence (the official code crashes when there is none yet).
                if sentences:
                    sentences[-1] += text[i + 1]
                else:
                    sentences.append(text[i + 1])
                start = i + 2
                i += 1
            else:
                start = i + 1
        i += 1
    if start < len(text):  # only reachable with keep_spans: an unclosed span swallowed the final mark
        sentences.append(text[start:])
    return sentences


# ----------------------------------------------------------------------------------------------------------
# 3. Robust entry point for the engine
# ----------------------------------------------------------------------------------------------------------

# Where an over-long sentence is best cut. This runs after normalisation, so no rule can reach across.
_CLAUSE_MARKS = frozenset("，,、；;：:…—")


def prepare_text(text: str, *, tokenizer: TextTokenizer, backend: Backend = "auto") -> list[str]:
    """Normalise and split user text into pieces to synthesise one by one; InputError if nothing is speakable.

    Equal to ``normalize(text, split=True)`` on ordinary text. Beyond it: control and format characters
    are removed, fine-grained tags survive wetext and sentence cutting, sentences longer than PIECE_MAX_LEN
    are cut at clause marks or spaces (so every piece is at most PIECE_HARD_LIMIT long), and pieces without
    a letter or digit are dropped.
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    _check_backend(backend)
    text = clean_text(text)
    if not text.strip():
        raise InputError("text is empty")

    if _frontend_disabled(text):
        # Markup switches the frontend off (official); we only split it when it would be an over-long piece.
        lang = "zh" if _has_chinese(text) else "en"
        length = _length_fn(lang, tokenizer)
        pieces = (
            [text]
            if length(text) <= PIECE_HARD_LIMIT
            else _split_paragraph(text, lang, length, cut_long=True)
        )
    else:
        body, lang = _rewrite(text, backend, robust=True)
        pieces = _split_paragraph(body, lang, _length_fn(lang, tokenizer), keep_spans=True, cut_long=True)

    pieces = [p for p in pieces if any(c.isalnum() for c in p)]
    if not pieces:
        raise InputError("text has nothing to speak: only punctuation, symbols or emoji")
    return pieces


def clean_text(text: str) -> str:
    """Normalise line ends to "\\n" and drop control and format characters (tabs and newlines stay)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c for c in text if c in "\t\n" or unicodedata.category(c) not in ("Cc", "Cf"))


# Qwen tokens of ordinary text are far shorter than this, so a prefix of limit * _MAX_UNIT_CHARS characters
# always holds more than ``limit`` tokens (a long run of spaces may not, and is then merely cut early).
_MAX_UNIT_CHARS = 16


def _cut_long(sentence: str, length: Callable[[str], int], limit: int) -> list[str]:
    """Cut a sentence into chunks of at most ``limit``: at clause marks, else spaces; never inside a tag."""
    chunks = []
    rest = sentence
    # Text longer than _MAX_UNIT_CHARS per unit cannot fit; checking that first spares tokenising a huge
    # sentence (BPE on one 20,000-character word is slow) just to learn it is too long.
    while len(rest) > limit * _MAX_UNIT_CHARS or length(rest) > limit:
        cut = _best_cut(rest, _longest_fit(rest, length, limit))
        chunks.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        chunks.append(rest)
    return chunks


def _longest_fit(text: str, length: Callable[[str], int], limit: int) -> int:
    """Largest end index whose prefix is within ``limit`` (binary search: lengths grow with the prefix)."""
    lo, hi = 1, min(len(text), limit * _MAX_UNIT_CHARS)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _best_cut(text: str, end: int) -> int:
    """Cut position in (0, end]: after a clause mark, else before a space, else beside a non-ASCII char."""
    window = text[: end + 1 + max(map(len, COSYVOICE2_SPECIAL_TOKENS))]  # tags that may straddle ``end``
    inside_tag = {p for m in _TAG_RE.finditer(window) for p in range(m.start() + 1, m.end())}
    floor = max(1, end // 2)  # not too early, or the sentence turns into many tiny chunks
    rules: tuple[Callable[[int], bool], ...] = (
        lambda p: text[p - 1] in _CLAUSE_MARKS,
        lambda p: not text[p - 1].isspace() and text[p].isspace(),
        lambda p: not (text[p - 1].isascii() and text[p].isascii()),
    )
    for rule in rules:
        for p in range(min(end, len(text) - 1), floor - 1, -1):
            if p not in inside_tag and rule(p):
                return p
    for p in range(end, 0, -1):
        if p not in inside_tag:
            return p
    return end


# ----------------------------------------------------------------------------------------------------------
# 4. Streaming text input
# ----------------------------------------------------------------------------------------------------------


class StreamingNormalizer:
    """Normalise text arriving in pieces: ``push`` returns finished normalised segments, ``flush`` the rest.

    Segments end at sentence marks; after ``max_pending`` characters without one, at clause marks, then at
    spaces (or, in Chinese, between non-ASCII characters). A cut is only made once the character after it
    has arrived, so numbers and words are never split. Each segment goes through the same rules as
    ``normalize(split=False)`` and the whitespace between segments is kept or dropped as whole-text
    normalisation would, so the concatenated output equals normalising the whole text at once unless a rule
    reaches across a cut (a language switch, a wetext date spanning a clause, ``<|…|>`` markup).
    """

    def __init__(self, *, backend: Backend = "auto", max_pending: int = 80) -> None:
        _check_backend(backend)
        if max_pending < 1:
            raise ValueError("max_pending must be positive")
        self._backend = backend
        self._max_pending = max_pending
        self._buffer = ""
        self._started = False  # whether text was emitted: whole-text strip only removes leading whitespace
        self._last_char = ""  # last raw character emitted, for the Chinese space rule at the next boundary
        # The official branch is chosen on the whole text; a stream that has shown a CJK character is Chinese
        # from then on, so later segments without one (a comma, "ABC") still follow the Chinese rules.
        self._chinese = False

    def push(self, piece: str) -> list[str]:
        """Add a piece of text; returns the segments that are now safe to emit (possibly none)."""
        if not isinstance(piece, str):
            raise InputError(f"streamed text must be a string, got {type(piece).__name__}")
        self._buffer += piece
        out = []
        for cut in self._cuts():
            segment, self._buffer = self._buffer[:cut], self._buffer[cut:]
            out += self._emit(segment, final=False)
        return out

    def flush(self) -> list[str]:
        """End of input: the remaining text, normalised; the normaliser is then ready for a new stream."""
        segment, self._buffer = self._buffer, ""
        out = self._emit(segment, final=True)
        self._started = False
        self._last_char = ""
        self._chinese = False
        return out

    def _cuts(self) -> list[int]:
        """Cut positions in the buffer as lengths of consecutive segments, earliest first."""
        buf = self._buffer
        sentence_ends = [p for p in range(1, len(buf)) if _sentence_end(buf, p)]
        if sentence_ends:
            return [b - a for a, b in itertools.pairwise([0, *sentence_ends])]
        if len(buf) <= self._max_pending:
            return []
        # In Chinese a cut at a space could break the " - " rule; between CJK characters no rule reaches.
        rules = (_clause_end, _cjk_gap if self._chinese or _has_chinese(buf) else _space_gap)
        cut = next((p for rule in rules for p in range(len(buf) - 1, 0, -1) if rule(buf, p)), None)
        return [] if cut is None else [cut]

    def _emit(self, segment: str, final: bool) -> list[str]:
        # Cuts never fall inside "\r\n" (both are whitespace), so cleaning per segment is safe.
        segment = clean_text(segment)
        body = segment.lstrip()
        lead = segment[: len(segment) - len(body)]
        if final:
            body = body.rstrip()
        if not body:
            return []
        self._chinese = self._chinese or _has_chinese(body)
        if _frontend_disabled(body):
            text = body
        else:
            # A comma run at the end of a Chinese text becomes "。"; mid-stream it is not the end, so keep it.
            core = body if final or not self._chinese else body.rstrip("，,、")
            text = _rewrite(core, self._backend, chinese=self._chinese)[0] if core else ""
            text += body[len(core) :]
        if not self._started:
            lead = ""
        elif self._chinese:
            lead = _replace_blank(self._last_char + lead.replace("\n", "") + body[0])[1:-1]
        self._started = True
        self._last_char = body[-1]
        out = lead + text
        return [out] if out else []
