"""Text frontend: tokenizer ids and normalisation against the official fixtures, plus our robustness layer.

Every expected value comes from fixtures/tokenizer/ (encode.json, text_normalize.json,
cosyvoice2_runtime_tokenizer_config.json); the strings written here only exercise behaviour the official code
does not have (bad input, long text, streaming).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import unicodedata
from pathlib import Path

import pytest

from cosyvoice2.errors import InputError, ModelLoadError
from cosyvoice2.text import (
    COSYVOICE2_SPECIAL_TOKENS,
    FINE_GRAINED_TAGS,
    PIECE_HARD_LIMIT,
    WETEXT_018,
    StreamingNormalizer,
    TextTokenizer,
    clean_text,
    normalize,
    number_words,
    prepare_text,
    reorder_tagged,
    to_units,
    warm_up,
)


@pytest.fixture(scope="module")
def tok_dir(fixtures: Path) -> Path:
    return fixtures / "tokenizer" / "CosyVoice-BlankEN"


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(tok_dir)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# Our backend for each wetext version the fixture's setups name (``helper_wetext_module``).
_BACKEND_OF_WETEXT = {"0.0.4": "wetext", "0.1.8": WETEXT_018}


def _setup_backend(setup: dict) -> str:
    """Our backend for one setup of text_normalize.json: rules only, or the wetext version it ran."""
    module = setup.get("helper_wetext_module")
    if not module:
        assert not setup.get("wetext_calls")
        return "none"
    name, version = module.split()
    assert name == "wetext", module
    return _BACKEND_OF_WETEXT[version]


def _normalize_setups(fixtures: Path) -> list[tuple[str, str, dict]]:
    """(setup name, backend, case) for every case of every setup."""
    data = _json(fixtures / "tokenizer" / "text_normalize.json")
    out = []
    for name, setup in data.items():
        if isinstance(setup, dict) and "cases" in setup:
            out += [(name, _setup_backend(setup), case) for case in setup["cases"]]
    return out


def _length(tokenizer: TextTokenizer, piece: str) -> int:
    # The official measure: characters for Chinese text, tokens otherwise.
    return len(piece) if any("\u4e00" <= c <= "\u9fff" for c in piece) else tokenizer.count(piece)


# -- tokenizer ---------------------------------------------------------------------------------------------


def test_encode_decode_match_fixture(fixtures: Path, tokenizer: TextTokenizer) -> None:
    data = _json(fixtures / "tokenizer" / "encode.json")
    assert data["cases"]
    for case in data["cases"]:
        ids = tokenizer.encode(case["text"])
        assert ids == case["ids"], case["text"]
        assert tokenizer.decode(ids) == case["decode_skip_special"], case["text"]
        # Without skipping, byte-level BPE is lossless up to the NFC normaliser.
        assert tokenizer.decode(ids, skip_special=False) == unicodedata.normalize("NFC", case["text"])


def test_special_ids_and_size(fixtures: Path, tokenizer: TextTokenizer) -> None:
    data = _json(fixtures / "tokenizer" / "encode.json")
    assert len(tokenizer) == data["len_tokenizer"]
    for token, token_id in data["special_token_ids"].items():
        assert tokenizer.token_id(token) == token_id
        assert tokenizer.encode(token) == [token_id]
        assert tokenizer.decode([token_id]) == ""
    assert tokenizer.endofprompt_id == data["special_token_ids"]["<|endofprompt|>"]
    with pytest.raises(KeyError):
        tokenizer.token_id("<|not-a-token|>")


def test_specials_follow_runtime_config(fixtures: Path, tokenizer: TextTokenizer) -> None:
    """Our special list and ids equal what the official class saved after its add_special_tokens."""
    config = _json(fixtures / "tokenizer" / "cosyvoice2_runtime_tokenizer_config.json")
    for token_id, spec in config["added_tokens_decoder"].items():
        assert tokenizer.token_id(spec["content"]) == int(token_id)
    official_order = list(dict.fromkeys([config["eos_token"], *config["additional_special_tokens"]]))
    assert list(COSYVOICE2_SPECIAL_TOKENS) == official_order
    assert tokenizer.special_token_ids == {t: tokenizer.token_id(t) for t in official_order}


def _tokenizer_copy(src: Path, dst: Path, skip: str | None = None) -> Path:
    dst.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if name != skip:
            (dst / name).symlink_to(src / name)
    return dst


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_names_it(tok_dir: Path, tmp_path: Path, missing: str) -> None:
    broken = _tokenizer_copy(tok_dir, tmp_path / "tok", skip=missing)
    with pytest.raises(ModelLoadError, match=missing):
        TextTokenizer.from_dir(broken)


def test_text_units(tok_dir: Path, tokenizer: TextTokenizer, tmp_path: Path) -> None:
    """Official directories have no ``text_units``: the text goes to the BPE as it is. A directory that says
    "pinyin" reads runs of Han characters as toned syllables; tags and other text are untouched."""
    assert tokenizer.units == "bpe"
    assert to_units("白日依山尽", "bpe") == "白日依山尽"
    text = "银行行长说[laughter]<strong>重要</strong> OK."
    assert to_units(text, "pinyin") == (
        " yin2 hang2 hang2 zhang3 shuo1 [laughter]<strong> zhong4 yao4 </strong> OK."
    )
    assert to_units("no Chinese here", "pinyin") == "no Chinese here"
    pinyin = _tokenizer_copy(tok_dir, tmp_path / "py", skip="tokenizer_config.json")  # ours to write
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (pinyin / "tokenizer_config.json").write_text(json.dumps({**config, "text_units": "pinyin"}))
    tok = TextTokenizer.from_dir(pinyin)
    assert tok.encode("河流") == tokenizer.encode(" he2 liu2 ")
    assert tok.encode("[laughter]") == tokenizer.encode("[laughter]")
    (pinyin / "tokenizer_config.json").write_text(json.dumps({**config, "text_units": "phones"}))
    with pytest.raises(ModelLoadError, match="text_units"):
        TextTokenizer.from_dir(pinyin)


def test_phoneme_text_units() -> None:
    """ "phonemes": Han runs through misaki's Chinese G2P, Latin runs through its English one (espeak-ng),
    the same phonemes the default corpus's teacher spoke; tags stay whole and neither G2P sees them."""
    pytest.importorskip("misaki")
    from cosyvoice2.text import misaki_g2p

    en, zh = misaki_g2p("en"), misaki_g2p("zh")
    assert to_units("Hello world.", "phonemes") == en("Hello world.")[0]
    assert to_units("白日依山尽", "phonemes") == zh("白日依山尽")[0]
    assert "↗" in to_units("白日", "phonemes")  # tones survive
    mixed = to_units("我爱 OK 绷[laughter]<strong>好</strong>!<|endofprompt|>", "phonemes")
    assert mixed == (
        zh("我爱")[0] + " " + en("OK")[0] + " " + zh("绷")[0] + "[laughter]<strong>" + zh("好")[0]
        + "</strong>!<|endofprompt|>"
    )  # fmt: skip
    assert to_units("河流。", "phonemes").endswith("↗。") and "河" not in to_units("河流。", "phonemes")
    assert to_units("", "phonemes") == "" and to_units("，。 ", "phonemes") == "，。 "


