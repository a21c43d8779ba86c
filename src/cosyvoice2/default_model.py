"""Our native model format and the model shipped with cosyvoice2 (trained by ``recipes/default_model.sh``).

A native model directory::

    cosyvoice2.json              format tag, every network's config (dataclass fields), speaker list;
                                 optional "prompt_language" ("match", the default, "always" or
                                 "never": see ``model_dir.Models.prompt_language``)
    lm.safetensors               CosyVoice2LM                 \
    flow.safetensors             Flow                          |  float16 weights; each file also carries
    hift.safetensors             HiFT (weight norm folded)     |  its own config in the safetensors
    speech_tokenizer.safetensors SpeechTokenizerModel          |  metadata, so it loads on its own
    speaker_encoder.safetensors  SpeakerEncoderModel          /
    tokenizer/                   text BPE: vocab.json, merges.txt, tokenizer_config.json (``TextTokenizer``)
    speakers/<name>.voice        built-in voices (``VoiceReference``: prompt tokens, mel, embedding, text)
    NOTICE                       licences of third-party weights (the speaker encoder)

Weights are stored as float16 and loaded as float32 (CPU inference runs in float32). The same config
helpers (``config_to_dict`` / ``config_from_dict``) read the training recipes' TOML files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CosyVoiceError, ModelLoadError
from .fileio import atomic_path

NATIVE_CONFIG = "cosyvoice2.json"
NATIVE_FORMAT = "cosyvoice2.native"
NATIVE_VERSION = 1
PACKAGE_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
TOKENIZER_DIR = "tokenizer"
SPEAKERS_DIR = "speakers"
PROMPT_LANGUAGE = ("always", "match", "never")  # model_dir.Models.prompt_language


def check_prompt_language(value: Any, where: str, error: type[CosyVoiceError] = ModelLoadError) -> str:
    if value not in PROMPT_LANGUAGE:
        raise error(f"{where}: prompt_language {value!r} is not one of {PROMPT_LANGUAGE}")
    return value


NETWORKS = ("lm", "flow", "hift", "speech_tokenizer", "speaker_encoder")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --------------------------------------------------------------------------------------------------
# Config dataclasses <-> plain dicts (JSON / TOML)
# --------------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A (nested) config dataclass -> JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build the dataclass ``cls`` from a dict, recursing into nested dataclasses and tuple fields.

    Unknown keys are an error (a typo in a recipe must not be silently ignored); missing keys take the
    dataclass defaults.
    """
    if not isinstance(data, Mapping):
        raise ModelLoadError(
            f"{where}: expected a table/object for {cls.__name__}, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ModelLoadError(f"{where}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    try:
        return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return config_from_dict(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                return _coerce(arg, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ModelLoadError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ModelLoadError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# --------------------------------------------------------------------------------------------------
# One network <-> one safetensors file
# --------------------------------------------------------------------------------------------------


def network_state(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """The state dict to ship: floating tensors cast to ``dtype``, everything contiguous and unshared."""
    return {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in model.state_dict().items()
    }


def save_network(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    kind: str,
    dtype: torch.dtype = torch.float16,
    notice: str | None = None,
) -> Path:
    """Write ``model`` (which has a ``cfg`` dataclass) to a safetensors file with its config, atomically."""
    path = Path(path)
    meta = {"format": NATIVE_FORMAT, "kind": kind, "config": json.dumps(config_to_dict(model.cfg))}
    if notice:
        meta["notice"] = notice
    with atomic_path(path) as tmp:
        save_file(network_state(model, dtype), tmp, metadata=meta)
    return path


def read_network(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(float32 state dict, metadata) of a network file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"missing weights file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, meta


def load_network(
    path: str | os.PathLike, model_cls: type, cfg_cls: type, cfg: Any | None = None
) -> nn.Module:
    """Build ``model_cls(cfg)`` (``cfg`` defaults to the config stored in the file) and load its weights."""
    state, meta = read_network(path)
    if cfg is None:
        try:
            cfg = config_from_dict(cfg_cls, json.loads(meta["config"]), f"{path} config")
        except (KeyError, json.JSONDecodeError):
            raise ModelLoadError(f"{path}: no config in the file metadata") from None
    model = model_cls(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{path}: weights do not match the config: {e}") from None
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Native model directories
# --------------------------------------------------------------------------------------------------


def network_classes():
    """(config class, model class) per network (imported lazily: the API imports this module)."""
    from .flow import Flow, FlowConfig
    from .hift import HiFT, HiFTConfig
    from .lm import CosyVoice2LM, LMConfig
    from .speaker import SpeakerEncoderConfig, SpeakerEncoderModel
    from .speech_tokenizer import SpeechTokenizerConfig, SpeechTokenizerModel

    return {
        "lm": (LMConfig, CosyVoice2LM),
        "flow": (FlowConfig, Flow),
        "hift": (HiFTConfig, HiFT),
        "speech_tokenizer": (SpeechTokenizerConfig, SpeechTokenizerModel),
        "speaker_encoder": (SpeakerEncoderConfig, SpeakerEncoderModel),
    }


def check_compatible(cfgs: Mapping[str, Any]) -> None:
    """The networks must agree on the speech vocabulary and the speaker embedding size."""
    codes = cfgs["speech_tokenizer"].codebook_size
    if cfgs["lm"].speech_token_size != codes or cfgs["flow"].vocab_size != codes:
        raise ModelLoadError(
            f"speech vocabularies differ: tokenizer {codes}, lm {cfgs['lm'].speech_token_size}, "
            f"flow {cfgs['flow'].vocab_size}"
        )
    if cfgs["flow"].spk_embed_dim != cfgs["speaker_encoder"].embedding_size:
        raise ModelLoadError(
            f"flow spk_embed_dim {cfgs['flow'].spk_embed_dim} != speaker embedding size "
            f"{cfgs['speaker_encoder'].embedding_size}"
        )
    if cfgs["flow"].n_mels != cfgs["hift"].in_channels:
        raise ModelLoadError("flow n_mels and hift in_channels differ")


@contextmanager
def replacing_dir(root: Path) -> Iterator[Path]:
    """A temporary sibling directory to fill; when the block ends without error it replaces ``root`` (made
    readable by all, then renamed into place, so ``root`` is always the old tree or the new one, never a
    mix), and on error it is removed and ``root`` is left as it was."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be read by others
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        old = None
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.replace(root, old)
        os.replace(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_native_dir(
    path: str | os.PathLike,
    *,
    lm: nn.Module,
    flow: nn.Module,
    hift: nn.Module,
    speech_tokenizer: nn.Module,
    speaker_encoder: nn.Module,
    text_tokenizer_dir: str | os.PathLike,
    speakers: Mapping[str, Any] | None = None,
    default_speaker: str | None = None,
    info: Mapping[str, Any] | None = None,
    notice: str | None = None,
    prompt_language: str | None = None,
) -> Path:
    """Write a complete native model directory, atomically: it is built in a temporary sibling directory
    and renamed into place, so ``path`` is either the old model or the new one, never a mix.

    ``speakers``: {name: VoiceReference} built-in voices; ``default_speaker`` must be one of them (default:
    the first). HiFT may still carry weight norm: it is folded on a copy. ``notice`` defaults to the
    speaker encoder licence notice.
    """
    from .hift import remove_weight_norm
    from .speaker import RESEMBLYZER_NOTICE

    root = Path(path)
    nets = {
        "lm": lm,
        "flow": flow,
        "hift": hift,
        "speech_tokenizer": speech_tokenizer,
        "speaker_encoder": speaker_encoder,
    }
    if any(nn.utils.parametrize.is_parametrized(m) for m in hift.modules()):
        hift = remove_weight_norm(copy.deepcopy(hift))
        nets["hift"] = hift
    check_compatible({k: m.cfg for k, m in nets.items()})
    speakers = dict(speakers or {})
    for name in speakers:
        if not _NAME_RE.match(name):
            raise CosyVoiceError(
                f"speaker name {name!r} is not usable as a file name ([A-Za-z0-9_.-], <= 64)"
            )
    if default_speaker is None and speakers:
        default_speaker = next(iter(speakers))
    if default_speaker is not None and default_speaker not in speakers:
        raise CosyVoiceError(f"default speaker {default_speaker!r} is not among the speakers")
    tok_src = Path(text_tokenizer_dir)
    from .text import TextTokenizer

    n_text = len(TextTokenizer.from_dir(tok_src))  # validates the files
    if n_text > lm.cfg.vocab_size:
        raise CosyVoiceError(f"text tokenizer has {n_text} ids but the LM embeds only {lm.cfg.vocab_size}")

    with replacing_dir(root) as tmp:
        config = {"format": NATIVE_FORMAT, "version": NATIVE_VERSION}
        for key, model in nets.items():
            config[key] = config_to_dict(model.cfg)
            save_network(
                tmp / f"{key}.safetensors",
                model,
                kind=key,
                notice=(notice or RESEMBLYZER_NOTICE) if key == "speaker_encoder" else None,
            )
        config["text_tokenizer"] = TOKENIZER_DIR
        config["speakers"] = list(speakers)
        config["default_speaker"] = default_speaker
        if prompt_language is not None:  # else the loader's default ("match")
            config["prompt_language"] = check_prompt_language(prompt_language, str(root), CosyVoiceError)
        config["info"] = dict(info or {})
        (tmp / TOKENIZER_DIR).mkdir()
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copyfile(tok_src / name, tmp / TOKENIZER_DIR / name)
        (tmp / SPEAKERS_DIR).mkdir()
        for name, voice in speakers.items():
            voice.save(tmp / SPEAKERS_DIR / f"{name}.voice", dtype=torch.float16)  # like the weights
        (tmp / "NOTICE").write_text((notice or RESEMBLYZER_NOTICE) + "\n", encoding="utf-8")
        (tmp / NATIVE_CONFIG).write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return root


def read_native_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(raw JSON, {network: config dataclass}) of a native model directory."""
    root = Path(path)
    cfg_path = root / NATIVE_CONFIG
    if not cfg_path.is_file():
        raise ModelLoadError(f"{root} is not a native cosyvoice2 model directory (no {NATIVE_CONFIG})")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if raw.get("format") != NATIVE_FORMAT:
        raise ModelLoadError(f"{cfg_path}: not a {NATIVE_FORMAT} config")
    if int(raw.get("version", 0)) > NATIVE_VERSION:
        raise ModelLoadError(
            f"{cfg_path} was written by a newer cosyvoice2 (format version {raw['version']})"
        )
    cfgs = {}
    for key, (cfg_cls, _) in network_classes().items():
        if key not in raw:
            raise ModelLoadError(f"{cfg_path}: no '{key}' section")
        cfgs[key] = config_from_dict(cfg_cls, raw[key], f"{cfg_path}:{key}")
    check_compatible(cfgs)
    return raw, cfgs


def load_native_dir(path: str | os.PathLike, *, text_backend: str = "auto"):
    """Load a native model directory into ``cosyvoice2.model_dir.Models`` (float32, eval mode, CPU)."""
    from .frontend import Frontend
    from .model_dir import Models
    from .text import TextTokenizer
    from .voice import VoiceReference

    root = Path(path)
    raw, cfgs = read_native_config(root)
    nets = {
        key: load_network(root / f"{key}.safetensors", model_cls, cfg_cls, cfgs[key])
        for key, (cfg_cls, model_cls) in network_classes().items()
    }
    tokenizer = TextTokenizer.from_dir(root / raw.get("text_tokenizer", TOKENIZER_DIR))
    if len(tokenizer) > cfgs["lm"].vocab_size:
        raise ModelLoadError(
            f"{root}: text tokenizer has {len(tokenizer)} ids, the LM only {cfgs['lm'].vocab_size}"
        )
    frontend = Frontend(
        tokenizer=tokenizer,
        tokenize_speech=nets["speech_tokenizer"].tokens,
        embed_speaker=nets["speaker_encoder"].embed,
        text_backend=text_backend,
    )
    speakers = {}
    for name in raw.get("speakers", []):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ModelLoadError(f"{root}: bad speaker name {name!r}")
        try:
            speakers[name] = VoiceReference.load(root / SPEAKERS_DIR / f"{name}.voice")
        except CosyVoiceError as e:
            raise ModelLoadError(f"{root}: speaker {name!r}: {e}") from None
    default = raw.get("default_speaker")
    if default is not None and default not in speakers:
        raise ModelLoadError(f"{root}: default speaker {default!r} is not among the speakers")
    # A native model's LM starts without a voice's transcript in another language (model_dir.Models)
    prompt_language = check_prompt_language(raw.get("prompt_language", "match"), str(root))
    return Models(nets["lm"], nets["flow"], nets["hift"], frontend, speakers, default, root, prompt_language)


def default_model_dir() -> Path:
    """The model directory shipped inside the package (``cosyvoice2/assets/default_model``)."""
    if not (PACKAGE_MODEL_DIR / NATIVE_CONFIG).is_file():
        raise ModelLoadError(
            "no default model is installed with this copy of cosyvoice2 (expected "
            f"{PACKAGE_MODEL_DIR / NATIVE_CONFIG}); train one with recipes/default_model.sh, or pass a model "
            "directory (e.g. an official CosyVoice2-0.5B download) with --model / cosyvoice2.load(path)"
        )
    return PACKAGE_MODEL_DIR


__all__ = [
    "NATIVE_CONFIG",
    "config_from_dict",
    "config_to_dict",
    "default_model_dir",
    "load_native_dir",
    "load_network",
    "read_native_config",
    "save_native_dir",
    "save_network",
]
