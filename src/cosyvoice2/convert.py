"""The one converter from official CosyVoice 2 checkpoints (llm.pt, flow.pt, hift.pt) to our modules.

Each component has an explicit key map: a list of ``(regex, replacement)`` rules tried in order on every
official key (first match wins; a replacement of ``None`` drops the key on purpose). Keys that no rule
matches are an error, as are missing keys and shape mismatches, so a checkpoint that does not fit its
config never loads half-way. Transforms that change tensors (folding weight norm, fusing projections)
run after renaming and are listed next to the rules.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ModelLoadError

Rules = list[tuple[str, str | None]]
Transform = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read an official ``.pt`` state dict safely (``weights_only=True``), naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"missing checkpoint file: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ModelLoadError(f"cannot read checkpoint {path}: {e}") from None
    except Exception as e:  # pickle errors for non-checkpoint files
        raise ModelLoadError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path} is not a state dict of tensors")
    return sd


def rename(sd: dict[str, Tensor], rules: Rules, source: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    compiled = [(re.compile(p), r) for p, r in rules]
    for key, value in sd.items():
        for pat, repl in compiled:
            if pat.fullmatch(key):
                if repl is not None:
                    out[pat.sub(repl, key)] = value
                break
        else:
            raise ModelLoadError(f"{source}: unexpected key {key!r} (no rule in the key map)")
    return out


def load_into(
    model: nn.Module, sd: dict[str, Tensor], source: str, rules: Rules, transforms: tuple[Transform, ...] = ()
) -> nn.Module:
    """Rename ``sd`` with ``rules``, apply ``transforms``, check every key and shape, load strictly."""
    sd = rename(sd, rules, source)
    for t in transforms:
        sd = t(sd)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ModelLoadError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise ModelLoadError(f"{source}: unexpected key {extra[0]!r} after conversion")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelLoadError(
                f"{source}: key {k!r} has shape {tuple(sd[k].shape)}, the config expects {tuple(v.shape)}"
            )
    model.load_state_dict({k: sd[k].to(v.dtype) for k, v in expected.items()}, strict=True)
    return model


# --------------------------------------------------------------------------------------------------
# Key maps. Official key (regex, full match) -> our key.
# --------------------------------------------------------------------------------------------------

# LM (lm.py). The Qwen2 backbone lives under `llm.model.model.*`. q/k/v and gate/up are first renamed
# one by one, then fuse_llm_projections concatenates each group along the output rows (one matmul
# instead of three / two per layer).
_QWEN = r"llm\.model\.model\."
_QWEN_LAYER = _QWEN + r"layers\.(\d+)\."
LLM_RULES: Rules = [
    (_QWEN + r"embed_tokens\.weight", "backbone.embed_tokens.weight"),
    (_QWEN_LAYER + r"self_attn\.([qkv]_proj)\.(weight|bias)", r"backbone.layers.\1.attn.\2.\3"),
    (_QWEN_LAYER + r"self_attn\.o_proj\.weight", r"backbone.layers.\1.attn.o.weight"),
    (_QWEN_LAYER + r"mlp\.(gate_proj|up_proj)\.weight", r"backbone.layers.\1.mlp.\2.weight"),
    (_QWEN_LAYER + r"mlp\.down_proj\.weight", r"backbone.layers.\1.mlp.down.weight"),
    (_QWEN_LAYER + r"input_layernorm\.weight", r"backbone.layers.\1.attn_norm.weight"),
    (_QWEN_LAYER + r"post_attention_layernorm\.weight", r"backbone.layers.\1.mlp_norm.weight"),
    (_QWEN + r"norm\.weight", "backbone.norm.weight"),
    # Dropped on purpose: the text lm_head (tied to embed_tokens) is never computed; CosyVoice only
    # reads the hidden states (SPEC §7.1), so the official per-step text logits are pure overhead.
    (r"llm\.model\.lm_head\.weight", None),
    (r"llm_embedding\.weight", "sos_task.weight"),  # rows: SOS, TASK_ID
    (r"speech_embedding\.weight", "speech_embedding.weight"),
    (r"llm_decoder\.(weight|bias)", r"speech_head.\1"),
]

# (module key pattern, parts in output-row order, fused name)
_LLM_FUSED = (
    (r"(backbone\.layers\.\d+\.attn)\.([qkv]_proj)\.(weight|bias)", ("q_proj", "k_proj", "v_proj"), "qkv"),
    (r"(backbone\.layers\.\d+\.mlp)\.(gate_proj|up_proj)\.(weight)", ("gate_proj", "up_proj"), "gate_up"),
)


def fuse_llm_projections(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate each layer's q/k/v (weight and bias) and gate/up weights along dim 0.

    A group with a missing part, or parts that cannot be stacked, is reported by the part's key
    (a wrong row count shows up afterwards as a shape mismatch of the fused key).
    """
    out = dict(sd)
    for pattern, parts, fused in _LLM_FUSED:
        groups = {(m.group(1), m.group(3)) for k in sd if (m := re.fullmatch(pattern, k))}
        for module, param in sorted(groups):
            names = [f"{module}.{p}.{param}" for p in parts]
            for n in names:
                if n not in sd:
                    raise ModelLoadError(f"missing key {n!r} (needed for the fused {module}.{fused}.{param})")
            tensors = [out.pop(n) for n in names]
            want_dim = 2 if param == "weight" else 1
            for n, t in zip(names, tensors):
                if t.dim() != want_dim or t.shape[1:] != tensors[0].shape[1:]:
                    raise ModelLoadError(
                        f"key {n!r} has shape {tuple(t.shape)}, which does not stack with "
                        f"{names[0]!r} {tuple(tensors[0].shape)}"
                    )
            out[f"{module}.{fused}.{param}"] = torch.cat(tensors, dim=0)
    return out


