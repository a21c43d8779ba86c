"""The ``cosyvoice2`` command line.

``cosyvoice2 speak "Hello there." -o hello.wav`` speaks with the default model; ``--model DIR`` takes an
official CosyVoice2-0.5B directory (or any directory in that layout). Errors we can explain are printed as
one line and exit with status 2; nothing a user typed should end in a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import CosyVoiceError


def _add_voice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-wav", help="prompt audio to clone (wav/flac/mp3/ogg, 0.5-30 s)")
    p.add_argument("--prompt-text", help="transcript of the prompt audio (zero-shot); omit for cross-lingual")
    p.add_argument("--voice", help="a built-in or saved speaker name, or a .voice file")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (default: the model shipped with cosyvoice2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    _add_compute_arg(p)
    p.add_argument("--int8", action="store_true", help="int8 LM and flow: faster, not exact")
    p.add_argument("--flow-steps", type=int, default=None, help="flow ODE steps (official 10)")
    _add_sampler_args(p)


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    """The flow sampler's levers (``FlowConfig.cfg_steps``, ``FlowConfig.first_chunk_steps``)."""
    p.add_argument(
        "--cfg-steps", type=int, default=None,
        help="classifier-free guidance on the first K flow steps only (default: all; not exact)",
    )  # fmt: skip
    p.add_argument(
        "--first-chunk-steps", type=int, default=None,
        help="flow ODE steps of a stream's first chunk (first-packet latency; default: all; not exact)",
    )  # fmt: skip


def _add_compute_arg(p: argparse.ArgumentParser) -> None:
    # Not --speed: that is the speaking rate of `speak`/`convert` (and of the server's requests).
    p.add_argument(
        "--compute",
        choices=("exact", "fast"),
        default="exact",
        help="exact: float32, the official numbers (default); fast: the precision this CPU runs fastest "
        "(int8/bf16, chosen from its features; outputs move slightly)",
    )


def _load_options(args) -> dict:
    """``cosyvoice2.load`` keywords from --compute, --int8, --flow-steps, --cfg-steps and
    --first-chunk-steps (explicit knobs win)."""
    opts: dict = {"compute": getattr(args, "compute", "exact")}
    if getattr(args, "int8", False):
        opts |= {"lm_quant": "int8", "flow_quant": "int8"}
    for name in ("flow_steps", "cfg_steps", "first_chunk_steps"):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    return opts


def _load(args):
    import torch

    from . import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, **_load_options(args))


def _resolve_voice(tts, args):
    if args.prompt_wav and args.voice:
        raise CosyVoiceError("give either --prompt-wav or --voice, not both")
    if args.prompt_wav:
        return tts.voice(args.prompt_wav, text=args.prompt_text)
    if args.prompt_text:
        raise CosyVoiceError("--prompt-text needs --prompt-wav")
    return args.voice


def _read_text(args) -> str:
    if args.file:
        path = Path(args.file)
        if str(path) == "-":
            return sys.stdin.read()
        if not path.is_file():
            raise CosyVoiceError(f"text file not found: {path}")
        return path.read_text(encoding="utf-8")
    if args.text is None:
        raise CosyVoiceError("give the text to speak, or --file FILE")
    return args.text


def cmd_speak(args) -> int:
    import numpy as np

    from .audio import write_audio_atomic

    text = _read_text(args)
    tts = _load(args)
    voice = _resolve_voice(tts, args)
    t0 = time.perf_counter()
    opts = dict(voice=voice, instruct=args.instruct, speed=args.speed, seed=args.seed)
    opts["cross_lingual"] = args.cross_lingual
    if args.stream:
        chunks, first = [], None
        for chunk in tts.stream(text, **opts):
            if first is None:
                first = time.perf_counter() - t0
            chunks.append(chunk)
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    else:
        first = None
        audio = tts.synthesize(text, progress=not args.quiet, **opts)
    elapsed = time.perf_counter() - t0
    out = write_audio_atomic(args.output, audio, tts.sample_rate)
    if not args.quiet:
        dur = len(audio) / tts.sample_rate
        extra = f", first audio after {first:.2f} s" if first is not None else ""
        rtf = elapsed / max(dur, 1e-9)
        print(f"wrote {out} ({dur:.2f} s of audio in {elapsed:.2f} s, RTF {rtf:.2f}{extra})")
    return 0


