"""Train the text BPE and the text-speech LM (``cosyvoice2.lm.CosyVoice2LM``).

    python -m cosyvoice2.train.lm --config recipes/conf/lm.toml

Text tokenizer: a byte-level BPE trained with ``tokenizers`` on the train split's transcripts, with the
Qwen2 pre-tokenizer split that ``TextTokenizer`` uses. It is written as ``vocab.json``, ``merges.txt`` and
``tokenizer_config.json`` (no base added tokens), the layout ``TextTokenizer.from_dir`` reads; that loader
appends the CosyVoice 2 special tokens (``<|endofprompt|>``, ``[breath]``, ...) after the BPE vocabulary,
so the LM's text vocabulary is ``len(TextTokenizer)``. It is trained once per run, in
``<out_dir>/text_tokenizer`` (or read from ``[lm] text_tokenizer``).

LM objective: ``CosyVoice2LM.forward_train``, i.e. length-normalised cross entropy on the speech ids, each
example laid out uni-stream (``SOS text TASK speech EOS``) or, with probability ``bistream_prob`` when its
speech/text ratio allows, bistream (``SOS (T5 S15)* T_rest TASK S_rest``, FILL after each full block).
Speech tokens come from the feature cache (``train.extract tokens``).

Recipe tables: ``[train]``, ``[model]`` (``LMConfig`` fields; ``vocab_size`` defaults to the tokenizer
size), ``[lm]`` (``LmTrainConfig``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..default_model import config_from_dict
from ..lm import Attention, CosyVoice2LM, LMConfig, apply_rope
from ..text import QWEN2_SPLIT_PATTERN, TEXT_UNITS, TextTokenizer, to_units
from .common import Dist, Task, TrainConfig, barrier, checkpoint_config, latest_checkpoint, run_recipe
from .data import FeatureCache, Utt, UttDataset, pad_1d, read_manifest

TOKENIZER_SUBDIR = "text_tokenizer"
AUX = "aux:"  # id prefix of LmTrainConfig.aux_corpus's utterances


@dataclass(frozen=True)
class LmTrainConfig:
    bpe_vocab_size: int = 4000
    bistream_prob: float = 0.5
    text_tokenizer: str = ""  # an existing BPE directory; default <out_dir>/text_tokenizer
    text_units: str = "bpe"  # a new BPE's input: "bpe", "pinyin" or "phonemes" (text.TEXT_UNITS)
    init_std: float = 0.02
    # Guided attention (after Tachibana et al. 2018): the first ``guided_heads`` query heads of every layer
    # become alignment heads. The loss is 1 - the attention that speech query n (of N) puts on the text
    # near the diagonal, sum_t a[n, t] exp(-(t/T - n/N)^2 / 2 sigma^2) over text positions t (of T). A
    # decoder-only LM must find the alignment on its own; from a few hours of speech it did not (no head
    # of the build 6 LM attended monotonically). Mass renormalised over the text alone was no prior: the
    # guided heads then stopped looking at the text at all. Training only: the model and inference are
    # unchanged. 0 = off, the official recipe.
    guided_attention: float = 0.0
    guided_heads: int = 1
    guided_sigma: float = 0.2
    # Share of speech input ids replaced by random ids in training (targets unchanged). With teacher
    # forcing, a 25 Hz code is mostly predictable from the codes before it; the build 7 LM's guided head
    # swept the text correctly while it sampled, yet what it said ignored the text (phoneme error ~100 %).
    input_noise: float = 0.0
    # Draw each example's share from U(0, input_noise) instead: some examples then keep almost all of their
    # history and some almost none, where only the text (its guided heads) says what comes next.
    input_noise_uniform: bool = False
    # Share of training utterances preceded by another utterance of the same speaker and language (texts
    # and speech tokens concatenated): the layout of zero-shot and saved-voice synthesis, where the voice's
    # transcript and prompt tokens come first. Trained on single utterances only, the build 10 LM read
    # worse after a prompt than with none (built-in voices, 15 of 18 with English prompts, 16 sentences:
    # English WER 76.9 % after the prompt vs 60.1 % without; Chinese CER 160.8 vs 67.7 %). Which utterances
    # get a prompt is fixed per utterance (so batches can be sized by the pair's length); the prompt is drawn
    # anew each time from the speaker's utterances of ``prompt_seconds``.
    prompt_pairs: float = 0.0
    prompt_seconds: tuple[float, float] = (2.0, 8.0)
    # Keep the prompt's speech ids free of ``input_noise``: at inference they are the voice's real tokens,
    # and noised like the rest they teach the LM that the prompt's speech says little about what follows.
    prompt_clean: bool = False
    # A second speech codebook beside the model's (training only): utterances of ``aux_corpus`` with the
    # tokens of ``aux_cache`` (another tokenizer's codes, e.g. the one the LM was trained on before) go
    # through their own speech embedding and head (``aux_speech_*`` on the objective, not exported) and
    # share everything else. Why: a new tokenizer's codes exist only for the audio on hand (a few hours),
    # while the old codes cover every hour the LM has seen; the shared transformer keeps learning text to
    # speech from all of them while the model's own tables learn the new codes. Single process only (the
    # unused table of a batch would stall DDP's gradient reduction).
    aux_corpus: str = ""
    aux_cache: str = ""


# --------------------------------------------------------------------------------------------------
# Text BPE
# --------------------------------------------------------------------------------------------------


def train_bpe(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int,
    min_frequency: int = 2,
    units: str = "bpe",
) -> Path:
    """Train a byte-level BPE on ``texts`` (as ``units`` turns them, recorded in tokenizer_config.json);
    write the ``TextTokenizer`` files to ``out_dir`` atomically."""
    if units not in TEXT_UNITS:
        raise ValueError(f"[lm] text_units {units!r} is not one of {TEXT_UNITS}")
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tk.train_from_iterator((to_units(t, units) for t in texts), trainer)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tk.model.save(str(tmp))
        config = {
            "tokenizer_class": "cosyvoice2-bpe",
            "added_tokens_decoder": {},
            "bpe_vocab_size": vocab_size,
        }
        if units != "bpe":
            config["text_units"] = units
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        TextTokenizer.from_dir(tmp)  # the files must load before they replace anything
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def text_tokenizer_for(out_dir: Path, lm_cfg: LmTrainConfig, utts: list[Utt], d: Dist) -> TextTokenizer:
    """The run's BPE: the configured one, the run's own, or (rank 0, first run) a newly trained one."""
    path = Path(lm_cfg.text_tokenizer) if lm_cfg.text_tokenizer else out_dir / TOKENIZER_SUBDIR
    if d.is_main and not (path / "vocab.json").is_file():
        if lm_cfg.text_tokenizer:
            raise FileNotFoundError(f"text tokenizer {path} does not exist")
        train_bpe((u.text for u in utts), path, lm_cfg.bpe_vocab_size, units=lm_cfg.text_units)
    barrier(d)
    return TextTokenizer.from_dir(path)


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


def init_weights(model: nn.Module, std: float) -> None:
    """GPT-style init for training from scratch: N(0, std) weights of Linear/Embedding, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def head_attention(attn: Attention, x: Tensor, plan: Any, heads: int) -> Tensor:
    """The attention probabilities [B, heads, L, L] (fp32) of ``attn``'s first ``heads`` query heads,
    recomputed from the layer's input x [B, L, D] and call plan as ``Attention.forward`` computes them."""
    B, L, _ = x.shape
    hd, group = attn.hd, attn.h // attn.hkv
    kv = sorted({h // group for h in range(heads)})
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x, w[: heads * hd], b[: heads * hd]).view(B, L, heads, hd).transpose(1, 2)
    k_rows = torch.cat([torch.arange(hd) + (attn.h + j) * hd for j in kv]).to(w.device)
    k = F.linear(x, w[k_rows], b[k_rows]).view(B, L, len(kv), hd).transpose(1, 2)
    q, k = apply_rope(q, plan.cos, plan.sin), apply_rope(k, plan.cos, plan.sin)
    k = k[:, [kv.index(h // group) for h in range(heads)]]  # the KV head of each query head
    scores = (q @ k.transpose(-1, -2)) / hd**0.5  # [B, heads, L, L]
    if plan.mask is not None:
        scores = scores.masked_fill(~plan.mask, float("-inf"))
    return scores.float().softmax(-1)


def guided_attention_loss(
    attn: Attention,
    x: Tensor,
    plan: Any,
    targets: Tensor,
    is_text: Tensor,
    speech_vocab: int,
    heads: int,
    sigma: float,
) -> Tensor:
    """Alignment penalty of one layer's first ``heads`` query heads (``LmTrainConfig``), in [0, 1].

    x [B, L, D]: the layer's attention input; targets [B, L] (speech ids where a speech id is predicted);
    is_text [B, L]. The queries are the positions that predict speech id n; each loses 1 minus its
    attention on text positions t weighted by a Gaussian of t/T - n/N. Returns the mean over queries.
    """
    a = head_attention(attn, x, plan, heads) * is_text[:, None, None, :]
    query = (targets >= 0) & (targets < speech_vocab)  # [B, L]
    n = (query.cumsum(1) - 0.5) / query.sum(1, keepdim=True).clamp_min(1)  # (n + 1/2) / N
    t = (is_text.cumsum(1) - 0.5) / is_text.sum(1, keepdim=True).clamp_min(1)
    near = torch.exp(-((t[:, None, :] - n[:, :, None]) ** 2) / (2 * sigma**2))  # [B, L, L]
    per_query = 1 - (a * near[:, None]).sum(-1)  # [B, heads, L]
    return per_query.masked_select(query[:, None, :].expand_as(per_query)).mean()


def text_gain(net: CosyVoice2LM, text: Tensor, speech: Tensor) -> dict[str, float]:
    """Teacher-forced ``loss`` and ``acc``, and ``gain``: how much the text lowers the loss, for one
    uni-stream example text [Lt], speech [Ls].

    The gain is the loss with the text reversed (the same units and length, in the wrong order) minus the
    loss with the true text, in nats per predicted position. An LM that predicts a code from the codes
    before it and ignores what it was asked to say scores ~0 however low its loss; the build 7 LM scored
    0.05-0.10 and sampled gibberish."""
    lens = torch.tensor([len(text)]), torch.tensor([len(speech)])
    with torch.no_grad():
        true = net.forward_train(text[None], lens[0], speech[None], lens[1], bistream_prob=0.0)
        rev = net.forward_train(text.flip(0)[None], lens[0], speech[None], lens[1], bistream_prob=0.0)["loss"]
    return {"loss": float(true["loss"]), "acc": float(true["acc"]), "gain": float(rev - true["loss"])}


def text_alignment(net: CosyVoice2LM, text: Tensor, speech: Tensor) -> list[tuple[float, float]]:
    """Per layer and head (layer-major): (share of attention on the text, correlation of each speech
    position with the text position it attends to on average) for one teacher-forced uni-stream example.
    An LM that reads its text has heads with a correlation near 1; the probe reports the best."""
    x, y, is_text = net.train_example(text, speech, bistream=False)
    seen = []
    hooks = [
        layer.attn.register_forward_pre_hook(lambda m, a: seen.append((m, *a)))
        for layer in net.backbone.layers
    ]
    try:
        with torch.no_grad():
            net.forward_embeds(x[None])
    finally:
        for h in hooks:
            h.remove()
    query = (y >= 0) & (y < net.cfg.speech_token_size)
    pos = torch.arange(int(is_text.sum()), dtype=torch.float32)
    out = []
    with torch.no_grad():
        for m, h, plan in seen:
            a = head_attention(m, h, plan, m.h)[0][:, query][:, :, is_text]  # [H, N, T]
            mass = a.sum(-1)
            where = (a / mass[..., None].clamp_min(1e-9) * pos).sum(-1)  # [H, N]
            ideal = torch.arange(where.shape[1], dtype=torch.float32)
            for hh in range(a.shape[0]):
                c = torch.corrcoef(torch.stack([where[hh], ideal]))[0, 1]
                out.append((float(mass[hh].mean()), float(c.nan_to_num(0.0))))
    return out


class LMObjective(nn.Module):
    def __init__(self, cfg: LMConfig, bistream_prob: float, lm_cfg: LmTrainConfig | None = None) -> None:
        super().__init__()
        self.net = CosyVoice2LM(cfg)
        self.bistream_prob = bistream_prob
        self.lm_cfg = lm_cfg or LmTrainConfig()
        # LmTrainConfig.aux_corpus: the second codebook's tables, shaped like the model's
        self.aux_speech_embedding: nn.Embedding | None = None
        self.aux_speech_head: nn.Linear | None = None
        if self.lm_cfg.aux_corpus:
            self.aux_speech_embedding = nn.Embedding(cfg.speech_vocab, cfg.hidden_size)
            self.aux_speech_head = nn.Linear(cfg.hidden_size, cfg.speech_vocab, bias=True)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean loss over the predicted positions of the batch. Rows with ``batch["codebook"]`` 1 use the
        auxiliary speech tables: each codebook's rows run as their own sub-batch (the layouts and losses
        are per example, so the combined mean weights each row as one batch would)."""
        book = batch.get("codebook")
        if self.aux_speech_embedding is None or book is None:
            return self._forward(batch)
        if not bool(book.any()):  # the log averages every key over every step: keep aux_tokens in it
            return {**self._forward(batch), "aux_tokens": torch.zeros(())}
        outs = []
        for aux in (False, True):
            rows = book.bool() if aux else ~book.bool()
            if not bool(rows.any()):
                continue
            sub = {k: v[rows] for k, v in batch.items()}
            with self._tables(aux):
                outs.append(self._forward(sub))
        n = sum(o["n_tokens"] for o in outs)
        total = {"n_tokens": n}
        for k in ("loss", "acc", "ce", "ga"):
            if k in outs[0]:
                total[k] = sum(o[k] * o["n_tokens"] for o in outs) / n
        total["aux_tokens"] = (outs[-1]["n_tokens"] / n).detach().float()
        return total

    @contextlib.contextmanager
    def _tables(self, aux: bool):
        """The network's speech embedding and head swapped for the auxiliary codebook's while inside."""
        if not aux:
            yield
            return
        net = self.net
        own = net.speech_embedding, net.speech_head
        net.speech_embedding, net.speech_head = self.aux_speech_embedding, self.aux_speech_head
        try:
            yield
        finally:
            net.speech_embedding, net.speech_head = own

    def _forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        guided = self.training and self.lm_cfg.guided_attention > 0
        seen: list[tuple[Attention, Tensor, Any]] = []
        hooks = []
        if guided:  # keep each layer's attention input; the loss recomputes the guided heads' maps
            for layer in self.net.backbone.layers:
                hooks.append(layer.attn.register_forward_pre_hook(lambda m, args: seen.append((m, *args))))
        noise: float | Tensor = self.lm_cfg.input_noise if self.training else 0.0
        if self.training and self.lm_cfg.input_noise_uniform:
            noise = torch.rand(batch["text"].shape[0]) * self.lm_cfg.input_noise
        try:
            # The layout draws use Python's global generator, which checkpoints save and restore per rank.
            out = self.net.forward_train(
                batch["text"],
                batch["text_lens"],
                batch["speech"],
                batch["speech_lens"],
                self.bistream_prob,
                rng=random,
                input_noise=noise,
                clean_prefix=batch.get("prompt_lens") if self.lm_cfg.prompt_clean else None,
            )
        finally:
            for h in hooks:
                h.remove()
        if guided:
            c, vocab = self.lm_cfg, self.net.cfg.speech_token_size
            ga = torch.stack(
                [
                    guided_attention_loss(
                        m, x, plan, out["targets"], out["is_text"], vocab, c.guided_heads, c.guided_sigma
                    )
                    for m, x, plan in seen
                ]
            ).mean()
            out["ce"] = out["loss"]
            out["ga"] = ga
            out["loss"] = out["loss"] + c.guided_attention * ga
        return out


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    text, text_lens = pad_1d([it["text"] for it in items])
    speech, speech_lens = pad_1d([it["speech"] for it in items])
    prompt = torch.tensor([int(it.get("prompt_len", 0)) for it in items])  # [B] leading prompt speech ids
    return {
        "text": text,
        "text_lens": text_lens,
        "speech": speech,
        "speech_lens": speech_lens,
        "prompt_lens": prompt,
        "codebook": torch.tensor([int(it.get("codebook", 0)) for it in items]),  # [B] 1: the aux codebook
    }


def lm_items(
    utts: list[Utt], tok: TextTokenizer, tokens: dict[str, Tensor]
) -> tuple[list[Utt], dict[str, Tensor]]:
    """Utterances with speech tokens and non-empty text; their text ids (pre-computed once)."""
    keep, text_ids = [], {}
    for u in utts:
        ids = tok.encode(u.text)
        if u.id in tokens and tokens[u.id].numel() and ids:
            keep.append(u)
            text_ids[u.id] = torch.tensor(ids, dtype=torch.long)
    return keep, text_ids


def prompt_partners(
    utts: list[Utt], share: float, seconds: tuple[float, float], seed: int
) -> dict[str, list[Utt]]:
    """``{utterance id: candidate prompts}`` for the ``share`` of ``utts`` trained after a prompt (see
    ``LmTrainConfig.prompt_pairs``): the other utterances of the same speaker and language, with another
    text, of ``seconds`` duration. Utterances without a candidate train alone."""
    if share <= 0:
        return {}
    pool: dict[tuple[str, str], list[Utt]] = {}
    for u in utts:
        if seconds[0] <= u.duration <= seconds[1]:
            pool.setdefault((u.speaker, u.language), []).append(u)
    out = {}
    for u in utts:
        if random.Random(f"{seed}:prompt:{u.id}").random() >= share:
            continue
        cands = [p for p in pool.get((u.speaker, u.language), []) if p.id != u.id and p.text != u.text]
        if cands:
            out[u.id] = cands
    return out


# --------------------------------------------------------------------------------------------------
# A new tokenizer's codebook from the old one's (recipes/codebook_map.py; LmTrainConfig.aux_corpus)
# --------------------------------------------------------------------------------------------------


def pair_counts(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], codes: int) -> torch.Tensor:
    """C [codes, codes]: frames with old code i and new code j, over the utterances both caches hold."""
    pairs = []
    for k in sorted(set(old) & set(new)):
        a, b = old[k].long().flatten(), new[k].long().flatten()
        if len(a) != len(b):
            raise ValueError(f"{k}: {len(a)} old codes but {len(b)} new ones (not the same frames)")
        pairs.append(a * codes + b)
    if not pairs:
        raise ValueError("the two caches share no utterance")
    return torch.bincount(torch.cat(pairs), minlength=codes * codes).double().view(codes, codes)


def map_tables(
    emb: torch.Tensor, head_w: torch.Tensor, head_b: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The new codebook's (embedding [V, D], head weight [V, D], head bias [V]) from the old's and
    C [K, K] (K codes; V >= K: rows from K on are stop ids, copied)."""
    k = counts.shape[0]
    seen = counts.sum(0) > 0  # new codes that occur
    p_old_given_new = counts / counts.sum(0, keepdim=True).clamp_min(1)  # [old, new], columns sum to 1
    p_new_given_old = counts / counts.sum(1, keepdim=True).clamp_min(1)  # rows sum to 1
    mix = p_old_given_new.T.float()  # [new, old]
    e, w, b = emb.clone().float(), head_w.clone().float(), head_b.clone().float()
    e[:k], w[:k] = mix @ emb[:k].float(), mix @ head_w[:k].float()
    log_p = torch.where(counts > 0, p_new_given_old.clamp_min(1e-12).log(), torch.zeros_like(counts))
    b[:k] = mix @ head_b[:k].float() + (p_old_given_new * log_p).sum(0).float()
    e[:k][~seen] = emb[:k].float().mean(0)
    w[:k][~seen] = head_w[:k].float().mean(0)
    b[:k][~seen] = b[:k][seen].min()
    return e, w, b


def build_task(recipe: dict[str, Any], cfg: TrainConfig, d: Dist) -> Task:
    lm_cfg = config_from_dict(LmTrainConfig, recipe.get("lm", {}), "[lm]")
    utts = read_manifest(cfg.corpus, cfg.splits, cfg.min_seconds, cfg.max_seconds, cfg.utts)
    tok = text_tokenizer_for(Path(cfg.out_dir), lm_cfg, utts, d)
    model_table = dict(recipe.get("model", {}))
    model_table.setdefault("vocab_size", len(tok))
    model_cfg = config_from_dict(LMConfig, model_table, "[model]")
    if model_cfg.vocab_size < len(tok):
        raise ValueError(f"[model] vocab_size {model_cfg.vocab_size} < text tokenizer size {len(tok)}")
    speech = FeatureCache(cfg.cache, "tokens").load()
    utts, text_ids = lm_items(utts, tok, speech)
    partners = prompt_partners(utts, lm_cfg.prompt_pairs, tuple(lm_cfg.prompt_seconds), cfg.seed)
    if bool(lm_cfg.aux_corpus) != bool(lm_cfg.aux_cache):
        raise ValueError("[lm] aux_corpus and aux_cache go together")
    if lm_cfg.aux_corpus:
        if d.distributed:
            raise ValueError("[lm] aux_corpus trains in a single process (run without torchrun)")
        # The aux rows' ids get a prefix: the same utterance may be in both sets, with different codes.
        aux_speech = {AUX + k: v for k, v in FeatureCache(lm_cfg.aux_cache, "tokens").load().items()}
        aux_utts = [
            dataclasses.replace(u, id=AUX + u.id)
            for u in read_manifest(lm_cfg.aux_corpus, cfg.splits, cfg.min_seconds, cfg.max_seconds)
        ]
        aux_utts, aux_text = lm_items(aux_utts, tok, aux_speech)
        # prompts come from the same codebook: one sequence never mixes the two
        partners.update(
            prompt_partners(aux_utts, lm_cfg.prompt_pairs, tuple(lm_cfg.prompt_seconds), cfg.seed)
        )
        speech.update(aux_speech)
        text_ids.update(aux_text)
        if d.is_main:
            print(f"[lm] {len(utts)} utterances in the model's codebook, {len(aux_utts)} in the aux codebook")
        utts = utts + aux_utts
    if partners and d.is_main:
        print(f"[lm] {len(partners)} of {len(utts)} utterances train after a prompt of the same speaker")

    def load(utt: Utt, rng: random.Random) -> dict[str, Tensor]:
        text, tokens = text_ids[utt.id], speech[utt.id].long()
        prompt_len = 0
        if utt.id in partners:  # [prompt text ++ text], [prompt speech ++ speech]: zero-shot's layout
            p = rng.choice(partners[utt.id])
            prompt_len = len(speech[p.id])
            text, tokens = torch.cat([text_ids[p.id], text]), torch.cat([speech[p.id].long(), tokens])
        return {
            "text": text,
            "speech": tokens,
            "prompt_len": torch.tensor(prompt_len),
            "codebook": torch.tensor(int(utt.id.startswith(AUX))),
        }

    def length(u: Utt) -> float:  # the batch sizer's view: a paired utterance counts its mean prompt
        cands = partners.get(u.id)
        return u.duration + (sum(p.duration for p in cands) / len(cands) if cands else 0.0)

    objective = LMObjective(model_cfg, lm_cfg.bistream_prob, lm_cfg)
    if latest_checkpoint(cfg.out_dir) is None:
        init_weights(objective.net, lm_cfg.init_std)
    dev_utts: list[Utt] = []
    if cfg.eval_every:
        dev_utts, dev_ids = lm_items(
            read_manifest(cfg.corpus, ("dev",), cfg.min_seconds, cfg.max_seconds), tok, speech
        )
        text_ids.update(dev_ids)
    return Task(
        name="lm",
        objective=objective,
        dataset=UttDataset(utts, load),
        lengths=[length(u) for u in utts],
        collate=collate,
        config=checkpoint_config(model_cfg, cfg, lm=dataclasses.asdict(lm_cfg)),
        dev_dataset=UttDataset(dev_utts, load) if dev_utts else None,
        dev_lengths=[u.duration for u in dev_utts],
        # fresh aux tables would teach the shared transformer noise
        init_required={"aux_speech_": "for [lm] aux_corpus, make one with recipes/codebook_map.py"}
        if lm_cfg.aux_corpus
        else {},
    )


def main(argv: list[str] | None = None) -> None:
    run_recipe(build_task, __doc__, argv)


if __name__ == "__main__":
    main()