def test_corrupt_files_raise(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        TextTokenizer.from_dir(tmp_path / "nowhere")

    broken = _tokenizer_copy(tok_dir, tmp_path / "vocab", skip="vocab.json")
    (broken / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="vocab.json"):
        TextTokenizer.from_dir(broken)

    broken = _tokenizer_copy(tok_dir, tmp_path / "merges", skip="merges.txt")
    (broken / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="merges.txt"):
        TextTokenizer.from_dir(broken)

    # An added token declared at an id the vocabulary does not lead to.
    config = _json(tok_dir / "tokenizer_config.json")
    first_id, spec = next(iter(config["added_tokens_decoder"].items()))
    config["added_tokens_decoder"] = {str(int(first_id) + 7): spec}
    broken = _tokenizer_copy(tok_dir, tmp_path / "config", skip="tokenizer_config.json")
    (broken / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        TextTokenizer.from_dir(broken)


# -- official normalisation --------------------------------------------------------------------------------


def test_normalize_matches_fixture(fixtures: Path, tokenizer: TextTokenizer) -> None:
    """Every setup of text_normalize.json against its own backend (rules only, wetext 0.0.4, 0.1.8)."""
    setups = _normalize_setups(fixtures)
    assert {"none", "wetext"} <= {backend for _, backend, _ in setups}  # the official pin is covered
    for name, backend, case in setups:
        text = case["text"]
        pieces = normalize(text, split=True, tokenizer=tokenizer, backend=backend)
        assert pieces == case["split"], (name, text)
        whole = normalize(text, split=False, tokenizer=tokenizer, backend=backend)
        assert whole == case["nosplit"], (name, text)


def test_wetext_calls_match_log(fixtures: Path) -> None:
    """Each logged wetext call gives the logged output through its setup's backend (zh iff a CJK char)."""
    from cosyvoice2.text import _wetext

    data = _json(fixtures / "tokenizer" / "text_normalize.json")
    setups = [setup for setup in data.values() if isinstance(setup, dict) and setup.get("wetext_calls")]
    assert setups
    for setup in setups:
        backend = _setup_backend(setup)
        for call in setup["wetext_calls"]:
            lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in call["in"]) else "en"
            assert _wetext(call["in"], lang, backend, robust=False) == call["out"], (backend, call["in"])


def test_installed_fsts_are_the_fixture_ones(fixtures: Path) -> None:
    """Both wetext backends read the FSTs of the installed wetext: the files the fixtures were made with."""
    from cosyvoice2.text import _wetext_fst_dir

    expected = _json(fixtures / "tokenizer" / "text_normalize.json")["fst_sha256"]
    assert expected
    folder = _wetext_fst_dir()
    for rel, sha in expected.items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == sha, rel


def test_auto_backend_is_the_official_pin(fixtures: Path, tokenizer: TextTokenizer) -> None:
    pytest.importorskip("wetext")
    cases = [case for _, backend, case in _normalize_setups(fixtures) if backend == "wetext"]
    assert cases
    for case in cases:
        auto = normalize(case["text"], split=True, tokenizer=tokenizer, backend="auto")
        assert auto == case["split"], case["text"]


def test_normalize_bad_arguments(tokenizer: TextTokenizer) -> None:
    with pytest.raises(InputError, match="backend"):
        normalize("hello", tokenizer=tokenizer, backend="ttsfrd")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="string"):
        normalize(42, tokenizer=tokenizer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokenizer"):
        normalize("An English sentence.", backend="none")
    assert normalize("", split=True, backend="none") == [""]  # official: empty text passes through


def test_warm_up() -> None:
    warm_up("none")
    with pytest.raises(InputError, match="backend"):
        warm_up("bogus")  # type: ignore[arg-type]
    pytest.importorskip("wetext")
    warm_up("wetext")
    warm_up(WETEXT_018)


def test_wetext_normalizers_shared_across_threads(fixtures: Path, tokenizer: TextTokenizer) -> None:
    pytest.importorskip("wetext")
    cases = [(backend, case) for _, backend, case in _normalize_setups(fixtures) if backend != "none"]
    assert cases
    results: list[bool] = []

    def work() -> None:
        for backend, case in cases:
            out = normalize(case["text"], split=False, tokenizer=tokenizer, backend=backend)
            results.append(out == case["nosplit"])

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 * len(cases) and all(results)


# -- wetext 0.0.4 (the official pin) vs 0.1.8 ------------------------------------------------------------
# Every expected string below was checked against the wetext 0.0.4 wheel's code (on the FSTs bundled in
# 0.1.8, like the fixtures' wetext_004 setup) and against wetext 0.1.8, each behind the official frontend.


def test_pin_leaves_english_without_digits_alone(tokenizer: TextTokenizer) -> None:
    """0.0.4 only rewrites text with a digit; 0.1.8 rewrites every English text (abbreviations, symbols)."""
    pytest.importorskip("wetext")
    text = "Mr. Smith & Dr. Jones met in the U.S. at last."
    assert normalize(text, split=False, tokenizer=tokenizer, backend="wetext") == text
    assert (
        normalize(text, split=False, tokenizer=tokenizer, backend=WETEXT_018)
        == "Mister Smith and doctor Jones met in the US at last."
    )
    # "Mr." keeps its full stop under the pin, so the sentence may be cut after it (here it is: the part
    # before it is over the merge's minimum); 0.1.8's "Mister" leaves one sentence.
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, whatever "
        "his feelings or views may be on his first entering a new neighbourhood, is considered by all the "
        "good families around him as the rightful property of some one or other of their many daughters, "
        "said my dear Mr. Bennet to his lady one fine morning, who had heard that Netherfield Park was let "
        "at last to a young man of large fortune from the north of England."
    )
    pinned = normalize(text, tokenizer=tokenizer, backend="wetext")
    assert pinned == normalize(text, tokenizer=tokenizer, backend="none")
    assert len(pinned) == 2 and pinned[0].endswith("Mr.")
    assert normalize(text, tokenizer=tokenizer, backend=WETEXT_018) == [text.replace("Mr.", "Mister")]
    assert prepare_text(text, tokenizer=tokenizer, backend="wetext") == pinned


