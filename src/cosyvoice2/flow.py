"""Flow-matching decoder: speech tokens -> 80-bin mel at 50 Hz (CosyVoice 2 ``CausalMaskedDiffWithXvec``).

Shape legend: B batch, N tokens (25 Hz), T mel frames (50 Hz, T = r*N with r = token_mel_ratio), D encoder
width (512), M mel bins (80), C estimator channels (256), H heads, S keys seen by a query (cached + block).

Pipeline (SPEC §8):

1. speaker embedding -> L2-normalise -> Linear -> ``spks`` [B, M];
2. prompt + target tokens -> ``TokenEncoder`` (Linear/LayerNorm input layer, pre-lookahead conv, Conformer
   blocks with relative-position attention, x r nearest up-sampling + causal conv, more Conformer blocks)
   -> ``encoder_proj`` -> ``mu`` [B, M, T] (our default model may first FiLM the encoder's output with
   ``spks``: ``FlowConfig.speaker_mu``);
3. ``cond`` = prompt mel on the prompt frames, zeros elsewhere;
4. Euler ODE (cosine time grid, ``n_timesteps``) from a fixed noise table, each step running the U-Net
   ``Estimator`` on a CFG batch of 2 (conditional row, row with mu/spks/cond zeroed);
5. drop the prompt frames.

Two ways to run it:

* ``Flow.inference``: the official call (parity with the fixtures). ``streaming=True`` applies static chunk
  masks (25 tokens / 50 frames, unlimited left context); ``finalize=False`` treats the last
  ``pre_lookahead_len`` tokens as right context only.
* ``Flow.stream_start`` / ``Flow.stream_step``: O(chunk) streaming with a caller-owned ``FlowStream``. The
  official loop re-runs the flow from token 0 for every chunk (quadratic, SPEC §16.6); here each call
  processes only its own block of tokens, attending to cached keys/values of everything before it.
  Attention is block-causal by call: a block's frames see all earlier frames and each other, so a
  chunk's output never changes afterwards. With ``static_chunks=True`` the official chunk masks are
  intersected with that, and a schedule aligned to the official chunks reproduces the official
  streaming output.
  ``stream_step`` = ``stream_prepare`` (checks, encoder) + ``euler_step`` until the block is done +
  ``stream_finish``. ``euler_step`` takes the blocks of several streams (each at its own ODE step) and
  runs them as one estimator call: CFG pairs stacked and right-padded to the longest block [2R, M, n],
  the padding masked, each stream attending to its own keys (``BatchWalk``). The engine's flow batcher
  uses it; one block alone is exactly the unbatched computation.

Memory of a stream (what ``FlowStream`` keeps per frame of prompt + generated speech): the estimator
caches K and V of every transformer block for every ODE step and both CFG rows, i.e.
``n_timesteps * 2 * 2 * n_attention_blocks * heads * head_dim`` values. Full size: 10 * 2 * 2 * 56 * 512 =
1 146 880 values = 4.6 MB/frame in float32, 2.3 MB/frame with ``cache_dtype=torch.bfloat16`` (about 115 MB
per second of audio). The encoder adds (6 / r + 4) * 3 * 512 values per frame (keys, values, projected
position rows), about 43 kB in float32, and the conv contexts are a constant few frames
(``Flow.stream_bytes_per_frame`` computes this for any config). Compute stays float32; only the stored
keys/values are rounded. On the small fixture model the streamed mel moved by at most 3e-4 (float16) and
2.3e-3 (bfloat16) against float32 caches, for mel values up to about 7. The default stays float32 (exact
parity); float16 is the more accurate compact choice but can overflow for keys/values beyond 65504.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RATES
from .errors import InputError, ModelLoadError

_EMBED_LN_EPS = 1e-5  # LayerNorm of the encoder's Linear input layers and after_norm (official)
_BLOCK_LN_EPS = 1e-12  # LayerNorms inside the official Conformer layers
_REL_POS_BASE = 10000.0  # sinusoid base of the ESPnet relative positions and of the time embedding
_TIME_SCALE = 1000.0  # the estimator embeds 1000 * t (Matcha SinusoidalPosEmb)
_LOOKAHEAD_SLOPE = 0.01  # leaky_relu default slope used by the pre-lookahead layer
_CONV_KERNEL = 3  # every causal conv of the estimator, and conv2 of the pre-lookahead layer
_CFG_BATCH = 2  # classifier-free guidance runs the estimator on a conditional and an unconditional row


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderConfig:
    """UpsampleConformerEncoder (relative-position Conformer without conv module or macaron FF)."""

    d_model: int = 512
    n_heads: int = 8
    ff_dim: int = 2048
    n_blocks: int = 6  # Conformer blocks at the token rate
    n_up_blocks: int = 4  # Conformer blocks at the frame rate (hard-coded in the official encoder)
    chunk_tokens: int = 25  # static chunk of the streaming masks (0: none); frame-rate blocks use r * this
    # Training only. The official encoder also drops out the position rows; we do not.
    dropout: float = 0.1  # residual branches, FF hidden, input layers
    pos_dropout: float = 0.1  # input layers, after the sqrt(D) scaling
    attn_dropout: float = 0.1


@dataclass(frozen=True)
class EstimatorConfig:
    """CausalConditionalDecoder: a one-level 1-D U-Net of causal ResNet blocks + transformer blocks."""

    in_channels: int = 320  # x, mu, spks, cond stacked: 4 * M
    out_channels: int = 80
    channels: int = 256
    n_heads: int = 8
    head_dim: int = 64
    n_transformers: int = 4  # transformer blocks after each ResNet block
    n_mid: int = 12
    chunk_frames: int = 50  # static chunk of the streaming masks (0: none)
    dropout: float = 0.0

    @property
    def time_dim(self) -> int:
        return 4 * self.channels  # official: time_embed_dim = channels[0] * 4

    @property
    def n_attention_blocks(self) -> int:
        return (self.n_mid + 2) * self.n_transformers


@dataclass(frozen=True)
class FlowConfig:
    """CausalMaskedDiffWithXvec + its CFM sampler; the defaults are CosyVoice2-0.5B."""

    vocab_size: int = 6561
    d_model: int = 512
    n_mels: int = 80
    spk_embed_dim: int = 192
    token_mel_ratio: int = RATES.token_mel_ratio
    pre_lookahead_len: int = 3
    n_timesteps: int = 10  # Euler steps (the official code passes a literal 10)
    cfg_rate: float = 0.7  # inference_cfg_rate: v = (1 + a) v_cond - a v_uncond
    t_scheduler: str = "cosine"  # or "linear"
    noise_seconds: int = 300  # length of the fixed noise table (official: 50 * 300 frames)
    noise_seed: int = 0
    # Scale of the ODE's starting noise (the official solver's ``temperature``, which it calls with 1.0).
    # Below 1 the sampler stays nearer the conditional mean; on our default flow 0-0.5 moved gate (b) by no
    # more than its noise (recipes/README.md "ninth session"): the noise is not what costs words.
    temperature: float = 1.0
    # The mel is mu + ode_weight (x_ODE - mu) in the ODE's space: 1 is the official sampler bit for bit; 0 is
    # the encoder's mean mu alone, with no estimator call (the ODE takes zero steps). Not official. Our small
    # default flow reads far better below 1 (gate (b), recipes/README.md "ninth session"): its estimator's
    # sampled detail costs more words than it adds. Frame-local, so streaming equals offline as before.
    ode_weight: float = 1.0
    # The speaker in mu (not official): a FiLM of the encoder's output from ``spks``, h (1 + scale) + shift,
    # before ``encoder_proj``. The official encoder sees only tokens, so mu is the mel of an average voice
    # and the estimator alone must turn it into the prompt's voice; in our small default flow that estimator
    # carries the voice and garbles the words (``ode_weight`` above: mu alone read ~15 points better, and
    # mu + 0.5 (ODE - mu) lost 0.06 similarity). With the speaker in mu the prior loss fits a voice-specific
    # mean, so less of the voice rests on the estimator. Zero-initialised (``mu_film``): a warm start begins
    # as its source.
    speaker_mu: bool = False
    # The ODE runs on (mel - mel_mean) / mel_std, so that the data has the noise's scale (Matcha-TTS does the
    # same with per-bin statistics). The official model works on the raw log mel: (0, 1), applied as no-ops.
    # Our default model sets them from its corpus: on raw log mels (mean ~-5, std ~2.5) a small estimator
    # left a layer of noise over the right envelope even on one training utterance.
    mel_mean: float = 0.0
    mel_std: float = 1.0
    # What the estimator predicts: "velocity" (official: u = x1 - z) or "data" (the clean mel x1; the ODE
    # takes the straight path's velocity (x1_hat - x) / (1 - t) from it, and the last Euler step lands on
    # x1_hat). The velocity target asks the network to pass the noise through to its output with the
    # right sign, an identity through ~10 randomly initialised layers: our small CPU-trained estimator sat
    # on that plateau (its output's regression on the noise stayed 0.00 after 600 steps on one utterance,
    # so the sampler's starting noise survived into the mel) while it had learnt x1 (coefficient 0.97).
    # "residual": like "data", but the estimator predicts the clean mel minus mu (its output is added to mu,
    # zero in the unconditional CFG pass). The flow then starts out as the encoder's regression of the mel
    # (which ``[flow] prior_weight`` trains directly) and the estimator learns only the detail on top: on one
    # utterance a randomly initialised estimator needed ~2.5x the steps of the encoder alone to reach the
    # same error when it had to learn to pass mu through itself.
    prediction: str = "velocity"
    encoder: EncoderConfig = EncoderConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    # Sampler speed levers (not official; None keeps the official sampler bit for bit, see bench/README.md).
    # ``cfg_steps``: classifier-free guidance (the estimator's batch-2 call) only on the first k of the
    # ``n_timesteps`` Euler steps; the rest run the conditional row alone (half the estimator rows) and
    # take its velocity unguided. A block solved with another step count (``first_chunk_steps``) guides
    # the same share of its steps, ceil(k * m / n) of m. ``first_chunk_steps``: Euler steps of a stream's
    # first block (the first ``Flow.stream_step`` after ``stream_start``: first-packet latency; the block
    # reads the prompt state's per-step caches at the nearest time of its grid). The stream's state after
    # that block is the exact one: its ``n_timesteps`` ODE is solved too, lazily, by the next call (off the
    # first packet's path), so every later chunk equals exact streaming bit for bit (reading the fast
    # block's own caches instead moved the later chunks too; bench/README.md "Flow sampler levers").
    # ``Flow.inference`` has no first chunk: only ``cfg_steps`` changes it.
    cfg_steps: int | None = None
    first_chunk_steps: int | None = None

    def __post_init__(self) -> None:
        if self.prediction not in ("velocity", "data", "residual"):
            raise ValueError(
                f"flow prediction must be 'velocity', 'data' or 'residual', got {self.prediction!r}"
            )
        if not 0.0 <= self.ode_weight <= 1.0:
            raise ValueError(f"flow ode_weight must be in [0, 1], got {self.ode_weight}")
        if not self.temperature >= 0:
            raise ValueError(f"flow temperature must be >= 0, got {self.temperature}")
        if not self.mel_std > 0:
            raise ValueError(f"flow mel_std must be positive, got {self.mel_std}")
        if self.cfg_steps is not None and (not isinstance(self.cfg_steps, int) or self.cfg_steps < 0):
            raise ValueError(f"flow cfg_steps must be None or an integer >= 0, got {self.cfg_steps!r}")
        first = self.first_chunk_steps
        if first is not None and (not isinstance(first, int) or first < 1):
            raise ValueError(f"flow first_chunk_steps must be None or an integer >= 1, got {first!r}")

    def ode_steps(self, steps: int | None = None) -> int:
        """Euler steps a block's ODE takes: ``steps`` (None: ``n_timesteps``), or 0 when ``ode_weight`` is 0
        (the mel is mu itself: no estimator call, no estimator cache)."""
        if self.ode_weight == 0.0:
            return 0
        return self.n_timesteps if steps is None else steps

    def cfg_rows(self, steps: int) -> tuple[int, ...]:
        """Estimator rows of each Euler step of a ``steps``-step grid: 2 (guided: conditional +
        unconditional row) or 1 (conditional only, ``cfg_steps``)."""
        if self.cfg_steps is None:
            return (_CFG_BATCH,) * steps
        guided = min(steps, math.ceil(self.cfg_steps * steps / self.n_timesteps))
        return (_CFG_BATCH,) * guided + (1,) * (steps - guided)

    @property
    def noise_frames(self) -> int:
        return int(RATES.mel_rate) * self.noise_seconds

    @classmethod
    def cosyvoice2_0_5b(cls) -> FlowConfig:
        """The released CosyVoice2-0.5B flow (every value spelled out)."""
        return cls(
            vocab_size=6561, d_model=512, n_mels=80, spk_embed_dim=192, token_mel_ratio=2,
            pre_lookahead_len=3, n_timesteps=10, cfg_rate=0.7, t_scheduler="cosine", noise_seconds=300,
            noise_seed=0,
            encoder=EncoderConfig(d_model=512, n_heads=8, ff_dim=2048, n_blocks=6, n_up_blocks=4,
                                  chunk_tokens=25),
            estimator=EstimatorConfig(in_channels=320, out_channels=80, channels=256, n_heads=8, head_dim=64,
                                      n_transformers=4, n_mid=12, chunk_frames=50),
        )  # fmt: skip

    @classmethod
    def from_official(cls, cfg: dict[str, Any]) -> FlowConfig:
        """Build from the official config dict (the fixtures' config.json format): ``cfg["flow"]["args"]``,
        ``cfg["flow.encoder"]["args"]``, ``cfg["flow.decoder"]["args"]["cfm_params"]`` and
        ``cfg["flow.decoder.estimator"]["args"]``. Raises ``ModelLoadError`` for variants not implemented.
        """
        try:
            flow, enc = cfg["flow"]["args"], cfg["flow.encoder"]["args"]
            cfm, est = cfg["flow.decoder"]["args"]["cfm_params"], cfg["flow.decoder.estimator"]["args"]
        except (KeyError, TypeError) as e:
            raise ModelLoadError(f"flow config lacks section {e}") from None
        unsupported = {
            "encoder input_layer": (enc.get("input_layer", "linear"), "linear"),
            "encoder pos_enc_layer_type": (enc.get("pos_enc_layer_type", "rel_pos_espnet"), "rel_pos_espnet"),
            "encoder selfattention_layer_type": (
                enc.get("selfattention_layer_type", "rel_selfattn"),
                "rel_selfattn",
            ),
            "encoder use_cnn_module": (enc.get("use_cnn_module", False), False),
            "encoder macaron_style": (enc.get("macaron_style", False), False),
            "encoder normalize_before": (enc.get("normalize_before", True), True),
            "encoder activation_type": (enc.get("activation_type", "swish"), "swish"),
            "estimator act_fn": (est.get("act_fn", "gelu"), "gelu"),
            "estimator channels (U-Net levels)": (len(est["channels"]), 1),
            "cfm solver": (cfm.get("solver", "euler"), "euler"),
            "flow output_type": (flow.get("output_type", "mel"), "mel"),
        }
        for what, (got, want) in unsupported.items():
            if got != want:
                raise ModelLoadError(
                    f"unsupported flow config: {what} = {got!r} (only {want!r} is implemented)"
                )
        if cfm.get("t_scheduler", "cosine") not in ("cosine", "linear"):
            raise ModelLoadError(f"unsupported flow config: t_scheduler = {cfm['t_scheduler']!r}")
        if not (flow["input_size"] == enc["input_size"] == enc["output_size"]):
            raise ModelLoadError(
                "flow config: flow input_size, encoder input_size and output_size must be equal"
            )
        if est["in_channels"] != 4 * flow["output_size"] or est["out_channels"] != flow["output_size"]:
            raise ModelLoadError("flow config: estimator channels do not match the mel size")
        return cls(
            vocab_size=flow["vocab_size"], d_model=flow["input_size"], n_mels=flow["output_size"],
            spk_embed_dim=flow["spk_embed_dim"], token_mel_ratio=flow["token_mel_ratio"],
            pre_lookahead_len=flow["pre_lookahead_len"],
            cfg_rate=cfm["inference_cfg_rate"], t_scheduler=cfm.get("t_scheduler", "cosine"),
            encoder=EncoderConfig(
                d_model=enc["output_size"], n_heads=enc["attention_heads"], ff_dim=enc["linear_units"],
                n_blocks=enc["num_blocks"], chunk_tokens=enc.get("static_chunk_size", 0),
                dropout=enc.get("dropout_rate", 0.1), pos_dropout=enc.get("positional_dropout_rate", 0.1),
                attn_dropout=enc.get("attention_dropout_rate", 0.0),
            ),
            estimator=EstimatorConfig(
                in_channels=est["in_channels"], out_channels=est["out_channels"], channels=est["channels"][0],
                n_heads=est["num_heads"], head_dim=est["attention_head_dim"], n_transformers=est["n_blocks"],
                n_mid=est["num_mid_blocks"], chunk_frames=est.get("static_chunk_size", 50),
                dropout=est.get("dropout", 0.0),
            ),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Helpers: attention masks and the per-call cache walk
# --------------------------------------------------------------------------------------------------


def block_mask(
    start: int, n: int, chunk: int | None, valid: Tensor | None, device: torch.device
) -> Tensor | None:
    """Which keys the queries of a block may see. Bool [B|1, 1, n, start + n], or None for "all".

    Queries sit at absolute positions [start, start + n); keys are everything before them plus the block
    (block-causal by call). ``chunk`` adds the official static chunk mask (query i sees key j iff
    j < (i // chunk + 1) * chunk, unlimited left context); ``valid`` [B, start + n] masks padded keys.
    """
    if chunk is None and valid is None:
        return None
    keys = torch.arange(start + n, device=device)
    if chunk is None:
        allowed = torch.ones(n, start + n, dtype=torch.bool, device=device)
    else:
        queries = torch.arange(start, start + n, device=device)
        allowed = keys[None, :] < (torch.div(queries, chunk, rounding_mode="floor")[:, None] + 1) * chunk
    allowed = allowed[None, None]
    return allowed if valid is None else allowed & valid[:, None, None, :]


class CacheWalk:
    """One call's pass over a layer-ordered streaming cache.

    Every stateful layer ``take``s its entry of the previous call (None on the first call, or when not
    streaming) and ``keep``s its entry for the next call, in the same order every call, so the cache is
    a flat tuple with no per-layer bookkeeping. Keys/values may be stored in a compact dtype.
    """

    def __init__(
        self,
        old: tuple[Tensor, ...] | None = None,
        collect: bool = False,
        kv_dtype: torch.dtype | None = None,
        share: bool = False,
        old_buffers: tuple[_TailBuffer | None, ...] | None = None,
    ):
        self._old: Iterator[Tensor] | None = iter(old) if old else None
        self.new: list[Tensor] | None = [] if collect else None
        self.kv_dtype = kv_dtype
        self.share = share  # the resulting state will seed many streams (see ``Attention``)
        self._old_buffers = iter(old_buffers) if old_buffers else None
        self.buffers: list[_TailBuffer | None] | None = [] if collect else None

    def take_buffer(self) -> _TailBuffer | None:
        """The buffer behind the previous call's next tail (estimator attention only)."""
        return None if self._old_buffers is None else next(self._old_buffers)

    def keep_buffer(self, buf: _TailBuffer | None) -> None:
        if self.buffers is not None:
            self.buffers.append(buf)

    @property
    def streaming(self) -> bool:
        """True when there is a previous call's cache or this call's cache is collected."""
        return self._old is not None or self.new is not None

    def take(self) -> Tensor | None:
        return None if self._old is None else next(self._old)

    def keep(self, value: Tensor, kv: bool = False) -> None:
        if self.new is not None:
            self.new.append(value.to(self.kv_dtype) if kv and self.kv_dtype is not None else value)

    def result(self) -> tuple[Tensor, ...]:
        assert self.new is not None
        return tuple(self.new)

    # The two estimator operations that read a stream's past. ``BatchWalk`` implements the same two over
    # several streams at once, so the estimator's layers work unchanged on one stream or a batch.

    def conv_context(self, x: Tensor, k: int) -> Tensor:
        """[B, C, k + T]: the previous call's last k frames (zeros at the start), then x [B, C, T]; the
        last k frames of the result are kept for the next call."""
        h = _left_context(self.take(), x, k)
        self.keep(_tail(h, k))
        return h

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        """Streaming estimator attention of a block: q, k, v [B, H, n, hd] (the block's own) -> [B, H, n, hd]
        over the cached keys and the block's; allowed [B|1, 1, n, S]."""
        return _cached_attention(self, q, k, v, allowed)


class BatchWalk:
    """One estimator call over the blocks of several streams (``Flow.euler_step``).

    Rows [2i, 2i + 2) of the batch (a CFG pair) are stream i, whose block has ``lengths[i]`` frames (with
    ``rows``: stream i has rows[i] rows, 1 on an unguided step, see ``FlowConfig.cfg_steps``); the
    frames after that are padding (the estimator's ``mask`` zeroes them before every conv; the convs are
    causal and attention is per stream, so padding never reaches a real frame). Each stream keeps its own
    ``CacheWalk`` (its own keys/values, conv contexts, tail buffers) and its own attention mask
    ``allowed[i]`` ([1, 1, n_i, S_i] or None); only the row-wise work (projections, feed-forward, convs,
    norms) is shared between streams.
    """

    streaming = True

    def __init__(
        self,
        walks: Sequence[CacheWalk],
        lengths: Sequence[int],
        allowed: Sequence[Tensor | None],
        rows: Sequence[int] | None = None,
    ) -> None:
        self.walks, self.lengths, self.allowed = list(walks), list(lengths), list(allowed)
        self.rows = [_CFG_BATCH] * len(self.walks) if rows is None else list(rows)
        self._starts = [sum(self.rows[:i]) for i in range(len(self.rows) + 1)]

    def _rows(self, i: int) -> slice:
        return slice(self._starts[i], self._starts[i + 1])

    def conv_context(self, x: Tensor, k: int) -> Tensor:
        """x [2R, C, T] -> [2R, C, k + T]; each stream keeps the last k frames of its own block."""
        left = [w.take() for w in self.walks]
        parts = [
            x.new_zeros(r, x.shape[1], k) if c is None else c.to(x.dtype) for c, r in zip(left, self.rows)
        ]
        h = torch.cat([torch.cat(parts), x], dim=-1)
        for i, (w, n) in enumerate(zip(self.walks, self.lengths)):
            # Stream i's frames end at k + n: its last k (context included, for a block shorter than k).
            w.keep(h[self._rows(i), :, n : n + k].clone(memory_format=torch.contiguous_format))
        return h

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        """q, k, v [2R, H, T, hd] -> [2R, H, T, hd]: each stream's real frames over its own keys (padded
        query rows stay zero); ``allowed`` is unused (per-stream masks are in ``self.allowed``)."""
        y = q.new_zeros(q.shape)
        for i, (w, n, mask) in enumerate(zip(self.walks, self.lengths, self.allowed)):
            r = self._rows(i)
            y[r, :, :n] = w.attend(q[r, :, :n], k[r, :, :n], v[r, :, :n], mask)
        return y


Walk = CacheWalk | BatchWalk  # what the estimator's layers read their streaming state through


def _tail(x: Tensor, k: int) -> Tensor:
    """Last k frames of [B, C, T] as a compact copy (a view would keep the whole block alive)."""
    return x[..., x.shape[-1] - k :].clone(memory_format=torch.contiguous_format)


def _left_context(ctx: Tensor | None, x: Tensor, k: int) -> Tensor:
    """[B, C, k + T]: the cached k left frames (zeros at the start of a sequence) followed by x [B, C, T]."""
    left = x.new_zeros(x.shape[0], x.shape[1], k) if ctx is None else ctx.to(x.dtype)
    return torch.cat([left, x], dim=-1)


# Estimator keys/values grow in place. A stream's cache for one attention block is (head, tail): the
# head is a read-only tensor shared by every stream started from the same state (the voice prompt, see
# ``Flow.stream_start``); the tail holds the stream's own frames as a view [B, H, n, d] of a larger
# buffer (``_TailBuffer``, carried next to the views in ``FlowStream.estimator_buffers``). Appending writes
# after the view when this view is the buffer's latest (longest) claim, so a chunk costs O(chunk) memory
# traffic instead of copying the whole prefix; a view that is not the latest (an older state reused
# after another call extended the buffer) copies into a new buffer first, so every state stays
# immutable: nothing before a view's end is ever written again.
_TAIL_LOCK = threading.Lock()
_TAIL_MIN_FRAMES = 64


class _TailBuffer:
    """Storage [B, H, capacity, d] behind estimator key/value tails; ``claimed`` frames are in use."""

    __slots__ = ("data", "claimed")

    def __init__(self, data: Tensor, claimed: int) -> None:
        self.data, self.claimed = data, claimed


_Caches = tuple[tuple[Tensor, ...], ...]  # per ODE step, layer-ordered cache entries (CacheWalk)
_Buffers = tuple[tuple[_TailBuffer | None, ...], ...]  # per ODE step, the buffers behind the tails


def _append_tail(tail: Tensor | None, buf: _TailBuffer | None, new: Tensor) -> tuple[Tensor, _TailBuffer]:
    """tail [B, H, n, d] (a view of ``buf``, or None) + new [B, H, m, d] -> (view [B, H, n+m, d], buffer)."""
    n, m = (0 if tail is None else tail.shape[2]), new.shape[2]
    with _TAIL_LOCK:
        in_place = buf is not None and n > 0 and buf.claimed == n and n + m <= buf.data.shape[2]
        if in_place:
            buf.claimed = n + m
    if not in_place:
        # Capacity doubles: amortised O(1) copies; pages past the end are not touched until used.
        cap = max(2 * (n + m), _TAIL_MIN_FRAMES)
        data = new.new_empty(new.shape[0], new.shape[1], cap, new.shape[3])
        if n:
            data[:, :, :n] = tail
        buf = _TailBuffer(data, n + m)
    buf.data[:, :, n : n + m] = new
    return buf.data[:, :, : n + m], buf


def _attend(q: Tensor, keys: list[Tensor], values: list[Tensor], allowed: Tensor | None) -> Tensor:
    """Softmax attention of q [B, H, n, d] over the concatenation of key/value segments, without
    concatenating them (no copy of the cached segments). allowed [B|1, 1, n, S] over all segments."""
    keys, values = [k for k in keys if k.shape[2]], [v for v in values if v.shape[2]]
    if len(keys) == 1:
        k, v = keys[0].to(q.dtype), values[0].to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.cat([torch.matmul(q, k.to(q.dtype).transpose(-1, -2)) for k in keys], dim=-1) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1)
    out, start = None, 0
    for v in values:
        part = torch.matmul(probs[..., start : start + v.shape[2]], v.to(q.dtype))
        out = part if out is None else out + part
        start += v.shape[2]
    return out


def _cached_attention(cache: CacheWalk, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    """The streaming path of ``Attention``: q, k, v [B, H, n, hd] of the block -> [B, H, n, hd].

    Takes the stream's (key head, key tail, value head, value tail) and the tails' buffers from ``cache``,
    appends the block's keys/values (or, with ``cache.share``, folds everything into a new shared head)
    and keeps the result for the next call.
    """
    b, h, _, hd = k.shape
    k_head, k_tail, v_head, v_tail = cache.take(), cache.take(), cache.take(), cache.take()
    k_buf, v_buf = cache.take_buffer(), cache.take_buffer()
    dtype = cache.kv_dtype or k.dtype
    segments, buffers = [], []  # [[key head, key tail], [value head, value tail]], their buffers
    for head, tail, buf, new in ((k_head, k_tail, k_buf, k), (v_head, v_tail, v_buf, v)):
        new = new.to(dtype)
        empty = new.new_empty(b, h, 0, hd)  # not a view: it must not pin `new`
        if cache.share:  # everything so far becomes the shared read-only head
            parts = [t for t in (head, tail) if t is not None and t.shape[2]] + [new]
            head, tail, buf = torch.cat(parts, 2) if len(parts) > 1 else new.contiguous(), empty, None
        else:
            head = empty if head is None else head
            tail, buf = _append_tail(tail, buf, new)
        cache.keep(head), cache.keep(tail)
        segments.append([head, tail])
        buffers.append(buf)
    cache.keep_buffer(buffers[0]), cache.keep_buffer(buffers[1])
    return _attend(q, segments[0], segments[1], allowed)


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


def rel_positions(lo: int, hi: int, d: int, device: torch.device) -> Tensor:
    """ESPnet relative positional encoding rows for relative distances r = lo .. hi-1: [hi - lo, d].

    Row r is [sin(r w_k), cos(r w_k)] interleaved (even dims sin, odd cos), w_k = base^(-2k/d). The
    official table lists r = T-1 .. -(T-1); rows depend on r only, so a streaming block can build the
    rows it needs without knowing the sequence length.
    """
    r = torch.arange(lo, hi, dtype=torch.float32, device=device)[:, None]
    inv = torch.exp(
        torch.arange(0, d, 2, dtype=torch.float32, device=device) * -(math.log(_REL_POS_BASE) / d)
    )
    pe = torch.zeros(hi - lo, d, device=device)
    pe[:, 0::2] = torch.sin(r * inv)
    pe[:, 1::2] = torch.cos(r * inv)
    return pe


class RelPositionAttention(nn.Module):
    """Transformer-XL style self-attention with ESPnet relative positions (wenet ``rel_selfattn``).

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . P(i - j)] / sqrt(dk), P = linear_pos(rel_positions).
    Streaming cache (3 entries): keys, values [B, H, start, dk] and the projected position rows for
    r = 0 .. start-1 [H, start, dk], which the next block needs again for its distances to earlier keys.
    """

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.h, self.dk, self.dropout = n_heads, d // n_heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.pos = nn.Linear(d, d, bias=False)
        self.bias_u = nn.Parameter(torch.zeros(n_heads, self.dk))
        self.bias_v = nn.Parameter(torch.zeros(n_heads, self.dk))

    def _project(self, pe: Tensor) -> Tensor:
        return self.pos(pe.to(self.pos.weight.dtype)).view(-1, self.h, self.dk).transpose(0, 1)  # [H, R, dk]

    def forward(self, x: Tensor, allowed: Tensor | None, cache: CacheWalk) -> Tensor:
        """x [B, n, D] (the block), allowed [B|1, 1, n, S] -> [B, n, D]."""
        b, n, d = x.shape
        k_old, v_old, p_old = cache.take(), cache.take(), cache.take()
        start = 0 if k_old is None else k_old.shape[2]
        q = self.q(x).view(b, n, self.h, self.dk)
        k = self.k(x).view(b, n, self.h, self.dk).transpose(1, 2)  # [B, H, n, dk]
        v = self.v(x).view(b, n, self.h, self.dk).transpose(1, 2)
        p = self._project(rel_positions(start, start + n, d, x.device))  # rows r = start .. start+n-1
        if k_old is not None:
            k, v, p = torch.cat([k_old, k], 2), torch.cat([v_old, v], 2), torch.cat([p_old, p], 1)
        cache.keep(k), cache.keep(v), cache.keep(p)
        # Distances i - j of a block query to its keys run from start+n-1 (first key) down to -(n-1) (last
        # key of the block). With the rows in that descending order, query i reads columns
        # (n-1-i) .. (n-1-i) + start+n-1: a skewed view (Transformer-XL's rel_shift) instead of a gather.
        table = torch.cat([self._project(rel_positions(1 - n, 0, d, x.device)), p], dim=1).flip(1)
        qu = (q + self.bias_u).transpose(1, 2)  # [B, H, n, dk]
        qv = (q + self.bias_v).transpose(1, 2)
        bd = torch.matmul(qv, table.transpose(1, 2)).contiguous()  # [B, H, n, R], R = start + 2n - 1
        big_r = bd.shape[-1]
        bd = bd.as_strided((b, self.h, n, start + n), (self.h * n * big_r, n * big_r, big_r - 1, 1), n - 1)
        bias = bd / math.sqrt(self.dk)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(qu, k, v, attn_mask=bias, dropout_p=dropout)  # [B, H, n, dk]
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """Linear -> activation -> dropout -> Linear, over the last dim."""

    def __init__(
        self, d: int, hidden: int, act: nn.Module, dropout: float = 0.0, d_out: int | None = None
    ) -> None:
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(d, hidden), act, nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, d if d_out is None else d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class ConformerBlock(nn.Module):
    """Pre-LN: x + MHSA(LN(x)); x + FF(LN(x)) with FF = Linear -> SiLU -> Linear."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.attn_norm = nn.LayerNorm(d, eps=_BLOCK_LN_EPS)
        self.attn = RelPositionAttention(d, cfg.n_heads, cfg.attn_dropout)
        self.ff_norm = nn.LayerNorm(d, eps=_BLOCK_LN_EPS)
        self.ff = FeedForward(d, cfg.ff_dim, nn.SiLU(), cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, allowed: Tensor | None, cache: CacheWalk) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), allowed, cache))
        return x + self.drop(self.ff(self.ff_norm(x)))


class InputLayer(nn.Module):
    """Linear -> LayerNorm -> x sqrt(D) (LinearNoSubsampling + ESPnet rel-pos scaling; adds no position)."""

    def __init__(self, d: int, dropout: float, pos_dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=_EMBED_LN_EPS)
        self.drop, self.pos_drop = nn.Dropout(dropout), nn.Dropout(pos_dropout)
        self.scale = math.sqrt(d)

    def forward(self, x: Tensor) -> Tensor:
        return self.pos_drop(self.drop(self.norm(self.proj(x))) * self.scale)


class PreLookahead(nn.Module):
    """Residual conv pair that lets each token see ``look`` tokens ahead (the only non-causal part).

    conv1 (kernel look+1) reads the token and the next ``look`` (zeros at the end of the utterance, or
    the given look-ahead tokens) -> leaky ReLU -> causal conv2 (kernel 3) -> + input.
    Streaming cache (1 entry): the last 2 conv1 outputs [B, D, 2].
    """

    def __init__(self, d: int, look: int) -> None:
        super().__init__()
        self.look = look
        self.conv1 = nn.Conv1d(d, d, look + 1)
        self.conv2 = nn.Conv1d(d, d, _CONV_KERNEL)

    def forward(self, x: Tensor, ahead: Tensor | None, cache: CacheWalk) -> Tensor:
        """x [B, n, D], ahead [B, look, D] or None -> [B, n, D]."""
        h = x.transpose(1, 2)
        right = h.new_zeros(h.shape[0], h.shape[1], self.look) if ahead is None else ahead.transpose(1, 2)
        h = F.leaky_relu(self.conv1(torch.cat([h, right], dim=-1)), _LOOKAHEAD_SLOPE)
        h = _left_context(cache.take(), h, _CONV_KERNEL - 1)
        cache.keep(_tail(h, _CONV_KERNEL - 1))
        return self.conv2(h).transpose(1, 2) + x


class Upsample(nn.Module):
    """Nearest x r repeat, then a causal conv of kernel 2r + 1. Streaming cache: the last 2r repeated rows."""

    def __init__(self, d: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv1d(d, d, 2 * ratio + 1)

    def forward(self, x: Tensor, cache: CacheWalk) -> Tensor:
        """x [B, D, n] -> [B, D, r n]."""
        h = _left_context(cache.take(), x.repeat_interleave(self.ratio, dim=-1), 2 * self.ratio)
        cache.keep(_tail(h, 2 * self.ratio))
        return self.conv(h)


class TokenEncoder(nn.Module):
    """UpsampleConformerEncoder: token embeddings [B, N, D] -> frame features [B, r N, D]."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        enc, d = cfg.encoder, cfg.encoder.d_model
        self.ratio, self.chunk = cfg.token_mel_ratio, enc.chunk_tokens or None
        self.embed = InputLayer(d, enc.dropout, enc.pos_dropout)
        self.lookahead = PreLookahead(d, cfg.pre_lookahead_len)
        self.blocks = nn.ModuleList(ConformerBlock(enc) for _ in range(enc.n_blocks))
        self.upsample = Upsample(d, cfg.token_mel_ratio)
        self.up_embed = InputLayer(d, enc.dropout, enc.pos_dropout)
        self.up_blocks = nn.ModuleList(ConformerBlock(enc) for _ in range(enc.n_up_blocks))
        self.out_norm = nn.LayerNorm(d, eps=_EMBED_LN_EPS)

    def forward(
        self, x: Tensor, lengths: Tensor, ahead: Tensor | None = None, streaming: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Padded batch: x [B, N, D], lengths [B] -> (h [B, rN, D], frame mask [B, 1, rN] bool).

        ``ahead`` [B, look, D]: right context for the pre-lookahead layer (zeros when None);
        ``streaming``: official static chunk masks.
        """
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        h = self.run(
            x, ahead, start=0, chunk=self.chunk if streaming else None, valid=valid, cache=CacheWalk()
        )
        return h, valid.repeat_interleave(self.ratio, dim=1)[:, None]

    def run(
        self,
        x: Tensor,
        ahead: Tensor | None,
        *,
        start: int,
        chunk: int | None,
        valid: Tensor | None,
        cache: CacheWalk,
    ) -> Tensor:
        """One block of tokens at positions [start, start + n): x [B, n, D] -> [B, r n, D].

        ``chunk`` in tokens (the frame-rate blocks use r * chunk); ``valid`` [B, start + n] padding mask.
        """
        n = x.shape[1]
        h = self.lookahead(self.embed(x), None if ahead is None else self.embed(ahead), cache)
        allowed = block_mask(start, n, chunk, valid, x.device)
        for block in self.blocks:
            h = block(h, allowed, cache)
        h = self.up_embed(self.upsample(h.transpose(1, 2), cache).transpose(1, 2))
        r = self.ratio
        frames_valid = None if valid is None else valid.repeat_interleave(r, dim=1)
        allowed = block_mask(r * start, r * n, None if chunk is None else r * chunk, frames_valid, x.device)
        for block in self.up_blocks:
            h = block(h, allowed, cache)
        return self.out_norm(h)


# --------------------------------------------------------------------------------------------------
# Estimator (the vector field of the ODE)
# --------------------------------------------------------------------------------------------------


class CausalConv1d(nn.Conv1d):
    """Conv1d that sees only the past: kernel-1 frames of left context (zeros, or the previous call's end)."""

    def forward(self, x: Tensor, cache: Walk) -> Tensor:  # type: ignore[override]
        return super().forward(cache.conv_context(x, self.kernel_size[0] - 1))


class CausalBlock(nn.Module):
    """(x * mask) -> causal conv -> LayerNorm over channels -> Mish -> * mask."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(c_in, c_out, _CONV_KERNEL)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x: Tensor, mask: Tensor, cache: Walk) -> Tensor:
        h = self.conv(x * mask, cache)
        return F.mish(self.norm(h.transpose(1, 2)).transpose(1, 2)) * mask


class ResnetBlock(nn.Module):
    """block2(block1(x) + Linear(Mish(t_emb))) + Conv1x1(x * mask)."""

    def __init__(self, c_in: int, c_out: int, time_dim: int) -> None:
        super().__init__()
        self.block1 = CausalBlock(c_in, c_out)
        self.block2 = CausalBlock(c_out, c_out)
        self.time_proj = nn.Linear(time_dim, c_out)
        self.res_conv = nn.Conv1d(c_in, c_out, 1)

    def forward(self, x: Tensor, mask: Tensor, temb: Tensor, cache: Walk) -> Tensor:
        """x [B, Cin, n], mask [B, 1, n], temb [B, time_dim] -> [B, Cout, n]."""
        h = self.block1(x, mask, cache) + self.time_proj(F.mish(temb))[:, :, None]
        return self.block2(h, mask, cache) + self.res_conv(x * mask)


class Attention(nn.Module):
    """Multi-head self-attention (q/k/v without bias, out with bias).

    Streaming cache (4 entries): key head, key tail, value head, value tail, each [B, H, S, hd] (see
    ``_append_tail``); the keys of a block are the head, then the tail, then the block's own.
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        inner = n_heads * head_dim
        self.h, self.hd, self.dropout = n_heads, head_dim, dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, allowed: Tensor | None, cache: Walk) -> Tensor:
        """x [B, n, C] -> [B, n, C]; allowed [B|1, 1, n, S]."""
        b, n, _ = x.shape
        q, k, v = (
            f(x).view(b, n, self.h, self.hd).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v)
        )
        # The official additive bias (1 - mask) * -1e10 and a boolean mask give the same softmax as long
        # as every query sees at least one key, which both masks guarantee.
        if cache.streaming:
            y = cache.attend(q, k, v, allowed)
        else:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.to_out(y.transpose(1, 2).reshape(b, n, self.h * self.hd))


class TransformerBlock(nn.Module):
    """Pre-LN: x + Attn(LN(x)); x + FF(LN(x)) with FF = Linear -> exact GELU -> Linear (diffusers block)."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.attn_norm = nn.LayerNorm(c)
        self.attn = Attention(c, cfg.n_heads, cfg.head_dim, cfg.dropout)
        self.ff_norm = nn.LayerNorm(c)
        self.ff = FeedForward(c, 4 * c, nn.GELU(), cfg.dropout)

    def forward(self, x: Tensor, allowed: Tensor | None, cache: Walk) -> Tensor:
        x = x + self.attn(self.attn_norm(x), allowed, cache)
        return x + self.ff(self.ff_norm(x))


class Stage(nn.Module):
    """ResNet block -> transformer blocks (-> causal conv). Returns (output, hidden before the conv)."""

    def __init__(self, c_in: int, cfg: EstimatorConfig, conv: bool) -> None:
        super().__init__()
        self.resnet = ResnetBlock(c_in, cfg.channels, cfg.time_dim)
        self.transformers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_transformers))
        self.conv = CausalConv1d(cfg.channels, cfg.channels, _CONV_KERNEL) if conv else None

    def forward(
        self, x: Tensor, mask: Tensor, temb: Tensor, allowed: Tensor | None, cache: Walk
    ) -> tuple[Tensor, Tensor]:
        h = self.resnet(x, mask, temb, cache).transpose(1, 2)  # [B, n, C]
        for block in self.transformers:
            h = block(h, allowed, cache)
        h = h.transpose(1, 2)
        return (h if self.conv is None else self.conv(h * mask, cache)), h


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of 1000 t: [B] -> [B, dim] = [sin, cos] with frequencies base^(-i/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(_REL_POS_BASE) / (half - 1)))
    arg = _TIME_SCALE * t[:, None] * freqs[None]
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class Estimator(nn.Module):
    """CausalConditionalDecoder: v(x, t | mu, spks, cond), every conv causal, so frame f sees frames <= f
    through the convs and what the attention mask allows."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.time_mlp = FeedForward(cfg.in_channels, cfg.time_dim, nn.SiLU(), d_out=cfg.time_dim)
        self.down = Stage(cfg.in_channels, cfg, conv=True)
        self.mid = nn.ModuleList(Stage(c, cfg, conv=False) for _ in range(cfg.n_mid))
        self.up = Stage(2 * c, cfg, conv=True)
        self.final_block = CausalBlock(c, c)
        self.final_proj = nn.Conv1d(c, cfg.out_channels, 1)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor,
        cond: Tensor,
        streaming: bool = False,
    ) -> Tensor:
        """Padded batch: x, mu, cond [B, M, T], mask [B, 1, T], t [B], spks [B, M] -> [B, M, T].

        ``streaming``: official static chunk mask of ``chunk_frames``.
        """
        chunk = (self.cfg.chunk_frames or None) if streaming else None
        allowed = block_mask(0, x.shape[-1], chunk, mask[:, 0].bool(), x.device)
        return self.run(x, mask, mu, t, spks, cond, allowed, CacheWalk())

    def run(
        self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
        allowed: Tensor | None, cache: Walk,
    ) -> Tensor:  # fmt: skip
        """One block of frames: shapes as ``forward`` with T = the block; ``allowed`` from ``block_mask``."""
        temb = self.time_mlp(time_embedding(t, self.cfg.in_channels).to(t.dtype))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        h, skip = self.down(h, mask, temb, allowed, cache)
        for stage in self.mid:
            h, _ = stage(h, mask, temb, allowed, cache)
        h, _ = self.up(torch.cat([h, skip], dim=1), mask, temb, allowed, cache)
        h = self.final_block(h, mask, cache)
        return self.final_proj(h * mask) * mask


# --------------------------------------------------------------------------------------------------
# Flow: encoder + CFM sampler; official inference and O(chunk) streaming
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowStream:
    """Caller-owned streaming state (see ``Flow.stream_start``). Immutable: every call returns a new one and
    never changes what an old one holds (estimator tails grow in place only past the end of every view,
    see ``_append_tail``), so the state after a prompt can seed any number of requests, concurrently."""

    spks: Tensor  # [1, M] projected speaker embedding
    prompt_mel: Tensor  # [1, M, Tp] prompt mel (the cond of frames < Tp)
    pending: Tensor  # [1, k] int64 prompt tokens not processed yet: the head of the first block
    promised: Tensor  # [1, j] int64 look-ahead tokens the previous call used; the next tokens must match
    n_tokens: int  # tokens processed (absolute position of the next block)
    encoder: tuple[Tensor, ...]  # layer-ordered encoder cache (CacheWalk)
    estimator: tuple[tuple[Tensor, ...], ...]  # per ODE step, layer-ordered estimator cache
    static_chunks: bool  # intersect the block-causal masks with the official static chunk masks
    cache_dtype: torch.dtype  # storage dtype of the estimator keys/values
    finished: bool = False
    # per ODE step, the buffers behind the estimator key/value tails (``_append_tail``), in layer order
    estimator_buffers: _Buffers = ()
    blocks: int = 0  # stream_step blocks decoded since stream_start (0: the next is the first chunk)
    # ``first_chunk_steps``: the first block's exact ODE, whose caches are this state's ``estimator``; solved
    # (once, thread-safe) by the next ``stream_prepare``. None: ``estimator`` is complete.
    redo: _Redo | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the caches (the per-frame cost is in the module docstring)."""
        tensors = [*self.encoder, *(t for step in self.estimator for t in step)]
        return sum(t.numel() * t.element_size() for t in tensors)


class _ODE:
    """One block's Euler ODE in progress, advanced one estimator call at a time (``Flow._euler_step``).

    Classifier-free guidance runs the estimator on a CFG pair of rows: mu2, cond2 [2, M, n] and spks2
    [2, M] (row 0 conditional, row 1 zeroed), mask [2, 1, n] (ones). x [1, M, n] is the current point
    (the block's slice of the flow's fixed noise table at the start), ``grid`` the (t, dt) of every step,
    allowed [1, 1, n, S] or None the block's attention mask. ``caches``/``buffers``: the stream's
    per-step estimator state before the block; ``new``/``new_buffers``: after it, one entry per step done.
    ``rows``: estimator rows of each step (2: guided; 1: the conditional row alone, ``FlowConfig.cfg_steps``).
    ``slots``: the cache entry each step reads (None: entry k for step k; another grid's caches are read at
    the nearest time, ``FlowConfig.first_chunk_steps``).
    """

    def __init__(
        self, mu: Tensor, spks: Tensor, cond: Tensor, noise: Tensor, allowed: Tensor | None,
        grid: list[tuple[Tensor, Tensor]], caches: _Caches | None, buffers: _Buffers, collect: bool,
        kv_dtype: torch.dtype | None, share: bool, rows: Sequence[int] | None = None,
        slots: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        self.mu2, self.spks2, self.cond2 = (torch.cat([v, torch.zeros_like(v)]) for v in (mu, spks, cond))
        self.mu = mu
        self.mask = mu.new_ones(_CFG_BATCH, 1, mu.shape[-1])
        self.x = noise.to(mu.dtype)
        self.allowed, self.grid = allowed, grid
        self.rows = tuple(rows) if rows is not None else (_CFG_BATCH,) * len(grid)
        self.slots = None if slots is None else tuple(slots)
        self.caches, self.buffers = caches, buffers
        self.collect, self.kv_dtype, self.share = collect, kv_dtype, share
        self.k = 0  # steps done
        self.new: list[tuple[Tensor, ...]] = []
        self.new_buffers: list[tuple[_TailBuffer | None, ...]] = []

    @property
    def frames(self) -> int:
        return self.x.shape[-1]

    @property
    def done(self) -> bool:
        return self.k == len(self.grid)

    @property
    def n_rows(self) -> int:
        """Estimator rows of the next step."""
        return self.rows[self.k]

    def inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(x, mask, mu, t, spks, cond) of the next step's estimator call, ``n_rows`` rows each."""
        r = self.n_rows
        x, t = self.x.expand(r, -1, -1), self.grid[self.k][0].to(self.x.dtype).expand(r)
        if r == _CFG_BATCH:
            return x, self.mask, self.mu2, t, self.spks2, self.cond2
        return x, self.mask[:r], self.mu2[:r], t, self.spks2[:r], self.cond2[:r]

    def walk(self) -> CacheWalk:
        """The stream's cache walk for the next step."""
        k = self.k if self.slots is None else self.slots[self.k]
        old = self.caches[k] if self.caches else None
        buffers = self.buffers[k] if self.buffers else None
        r = self.n_rows
        if old and old[0].shape[0] != r:
            # Entry made by a step with the other row count (``cfg_steps`` with another grid): the guided
            # row alone, or it stands in for both rows. Tails are then copied (no buffers).
            old = tuple(t[:r] if t.shape[0] > r else t.expand(r, *t.shape[1:]) for t in old)
            buffers = None
        return CacheWalk(old, self.collect, self.kv_dtype, self.share, buffers)

    def result(self, ode_weight: float = 1.0) -> Tensor:
        """The end point [1, M, n] in the ODE's space: x, or mu + w (x - mu) (``FlowConfig.ode_weight``;
        0: mu, the ODE took no steps)."""
        if ode_weight == 1.0:
            return self.x
        if ode_weight == 0.0:
            return self.mu
        return self.mu + ode_weight * (self.x - self.mu.to(self.x.dtype))

    def advance(self, v: Tensor, walk: CacheWalk, cfg_rate: float, data: bool = False) -> None:
        """Apply the step: v [2, M, n] is the estimator's output for this ODE's CFG pair ([1, M, n] on an
        unguided step: the conditional velocity is taken as it is).

        ``data``: the output predicts the clean mel (``FlowConfig.prediction``), turned into a velocity here
        (after the guidance mix, which is linear in either form).
        """
        t, dt = self.grid[self.k]
        g = (1.0 + cfg_rate) * v[:1] - cfg_rate * v[1:] if v.shape[0] == _CFG_BATCH else v
        if data:
            g = (g - self.x) / (1 - t.to(g.dtype))
        self.x = self.x + dt * g
        if self.collect:
            self.new.append(walk.result())
            self.new_buffers.append(tuple(walk.buffers))
        self.k += 1


class _Redo:
    """The ``n_timesteps`` ODE of a stream's first block (``FlowConfig.first_chunk_steps``), solved at most
    once, by whichever call needs its caches first (``Flow._settle``); states sharing it stay immutable."""

    def __init__(self, ode: _ODE) -> None:
        self._ode: _ODE | None = ode
        self._lock = threading.Lock()
        self._caches: tuple[_Caches, _Buffers] | None = None

    def caches(self, flow: Flow) -> tuple[_Caches, _Buffers]:
        with self._lock:
            if self._caches is None:
                assert self._ode is not None
                while not self._ode.done:
                    flow._euler_step([self._ode])
                self._caches = (tuple(self._ode.new), tuple(self._ode.new_buffers))
                self._ode = None
            return self._caches


@dataclass(eq=False)
class FlowBlock:
    """A ``Flow.stream_step`` in flight, so that several streams' ODEs can share estimator calls.

    ``Flow.stream_prepare`` runs the encoder and returns it; ``Flow.euler_step`` advances its ODE by one
    estimator call (alone, or batched with other streams' blocks); once ``done``, ``Flow.stream_finish``
    returns (mel, next state). Everything in it belongs to one stream.
    """

    ode: _ODE | None  # None for an empty final block (nothing to solve)
    state: FlowStream  # the next state, without the estimator caches (``stream_finish`` adds them)
    in_prompt: int  # leading frames of the block that are prompt frames (solved, not returned)
    redo: _ODE | None = None  # the block's exact ODE, whose caches the next state gets (first_chunk_steps)

    @property
    def done(self) -> bool:
        return self.ode is None or self.ode.done

    @property
    def frames(self) -> int:
        """Mel frames the estimator runs over (prompt frames of the block included)."""
        return 0 if self.ode is None else self.ode.frames


def _as_tokens(tokens: Tensor | Sequence[int], name: str, device: torch.device) -> Tensor:
    """[1, n] or [n] int tensor, or a list of ints -> [1, n] int64."""
    t = torch.as_tensor(tokens, device=device) if not isinstance(tokens, Tensor) else tokens.to(device)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] != 1 or (t.numel() and t.is_floating_point()):
        raise InputError(f"{name} must be integer speech tokens of shape [1, n] or [n], got {tuple(t.shape)}")
    return t.long()


class Flow(nn.Module):
    """CausalMaskedDiffWithXvec for inference: tokens + prompt (tokens, mel, speaker embedding) -> mel."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.spk_proj = nn.Linear(cfg.spk_embed_dim, cfg.n_mels)
        self.encoder = TokenEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.d_model, cfg.n_mels)
        self.mu_film = nn.Linear(cfg.n_mels, 2 * cfg.d_model) if cfg.speaker_mu else None
        if self.mu_film is not None:
            nn.init.zeros_(self.mu_film.weight)
            nn.init.zeros_(self.mu_film.bias)
        self.estimator = Estimator(cfg.estimator)
        # SPEC §16.9: the official constructor reseeds every global RNG to draw this table. We draw the
        # same numbers (CPU generator, same seed) from a private generator instead. Not in the state dict.
        gen = torch.Generator().manual_seed(cfg.noise_seed)
        noise = torch.randn(1, cfg.n_mels, cfg.noise_frames, generator=gen, device=gen.device)
        self.register_buffer("noise", noise, persistent=False)

    # -- pieces shared by both paths ---------------------------------------------------------------

    def _check(self, tokens: Tensor, name: str) -> Tensor:
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise InputError(f"{name}: speech token ids must be in [0, {self.cfg.vocab_size})")
        return tokens

    def _speaker(self, embedding: Tensor) -> Tensor:
        """[1, spk_embed_dim] -> [1, M]."""
        if embedding.dim() != 2 or embedding.shape != (1, self.cfg.spk_embed_dim):
            raise InputError(
                f"embedding must have shape [1, {self.cfg.spk_embed_dim}], got {tuple(embedding.shape)}"
            )
        return self.spk_proj(F.normalize(embedding.to(self.noise.dtype), dim=1))

    def mu(self, h: Tensor, spks: Tensor) -> Tensor:
        """Encoder output h [B, T, D], speaker spks [B, M] -> mu [B, M, T] (``FlowConfig.speaker_mu``)."""
        if self.mu_film is not None:
            scale, shift = self.mu_film(spks)[:, None].chunk(2, dim=-1)  # [B, 1, D] each
            h = h * (1 + scale) + shift
        return self.encoder_proj(h).transpose(1, 2)

    def _prompt_mel(self, prompt_feat: Tensor) -> Tensor:
        """[1, Tp, M] -> [1, M, Tp]."""
        if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 or prompt_feat.shape[2] != self.cfg.n_mels:
            raise InputError(
                f"prompt_feat must have shape [1, T, {self.cfg.n_mels}], got {tuple(prompt_feat.shape)}"
            )
        if self.cfg.mel_mean != 0.0 or self.cfg.mel_std != 1.0:
            prompt_feat = (prompt_feat.float() - self.cfg.mel_mean) / self.cfg.mel_std
        return prompt_feat.to(self.noise.dtype).transpose(1, 2)

    def _mel_out(self, x: Tensor) -> Tensor:
        """The ODE's end point [..] -> log mel float32 (undoes ``mel_mean``/``mel_std``)."""
        x = x.float()
        if self.cfg.mel_mean != 0.0 or self.cfg.mel_std != 1.0:
            x = x * self.cfg.mel_std + self.cfg.mel_mean
        return x

    def _noise(self, f0: int, f1: int) -> Tensor:
        if f1 > self.cfg.noise_frames:
            raise InputError(
                f"prompt + speech too long for the flow: {f1} mel frames > {self.cfg.noise_frames} "
                f"({self.cfg.noise_seconds} s)"
            )
        if self.cfg.temperature != 1.0:
            return self.noise[:, :, f0:f1] * self.cfg.temperature
        return self.noise[:, :, f0:f1]

    def _time_grid(self, device: torch.device, steps: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """(t, dt) per Euler step, accumulated as the official solver does (t += dt; dt = t_{k+1} - t).

        ``steps``: the number of Euler steps (None: ``n_timesteps``)."""
        n = self.cfg.n_timesteps if steps is None else steps
        if n == 0:
            return []
        span = torch.linspace(0, 1, n + 1, device=device, dtype=torch.float32)
        if self.cfg.t_scheduler == "cosine":
            span = 1 - torch.cos(span * 0.5 * torch.pi)
        grid, t, dt = [], span[0], span[1] - span[0]
        for k in range(1, n + 1):
            grid.append((t, dt))
            t = t + dt
            if k < n:
                dt = span[k + 1] - t
        return grid

    def _solve(
        self, mu: Tensor, spks: Tensor, cond: Tensor, noise: Tensor, allowed: Tensor | None,
        caches: _Caches | None, collect: bool, kv_dtype: torch.dtype | None = None, share: bool = False,
        buffers: _Buffers = (),
    ) -> tuple[Tensor, _Caches, _Buffers]:  # fmt: skip
        """Euler ODE with classifier-free guidance over one block of frames.

        mu, cond, noise [1, M, n], spks [1, M] -> (mel [1, M, n] float32, new per-step caches, their tail
        buffers). ``share``: the new caches will seed many streams (estimator keys/values become read-only
        heads); ``buffers``: the tail buffers of ``caches``.
        """
        ode = self._ode(mu, spks, cond, noise, allowed, caches, buffers, collect, kv_dtype, share)
        while not ode.done:
            self._euler_step([ode])
        return self._mel_out(ode.result(self.cfg.ode_weight)), tuple(ode.new), tuple(ode.new_buffers)

    def _ode(
        self, mu: Tensor, spks: Tensor, cond: Tensor, noise: Tensor, allowed: Tensor | None,
        caches: _Caches | None, buffers: _Buffers, collect: bool, kv_dtype: torch.dtype | None, share: bool,
        steps: int | None = None,
    ) -> _ODE:  # fmt: skip
        """The ODE of one block over ``steps`` Euler steps (None: ``n_timesteps``). ``caches`` made on a grid
        of another length are read at the nearest time (``FlowConfig.first_chunk_steps``)."""
        steps = self.cfg.ode_steps(steps)
        grid = self._time_grid(mu.device, steps)
        slots = None
        if caches and len(caches) != steps:
            times = torch.stack([t for t, _ in self._time_grid(mu.device, len(caches))])
            slots = [int((times - t).abs().argmin()) for t, _ in grid]
        rows = self.cfg.cfg_rows(steps)
        return _ODE(
            mu, spks, cond, noise, allowed, grid, caches, buffers, collect, kv_dtype, share, rows, slots
        )  # fmt: skip

    def _euler_step(self, odes: Sequence[_ODE]) -> None:
        """One Euler step of every ODE (each at its own step) in one estimator call.

        One ODE: its CFG pair alone, [2, M, n] (the unbatched computation, bit for bit). Several (R):
        their CFG pairs stacked and right-padded to the longest block, [2R, M, n_max], with a frame mask
        that zeroes the padding; each stream attends to its own cached keys (``BatchWalk``). The GEMMs then
        round differently than alone (about 1e-6 relative), nothing else changes.
        """
        a, data = self.cfg.cfg_rate, self.cfg.prediction in ("data", "residual")
        residual = self.cfg.prediction == "residual"
        if len(odes) == 1:
            o = odes[0]
            walk = o.walk()
            x2, mask, mu2, t2, spks2, cond2 = o.inputs()
            v = self.estimator.run(x2, mask, mu2, t2, spks2, cond2, o.allowed, walk)
            if residual:  # mu2 = [mu, 0]: the conditional pass adds mu, the unconditional one nothing
                v = v + mu2.to(v.dtype)
            o.advance(v, walk, a, data)
            return
        lengths, rows = [o.frames for o in odes], [o.n_rows for o in odes]
        n = max(lengths)

        def stack(parts: list[Tensor]) -> Tensor:  # [2, C, n_i] each -> [2R, C, n] (zeros after n_i)
            return torch.cat([F.pad(p, (0, n - p.shape[-1])) for p in parts])

        inputs = [o.inputs() for o in odes]  # (x, mask, mu, t, spks, cond) per ODE
        x2, mask, mu2, cond2 = (stack([i[j] for i in inputs]) for j in (0, 1, 2, 5))
        t2, spks2 = torch.cat([i[3] for i in inputs]), torch.cat([i[4] for i in inputs])  # [2R], [2R, M]
        walks = [o.walk() for o in odes]
        batch = BatchWalk(walks, lengths, [o.allowed for o in odes], rows)
        v = self.estimator.run(x2, mask, mu2, t2, spks2, cond2, None, batch)  # [2R, M, n]
        if residual:
            v = v + mu2.to(v.dtype)
        for i, (o, walk) in enumerate(zip(odes, walks)):
            o.advance(v[batch._rows(i), :, : o.frames], walk, a, data)

    # -- official inference ----------------------------------------------------------------------

    @torch.inference_mode()
    def inference(
        self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor, *,
        streaming: bool, finalize: bool,
    ) -> Tensor:  # fmt: skip
        """The official ``CausalMaskedDiffWithXvec.inference`` (batch 1).

        token [1, N], prompt_token [1, P] int; prompt_feat [1, Tp, M]; embedding [1, spk_embed_dim].
        Returns mel [1, M, r (P + N) - Tp] float32 (r N when the prompt is aligned), or r (P + N - look) - Tp
        frames when ``finalize`` is False: then the last ``look`` tokens only feed the pre-lookahead layer.
        ``streaming`` applies the static chunk masks (chunks counted from the first prompt token).
        """
        dev = self.noise.device
        token = self._check(_as_tokens(token, "token", dev), "token")
        prompt_token = self._check(_as_tokens(prompt_token, "prompt_token", dev), "prompt_token")
        spks, prompt_mel = self._speaker(embedding.to(dev)), self._prompt_mel(prompt_feat.to(dev))
        look = self.cfg.pre_lookahead_len
        if not finalize and token.shape[1] < look:
            raise InputError(
                f"finalize=False needs at least {look} tokens (the look-ahead), got {token.shape[1]}"
            )
        n_tokens = prompt_token.shape[1] + token.shape[1] - (0 if finalize else look)
        noise = self._noise(0, self.cfg.token_mel_ratio * n_tokens)  # checks the length before any work
        x = self.token_embed(torch.cat([prompt_token, token], dim=1))  # [1, P + N, D]
        ahead = None
        if not finalize:
            x, ahead = x[:, : x.shape[1] - look], x[:, x.shape[1] - look :]
        chunk, est_chunk = self._chunks(streaming)
        h = self.encoder.run(x, ahead, start=0, chunk=chunk, valid=None, cache=CacheWalk())
        mu = self.mu(h, spks)  # [1, M, T]
        n_frames, n_prompt = mu.shape[-1], prompt_mel.shape[-1]
        if n_prompt > n_frames:
            raise InputError(
                f"prompt_feat has {n_prompt} frames, more than the {n_frames} frames of all tokens"
            )
        cond = torch.zeros_like(mu)
        cond[:, :, :n_prompt] = prompt_mel
        allowed = block_mask(0, n_frames, est_chunk, None, dev)
        mel, _, _ = self._solve(mu, spks, cond, noise, allowed, None, collect=False)
        return mel[:, :, n_prompt:]

    # -- O(chunk) streaming ------------------------------------------------------------------------

    def stream_bytes_per_frame(self, cache_dtype: torch.dtype = torch.float32) -> float:
        """Cache bytes a stream holds per mel frame (prompt + generated), without the constant conv contexts.

        Estimator: K and V of every attention block, for every ODE step and its rows (both CFG rows, or the
        conditional one on unguided steps), in ``cache_dtype``. Encoder (model dtype): K, V and projected
        position rows of every Conformer block; the token-rate blocks hold one row per r frames.
        """
        cfg, est, enc = self.cfg, self.cfg.estimator, self.cfg.encoder
        kv = sum(cfg.cfg_rows(cfg.ode_steps())) * 2 * est.n_attention_blocks * est.n_heads * est.head_dim
        encoder = 3 * enc.d_model * (enc.n_blocks / cfg.token_mel_ratio + enc.n_up_blocks)
        return kv * torch.finfo(cache_dtype).bits / 8 + encoder * self.noise.element_size()

    def _chunks(self, static: bool) -> tuple[int | None, int | None]:
        """(encoder chunk in tokens, estimator chunk in frames) of the official static masks, or None."""
        if not static:
            return None, None
        return self.cfg.encoder.chunk_tokens or None, self.cfg.estimator.chunk_frames or None

    def _align(self) -> int:
        """Token multiple at which the token-rate, frame-rate and estimator static chunks all end together."""
        r, est = self.cfg.token_mel_ratio, self.cfg.estimator.chunk_frames
        return math.lcm(*(u for u in (self.cfg.encoder.chunk_tokens, est // math.gcd(est, r)) if u))

    @torch.inference_mode()
    def stream_start(
        self, prompt_token: Tensor | Sequence[int], prompt_feat: Tensor, embedding: Tensor, *,
        static_chunks: bool = False, cache_dtype: torch.dtype = torch.float32,
    ) -> FlowStream:  # fmt: skip
        """Process a voice prompt once; the returned state can start any number of streams.

        prompt_token [1, P], prompt_feat [1, Tp, M], embedding [1, spk_embed_dim]. The last
        ``pre_lookahead_len`` prompt tokens depend on the first target tokens through the pre-lookahead
        layer, so they (and, with ``static_chunks``, the prompt tokens after the last chunk boundary) are
        kept as the head of the first block instead of being cached. ``cache_dtype`` stores the estimator
        keys/values (bfloat16 halves the memory; see the module docstring).
        """
        dev = self.noise.device
        tokens = self._check(_as_tokens(prompt_token, "prompt_token", dev), "prompt_token")
        spks, prompt_mel = self._speaker(embedding.to(dev)), self._prompt_mel(prompt_feat.to(dev))
        r, look = self.cfg.token_mel_ratio, self.cfg.pre_lookahead_len
        # Cache only tokens whose frames are all prompt frames (never emitted) and whose look-ahead is known.
        cut = max(0, min(tokens.shape[1] - look, prompt_mel.shape[-1] // r))
        if static_chunks:
            cut -= cut % self._align()
        empty = tokens[:, :0]
        state = FlowStream(spks, prompt_mel, tokens, empty, 0, (), (), static_chunks, cache_dtype)
        if cut == 0:
            return state
        _, state = self._advance(state, tokens[:, :cut], tokens[:, cut : cut + look], share=True)
        return replace(state, pending=tokens[:, cut:])

    @torch.inference_mode()
    def stream_step(
        self, state: FlowStream, tokens: Tensor | Sequence[int], lookahead: Tensor | Sequence[int] | None, *,
        final: bool,
    ) -> tuple[Tensor, FlowStream]:  # fmt: skip
        """Decode the next block: returns (mel [1, M, frames of these tokens] float32, new state).

        ``lookahead``: the next ``pre_lookahead_len`` tokens (the start of the next call's ``tokens``);
        None or empty when ``final`` (the utterance ends: zeros, as the official finalize). Work is
        proportional to the block (attention also reads the cached keys of earlier frames).
        The same as ``stream_prepare``, ``euler_step`` until done, ``stream_finish``.
        """
        block = self.stream_prepare(state, tokens, lookahead, final=final)
        while not block.done:
            self.euler_step([block])
        return self.stream_finish(block)

    @torch.inference_mode()
    def stream_prepare(
        self, state: FlowStream, tokens: Tensor | Sequence[int], lookahead: Tensor | Sequence[int] | None, *,
        final: bool,
    ) -> FlowBlock:  # fmt: skip
        """The first part of ``stream_step`` (arguments as there): checks, encoder, the block's ODE set up."""
        if state.finished:
            raise InputError("this flow stream has already ended (final=True was given)")
        state = self._settle(state)
        dev, look = self.noise.device, self.cfg.pre_lookahead_len
        tokens = self._check(_as_tokens(tokens, "tokens", dev), "tokens")
        ahead = (
            None if lookahead is None else self._check(_as_tokens(lookahead, "lookahead", dev), "lookahead")
        )
        if ahead is not None and ahead.numel() == 0:
            ahead = None
        if (ahead is None) != final:
            raise InputError("lookahead tokens are required when final=False and not allowed when final=True")
        if ahead is not None and ahead.shape[1] != look:
            raise InputError(f"lookahead must have exactly {look} tokens, got {ahead.shape[1]}")
        block = torch.cat([state.pending, tokens], dim=1)
        seen = block if ahead is None else torch.cat([block, ahead], dim=1)
        promised = state.promised
        if seen.shape[1] < promised.shape[1] or not torch.equal(seen[:, : promised.shape[1]], promised):
            raise InputError("tokens do not continue with the look-ahead tokens given in the previous call")
        if block.shape[1] == 0:
            if not final:
                raise InputError("stream_step needs at least one token when final=False")
            return FlowBlock(None, replace(state, finished=True), 0)
        # The stream's first block may take fewer Euler steps (first packet); the state says which it is.
        steps = self.cfg.first_chunk_steps if state.blocks == 0 else None
        if steps == self.cfg.n_timesteps:
            steps = None
        out = self._prepare(state, block, ahead, steps=steps, redo=steps is not None and not final)
        promised = block[:, :0] if ahead is None else ahead
        nxt = replace(out.state, pending=tokens[:, :0], promised=promised, finished=final)
        out.state = replace(nxt, blocks=state.blocks + 1)
        return out

    @torch.inference_mode()
    def euler_step(self, blocks: Sequence[FlowBlock]) -> None:
        """One ODE step of each block (not ``done``; each at its own step, from any streams of this flow) in
        one estimator call. One block gives exactly ``stream_step``'s numbers; several round differently
        (batched GEMMs), by about 1e-6 relative (tests/test_engine.py measures it)."""
        if any(b.done for b in blocks):
            raise ValueError("euler_step got a block whose ODE is already solved")
        if blocks:
            self._euler_step([b.ode for b in blocks])

    @torch.inference_mode()
    def stream_finish(self, block: FlowBlock) -> tuple[Tensor, FlowStream]:
        """(mel [1, M, frames of the block's tokens] float32, next state) of a solved block."""
        if not block.done:
            raise ValueError("stream_finish needs a solved block (run euler_step until done)")
        if block.ode is None:
            return block.state.prompt_mel.new_zeros(1, self.cfg.n_mels, 0), block.state
        o = block.ode
        if block.redo is not None:  # the exact ODE's caches, solved when the next call needs them
            state = replace(block.state, redo=_Redo(block.redo))
        else:
            state = replace(block.state, estimator=tuple(o.new), estimator_buffers=tuple(o.new_buffers))
        return self._mel_out(o.result(self.cfg.ode_weight)[:, :, block.in_prompt :]), state

    def _settle(self, state: FlowStream) -> FlowStream:
        """``state`` with its estimator caches complete (solves a pending first-block ODE, once)."""
        if state.redo is None:
            return state
        caches, buffers = state.redo.caches(self)
        return replace(state, estimator=caches, estimator_buffers=buffers, redo=None)

    def _advance(
        self, state: FlowStream, block: Tensor, ahead: Tensor | None, share: bool = False
    ) -> tuple[Tensor, FlowStream]:
        """Run encoder + ODE over tokens [n_tokens, n_tokens + n) with the cached left context.

        block [1, n], ahead [1, look] or None -> (mel of the block's non-prompt frames, advanced state).
        ``share``: the new state will seed many streams (its estimator keys/values are stored as read-only
        heads that later blocks never copy; see ``_append_tail``).
        """
        out = self._prepare(state, block, ahead, share)
        while not out.done:
            self.euler_step([out])
        return self.stream_finish(out)

    def _prepare(
        self, state: FlowStream, block: Tensor, ahead: Tensor | None, share: bool = False,
        steps: int | None = None, redo: bool = False,
    ) -> FlowBlock:  # fmt: skip
        """Encoder over the block (arguments as ``_advance``) and its ODE over ``steps`` Euler steps (None:
        ``n_timesteps``), ready for ``euler_step``. ``redo``: also set up the block's ``n_timesteps`` ODE,
        whose caches (not the ``steps`` ODE's) the next state gets."""
        r, a, n = self.cfg.token_mel_ratio, state.n_tokens, block.shape[1]
        f0, f1 = r * a, r * (a + n)
        noise = self._noise(f0, f1)
        chunk, est_chunk = self._chunks(state.static_chunks)
        enc = CacheWalk(state.encoder, collect=True)
        h = self.encoder.run(self.token_embed(block), None if ahead is None else self.token_embed(ahead),
                             start=a, chunk=chunk, valid=None, cache=enc)  # fmt: skip
        mu = self.mu(h, state.spks)  # [1, M, r n]
        n_prompt = state.prompt_mel.shape[-1]
        in_prompt = min(max(n_prompt - f0, 0), f1 - f0)  # frames of this block that are prompt frames
        cond = torch.zeros_like(mu)
        cond[:, :, :in_prompt] = state.prompt_mel[:, :, f0 : f0 + in_prompt]
        allowed = block_mask(f0, f1 - f0, est_chunk, None, mu.device)

        def ode(collect: bool, n_steps: int | None) -> _ODE:
            return self._ode(
                mu, state.spks, cond, noise, allowed, state.estimator, state.estimator_buffers, collect,
                state.cache_dtype, share, n_steps,
            )  # fmt: skip

        # The caches of the next state come from the ODE (``stream_finish``); until then it holds none.
        nxt = replace(state, n_tokens=a + n, encoder=enc.result(), estimator=(), estimator_buffers=())
        return FlowBlock(ode(not redo, steps), nxt, in_prompt, ode(True, None) if redo else None)
