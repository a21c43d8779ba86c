"""Train the supervised semantic FSQ speech tokenizer (``cosyvoice2.speech_tokenizer``) with a CTC ASR loss.

    python -m cosyvoice2.train.tokenizer --config recipes/conf/tokenizer.toml

Objective: whisper log-mel (16 kHz, 128 bins) -> ``SpeechTokenizerModel`` (the shipped part: convs,
encoder blocks, projection to 8 dims, FSQ with 3 levels at 25 Hz) -> ``ASRHead`` (up-projection, more
encoder blocks, linear) -> CTC over the transcript's characters. The ASR head is thrown away at export.
SpecAugment-style frequency and time masks regularise the encoder. ``[asr] whisper_init`` starts the
encoder from a pretrained Whisper encoder (``cosyvoice2.train.whisper_init``), mostly frozen. Metrics:
CTC loss, how many of the 6561 codes a batch uses, and the code perplexity (both should grow as the
codes start to carry speech).

Recipe tables: ``[train]`` (``TrainConfig``), ``[model]`` (``SpeechTokenizerConfig``), ``[asr]``
(``AsrConfig``). The character vocabulary is built from the train split's transcripts on the first run
and kept in ``<out_dir>/vocab.json``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..audio import whisper_log_mel
from ..config import RATES
from ..default_model import config_from_dict
from ..speech_tokenizer import FSQ, Block, SpeechTokenizerConfig, SpeechTokenizerModel, sinusoids
from .common import (
    Dist,
    Task,
    TrainConfig,
    atomic_write_text,
    broadcast_object,
    checkpoint_config,
    run_recipe,
)
from .data import Utt, UttDataset, load_wav, pad_1d, pad_time, read_manifest

BLANK, UNK = 0, 1


@dataclass(frozen=True)
class AsrConfig:
    n_blocks: int = 2  # encoder blocks after the quantiser
    freq_masks: int = 2
    freq_mask_width: int = 16
    time_masks: int = 2
    time_mask_width: int = 40  # feature frames (100 Hz)
    fsq_noise_prob: float = 0.5  # batches that train through uniform noise instead of rounding (see FSQ)
    # Early in CTC training the head predicts blanks whatever it is fed; the encoder then drifts to values
    # that all round to one code, and straight-through rounding of a constant gives the head nothing to
    # learn from (measured: 1-3 codes in use after 200 steps). A hinge on each FSQ dimension's variance
    # over the batch's frames keeps the values spread across the levels; it is zero once they are.
    spread_min: float = 0.3
    spread_weight: float = 1.0
    # Start the encoder from a pretrained Whisper encoder (cosyvoice2.train.whisper_init): "" (no),
    # "tiny.en" (the eval extra's Whisper tiny.en) or a CTranslate2 model.bin. The [model] table's encoder
    # sizes are then Whisper's; only the last ``train_blocks`` encoder blocks, the final norm, the
    # projection into the quantiser and the ASR head train (the stem and earlier blocks stay frozen).
    whisper_init: str = ""
    train_blocks: int = 1
    # CTC targets. "chars": letters, Chinese as pinyin letters + tone digits. "phonemes": the phonemes the
    # corpus's Kokoro teacher was driven by (misaki, the ``data`` extra: espeak-ng IPA for English,
    # pinyin -> IPA with tone arrows for Chinese), one unit per symbol, stress marks and spaces dropped.
    # Letters are English spelling, which no short stretch of audio determines; phonemes are what it says.
    units: str = "chars"
    # With n_blocks = 0 the head is local: per-token MLP + one conv of this width (tokens), so that each
    # code has to name its own sound. Behind transformer blocks the codes may carry their content only in
    # context (build 4: the mean mel of each code read at 100 % WER), which a small flow and LM trained on
    # a few hours cannot untangle.
    head_kernel: int = 3

    def __post_init__(self) -> None:
        if self.units not in ("chars", "phonemes"):
            raise ValueError(f"[asr] units must be 'chars' or 'phonemes', got {self.units!r}")
        if self.head_kernel < 1 or self.head_kernel % 2 == 0:
            raise ValueError(f"[asr] head_kernel must be odd and >= 1, got {self.head_kernel}")


# --------------------------------------------------------------------------------------------------
# Characters
# --------------------------------------------------------------------------------------------------

_DROP = re.compile(r"[^\w' ]+")


_CJK = re.compile(r"[\u3400-\u9fff]")


def _pinyin(text: str) -> str:
    """Chinese characters -> tone-numbered pinyin syllables ("ni3 hao3"); other text is kept as it is.

    Thousands of hanzi, most seen a handful of times in a small corpus, make a poor CTC target; pinyin
    letters with tone digits are a ~40-symbol alphabet that makes the codes carry pronunciation and tone,
    which is what the LM and flow need. Without pypinyin (the ``data`` extra) the characters are used.
    """
    try:
        from pypinyin import Style, lazy_pinyin
    except ImportError:
        return text
    return " ".join(lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True, errors="default"))


def asr_text(text: str) -> str:
    """Transcript -> the characters the ASR head predicts: NFKC, lower case, no punctuation, single spaces,
    Chinese as pinyin letters and tone digits."""
    t = unicodedata.normalize("NFKC", text).lower()
    if _CJK.search(t):
        t = _pinyin(t)
    t = _DROP.sub(" ", t)
    return " ".join(t.split())


_NOT_PHONE = re.compile(r"[\sˈˌ\W]+")  # spaces, stress marks, punctuation (tone arrows are kept)


def asr_units(text: str, language: str, units: str) -> str:
    """Transcript -> the symbols the ASR head predicts, one character each (see AsrConfig.units)."""
    if units == "chars":
        return asr_text(text)
    from ..text import misaki_g2p

    phonemes, _ = misaki_g2p(language)(unicodedata.normalize("NFKC", text))
    return "".join(ch for ch in phonemes if ch in "↗↘→↓" or not _NOT_PHONE.fullmatch(ch))


def build_vocab(texts: list[str], max_size: int = 6000) -> list[str]:
    """Symbols by frequency (ties by code point); ids 0 and 1 are CTC blank and unknown."""
    counts = Counter(ch for t in texts for ch in t)
    chars = sorted(counts, key=lambda c: (-counts[c], c))[: max_size - 2]
    return ["<blank>", "<unk>", *chars]


def encode_chars(units: str, index: dict[str, int]) -> list[int]:
    return [index.get(ch, UNK) for ch in units]


# --------------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------------


class AsrHead(nn.Module):
    """FSQ values [B, N, Q] -> Linear up to D -> encoder blocks -> character logits [B, N, V].

    With ``asr.n_blocks == 0`` it is local instead: Linear -> GELU -> Conv1d(k = head_kernel) -> GELU.
    """

    def __init__(self, cfg: SpeechTokenizerConfig, asr: AsrConfig, vocab_size: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.up = nn.Linear(cfg.fsq_dim, d)
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, cfg.ff_dim, cfg.dropout) for _ in range(asr.n_blocks)
        )
        self.local = None
        if not asr.n_blocks:
            self.local = nn.Conv1d(d, d, asr.head_kernel, padding=asr.head_kernel // 2)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab_size)

    def forward(self, q: Tensor, lens: Tensor) -> Tensor:
        h = self.up(q)
        if self.local is not None:
            h = F.gelu(self.local(F.gelu(h).transpose(1, 2)).transpose(1, 2))
            return self.out(self.norm(h))
        h = h + sinusoids(h.shape[1], h.shape[2], h.device).to(h.dtype)
        valid = torch.arange(h.shape[1], device=h.device)[None] < lens[:, None]
        for block in self.blocks:
            h = block(h, valid)
        return self.out(self.norm(h))


def spec_augment(feats: Tensor, lens: Tensor, asr: AsrConfig) -> Tensor:
    """Zero random frequency bands and time spans of whisper features [B, M, F] (a copy)."""
    x = feats.clone()
    b, m, _ = x.shape
    for i in range(b):
        for _ in range(asr.freq_masks):
            w = int(torch.randint(0, asr.freq_mask_width + 1, ()))
            f0 = int(torch.randint(0, max(1, m - w), ()))
            x[i, f0 : f0 + w] = 0
        for _ in range(asr.time_masks):
            n = int(lens[i])
            w = min(int(torch.randint(0, asr.time_mask_width + 1, ())), n // 5)
            t0 = int(torch.randint(0, max(1, n - w), ()))
            x[i, :, t0 : t0 + w] = 0
    return x


class TokenizerObjective(nn.Module):
    def __init__(
        self,
        cfg: SpeechTokenizerConfig,
        asr: AsrConfig,
        vocab_size: int,
        init: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.asr_cfg = asr
        self.net = SpeechTokenizerModel(cfg)
        self.net.fsq.noise_prob = asr.fsq_noise_prob
        self.asr = AsrHead(cfg, asr, vocab_size)
        if init is not None:  # a pretrained encoder: load it, freeze all but its last blocks
            self.net.load_state_dict(init, strict=False)
            frozen = [self.net.conv1, self.net.conv2, *self.net.blocks[: cfg.n_blocks - asr.train_blocks]]
            for module in frozen:
                module.requires_grad_(False)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        feats, feat_lens = batch["feats"], batch["feat_lens"]
        if self.training:
            feats = spec_augment(feats, feat_lens, self.asr_cfg)
        bounded, lens = self.net.encode(feats, feat_lens)
        q, codes = self.net.fsq.round(bounded)
        logp = self.asr(q, lens).float().log_softmax(-1)  # [B, N, V]
        loss = F.ctc_loss(
            logp.transpose(0, 1),
            batch["text"],
            lens,
            batch["text_lens"],
            blank=BLANK,
            reduction="mean",
            zero_infinity=True,
        )
        valid = torch.arange(codes.shape[1], device=codes.device)[None] < lens[:, None]
        spread = bounded[valid].float().var(0)  # [Q]
        spread_loss = F.relu(self.asr_cfg.spread_min - spread).mean()
        hist = torch.bincount(codes[valid], minlength=self.net.cfg.codebook_size).float()
        p = hist / hist.sum().clamp(min=1)
        perplexity = torch.exp(-(p * p.clamp(min=1e-12).log()).sum())
        out = {
            "loss": loss + self.asr_cfg.spread_weight * spread_loss,
            "ctc": loss.detach(),
            "spread": spread.mean().detach(),
            "codes_used": (hist > 0).sum(),
            "code_perplexity": perplexity,
        }
        if not self.training:  # dev rows: greedy CTC symbol error rate, what the loss stands for
            out["unit_error"] = torch.tensor(greedy_error(logp, lens, batch["text"], batch["text_lens"]))
        return out


def greedy_error(logp: Tensor, lens: Tensor, text: Tensor, text_lens: Tensor) -> float:
    """Symbol error rate of greedy CTC decoding: logp [B, N, V], text [B, L] -> edits / reference symbols."""
    from ..evaluate import align

    edits = total = 0
    for b, best in enumerate(logp.argmax(-1)):
        hyp = torch.unique_consecutive(best[: int(lens[b])]).tolist()
        ref = text[b, : int(text_lens[b])].tolist()
        edits += align([str(t) for t in ref], [str(t) for t in hyp if t != BLANK]).edits
        total += len(ref)
    return edits / max(total, 1)


class PhonemeReader:
    """A trained tokenizer's CTC head on its own: speech codes [N] -> the phonemes (or characters) it reads.

    It judges token sequences without the flow or a vocoder: the reference tokens of an utterance read at
    the tokenizer's own unit error, and tokens an LM samples read as well as they follow the text. Saved
    as one .safetensors (the head's weights; its configs and vocabulary in the metadata) by
    ``PhonemeReader.save_from_run``; the default model directory's
    ``phoneme_reader.safetensors`` is its tokenizer's (training diagnostics only; inference never reads it).
    """

    def __init__(self, head: AsrHead, fsq: FSQ, vocab: list[str], units: str) -> None:
        self.head, self.fsq, self.vocab, self.units = head.eval(), fsq, vocab, units

    @classmethod
    def load(cls, path: str | Path) -> PhonemeReader:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            weights = {k: f.get_tensor(k).float() for k in f.keys()}
        model = config_from_dict(SpeechTokenizerConfig, json.loads(meta["model"]), "[model]")
        asr = config_from_dict(AsrConfig, json.loads(meta["asr"]), "[asr]")
        vocab = json.loads(meta["vocab"])
        head = AsrHead(model, asr, len(vocab))
        head.load_state_dict(weights)
        return cls(head, FSQ(model.fsq_dim, model.fsq_levels), vocab, asr.units)

    @staticmethod
    def save_from_run(run: str | Path, out: str | Path, checkpoint: str = "best.pt") -> Path:
        """The ASR head of ``run/ckpt/<checkpoint>`` with ``run/vocab.json`` -> ``out`` (fp16, atomic)."""
        from safetensors.torch import save_file

        from ..fileio import atomic_path

        run = Path(run)
        ckpt = torch.load(run / "ckpt" / checkpoint, map_location="cpu", weights_only=False)
        weights = {k[4:]: v.half().contiguous() for k, v in ckpt["model"].items() if k.startswith("asr.")}
        meta = {
            "model": json.dumps(ckpt["config"]["model"]),
            "asr": json.dumps(ckpt["config"]["asr"]),
            "vocab": (run / "vocab.json").read_text(encoding="utf-8"),
            "step": str(ckpt["step"]),
        }
        with atomic_path(out) as tmp:
            save_file(weights, str(tmp), metadata=meta)
        return Path(out)

    @torch.no_grad()
    def read(self, codes: Tensor | list[int]) -> str:
        """Greedy CTC reading of one code sequence [N]."""
        codes = torch.as_tensor(codes, dtype=torch.long).reshape(-1)
        if not codes.numel():
            return ""
        logp = self.head(self.fsq.values(codes)[None], torch.tensor([codes.numel()]))[0]
        best = torch.unique_consecutive(logp.argmax(-1)).tolist()
        return "".join(self.vocab[i] for i in best if i != BLANK)

    def error(self, codes: Tensor | list[int], text: str, language: str) -> tuple[int, int]:
        """(edits, reference units) between the reading of ``codes`` and ``text``'s units."""
        from ..evaluate import align

        ref = asr_units(text, language, self.units)
        return align(list(ref), list(self.read(codes))).edits, len(ref)


# --------------------------------------------------------------------------------------------------
# Data and the task
# --------------------------------------------------------------------------------------------------


def load_item(n_mels: int, index: dict[str, int], units: str):
    def load(utt: Utt, rng: random.Random) -> dict[str, Tensor]:
        wav = torch.from_numpy(load_wav(utt, RATES.tokenizer_sample_rate))[None]
        feats = whisper_log_mel(wav, n_mels)[0]  # [M, F]
        target = encode_chars(asr_units(utt.text, utt.language, units), index)
        return {"feats": feats, "text": torch.tensor(target or [UNK], dtype=torch.long)}

    return load


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    feats, feat_lens = pad_time([it["feats"] for it in items])
    text, text_lens = pad_1d([it["text"] for it in items])
    return {"feats": feats, "feat_lens": feat_lens, "text": text, "text_lens": text_lens}


def vocab_for(out_dir: Path, utts: list[Utt], d: Dist, units: str = "chars") -> list[str]:
    """The run's character vocabulary: read back on resume, built (by rank 0) on the first run."""
    path = out_dir / "vocab.json"
    vocab = None
    if d.is_main:
        if path.is_file():
            vocab = json.loads(path.read_text(encoding="utf-8"))
        else:
            vocab = build_vocab([asr_units(u.text, u.language, units) for u in utts])
            atomic_write_text(path, json.dumps(vocab, ensure_ascii=False) + "\n")
    return broadcast_object(vocab, d)


def whisper_start(model_cfg: SpeechTokenizerConfig, asr: AsrConfig):
    """(model config, initial weights) for ``asr.whisper_init`` (see AsrConfig)."""
    from .whisper_init import default_whisper_path, read_ct2, whisper_config, whisper_state

    if not asr.whisper_init:
        return model_cfg, None
    path = default_whisper_path() if asr.whisper_init == "tiny.en" else Path(asr.whisper_init)
    ct2 = read_ct2(path)
    model_cfg = dataclasses.replace(whisper_config(ct2, model_cfg), dropout=0.0)  # Whisper has none
    if not 0 <= asr.train_blocks <= model_cfg.n_blocks:
        raise ValueError(f"[asr] train_blocks must be in 0..{model_cfg.n_blocks}, got {asr.train_blocks}")
    return model_cfg, whisper_state(ct2, model_cfg)


def build_task(recipe: dict[str, Any], cfg: TrainConfig, d: Dist) -> Task:
    model_cfg = config_from_dict(SpeechTokenizerConfig, recipe.get("model", {}), "[model]")
    asr = config_from_dict(AsrConfig, recipe.get("asr", {}), "[asr]")
    model_cfg, init = whisper_start(model_cfg, asr)
    max_seconds = min(cfg.max_seconds, model_cfg.max_seconds)
    utts = read_manifest(cfg.corpus, cfg.splits, cfg.min_seconds, max_seconds, cfg.utts)
    vocab = vocab_for(Path(cfg.out_dir), utts, d, asr.units)
    index = {c: i for i, c in enumerate(vocab)}
    dev = read_manifest(cfg.corpus, ("dev",), cfg.min_seconds, cfg.max_seconds) if cfg.eval_every else []
    load = load_item(model_cfg.n_mels, index, asr.units)
    return Task(
        name="tokenizer",
        objective=TokenizerObjective(model_cfg, asr, len(vocab), init),
        dataset=UttDataset(utts, load),
        lengths=[u.duration for u in utts],
        collate=collate,
        config=checkpoint_config(model_cfg, cfg, asr=dataclasses.asdict(asr), vocab_size=len(vocab)),
        dev_dataset=UttDataset(dev, load) if dev else None,
        dev_lengths=[u.duration for u in dev],
    )


def main(argv: list[str] | None = None) -> None:
    run_recipe(build_task, __doc__, argv)


if __name__ == "__main__":
    main()