def test_pin_reads_digits_only_text_as_english(tokenizer: TextTokenizer) -> None:
    """In the English branch, 0.1.8's lang='auto' sends text made only of digits to the Chinese FSTs."""
    pytest.importorskip("wetext")
    assert normalize("2024", split=False, tokenizer=tokenizer, backend="wetext") == "twenty twenty four"
    assert normalize("2024", split=False, tokenizer=tokenizer, backend=WETEXT_018) == "两千零二十四"


def test_pin_does_not_escape_quotes_and_backslashes(tokenizer: TextTokenizer) -> None:
    """0.1.8 escapes tagged values twice, so its output carries backslashes; 0.0.4's does not."""
    pytest.importorskip("wetext")
    cases = {
        'He said "yes" 3 times.': ('He said "yes" three times.', 'He said \\"yes\\" three times.'),
        "Use a\\b for 2 paths.": ("Use a\\b for two paths.", "Use a\\\\b for two paths."),
        '他说"你好"3次。': ('他说"你好"三次。', '他说\\"你好\\"三次。'),
    }
    for text, (pinned, newer) in cases.items():
        assert normalize(text, split=False, tokenizer=tokenizer, backend="wetext") == pinned
        assert normalize(text, split=False, tokenizer=tokenizer, backend=WETEXT_018) == newer
        # prepare_text undoes 0.1.8's escaping: both backends give the pinned text.
        for backend in ("wetext", WETEXT_018):
            assert prepare_text(text, tokenizer=tokenizer, backend=backend) == [pinned]