LLM_TRANSFORMS: tuple[Transform, ...] = (fuse_llm_projections,)

# Flow (flow.py). Pure renames; named groups (?P<x>...) let the estimator rules be composed from a
# stage prefix and a sub-module rule. Only the one-level U-Net of CosyVoice 2 exists on our side, so a
# checkpoint with down_blocks.1 (or any other extra key) fails as an unexpected key.
_FLOW_P = r"(?P<p>weight|bias)"
_FLOW_ENC_BLOCK = {  # wenet ConformerEncoderLayer -> ConformerBlock
    rf"self_attn\.linear_(?P<n>q|k|v|out)\.{_FLOW_P}": r"attn.\g<n>.\g<p>",
    r"self_attn\.linear_pos\.weight": "attn.pos.weight",
    r"self_attn\.pos_bias_(?P<n>u|v)": r"attn.bias_\g<n>",
    rf"feed_forward\.w_(?P<n>[12])\.{_FLOW_P}": r"ff.fc\g<n>.\g<p>",
    rf"norm_mha\.{_FLOW_P}": r"attn_norm.\g<p>",
    rf"norm_ff\.{_FLOW_P}": r"ff_norm.\g<p>",
}
_FLOW_STAGE = {  # decoder.estimator.<official stage> -> estimator.<ours>
    r"down_blocks\.0": "down",
    r"mid_blocks\.(?P<m>\d+)": r"mid.\g<m>",
    r"up_blocks\.0": "up",
}
_FLOW_STAGE_PART = {  # [resnet, transformer_blocks, conv] lists -> named parts
    rf"0\.block(?P<b>[12])\.block\.0\.{_FLOW_P}": r"resnet.block\g<b>.conv.\g<p>",
    rf"0\.block(?P<b>[12])\.block\.2\.{_FLOW_P}": r"resnet.block\g<b>.norm.\g<p>",
    rf"0\.mlp\.1\.{_FLOW_P}": r"resnet.time_proj.\g<p>",
    rf"0\.res_conv\.{_FLOW_P}": r"resnet.res_conv.\g<p>",
    rf"1\.(?P<j>\d+)\.norm1\.{_FLOW_P}": r"transformers.\g<j>.attn_norm.\g<p>",
    r"1\.(?P<j>\d+)\.attn1\.to_(?P<n>q|k|v)\.weight": r"transformers.\g<j>.attn.to_\g<n>.weight",
    rf"1\.(?P<j>\d+)\.attn1\.to_out\.0\.{_FLOW_P}": r"transformers.\g<j>.attn.to_out.\g<p>",
    rf"1\.(?P<j>\d+)\.norm3\.{_FLOW_P}": r"transformers.\g<j>.ff_norm.\g<p>",
    rf"1\.(?P<j>\d+)\.ff\.net\.0\.proj\.{_FLOW_P}": r"transformers.\g<j>.ff.fc1.\g<p>",
    rf"1\.(?P<j>\d+)\.ff\.net\.2\.{_FLOW_P}": r"transformers.\g<j>.ff.fc2.\g<p>",
    rf"2\.{_FLOW_P}": r"conv.\g<p>",  # mid stages have no conv: no official key matches there
}
FLOW_RULES: Rules = [
    (r"input_embedding\.weight", "token_embed.weight"),
    (rf"spk_embed_affine_layer\.{_FLOW_P}", r"spk_proj.\g<p>"),
    (rf"encoder_proj\.{_FLOW_P}", r"encoder_proj.\g<p>"),
    (rf"encoder\.embed\.out\.0\.{_FLOW_P}", r"encoder.embed.proj.\g<p>"),
    (rf"encoder\.embed\.out\.1\.{_FLOW_P}", r"encoder.embed.norm.\g<p>"),
    (rf"encoder\.pre_lookahead_layer\.(?P<c>conv[12])\.{_FLOW_P}", r"encoder.lookahead.\g<c>.\g<p>"),
    (rf"encoder\.up_layer\.conv\.{_FLOW_P}", r"encoder.upsample.conv.\g<p>"),
    (rf"encoder\.up_embed\.out\.0\.{_FLOW_P}", r"encoder.up_embed.proj.\g<p>"),
    (rf"encoder\.up_embed\.out\.1\.{_FLOW_P}", r"encoder.up_embed.norm.\g<p>"),
    (rf"encoder\.after_norm\.{_FLOW_P}", r"encoder.out_norm.\g<p>"),
    *[
        (rf"encoder\.{theirs}\.(?P<i>\d+)\.{pat}", rf"encoder.{ours}.\g<i>.{repl}")
        for theirs, ours in (("encoders", "blocks"), ("up_encoders", "up_blocks"))
        for pat, repl in _FLOW_ENC_BLOCK.items()
    ],
    (rf"decoder\.estimator\.time_mlp\.linear_(?P<n>[12])\.{_FLOW_P}", r"estimator.time_mlp.fc\g<n>.\g<p>"),
    *[
        (rf"decoder\.estimator\.{stage}\.{pat}", rf"estimator.{ours}.{repl}")
        for stage, ours in _FLOW_STAGE.items()
        for pat, repl in _FLOW_STAGE_PART.items()
    ],
    (rf"decoder\.estimator\.final_block\.block\.0\.{_FLOW_P}", r"estimator.final_block.conv.\g<p>"),
    (rf"decoder\.estimator\.final_block\.block\.2\.{_FLOW_P}", r"estimator.final_block.norm.\g<p>"),
    (rf"decoder\.estimator\.final_proj\.{_FLOW_P}", r"estimator.final_proj.\g<p>"),
]
FLOW_TRANSFORMS: tuple[Transform, ...] = ()

