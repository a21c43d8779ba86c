"""Train the HiFT vocoder (``cosyvoice2.hift.HiFT``) as a GAN on fixed-length segments.

    python -m cosyvoice2.train.hift --config recipes/conf/hift.toml

Each item is a random ``segment_frames`` x 480-sample crop of a 24 kHz utterance, its 80-bin flow mel
(``audio.prompt_mel``, fmax 8 kHz: what the flow will produce) and a reference f0 per mel frame from a
YIN pitch tracker (``yin_f0``). The generator is HiFT with weight norm on its convs (folded at export).

Per step (SPEC §14, minus the TPR term):

* generator forward: f0 = f0_predictor(mel); source = sine source(f0, detached); audio = decode(mel, source);
* discriminator step: least-squares GAN loss of a multi-period discriminator (periods 2, 3, 5, 7, 11, on
  the waveform folded into [L / p, p] images) and a multi-resolution spectrogram discriminator (three
  STFT resolutions, 2-D convs over time x frequency), real vs generated (detached) audio;
* generator step: adversarial loss + ``fm_weight`` x feature matching (L1 between the discriminators'
  hidden maps on real and generated audio) + ``mel_weight`` x L1 between log-mels (fmax = Nyquist) +
  ``f0_weight`` x L1(f0_pred, reference f0) in Hz.

The first ``adversarial_from`` steps train the generator on the mel and f0 losses alone. HiFT trains in
float32 (its iSTFT and the spectrogram losses need it). Both networks and both optimizers are in the
checkpoints; gradient accumulation is not used here.

Recipe tables: ``[train]``, ``[model]`` (``HiFTConfig``), ``[hift]`` (``HiftTrainConfig``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.parametrizations import weight_norm

from ..audio import FLOW_MEL, prompt_mel
from ..config import RATES
from ..default_model import config_from_dict
from ..hift import HiFT, HiFTConfig, apply_weight_norm
from .common import (
    Budget,
    Dist,
    JsonlLog,
    TrainConfig,
    all_mean,
    atomic_write_text,
    barrier,
    checkpoint_config,
    configure_threads,
    distributed,
    gather_objects,
    latest_checkpoint,
    load_checkpoint,
    load_recipe,
    lr_at,
    make_optimizer,
    recipe_parser,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    stop_on_signals,
    to_device,
    train_config,
    warm_start,
)
from .data import BatchStream, Utt, UttDataset, load_wav, read_manifest

LOSS_MEL = dataclasses.replace(FLOW_MEL, fmax=None)  # the GAN's mel loss spans the whole band
_SILENCE_FLOOR_DB = -70.0  # yin_f0: frames below this mean power (dBFS) are unvoiced


@dataclass(frozen=True)
class HiftTrainConfig:
    segment_frames: int = 50  # mel frames per training segment (480 samples each: 1 s)
    mel_weight: float = 45.0
    fm_weight: float = 2.0
    f0_weight: float = 1.0
    adversarial_from: int = 0  # steps of mel/f0-only generator training before the GAN starts
    lr_d: float = 0.0  # discriminator learning rate (0: the generator's)
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    period_channels: tuple[int, ...] = (32, 128, 512, 1024)
    resolutions: tuple[tuple[int, int, int], ...] = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))
    spec_channels: int = 32
    f0_min: float = 50.0
    f0_max: float = 600.0
    # Multi-resolution STFT loss (spectral convergence + log-magnitude L1, Yamamoto et al. 2020). The 80-bin
    # mel loss cannot see harmonics; without the GAN a generator trained on it alone smears them and the
    # formants (measured on the first CPU build: Whisper could not read its copy-synthesis, WER 98 %).
    stft_weight: float = 0.0
    stft_resolutions: tuple[tuple[int, int, int], ...] = ((512, 120, 480), (1024, 240, 960), (256, 50, 200))
    # The f0 predictor outputs Hz straight from a Linear, so at a GAN-sized Adam learning rate its output
    # moves slowly (a weight moves ~lr per step). Build 1 (2150 steps at 2e-4, mel loss only) ended with a
    # predictor that says ~8 Hz on the voiced frames of a low voice (under the 10 Hz voicing threshold: no
    # sines at all there) and a decoder that barely used the source (cepstral peak of its copy-synthesis
    # 0.07 vs 0.17 for the real audio). Hence: a learning-rate multiple for the predictor, its output bias
    # started at a typical f0, and the option to drive the source by the reference f0 while training.
    f0_lr_scale: float = 1.0
    f0_bias_init: float = 0.0  # Hz; 0 keeps PyTorch's default init
    # Weight of the frames YIN calls voiced in the f0 L1 (unvoiced frames weigh 1). Why: ~65 % of the
    # corpus's frames are unvoiced, so an L1 predictor unsure of a new voice settles on the median, 0 Hz:
    # build 7's called ~40 % of the voiced frames of a held-out voice unvoiced, its sine source fell
    # silent there and Whisper read that voice's copy-synthesis at 23 % WER (4.9 % for the recording).
    f0_voiced_weight: float = 1.0
    # Which f0 drives the sine source while training: "predicted" (the official way: the predictor's own,
    # detached) or "reference" (YIN's f0 of the real audio: the decoder learns to use correct harmonics
    # from the first step, whatever the predictor's state; inference always uses the predictor).
    source_f0: str = "predicted"
    # Ground-truth-aligned mels (``train.gta``): a feature cache whose ``gta_mels`` are the flow's mels of
    # the corpus's utterances, frame for frame with their audio. A ``gta_share`` of the segments then
    # take the flow's mel as input (the target stays the real audio): the vocoder learns to render what
    # it hears at inference, not only mels of real speech. "" (default): mels of the real audio only.
    gta_cache: str = ""
    gta_share: float = 1.0

    def __post_init__(self) -> None:
        if self.source_f0 not in ("predicted", "reference"):
            raise ValueError(f"[hift] source_f0 must be 'predicted' or 'reference', got {self.source_f0!r}")
        if not 0.0 <= self.gta_share <= 1.0:
            raise ValueError(f"[hift] gta_share must be in [0, 1], got {self.gta_share}")
        if self.f0_voiced_weight <= 0:
            raise ValueError(f"[hift] f0_voiced_weight must be > 0, got {self.f0_voiced_weight}")


def f0_l1(pred: Tensor, ref: Tensor, voiced_weight: float = 1.0) -> Tensor:
    """Mean |pred - ref| in Hz over frames [B, T], voiced frames (ref > 0) weighted ``voiced_weight``."""
    w = torch.where(ref > 0, voiced_weight, 1.0).to(pred.dtype)
    return (w * (pred - ref).abs()).sum() / w.sum()


# --------------------------------------------------------------------------------------------------
# Reference pitch: YIN (de Cheveigne & Kawahara 2002)
# --------------------------------------------------------------------------------------------------


def yin_f0(
    wav: np.ndarray,
    n_frames: int,
    sr: int = RATES.sample_rate,
    hop: int = RATES.hop_length,
    fmin: float = 50.0,
    fmax: float = 600.0,
    threshold: float = 0.15,
    silence_db: float = 50.0,
) -> np.ndarray:
    """f0 in Hz per mel frame [n_frames] (0 = unvoiced), frame i centred where ``prompt_mel``'s frame i is.

    Difference function over a window of 2 x the longest period, cumulative-mean normalisation, the first
    dip below ``threshold`` followed down to its local minimum, parabolic refinement. Frames quieter than
    the loudest frame by ``silence_db``, or below -70 dBFS, are unvoiced.
    """
    tau_min, tau_max = max(2, int(sr / fmax)), int(sr / fmin)
    n = 2 * tau_max  # analysis window
    centres = np.arange(n_frames) * hop + hop // 2  # prompt_mel frame i covers [i hop - 720, i hop + 1200)
    x = np.pad(wav.astype(np.float64), (n // 2, n // 2 + hop * n_frames))
    idx = centres[:, None] + np.arange(n)[None, :]  # window starts at centre - n/2 in the padded signal
    frames = x[idx]  # [F, n]
    frames = frames - frames.mean(axis=1, keepdims=True)
    spec = np.fft.rfft(frames, 2 * n, axis=1)
    acf = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :n]  # r[tau] = sum_j x_j x_{j+tau}
    energy = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames**2, axis=1)], axis=1)  # [F, n+1]
    taus = np.arange(n)
    diff = energy[:, n - taus] + energy[:, n : n + 1] - energy[:, taus] - 2 * acf  # d(tau)
    diff[:, 0] = 0.0
    cum = np.cumsum(diff[:, 1:], axis=1)
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] * taus[1:] / np.maximum(cum, 1e-12)
    level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    f0 = np.zeros(n_frames)
    for i in range(n_frames):
        if level[i] < max(level.max() - silence_db, _SILENCE_FLOOR_DB):
            continue
        below = np.nonzero(cmnd[i, tau_min : tau_max + 1] < threshold)[0]
        if below.size == 0:
            continue
        tau = tau_min + int(below[0])
        while tau + 1 <= tau_max and cmnd[i, tau + 1] < cmnd[i, tau]:
            tau += 1
        a, b, c = cmnd[i, tau - 1], cmnd[i, tau], cmnd[i, min(tau + 1, n - 1)]
        denom = a - 2 * b + c
        shift = 0.5 * (a - c) / denom if abs(denom) > 1e-12 else 0.0
        f0[i] = sr / (tau + float(np.clip(shift, -1, 1)))
    return f0.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Discriminators
# --------------------------------------------------------------------------------------------------


class PeriodDiscriminator(nn.Module):
    """Waveform [B, 1, L] folded to [B, 1, L/p, p]; 2-D convs striding over the L/p axis."""

    def __init__(self, period: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.period = period
        chans = (1, *channels)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(chans[i], chans[i + 1], (5, 1), (3, 1), padding=(2, 0)))
            for i in range(len(channels))
        )
        self.convs.append(weight_norm(nn.Conv2d(chans[-1], chans[-1], (5, 1), 1, padding=(2, 0))))
        self.post = weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, _, n = x.shape
        pad = -n % self.period
        if pad:
            x = F.pad(x, (0, pad), mode="reflect")
        h = x.view(b, 1, -1, self.period)
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.1)
            feats.append(h)
        h = self.post(h)
        feats.append(h)
        return h.flatten(1), feats


class SpectrogramDiscriminator(nn.Module):
    """|STFT| [B, 1, frames, bins] -> 2-D convs striding over frequency."""

    def __init__(self, n_fft: int, hop: int, win: int, channels: int) -> None:
        super().__init__()
        self.n_fft, self.hop, self.win = n_fft, hop, win
        self.register_buffer("window", torch.hann_window(win), persistent=False)
        c = channels
        self.convs = nn.ModuleList(
            [
                weight_norm(nn.Conv2d(1, c, (3, 9), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 3), padding=(1, 1))),
            ]
        )
        self.post = weight_norm(nn.Conv2d(c, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        spec = torch.stft(
            x.squeeze(1), self.n_fft, self.hop, self.win, window=self.window, center=True, return_complex=True
        )
        h = spec.abs().transpose(1, 2)[:, None]  # [B, 1, frames, bins]
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.1)
            feats.append(h)
        h = self.post(h)
        feats.append(h)
        return h.flatten(1), feats


class Discriminators(nn.Module):
    """All sub-discriminators: audio [B, 1, L] -> [(scores [B, *], hidden maps)] per sub-discriminator."""

    def __init__(self, tc: HiftTrainConfig) -> None:
        super().__init__()
        self.subs = nn.ModuleList(
            [PeriodDiscriminator(p, tc.period_channels) for p in tc.periods]
            + [SpectrogramDiscriminator(*r, tc.spec_channels) for r in tc.resolutions]
        )

    def forward(self, x: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(x) for d in self.subs]


def discriminator_loss(outs: list[tuple[Tensor, list[Tensor]]], n_real: int) -> Tensor:
    """Least squares: real scores -> 1, generated -> 0. ``outs`` from a batch of [real; generated]."""
    loss = 0.0
    for score, _ in outs:
        loss = loss + ((1 - score[:n_real]) ** 2).mean() + (score[n_real:] ** 2).mean()
    return loss


def generator_losses(outs: list[tuple[Tensor, list[Tensor]]], n_real: int) -> tuple[Tensor, Tensor]:
    """(adversarial, feature matching) for the generated half of a [real; generated] batch."""
    adv, fm = 0.0, 0.0
    for score, feats in outs:
        adv = adv + ((1 - score[n_real:]) ** 2).mean()
        for f in feats:
            fm = fm + (f[:n_real].detach() - f[n_real:]).abs().mean()
    return adv, fm


# --------------------------------------------------------------------------------------------------
# Generator objective
# --------------------------------------------------------------------------------------------------


class HiftGenerator(nn.Module):
    """Weight-normed HiFT; ``forward(mel [B, M, T]) -> (audio [B, 480 T], f0 [B, T])``."""

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.net = apply_weight_norm(HiFT(cfg))

    def forward(self, mel: Tensor, source_f0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``source_f0`` [B, T] (Hz) drives the sine source instead of the prediction when given."""
        f0 = self.net.f0_predictor(mel)
        # The f0 loss trains the predictor; the source only learns its harmonic mix from the audio losses.
        source = self.net.source(f0.detach() if source_f0 is None else source_f0)
        return self.net.decode(mel, source), f0