def cmd_voice(args) -> int:
    tts = _load(args)
    voice = tts.voice(args.prompt_wav, text=args.prompt_text, name=args.name)
    path = voice.save(args.output)
    print(
        f"saved voice to {path} ({voice.duration:.2f} s prompt, transcript: {'yes' if voice.text else 'no'})"
    )
    return 0


def cmd_convert(args) -> int:
    from .audio import write_audio_atomic

    tts = _load(args)
    voice = _resolve_voice(tts, args)
    if voice is None:
        raise CosyVoiceError("voice conversion needs a target voice: --prompt-wav or --voice")
    audio = tts.convert(args.source, voice, speed=args.speed, seed=args.seed)
    out = write_audio_atomic(args.output, audio, tts.sample_rate)
    print(f"wrote {out} ({len(audio) / tts.sample_rate:.2f} s)")
    return 0


def cmd_speakers(args) -> int:
    tts = _load(args)
    names = tts.speakers()
    print("\n".join(names) if names else "(no built-in speakers)")
    return 0


def cmd_eval(args) -> int:
    from . import evaluate as ev

    languages = ev.parse_languages(args.languages)
    if args.max_sentences < 1:
        raise CosyVoiceError("--max-sentences must be at least 1")
    corpus = ev.read_manifest(args.corpus)
    prompts = ev.read_manifest(args.prompts) if args.prompts else None
    asr = ev.WhisperASR(en_model=args.asr_en, threads=args.threads, compute_type=args.asr_compute)
    similarity = ev.SpeakerSimilarity.load(args.speaker_encoder)
    tts = _load(args)
    options = {"compute": args.compute, "int8": args.int8, "flow_steps": args.flow_steps}
    options |= {"cfg_steps": args.cfg_steps, "first_chunk_steps": args.first_chunk_steps}
    options |= {"threads": args.threads, "plan": tts.compute_plan.as_dict()}
    header = {
        "model": ev.model_info(tts, args.model, options),
        "corpus": {"path": str(Path(args.corpus).resolve()), "utterances": len(corpus)},
        "prompts": str(Path(args.prompts).resolve()) if args.prompts else "corpus:test_unseen_speaker",
    }
    report = ev.evaluate(
        tts,
        corpus,
        asr=asr,
        similarity=similarity,
        languages=languages,
        max_sentences=args.max_sentences,
        voices=args.voices,
        prompts=prompts,
        stream=args.stream,
        resynth=args.resynth,
        seed=args.seed,
        progress=not args.quiet,
        header=header,
    )
    path = ev.write_report(args.output, report)
    if not args.quiet:
        print(ev.format_summary(report))
    print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    from . import evaluate as ev

    base, other = ev.load_report(args.base), ev.load_report(args.other)
    result = ev.compare_reports(
        base,
        other,
        n_boot=args.boot,
        seed=args.seed,
        budget_error=args.budget_error,
        budget_similarity=args.budget_similarity,
    )
    result["files"] = {"base": str(Path(args.base).resolve()), "other": str(Path(args.other).resolve())}
    print(ev.format_comparison(result))
    if args.output:
        try:
            path = ev.write_report(args.output, result)
        except OSError as e:
            raise CosyVoiceError(f"cannot write {args.output}: {e}") from None
        print(f"wrote {path}")
    return 0