def test_pin_reorder_drops_fields_outside_the_canonical_order() -> None:
    """0.0.4 keeps only the fields a token's canonical order names (0.1.8 would append the others)."""
    tagged = 'money { currency_maj: "$" integer_part: "5" note: "x" } w { v: "a\\"b" k: "1" }'
    assert (
        reorder_tagged(tagged, "en")
        == 'money { integer_part: "5" currency_maj: "$" } w { v: "a\\"b" k: "1" }'
    )
    kept = 'date { preserve_order: "true" year: "2024" day: "5" other: "y" }'
    assert reorder_tagged(kept, "en") == kept
    assert reorder_tagged('time { minute: "30" hour: "10" }', "zh") == 'time { hour: "10" minute: "30" }'
    with pytest.raises(ValueError):
        reorder_tagged('money { integer_part: "5"', "en")


def test_text_the_tagger_cannot_read_is_kept(tokenizer: TextTokenizer) -> None:
    """Two spaces in a row defeat the English tagger: official wetext raises (0.1.8 even without a digit);
    both backends keep the text, and the rules still spell out the digits."""
    pytest.importorskip("wetext")
    for backend in ("wetext", WETEXT_018):
        assert (
            normalize("Hello   world.", split=False, tokenizer=tokenizer, backend=backend) == "Hello   world."
        )
        out = normalize("I have  3 apples.", split=False, tokenizer=tokenizer, backend=backend)
        assert out == "I have  three apples."


# -- number spelling ---------------------------------------------------------------------------------------

# Wordings checked against inflect 7 (the official dependency), including its comma and "and" placement.
_NUMBER_WORDS = {
    "0": "zero",
    "007": "seven",
    "1": "one",
    "12": "twelve",
    "20": "twenty",
    "100": "one hundred",
    "1001": "one thousand and one",
    "1100": "one thousand, one hundred",
    "2024": "two thousand and twenty-four",
    "21000": "twenty-one thousand",
    "1000020": "one million and twenty",
    "1000001000": "one billion, one thousand",
    "1234567": "one million, two hundred and thirty-four thousand, five hundred and sixty-seven",
    "²": "zero",  # a digit to str.isdigit, but not a decimal digit: inflect drops it
    "٣": "three",
}


def test_number_words_examples() -> None:
    for digits, words in _NUMBER_WORDS.items():
        assert number_words(digits) == words
    assert number_words("7" * 40) == " ".join(["seven"] * 40)  # beyond inflect's range: digit by digit


