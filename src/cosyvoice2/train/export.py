"""Turn training runs into shippable networks and assemble a native model directory.

``network_from_run(kind, run)`` rebuilds the network a trainer ships (``objective.net``) from a run
directory's latest checkpoint (or a checkpoint file, or an already exported ``.safetensors``). The
command line puts every network, the text tokenizer and a few built-in voices into a native directory::

    python -m cosyvoice2.train.export --runs exp --corpus data/corpus --cache exp/cache \\
        --out src/cosyvoice2/assets/default_model --speakers 4

Built-in voices: for each chosen corpus speaker, one utterance of ``prompt_seconds`` (closest) from the
train split becomes the prompt (tokens, mel, transcript) with the speaker's mean embedding.

``--base DIR`` starts from an existing native directory instead (e.g. the shipped default model) and
replaces only the networks named on the command line, keeping its other networks, its text tokenizer and
its built-in voices as they are: one session's update of the default model touches only what improved::

    python -m cosyvoice2.train.export --base src/cosyvoice2/assets/default_model --flow exp/b3/flow \
        --hift exp/b3/hift --out /tmp/candidate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..config import RATES
from ..default_model import PROMPT_LANGUAGE, config_from_dict, load_network, save_native_dir
from ..errors import ModelLoadError
from .common import latest_checkpoint, load_checkpoint, strip_prefix

RUN_DIRS = {
    "speech_tokenizer": "tokenizer",
    "lm": "lm",
    "flow": "flow",
    "hift": "hift",
    "speaker_encoder": "speaker",
}


def _classes(kind: str):
    from ..default_model import network_classes

    try:
        return network_classes()[kind]
    except KeyError:
        raise ModelLoadError(f"unknown network kind {kind!r}") from None


def network_from_run(kind: str, run: str | Path) -> nn.Module:
    """The trained network of a run: a run directory, a checkpoint ``.pt`` or a network ``.safetensors``;
    ``A+B+...`` (several of those, none of which exists under the joined name): the uniform average of
    their weights (``average_networks``); ``CKPT@ema``: the moving average of the weights that a run with
    ``train.ema_decay`` keeps in its step checkpoints."""
    path = Path(run)
    if "+" in str(run) and not path.exists():
        return average_networks([network_from_run(kind, part) for part in str(run).split("+")])
    weights = "model"
    if str(run).endswith("@ema") and not path.exists():
        path, weights = Path(str(run)[: -len("@ema")]), "ema"
    cfg_cls, model_cls = _classes(kind)
    if path.suffix == ".safetensors":
        if weights != "model":
            raise ModelLoadError(f"{path} is an exported network: it has no {weights} weights")
        return load_network(path, model_cls, cfg_cls)
    ckpt_path = path if path.is_file() else latest_checkpoint(path)
    if ckpt_path is None:
        raise ModelLoadError(f"no checkpoint in {path} (train the {kind} first)")
    ckpt = load_checkpoint(ckpt_path)
    if weights not in ckpt:
        raise ModelLoadError(f"{ckpt_path} holds no {weights} weights (its run had no train.ema_decay)")
    cfg = config_from_dict(cfg_cls, ckpt["config"]["model"], f"{ckpt_path} model config")
    model = model_cls(cfg)
    state = strip_prefix(ckpt[weights], "net.")
    if kind == "hift":
        from ..hift import apply_weight_norm, remove_weight_norm

        apply_weight_norm(model)
        model.load_state_dict(state)
        remove_weight_norm(model)
    else:
        model.load_state_dict(state)
    return model.eval()


def average_networks(nets: list[nn.Module]) -> nn.Module:
    """The first network with every floating-point tensor replaced by the mean over ``nets``.

    Why: arms fine-tuned for the same minutes from the same shipped weights (e.g. two LM input-noise
    settings) stay in one basin, where their average (a "model soup") can beat either; it is ranked like
    any other candidate before it ships. Integer buffers must agree; shapes and keys must match.
    """
    if not nets:
        raise ModelLoadError("nothing to average")
    states = [n.state_dict() for n in nets]
    out = {}
    for key, first in states[0].items():
        tensors = [st.get(key) for st in states]
        if any(t is None or t.shape != first.shape for t in tensors):
            raise ModelLoadError(f"cannot average: {key!r} is missing or has another shape in one network")
        if first.is_floating_point():
            out[key] = torch.stack([t.float() for t in tensors]).mean(0).to(first.dtype)
        elif all(torch.equal(t, first) for t in tensors):
            out[key] = first
        else:
            raise ModelLoadError(f"cannot average: integer tensor {key!r} differs between networks")
    if any(set(st) != set(states[0]) for st in states):
        raise ModelLoadError("cannot average: the networks have different tensors")
    nets[0].load_state_dict(out)
    return nets[0].eval()


def speaker_prompts(
    corpus: Path, cache: Path, tokenize, n_speakers: int | list[str], prompt_seconds: float = 5.0
):
    """{speaker: VoiceReference} for built-in voices (see the module docstring)."""
    from ..audio import prompt_mel
    from ..voice import VoiceReference
    from .data import FeatureCache, load_wav, read_manifest

    utts = read_manifest(corpus, ("train",), 1.0, 15.0)
    means = FeatureCache(cache, "speakers").load()
    by_spk: dict[str, list] = {}
    for u in utts:
        by_spk.setdefault(u.speaker, []).append(u)
    names = sorted(by_spk) if isinstance(n_speakers, int) else list(n_speakers)
    if isinstance(n_speakers, int):
        names = names[:n_speakers]
    voices = {}
    for name in names:
        if name not in by_spk:
            raise ModelLoadError(f"speaker {name!r} has no train utterances in {corpus}")
        utt = min(by_spk[name], key=lambda u: (abs(u.duration - prompt_seconds), u.id))
        wav24 = load_wav(utt, RATES.sample_rate)
        wav16 = load_wav(utt, RATES.tokenizer_sample_rate)
        mel = prompt_mel(torch.from_numpy(wav24)[None])[0]
        tokens = tokenize(torch.from_numpy(wav16)[None])
        voices[name] = VoiceReference(
            embedding=means[name],
            speech_tokens=tokens,
            mel=mel,
            text=utt.text,
            name=name,
            meta={"source_utterance": utt.id},
        )
    return voices


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("exp"), help="directory holding the run directories")
    for kind, sub in RUN_DIRS.items():
        ap.add_argument(
            f"--{kind.replace('_', '-')}", help=f"run dir / checkpoint / .safetensors (default RUNS/{sub})"
        )
    ap.add_argument("--text-tokenizer", help="BPE directory (default RUNS/lm/text_tokenizer)")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--cache", type=Path, default=Path("exp/cache"))
    ap.add_argument(
        "--speakers", default="4", help="number of built-in voices, comma-separated names, or 'all'"
    )
    ap.add_argument("--default-speaker", help="the voice used when none is given (default: the first)")
    ap.add_argument("--prompt-seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", type=Path, help="native model directory whose other parts are kept")
    ap.add_argument(
        "--prompt-language",
        choices=PROMPT_LANGUAGE,
        help="when the LM continues from a voice's transcript (model_dir.Models.prompt_language; default: "
        "the base's, else match)",
    )
    ap.add_argument(
        "--flow-ode-weight",
        type=float,
        help="the flow's FlowConfig.ode_weight in the exported config (default: the flow's own)",
    )
    args = ap.parse_args(argv)
    if args.flow_ode_weight is not None:
        from ..flow import FlowConfig

        try:  # FlowConfig's own rule, before any network is read
            FlowConfig(ode_weight=args.flow_ode_weight)
        except ValueError as e:
            ap.error(str(e))
    if args.base is not None:
        return update_native(args)

    nets = {}
    for kind, sub in RUN_DIRS.items():
        given = getattr(args, kind)
        if given is None:
            given = (
                args.runs / sub / "speaker_encoder.safetensors"
                if kind == "speaker_encoder"
                else args.runs / sub
            )
        nets[kind] = network_from_run(kind, given)
    if args.flow_ode_weight is not None:
        nets["flow"].cfg = dataclasses.replace(nets["flow"].cfg, ode_weight=args.flow_ode_weight)
    if args.speakers == "all":
        from .data import read_manifest

        chosen = sorted({u.speaker for u in read_manifest(args.corpus, ("train",), 1.0, 15.0)})
    elif args.speakers.isdigit():
        chosen = int(args.speakers)
    else:
        chosen = [s for s in args.speakers.split(",") if s]
    voices = speaker_prompts(
        args.corpus, args.cache, nets["speech_tokenizer"].tokens, chosen, args.prompt_seconds
    )
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    info = {"params": n_params, "corpus": str(args.corpus)}
    out = save_native_dir(
        args.out,
        **nets,
        text_tokenizer_dir=args.text_tokenizer or args.runs / "lm" / "text_tokenizer",
        speakers=voices,
        default_speaker=args.default_speaker,
        info=info,
        prompt_language=args.prompt_language,
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        json.dumps({"out": str(out), "bytes": size, "params": n_params, "speakers": list(voices)}, indent=2)
    )


def update_native(args: argparse.Namespace) -> None:
    """``--base``: a copy of the base directory in which only the named networks (and their config
    sections) are replaced; every other file is copied byte for byte. Written atomically like
    ``save_native_dir`` (``--out`` may be ``--base`` itself)."""
    import copy
    import shutil

    from ..default_model import (
        NATIVE_CONFIG,
        SPEAKERS_DIR,
        TOKENIZER_DIR,
        check_compatible,
        config_to_dict,
        read_native_config,
        replacing_dir,
        save_network,
    )
    from ..hift import remove_weight_norm

    raw, cfgs = read_native_config(args.base)
    replaced = {kind: getattr(args, kind) for kind in RUN_DIRS if getattr(args, kind)}
    nets = {kind: network_from_run(kind, given) for kind, given in replaced.items()}
    if "hift" in nets and any(nn.utils.parametrize.is_parametrized(m) for m in nets["hift"].modules()):
        nets["hift"] = remove_weight_norm(copy.deepcopy(nets["hift"]))
    check_compatible({**cfgs, **{k: m.cfg for k, m in nets.items()}})
    # A new LM brings its own BPE when its run trained one (e.g. other text units): the ids it learnt mean
    # nothing under the base's. An LM trained on the base's BPE (``[lm] text_tokenizer``) keeps it.
    tok_dir = Path(args.text_tokenizer) if args.text_tokenizer else None
    if tok_dir is None and "lm" in replaced and (Path(replaced["lm"]) / "text_tokenizer").is_dir():
        tok_dir = Path(replaced["lm"]) / "text_tokenizer"
    if tok_dir is not None:
        from ..text import TextTokenizer

        n_text = len(TextTokenizer.from_dir(tok_dir))
        lm_vocab = nets["lm"].cfg.vocab_size if "lm" in nets else cfgs["lm"].vocab_size
        if n_text > lm_vocab:
            raise SystemExit(f"text tokenizer {tok_dir} has {n_text} ids but the LM embeds only {lm_vocab}")
    out = Path(args.out)
    with replacing_dir(out) as tmp:
        shutil.copytree(args.base, tmp, dirs_exist_ok=True)
        if tok_dir is not None:
            shutil.rmtree(tmp / TOKENIZER_DIR, ignore_errors=True)
            shutil.copytree(tok_dir, tmp / TOKENIZER_DIR)
            raw.setdefault("info", {})["text_tokenizer"] = str(tok_dir)
        for kind, net in nets.items():
            save_network(tmp / f"{kind}.safetensors", net, kind=kind)
            raw[kind] = config_to_dict(net.cfg)
        if "speech_tokenizer" in nets:
            # A new tokenizer's codes mean something else: the built-in voices' prompt tokens (and so their
            # prompt utterances) are made anew from --corpus / --cache for the same speaker names.
            voices = speaker_prompts(
                args.corpus,
                args.cache,
                nets["speech_tokenizer"].tokens,
                list(raw["speakers"]),
                args.prompt_seconds,
            )
            for name, voice in voices.items():
                voice.save(tmp / SPEAKERS_DIR / f"{name}.voice", dtype=torch.float16)
            # The base's phoneme reader (train.tokenizer.PhonemeReader) reads the old codes only; a new
            # one comes from the tokenizer's run: PhonemeReader.save_from_run(RUN, OUT/<that file>).
            (tmp / "phoneme_reader.safetensors").unlink(missing_ok=True)
            raw.setdefault("info", {})["voices_from"] = str(args.corpus)
        if replaced:
            raw.setdefault("info", {})["replaced"] = {k: str(v) for k, v in replaced.items()}
        if args.prompt_language is not None:
            raw["prompt_language"] = args.prompt_language
        if args.flow_ode_weight is not None:
            raw["flow"]["ode_weight"] = args.flow_ode_weight
        text = json.dumps(raw, indent=2, ensure_ascii=False) + "\n"
        (tmp / NATIVE_CONFIG).write_text(text, encoding="utf-8")
        read_native_config(tmp)  # the result must load before it replaces anything
    print(json.dumps({"out": str(out), "base": str(args.base), "replaced": sorted(replaced)}, indent=2))


if __name__ == "__main__":
    main()
