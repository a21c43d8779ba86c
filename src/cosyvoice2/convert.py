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

# LM: filled in with lm.py
LLM_RULES: Rules = []
LLM_TRANSFORMS: tuple[Transform, ...] = ()

# Flow: filled in with flow.py
FLOW_RULES: Rules = []
FLOW_TRANSFORMS: tuple[Transform, ...] = ()

# HiFT: filled in with hift.py
HIFT_RULES: Rules = []
HIFT_TRANSFORMS: tuple[Transform, ...] = ()


def load_llm(model: nn.Module, path: str | Path) -> nn.Module:
    return load_into(model, load_checkpoint(path), str(path), LLM_RULES, LLM_TRANSFORMS)


def load_flow(model: nn.Module, path: str | Path) -> nn.Module:
    return load_into(model, load_checkpoint(path), str(path), FLOW_RULES, FLOW_TRANSFORMS)


def load_hift(model: nn.Module, path: str | Path) -> nn.Module:
    sd = load_checkpoint(path)
    # The official loader strips every "generator." so a HiFiGan training checkpoint also loads.
    sd = {k.replace("generator.", ""): v for k, v in sd.items()}
    return load_into(model, sd, str(path), HIFT_RULES, HIFT_TRANSFORMS)