@pytest.mark.slow
def test_number_words_matches_inflect() -> None:
    inflect = pytest.importorskip("inflect")  # importing it takes seconds, hence slow
    engine = inflect.engine()
    rng = random.Random(11)
    samples = [str(i) for i in range(3000)]
    samples += ["".join(rng.choice("0123456789") for _ in range(n)) for n in range(1, 37) for _ in range(200)]
    for digits in samples:
        assert number_words(digits) == engine.number_to_words(digits), digits


# -- prepare_text ------------------------------------------------------------------------------------------


def test_prepare_text_equals_official_on_ordinary_text(fixtures: Path, tokenizer: TextTokenizer) -> None:
    for name, backend, case in _normalize_setups(fixtures):
        text = case["text"]
        if any(unicodedata.category(c) in ("Cc", "Cf") and c not in "\t\n" for c in text):
            continue  # we strip control characters; the official code does not
        if backend == WETEXT_018 and ('"' in text or "\\" in text):
            continue  # we undo wetext 0.1.8's backslash escaping; the official code does not
        expected = [p for p in case["split"] if any(c.isalnum() for c in p)]
        if not expected:
            with pytest.raises(InputError):
                prepare_text(text, tokenizer=tokenizer, backend=backend)
        else:
            assert prepare_text(text, tokenizer=tokenizer, backend=backend) == expected, (name, text)


@pytest.mark.parametrize("bad", [None, 42, b"bytes", ["a list"]])
def test_prepare_text_rejects_non_strings(tokenizer: TextTokenizer, bad: object) -> None:
    with pytest.raises(InputError, match="string"):
        prepare_text(bad, tokenizer=tokenizer)  # type: ignore[arg-type]


@pytest.mark.parametrize("empty", ["", "   ", "\n\t \r\n", "\x00\x07\u200b"])
def test_prepare_text_rejects_empty(tokenizer: TextTokenizer, empty: str) -> None:
    with pytest.raises(InputError, match="empty"):
        prepare_text(empty, tokenizer=tokenizer, backend="none")


@pytest.mark.parametrize("unspeakable", ["!!! ... ???", "🙂🙂🙂", "©®™ — •", "。，！？", "* * *"])
def test_prepare_text_rejects_unspeakable(tokenizer: TextTokenizer, unspeakable: str) -> None:
    with pytest.raises(InputError, match="nothing to speak"):
        prepare_text(unspeakable, tokenizer=tokenizer, backend="none")


def test_prepare_text_strips_control_characters(tokenizer: TextTokenizer) -> None:
    plain = prepare_text("Hello world, how are you?", tokenizer=tokenizer, backend="none")
    noisy = prepare_text("Hel\x00lo wor\u200bld,\x07 how are you?\x1b", tokenizer=tokenizer, backend="none")
    assert noisy == plain
    assert clean_text("a\r\nb\rc\td\x0c") == "a\nb\nc\td"


@pytest.mark.parametrize("backend", ["none", "wetext"])
def test_prepare_text_keeps_tags(tokenizer: TextTokenizer, backend: str) -> None:
    if backend == "wetext":
        pytest.importorskip("wetext")
    texts = [
        "[breath]Hello there, I have 3 things to say. <strong>This is important. Listen to all 2 of "
        "them!</strong> [laughter] Thanks a lot [sigh]. " * 6,
        "他突然[laughter]停下来，因为这个故事真的<strong>太好笑了。真的有3次</strong>了。"
        "[breath]我们继续吧！" * 6,
    ]
    for text in texts:
        pieces = prepare_text(text, tokenizer=tokenizer, backend=backend)
        assert len(pieces) > 1
        for tag in FINE_GRAINED_TAGS:
            assert sum(p.count(tag) for p in pieces) == text.count(tag), tag
        for piece in pieces:
            # A span never straddles two pieces, and every tag is still one token.
            assert piece.count("<strong>") == piece.count("</strong>")
            ids = tokenizer.encode(piece)
            for tag in FINE_GRAINED_TAGS:
                assert ids.count(tokenizer.token_id(tag)) == piece.count(tag)