# HiFT (hift.py). Weight-normalised convs arrive as (g, v) pairs, either as torch's parametrisation
# (`<m>.parametrizations.weight.original0/1`, the released hift.pt) or the legacy `<m>.weight_g/_v`.
# Both spellings are renamed to `<m>.weight_g/_v`, then fold_weight_norm turns each pair into `<m>.weight`.
_HIFT_WN = (
    r"(conv_pre|conv_post|ups\.\d+|(?:source_)?resblocks\.\d+\.convs[12]\.\d+|f0_predictor\.condnet\.\d+)"
)
HIFT_RULES: Rules = [
    (_HIFT_WN + r"\.parametrizations\.weight\.original0", r"\1.weight_g"),
    (_HIFT_WN + r"\.parametrizations\.weight\.original1", r"\1.weight_v"),
    (_HIFT_WN + r"\.(weight_g|weight_v|bias)", r"\1.\2"),
    (r"((?:source_)?resblocks\.\d+\.activations[12]\.\d+\.alpha)", r"\1"),  # Snake alpha
    (r"(source_downs\.\d+\.(?:weight|bias))", r"\1"),  # plain convs (no weight norm)
    (r"(f0_predictor\.classifier\.(?:weight|bias))", r"\1"),
    (r"m_source\.l_linear\.(weight|bias)", r"source.merge.\1"),  # harmonics -> one excitation
]


def fold_weight_norm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace every `<m>.weight_g` [O,1,..] / `<m>.weight_v` [O,...] pair by `<m>.weight` = g * v / ||v||.

    The norm runs over every dim but 0 (torch's weight_norm dim=0; for ConvTranspose1d, weight [in, out, k],
    that is per input channel). This is the weight the official parametrisation computes on each forward.
    """
    out = {k: v for k, v in sd.items() if not k.endswith((".weight_g", ".weight_v"))}
    prefixes = {k.rsplit(".", 1)[0] for k in sd if k.endswith((".weight_g", ".weight_v"))}
    for m in sorted(prefixes):
        g, v = sd.get(f"{m}.weight_g"), sd.get(f"{m}.weight_v")
        if g is None or v is None:
            raise ModelLoadError(f"weight norm pair incomplete: {m!r} lacks {'g' if g is None else 'v'}")
        if f"{m}.weight" in sd:
            raise ModelLoadError(f"{m!r} has both a plain weight and a weight-norm pair")
        if v.dim() < 2 or g.numel() != v.shape[0]:
            raise ModelLoadError(f"{m!r}: weight norm g {tuple(g.shape)} does not fit v {tuple(v.shape)}")
        # torch._weight_norm is the kernel the parametrisation itself runs, so the folded weight is
        # bit-identical to the official one (a hand-written norm differs in the last bits: f0 drifts ~1e-4).
        g = g.float().reshape((v.shape[0],) + (1,) * (v.dim() - 1))
        out[f"{m}.weight"] = torch._weight_norm(v.float(), g, 0).to(v.dtype)
    return out


HIFT_TRANSFORMS: tuple[Transform, ...] = (fold_weight_norm,)


def load_llm(model: nn.Module, path: str | Path) -> nn.Module:
    return load_into(model, load_checkpoint(path), str(path), LLM_RULES, LLM_TRANSFORMS)


def load_flow(model: nn.Module, path: str | Path) -> nn.Module:
    return load_into(model, load_checkpoint(path), str(path), FLOW_RULES, FLOW_TRANSFORMS)


def load_hift(model: nn.Module, path: str | Path) -> nn.Module:
    sd = load_checkpoint(path)
    # The official loader strips every "generator." so a HiFiGan training checkpoint also loads.
    sd = {k.replace("generator.", ""): v for k, v in sd.items()}
    return load_into(model, sd, str(path), HIFT_RULES, HIFT_TRANSFORMS)