def _scale_f0_lr(opt: torch.optim.Optimizer, gen: HiftGenerator, cfg: TrainConfig, scale: float):
    """The same AdamW groups, with the f0 predictor's parameters split into groups at ``scale`` x lr."""
    f0_ids = {id(p) for p in gen.net.f0_predictor.parameters()}
    groups = []
    for g in opt.param_groups:
        rest = [p for p in g["params"] if id(p) not in f0_ids]
        f0 = [p for p in g["params"] if id(p) in f0_ids]
        groups += [{"params": rest, "weight_decay": g["weight_decay"], "lr_scale": 1.0}]
        groups += [{"params": f0, "weight_decay": g["weight_decay"], "lr_scale": scale}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def log_mel(audio: Tensor) -> Tensor:
    return prompt_mel(audio, LOSS_MEL)


def stft_loss(fake: Tensor, real: Tensor, resolutions: tuple[tuple[int, int, int], ...]) -> Tensor:
    """Mean over resolutions of spectral convergence + L1 of log magnitudes; fake, real [B, L]."""
    total = fake.new_zeros(())
    for n_fft, hop, win in resolutions:
        window = torch.hann_window(win, device=fake.device)
        mags = [
            torch.stft(x, n_fft, hop, win, window=window, return_complex=True).abs().clamp(min=1e-7)
            for x in (fake, real)
        ]
        sc = torch.linalg.norm(mags[1] - mags[0]) / torch.linalg.norm(mags[1]).clamp(min=1e-7)
        total = total + sc + F.l1_loss(mags[0].log(), mags[1].log())
    return total / len(resolutions)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_loader(tc: HiftTrainConfig, gta: dict[str, Tensor] | None = None):
    """Items of one random segment per utterance; ``gta``: flow mel codes [M, T] per utterance id."""
    from .flow import dequantize_mel

    hop = RATES.hop_length
    seg = tc.segment_frames * hop

    def load(utt: Utt, rng: random.Random) -> dict[str, Tensor]:
        wav = load_wav(utt, RATES.sample_rate)
        if len(wav) < seg:
            wav = np.pad(wav, (0, seg - len(wav)))
        use_gta = gta is not None and utt.id in gta and rng.random() < tc.gta_share
        frames = (len(wav) - seg) // hop + 1
        if use_gta:  # the flow's frames stop at its last token: keep the segment inside them
            frames = min(frames, gta[utt.id].shape[1] - tc.segment_frames + 1)
            use_gta = frames > 0
        start = rng.randrange(0, max(frames, 1)) * hop
        crop = np.ascontiguousarray(wav[start : start + seg])
        if use_gta:  # flow frame i covers the same samples as the audio's mel frame i
            f = start // hop
            mel = dequantize_mel(gta[utt.id][:, f : f + tc.segment_frames])
        else:
            mel = prompt_mel(torch.from_numpy(crop)[None])[0].T  # [M, T]
        f0 = yin_f0(crop, tc.segment_frames, fmin=tc.f0_min, fmax=tc.f0_max)
        return {"audio": torch.from_numpy(crop), "mel": mel, "f0": torch.from_numpy(f0)}

    return load


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# --------------------------------------------------------------------------------------------------
# The GAN loop
# --------------------------------------------------------------------------------------------------


def train(
    recipe: dict[str, Any], cfg: TrainConfig, d: Dist, resume_from: str | None = None
) -> dict[str, float]:
    model_cfg = config_from_dict(HiFTConfig, recipe["model"], "[model]")
    tc = config_from_dict(HiftTrainConfig, recipe.get("hift", {}), "[hift]")
    if cfg.ema_decay:  # its GAN loop is its own, not common.fit's
        raise ValueError("train.ema_decay is not supported by the vocoder's trainer")
    out_dir = Path(cfg.out_dir)
    seed_everything(cfg.seed)
    gen, disc = HiftGenerator(model_cfg).to(d.device), Discriminators(tc).to(d.device)
    if tc.f0_bias_init:
        with torch.no_grad():
            gen.net.f0_predictor.classifier.bias.fill_(tc.f0_bias_init)
    seed_everything(cfg.seed + d.rank)
    opt_g = make_optimizer(gen, cfg)
    if tc.f0_lr_scale != 1.0:
        opt_g = _scale_f0_lr(opt_g, gen, cfg, tc.f0_lr_scale)
    opt_d = make_optimizer(disc, cfg, lr=tc.lr_d or cfg.lr)
    utts = read_manifest(cfg.corpus, cfg.splits, cfg.min_seconds, cfg.max_seconds, cfg.utts)
    gta = None
    if tc.gta_cache:
        from .data import FeatureCache

        gta = FeatureCache(tc.gta_cache, "gta_mels").load()
        if d.is_main:
            n = sum(u.id in gta for u in utts)
            print(
                f"[hift] {n} of {len(utts)} utterances have flow mels (gta_share {tc.gta_share})",
                file=sys.stderr,
            )
    seconds = tc.segment_frames * RATES.hop_length / RATES.sample_rate
    stream = BatchStream(
        [seconds] * len(utts), cfg.batch_seconds, cfg.max_batch, cfg.sort_window, cfg.seed, d.rank, d.world
    )
    config = checkpoint_config(model_cfg, cfg, hift=dataclasses.asdict(tc))
    step, train_seconds = 0, 0.0
    ckpt_path = Path(resume_from) if resume_from else latest_checkpoint(out_dir)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        gen.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["disc"])
        opt_g.load_state_dict(ckpt["optimizer"])
        opt_d.load_state_dict(ckpt["optimizer_d"])
        stream.load_state(ckpt["data"])
        step = int(ckpt["step"])
        train_seconds = float(ckpt.get("train_seconds", 0.0))
        if len(ckpt["rng"]) == d.world:
            set_rng_state(ckpt["rng"][d.rank])
        else:
            seed_everything(cfg.seed + 7919 * step + d.rank)
        if d.is_main:
            print(f"[hift] resumed from {ckpt_path} at step {step}", file=sys.stderr)
    elif cfg.init_from:  # warm start: both networks' weights, fresh optimizers and schedule
        n, total = warm_start(cfg.init_from, cfg.init_exclude, model=gen, disc=disc)
        if d.is_main:
            print(f"[hift] started from {cfg.init_from}: {n} of {total} tensors", file=sys.stderr)
    gen_ddp = DDP(gen, broadcast_buffers=False) if d.distributed else gen
    disc_ddp = DDP(disc, broadcast_buffers=False) if d.distributed else disc
    log = JsonlLog(out_dir / "log.jsonl" if d.is_main else None)
    if d.is_main:
        atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    batches = stream.iterate(
        UttDataset(utts, make_loader(tc, gta)), collate, cfg.num_workers, pin=d.device.type == "cuda"
    )
    bar = None
    if d.is_main:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.max_steps, initial=step, desc="hift", unit="step", dynamic_ncols=True, file=sys.stderr
        )
    last: dict[str, float] = {}
    sums: dict[str, float] = {}
    n_sum, t0 = 0, time.perf_counter()
    budget = Budget(cfg, step, train_seconds, d.world)
    gen.train(), disc.train()
    with stop_on_signals(budget, "hift"):
        while not budget.done(step):
            lr = lr_at(step, cfg, budget.progress(step))
            for group in opt_g.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            for group in opt_d.param_groups:
                group["lr"] = lr * (tc.lr_d or cfg.lr) / cfg.lr
            batch = to_device(next(batches), d.device)
            real = batch["audio"][:, None]  # [B, 1, L]
            n = real.shape[0]
            fake, f0 = gen_ddp(batch["mel"], batch["f0"] if tc.source_f0 == "reference" else None)
            fake = fake[:, None]
            metrics: dict[str, float] = {}
            adversarial = step >= tc.adversarial_from
            if adversarial:
                d_loss = discriminator_loss(disc_ddp(torch.cat([real, fake.detach()])), n)
                d_loss.backward()
                metrics["d_grad_norm"] = float(
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
                )
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
                metrics["d_loss"] = d_loss.item()
            mel_loss = F.l1_loss(log_mel(fake[:, 0]), log_mel(real[:, 0]))
            f0_loss = f0_l1(f0, batch["f0"], tc.f0_voiced_weight)
            g_loss = tc.mel_weight * mel_loss + tc.f0_weight * f0_loss
            if tc.stft_weight:
                spec_loss = stft_loss(fake[:, 0], real[:, 0], tc.stft_resolutions)
                g_loss = g_loss + tc.stft_weight * spec_loss
                metrics["stft"] = spec_loss.item()
            if adversarial:
                adv, fm = generator_losses(disc_ddp(torch.cat([real, fake])), n)
                g_loss = g_loss + adv + tc.fm_weight * fm
                metrics.update(adv=adv.item(), fm=fm.item())
            g_loss.backward()
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip))
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(
                set_to_none=True
            )  # the generator step's gradients on the discriminator are dropped
            metrics.update(loss=g_loss.item(), mel=mel_loss.item(), f0=f0_loss.item())
            step += 1
            n_sum += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            if step % cfg.log_every == 0:
                budget.sync(d)
            if step % cfg.log_every == 0 or budget.done(step):
                last = all_mean({k: v / n_sum for k, v in sums.items()}, d)
                last.update(
                    step=step, lr=lr, sec_per_step=(time.perf_counter() - t0) / n_sum, epoch=stream.epoch
                )
                log.write(**last)
                if bar is not None:
                    bar.set_postfix(mel=f"{last['mel']:.3f}", lr=f"{lr:.2e}")
                sums, n_sum, t0 = {}, 0, time.perf_counter()
            if step % cfg.save_every == 0 or budget.done(step):
                rngs = gather_objects(rng_state(), d)
                if d.is_main:
                    payload = {
                        "step": step,
                        "train_seconds": budget.seconds(),
                        "model": gen.state_dict(),
                        "disc": disc.state_dict(),
                        "optimizer": opt_g.state_dict(),
                        "optimizer_d": opt_d.state_dict(),
                        "config": config,
                        "data": stream.state(),
                        "rng": rngs,
                    }
                    save_checkpoint(out_dir, payload, cfg.keep_checkpoints)
                barrier(d)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return last


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = recipe_parser(__doc__).parse_args(argv)
    recipe = load_recipe(args.config, args.set)
    cfg = train_config(recipe)
    configure_threads(cfg)
    with distributed(cfg.device) as d:
        return train(recipe, cfg, d, args.resume_from)


if __name__ == "__main__":
    main()