def _long_texts() -> dict[str, str]:
    rng = random.Random(7)
    words = "the quick brown fox jumps over a lazy dog while seven ducks sing near our old mill".split()
    sentences = []
    while sum(map(len, sentences)) < 20_000:
        n = rng.randint(3, 40)
        sentence = " ".join(rng.choice(words) for _ in range(n)) + rng.choice([".", "!", "?", ";", ","])
        sentences.append(sentence.capitalize() + (f" {rng.randint(1, 9999)}" if rng.random() < 0.2 else ""))
    english = " ".join(sentences)[:20_000]
    return {
        "english": english,
        "english_no_punctuation": english.replace(".", "").replace("!", "").replace("?", "").replace(";", ""),
        "one_long_word": "ab" * 10_000,
        "chinese": ("今天天气很好，我们一起去公园散步吧。" * 1200)[:20_000],
        "chinese_no_punctuation": ("今天天气很好我们一起去公园散步吧" * 1300)[:20_000],
        "tags_no_punctuation": ("[breath]八百标兵奔北坡<strong>北坡炮兵并排跑</strong>" * 800)[:20_000],
    }


@pytest.mark.parametrize("name", list(_long_texts()))
def test_long_text_is_split_within_limits(tokenizer: TextTokenizer, name: str) -> None:
    text = _long_texts()[name]
    assert len(text) > 19_000
    pieces = prepare_text(text, tokenizer=tokenizer, backend="none")
    assert len(pieces) > 20
    assert all(0 < _length(tokenizer, p) <= PIECE_HARD_LIMIT for p in pieces)
    # Nothing is lost: the pieces put back together are the normalised text (plus its final mark).
    whole = normalize(text, split=False, backend="none")
    joined = "".join(pieces)
    assert joined in (whole, whole + ".", whole + "。")


# -- streaming ---------------------------------------------------------------------------------------------

_STREAM_TEXTS = [
    "Hello world.  I have 3 apples, and 25 oranges!\nHow about you? It's 10:30 now; the price is $12.50 "
    '(about 1,000,000 yen). "Quoted." Done',
    "  The quick brown fox jumps over 2 lazy dogs; then it ran away... Really?! Yes: 100% sure, e.g. "
    "twice   ",
    "今天天气很好，我们一起去公园散步吧。明天会下雨吗？我不知道！气温12.5度，湿度80%。",
    "春天来了，花儿开了，鸟儿在树上唱歌，孩子们在草地上奔跑，老人们坐在长椅上聊天，一切都是那么美好，",
    "他突然[laughter]停下来，因为这个故事真的<strong>太好笑</strong>了。 ABC DEF 的内容。\n第三句（括号）。",
]


def _stream(text: str, normalizer: StreamingNormalizer, rng: random.Random) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 8)
        out += normalizer.push(text[i : i + n])
        i += n
    return out + normalizer.flush()


@pytest.mark.parametrize("index", range(len(_STREAM_TEXTS)))
def test_streaming_equals_whole_text(index: int) -> None:
    text = _STREAM_TEXTS[index]
    rng = random.Random(index)
    whole = normalize(text, split=False, backend="none")
    normalizer = StreamingNormalizer(backend="none")
    for trial in range(12):
        normalizer = StreamingNormalizer(backend="none", max_pending=rng.choice([4, 16, 80]))
        segments = _stream(text, normalizer, rng)
        assert all(segments), "no empty segments"
        assert "".join(segments) == whole, trial
    # The normaliser is reusable after flush.
    assert "".join(_stream(text, normalizer, rng)) == whole


def test_streaming_with_wetext() -> None:
    pytest.importorskip("wetext")
    rng = random.Random(3)
    for text in [
        "I bought 3 books. She read 25 pages today! We left at 10:30.",
        "今天是2024年3月4日。气温12.5度。",
    ]:
        whole = normalize(text, split=False, backend="wetext")
        segments = _stream(text, StreamingNormalizer(backend="wetext"), rng)
        assert "".join(segments) == whole


def test_streaming_emits_early_and_rejects_bad_input() -> None:
    normalizer = StreamingNormalizer(backend="none")
    assert normalizer.push("First sentence") == []
    assert normalizer.push(" ends here. Second") == ["First sentence ends here."]
    assert normalizer.flush() == [" Second"]
    assert normalizer.flush() == []
    with pytest.raises(InputError):
        normalizer.push(None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="backend"):
        StreamingNormalizer(backend="bogus")  # type: ignore[arg-type]


def test_text_language() -> None:
    """By script: Chinese characters make "zh" (also mixed with Latin), Latin letters alone "en"; tags and
    digits say nothing."""
    from cosyvoice2.text import text_language

    assert text_language("你好，世界。") == "zh"
    assert text_language("他说 hello 了") == "zh"
    assert text_language("Hello, world.") == "en"
    assert text_language("[laughter]你好") == "zh"
    assert text_language("[laughter] 123 <strong>!</strong>") is None
    assert text_language("") is None
