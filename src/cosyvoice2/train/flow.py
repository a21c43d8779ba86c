"""Train the flow-matching decoder (``cosyvoice2.flow.Flow``): speech tokens + speaker -> 80-bin mel.

    python -m cosyvoice2.train.flow --config recipes/conf/flow.toml

``Flow`` is an inference module; the training forward lives here and calls its submodules (SPEC §14):

1. speaker embedding -> L2 normalise -> ``spk_proj`` -> ``spks`` [B, M];
2. tokens -> ``token_embed`` (padding zeroed) -> ``TokenEncoder`` -> (``mu_film`` from ``spks``, with
   ``speaker_mu``) -> ``encoder_proj`` -> ``mu`` [B, M, T];
3. ``cond``: for each utterance with probability ``prompt_prob``, a random prefix (0 .. ``prompt_max`` of its
   frames) of the target mel, zeros elsewhere: the model learns to continue a prompt;
4. OT-CFM: t ~ U(0, 1) (cosine-warped like the sampler's grid), z ~ N(0, I),
   y = (1 - (1 - sigma_min) t) z + t x1, target u = x1 - (1 - sigma_min) z;
5. classifier-free guidance training: with probability ``cond_drop`` per utterance mu, spks and cond are
   zeroed together;
6. unified streaming/offline training: with probability ``chunk_prob`` per batch both the encoder and the
   estimator use the static chunk masks (the streaming attention pattern), else full attention;
7. loss: MSE between the estimator's output and u over the valid frames, plus ``prior_weight`` x MSE
   between mu and the target mel (not in the official recipe; see ``FlowTrainConfig``).

The target mel is ``audio.prompt_mel`` of the 24 kHz audio padded to a whole number of tokens (960
samples), so mel frames = 2 x tokens; tokens and mel are cut to the shorter of the two.

Recipe tables: ``[train]``, ``[model]`` (``FlowConfig`` with ``[model.encoder]``, ``[model.estimator]``),
``[flow]`` (``FlowTrainConfig``).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..audio import prompt_mel
from ..config import RATES
from ..default_model import config_from_dict
from ..flow import Flow, FlowConfig
from .common import Dist, Task, TrainConfig, checkpoint_config, run_recipe
from .data import FeatureCache, Utt, UttDataset, load_wav, pad_1d, pad_time, read_manifest


@dataclass(frozen=True)
class FlowTrainConfig:
    sigma_min: float = 1e-6
    cond_drop: float = 0.2  # training_cfg_rate
    prompt_prob: float = 0.5
    prompt_max: float = 0.3  # the longest prompt prefix, as a share of the frames
    chunk_prob: float = 0.5
    embedding: str = "utterance"  # speaker condition: "utterance" embedding or the "speaker" mean
    # Prior loss (Grad-TTS / Matcha-TTS): MSE between the encoder's mu and the target mel on valid frames.
    # The official recipe has none (mu is learnt only through the estimator); with a CPU budget it makes the
    # encoder a mel regressor from the first steps, so the ODE starts near the answer. Inference is unchanged.
    prior_weight: float = 0.0
    # Read the target mels from the feature cache (``extract mels``, 8-bit codes) instead of computing them
    # from the audio: the corpus then needs only its manifest, not its FLAC files (a lent GPU machine that
    # is sent a few tens of MB). The codes' rounding error (<= 0.032 in log-mel) is far below the model's.
    mel_cache: bool = False


class FlowObjective(nn.Module):
    def __init__(self, cfg: FlowConfig, train: FlowTrainConfig) -> None:
        super().__init__()
        self.net = Flow(cfg)
        self.train_cfg = train

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """tokens [B, N], token_lens [B], mel [B, M, T = rN], embedding [B, E] -> loss."""
        flow, tc = self.net, self.train_cfg
        tokens, token_lens, x1 = batch["tokens"], batch["token_lens"], batch["mel"]
        if flow.cfg.mel_mean != 0.0 or flow.cfg.mel_std != 1.0:  # the space the ODE runs in (FlowConfig)
            x1 = (x1 - flow.cfg.mel_mean) / flow.cfg.mel_std
        b, m, t_len = x1.shape
        valid_tok = torch.arange(tokens.shape[1], device=tokens.device)[None] < token_lens[:, None]
        x = flow.token_embed(tokens.clamp(min=0)) * valid_tok[..., None]
        streaming = bool(torch.rand(()) < tc.chunk_prob)
        h, frame_mask = flow.encoder(x, token_lens, streaming=streaming)  # [B, T, D], [B, 1, T]
        spks = flow.spk_proj(F.normalize(batch["embedding"], dim=1))
        mu = mu_full = flow.mu(h, spks)  # [B, M, T]
        mask = frame_mask.to(x1.dtype)

        frames = token_lens * flow.cfg.token_mel_ratio
        cond = torch.zeros_like(x1)
        use_prompt = torch.rand(b) < tc.prompt_prob
        for i in range(b):
            if use_prompt[i]:
                n = int(torch.randint(0, int(tc.prompt_max * int(frames[i])) + 1, ()))
                cond[i, :, :n] = x1[i, :, :n]

        t = torch.rand(b, device=x1.device, dtype=x1.dtype)
        if flow.cfg.t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * torch.pi)
        z = torch.randn_like(x1)
        tt = t[:, None, None]
        y = (1 - (1 - tc.sigma_min) * tt) * z + tt * x1
        u = x1 - (1 - tc.sigma_min) * z
        keep = (torch.rand(b, device=x1.device) > tc.cond_drop).to(x1.dtype)
        mu, spks, cond = mu * keep[:, None, None], spks * keep[:, None], cond * keep[:, None, None]
        pred = flow.estimator(y, mask, mu, t, spks, cond, streaming=streaming)
        if flow.cfg.prediction == "residual":  # mu is already zeroed where the condition was dropped
            pred = pred + mu
        target = u if flow.cfg.prediction == "velocity" else x1
        fm = F.mse_loss(pred * mask, target * mask, reduction="sum") / (mask.sum() * m)
        out = {"loss": fm, "streaming": torch.tensor(float(streaming))}
        if tc.prior_weight:
            prior = F.mse_loss(mu_full * mask, x1 * mask, reduction="sum") / (mask.sum() * m)
            out.update(loss=fm + tc.prior_weight * prior, fm=fm.detach(), prior=prior.detach())
        return out


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def padded_mel(wav24: np.ndarray) -> Tensor:
    """24 kHz audio -> mel [M, T] after padding to a whole token (T = 2 x tokens)."""
    per_token = RATES.samples_per_token
    wav = np.pad(wav24, (0, -len(wav24) % per_token))
    return prompt_mel(torch.from_numpy(wav)[None])[0].T


# 8-bit mel codes (``extract mels``): log-mels span [log 1e-5, ~2] = [-11.5, 2]; the fixed grid leaves
# headroom above and rounds to within half a step (0.031).
MEL_CODE_MIN, MEL_CODE_STEP = -11.6, 16.0 / 255


def quantize_mel(mel: Tensor) -> Tensor:
    """Log-mel [M, T] float -> uint8 codes (values outside the grid are clamped)."""
    return ((mel - MEL_CODE_MIN) / MEL_CODE_STEP).round().clamp(0, 255).to(torch.uint8)


def dequantize_mel(codes: Tensor) -> Tensor:
    return codes.float() * MEL_CODE_STEP + MEL_CODE_MIN


def make_loader(
    tokens: dict[str, Tensor],
    embeddings: dict[str, Tensor],
    ratio: int,
    mels: dict[str, Tensor] | None = None,
):
    def load(utt: Utt, rng: random.Random) -> dict[str, Tensor]:
        mel = (
            dequantize_mel(mels[utt.id]) if mels is not None else padded_mel(load_wav(utt, RATES.sample_rate))
        )
        tok = tokens[utt.id].long()
        n = min(len(tok), mel.shape[1] // ratio)
        return {"tokens": tok[:n], "mel": mel[:, : n * ratio], "embedding": embeddings[utt.id]}

    return load


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    tokens, token_lens = pad_1d([it["tokens"] for it in items])
    mel, _ = pad_time([it["mel"] for it in items])
    return {
        "tokens": tokens,
        "token_lens": token_lens,
        "mel": mel,
        "embedding": torch.stack([it["embedding"].float() for it in items]),
    }


def _usable(
    utts: list[Utt], tokens: dict[str, Tensor], emb: dict[str, Tensor], mels: dict[str, Tensor] | None
) -> list[Utt]:
    def ok(u: Utt) -> bool:
        has_mel = mels is None or (u.id in mels and mels[u.id].numel())
        return bool(u.id in tokens and tokens[u.id].numel() and u.id in emb and emb[u.id].numel() and has_mel)

    return [u for u in utts if ok(u)]


def build_task(recipe: dict[str, Any], cfg: TrainConfig, d: Dist) -> Task:
    model_cfg = config_from_dict(FlowConfig, recipe.get("model", {}), "[model]")
    tc = config_from_dict(FlowTrainConfig, recipe.get("flow", {}), "[flow]")
    tokens = FeatureCache(cfg.cache, "tokens").load()
    if tc.embedding == "speaker":
        means = FeatureCache(cfg.cache, "speakers").load()
        all_utts = read_manifest(cfg.corpus, None)
        emb = {u.id: means[u.speaker] for u in all_utts if u.speaker in means}
    else:
        emb = FeatureCache(cfg.cache, "embeddings").load()
    mels = FeatureCache(cfg.cache, "mels").load() if tc.mel_cache else None
    utts = read_manifest(cfg.corpus, cfg.splits, cfg.min_seconds, cfg.max_seconds, cfg.utts)
    utts = _usable(utts, tokens, emb, mels)
    dev = (
        _usable(read_manifest(cfg.corpus, ("dev",), cfg.min_seconds, cfg.max_seconds), tokens, emb, mels)
        if cfg.eval_every
        else []
    )
    load = make_loader(tokens, emb, model_cfg.token_mel_ratio, mels)
    return Task(
        name="flow",
        objective=FlowObjective(model_cfg, tc),
        dataset=UttDataset(utts, load),
        lengths=[u.duration for u in utts],
        collate=collate,
        config=checkpoint_config(model_cfg, cfg, flow=dataclasses.asdict(tc)),
        dev_dataset=UttDataset(dev, load) if dev else None,
        dev_lengths=[u.duration for u in dev],
    )


def main(argv: list[str] | None = None) -> None:
    run_recipe(build_task, __doc__, argv)


if __name__ == "__main__":
    main()