def _autoscale(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise CosyVoiceError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4; got {text!r}")
    return int(lo), int(hi)


def cmd_serve(args) -> int:
    if args.ray:
        return _serve_ray(args)
    from .server import serve

    serve(**_server_settings(args), host=args.host, port=args.port, allowed_hosts=args.allowed_host or [])
    return 0


def _server_settings(args) -> dict:
    """The settings a server process (or each Ray replica) takes from the command line."""
    return dict(
        model=args.model,
        threads=args.threads,
        data_dir=args.data_dir,
        voice_db=args.voice_db,
        voice_files=args.voice_files,
        voice_namespace=args.voice_namespace,
        api_key=args.api_key,
        max_active=args.max_active,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        request_timeout=args.request_timeout,
        cors_origins=args.cors_origin or [],
        compute=args.compute,
        cfg_steps=args.cfg_steps,
        first_chunk_steps=args.first_chunk_steps,
    )


def _serve_ray(args) -> int:
    try:
        from .server.ray_serve import ReplicaOptions, serve_ray
    except ImportError as e:
        raise CosyVoiceError(f"--ray needs Ray Serve: pip install 'cosyvoice2[ray]' ({e})") from None
    if args.host in ("0.0.0.0", "::", ""):
        hosts = list(args.allowed_host or []) or ["*"]
    else:
        hosts = [*(args.allowed_host or []), args.host]
    options = ReplicaOptions.from_dict({**_server_settings(args), "allowed_hosts": hosts})
    if args.replica_cpus <= 0:
        raise CosyVoiceError(f"--replica-cpus must be positive, got {args.replica_cpus}")
    serve_ray(
        options,
        host=args.host,
        port=args.port,
        address=args.ray_address,
        replicas=args.replicas,
        autoscale=_autoscale(args.autoscale),
        num_cpus=args.replica_cpus,
        max_queued=args.ray_max_queued,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyvoice2", description="Streaming zero-shot text-to-speech")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("speak", help="text in, audio file out")
    p.add_argument("text", nargs="?", help="the text to speak")
    p.add_argument("-f", "--file", help="read the text from a file ('-' for stdin)")
    p.add_argument("-o", "--output", default="out.wav", help="output file (.wav/.flac/.mp3/.ogg)")
    _add_model_args(p)
    _add_voice_args(p)
    p.add_argument("--instruct", help='style instruction, e.g. "speak happily" (needs a prompt voice)')
    p.add_argument(
        "--cross-lingual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start the LM without the voice's transcript (--cross-lingual) or after it "
        "(--no-cross-lingual); default: the model decides (the shipped model starts without it; official "
        "models continue from it)",
    )
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="synthesise in streaming chunks")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_speak)

    p = sub.add_parser("voice", help="make a reusable voice file from prompt audio")
    p.add_argument("prompt_wav")
    p.add_argument("--prompt-text", help="transcript of the prompt (enables zero-shot cloning)")
    p.add_argument("--name")
    p.add_argument("-o", "--output", required=True)
    _add_model_args(p)
    p.set_defaults(func=cmd_voice)

    p = sub.add_parser("convert", help="voice conversion: say what the source says in the target voice")
    p.add_argument("source")
    p.add_argument("-o", "--output", default="converted.wav")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    _add_model_args(p)
    _add_voice_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="speech API server (OpenAI-compatible)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="model directory (default: the model shipped with cosyvoice2)")
    p.add_argument("--data-dir", help="where saved voices live (default: $XDG_DATA_HOME/cosyvoice2)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $COSYVOICE2_API_KEY)")
    p.add_argument("--max-active", type=int, default=2, help="requests synthesised at once")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait for a slot; more get 429")
    p.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait (then 429)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may run")
    p.add_argument("--cors-origin", action="append", help="allow a browser origin (repeatable)")
    p.add_argument(
        "--allowed-host",
        action="append",
        help="without an API key, also answer to this Host name (repeatable; '*': any)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    _add_compute_arg(p)
    _add_sampler_args(p)
    g = p.add_argument_group("voice library (default: SQLite + files in --data-dir)")
    g.add_argument(
        "--voice-db", help="postgresql://USER@HOST/DB, shared by several servers (or $COSYVOICE2_VOICE_DB)"
    )
    g.add_argument(
        "--voice-files", help="voice files: a (shared) directory or s3://BUCKET/PREFIX[?endpoint=URL]"
    )
    g.add_argument("--voice-namespace", default="default", help="library namespace in a shared database")
    g = p.add_argument_group("Ray Serve (pip install 'cosyvoice2[ray]')")
    g.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas behind Ray's HTTP proxy")
    g.add_argument("--ray-address", help="join this Ray cluster ('auto': the local one; default: start one)")
    g.add_argument("--replicas", type=int, default=1, help="replicas, one model each (default 1)")
    g.add_argument("--autoscale", metavar="MIN:MAX", help="scale replicas on requests in flight instead")
    g.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs per replica; torch threads follow (default 1)"
    )
    g.add_argument("--ray-max-queued", type=int, default=None, help="requests Ray may hold (then 503)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "eval",
        help="WER/CER (Whisper) and speaker similarity on held-out corpus sentences, as a JSON report",
        description="Synthesise held-out sentences of a corpus with built-in voices and zero-shot from "
        "held-out speakers' prompts, score them with Whisper (faster-whisper) and Resemblyzer beside the "
        "corpus's own audio (the teacher), and write a JSON report. Needs the eval extra: "
        'pip install "cosyvoice2[eval]". See cosyvoice2/evaluate.py for the report format.',
    )
    p.add_argument("--corpus", required=True, help="corpus folder with manifest.jsonl (or the manifest)")
    p.add_argument("-o", "--output", "--out", default="eval.json", help="report file (default: eval.json)")
    p.add_argument("--max-sentences", type=int, default=20, help="held-out sentences per language (20)")
    p.add_argument("--languages", default="en,zh", help="comma-separated: en, zh (default: en,zh)")
    p.add_argument("--voices", type=int, default=None, help="use the first N built-in voices (default: all)")
    p.add_argument(
        "--prompts", help="manifest of zero-shot prompts (default: the corpus's held-out speakers)"
    )
    p.add_argument("--stream", action="store_true", help="also score streaming synthesis (doubles the time)")
    p.add_argument(
        "--resynth",
        action="store_true",
        help="also score the teacher audio through the vocoder alone and through tokenizer + flow + vocoder",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--speaker-encoder",
        help="Resemblyzer wheel, its pretrained.pt or a converted .safetensors (default: fetched once)",
    )
    p.add_argument("--asr-en", choices=("tiny.en", "base"), default="tiny.en", help="Whisper for English")
    p.add_argument("--asr-compute", choices=("float32", "int8"), default="float32", help="Whisper precision")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "compare",
        help="paired comparison of two eval reports: the quality cost of a setting, with an interval",
        description="Match the items of two `cosyvoice2 eval` reports (same sentences, seeds, voices and "
        "prompts) and give, per condition and language, OTHER's error rate minus BASE's (also its S+D "
        "miss rate and, when both reports have it, its loop-guarded rate) and, per condition, its speaker "
        "similarity minus BASE's, each with a 95 % paired bootstrap interval and a verdict against the "
        "budget: within, over, or undecided (more sentences needed).",
    )
    p.add_argument("base", help="the reference run's report, e.g. --compute exact")
    p.add_argument("other", help="the run to judge, e.g. --compute fast")
    p.add_argument(
        "--budget-error",
        type=float,
        default=0.01,
        help="allowed error-rate increase (0.01: 1 point; also for the S+D and loop-guarded rates)",
    )
    p.add_argument(
        "--budget-similarity", type=float, default=0.01, help="allowed speaker-similarity drop (0.01)"
    )
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("-o", "--output", help="also write the comparison as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("speakers", help="list built-in speakers")
    _add_model_args(p)
    p.set_defaults(func=cmd_speakers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CosyVoiceError as e:
        print(f"cosyvoice2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cosyvoice2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
