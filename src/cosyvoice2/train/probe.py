"""Probes of one network on a few corpus utterances: does it reproduce what it was trained on?

    python -m cosyvoice2.train.probe hift --run exp/overfit/hift --utts ID [ID ...]
    python -m cosyvoice2.train.probe flow --run exp/overfit/flow --cache exp/cache --utts ID
    python -m cosyvoice2.train.probe lm   --run exp/overfit/lm   --cache exp/cache --utts ID
    python -m cosyvoice2.train.probe tokens --cache exp/cache --utts ID   # no network: the tokens' floor

They are the single-utterance overfit checks of ``recipes/README.md`` (a network that cannot reproduce one
training utterance has a bug, not a budget problem) and work as quick checks of any run. One JSON object
per utterance goes to stdout:

* ``hift``: the utterance's mel through the vocoder's inference path (predicted f0, sine source); Whisper's
  error rate on the result; mean predicted vs reference (YIN) f0 on voiced and unvoiced frames; the
  cepstral peak prominence (pitch harmonics: ~0 for a vocoder whose source is silent) of copy and original.
* ``flow``: the utterance's speech tokens + its speaker embedding through the flow (offline, no prompt);
  mean |mel - reference mel|; Whisper's error rate on the mel through Griffin-Lim (no vocoder weights) and,
  with ``--hift``, through that vocoder. With ``--reader``, the phoneme error of the input tokens and of
  the rendered audio tokenised again (the same for ``hift``: the recording's tokens and its copy's): what
  the network loses of what its input says, in the tokenizer's own terms.
* ``lm``: teacher-forced next-token accuracy on the speech tokens (uni-stream layout); free-running
  top-1 decoding from the text: the share of reference tokens reproduced position by position and the
  length ratio; the head that follows the text best (``align_corr``: correlation of each speech
  position with the text position it attends to; an LM that has not learnt to read its text stays < 0.5);
  with ``--reader``, the phoneme error of the reference tokens and of tokens sampled as inference samples
  them, both read back by the speech tokenizer's CTC head: the LM's intelligibility without the flow.
* ``tokens``: no network. Each speech token is rendered as the mean of the mel frames it stands for over
  the corpus's train split, through Griffin-Lim: what the token sequence says with no context at all. A
  flow (which sees context and the speaker) that reads worse than this table has not yet learnt the
  tokens' content; one that reads no better than it is bounded by the tokens.

Every row also holds ``ref_error`` (Whisper on the corpus audio itself), the ceiling for the others.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..audio import griffin_lim, prompt_mel, resample
from ..config import RATES
from .data import FeatureCache, Utt, load_wav, read_manifest
from .export import network_from_run as _network_from_run
from .hift import yin_f0

# Every probed utterance uses the same networks and feature caches: load each once per process.
network_from_run = functools.cache(_network_from_run)


@functools.cache
def _features(cache: str, name: str) -> dict[str, Tensor]:
    return FeatureCache(cache, name).load()


def cepstral_peak(
    wav: np.ndarray, sr: int = RATES.sample_rate, fmin: float = 60.0, fmax: float = 400.0
) -> float:
    """Mean cepstral peak prominence (log-magnitude cepstrum) of the louder half of 40 ms frames.

    Voiced speech has a peak at the pitch period's quefrency; a vocoder without harmonics does not.
    """
    n = int(0.04 * sr)
    if len(wav) < n:
        return 0.0
    frames = np.lib.stride_tricks.sliding_window_view(wav, n)[:: n // 2] * np.hanning(n)
    keep = np.argsort((frames**2).sum(1))[len(frames) // 2 :]
    log_mag = np.log(np.abs(np.fft.rfft(frames[keep], axis=1)) + 1e-6)
    cep = np.fft.irfft(log_mag, axis=1)[:, int(sr / fmax) : int(sr / fmin)]
    return float((cep.max(1) - np.median(cep, 1)).mean())


class _Listener:
    """Whisper (the eval extra) -> error rate against the corpus text."""

    def __init__(self, threads: int) -> None:
        from ..evaluate import WhisperASR

        self.asr = WhisperASR(threads=threads)

    def __call__(self, wav24: np.ndarray, utt: Utt) -> tuple[float, str]:
        from ..evaluate import error_count

        hyp = self.asr.transcribe(resample(wav24, RATES.sample_rate, 16000), utt.language)
        ec = error_count(utt.text, hyp, utt.language)
        return round(ec.edits / max(1, ec.ref_units), 4), hyp


def _mel(wav: np.ndarray) -> Tensor:
    """[M, T] flow mel of 24 kHz audio, padded to whole tokens like the flow trainer's targets."""
    wav = np.pad(wav, (0, -len(wav) % RATES.samples_per_token))
    return prompt_mel(torch.from_numpy(wav)[None])[0].T


def probe_hift(args, utt: Utt, wav: np.ndarray, listen: _Listener) -> dict:
    net = network_from_run("hift", args.run)
    mel = prompt_mel(torch.from_numpy(wav)[None]).transpose(1, 2)  # [1, M, T]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = net.inference(mel, generator=gen)[0][0].numpy()
        f0 = net.f0(mel)[0].numpy()
    ref_f0 = yin_f0(wav[: mel.shape[2] * RATES.hop_length], mel.shape[2])
    voiced = ref_f0 > 0
    err, hyp = listen(out, utt)
    return {
        "error": err,
        "hyp": hyp,
        "f0_voiced": [round(float(f0[voiced].mean()), 1), round(float(ref_f0[voiced].mean()), 1)],
        "f0_unvoiced_pred": round(float(f0[~voiced].mean()), 1),
        "cepstral_peak": [round(cepstral_peak(out), 4), round(cepstral_peak(wav), 4)],
        "_audio": out,
        **(_reread(args, out, None, utt, wav) if args.reader else {}),
    }


def _flow_for_probe(args):
    """The flow of ``--run`` with the sampler settings of ``--cfg-rate``, ``--flow-steps``, ``--temperature``
    and ``--ode-weight``; ``--prior`` (ode_weight 0) renders the encoder's mean mu itself (no ODE): what
    the estimator adds is the difference."""
    import dataclasses

    net = network_from_run("flow", args.run)
    changes = {}
    if args.cfg_rate is not None:
        changes["cfg_rate"] = args.cfg_rate
    if args.flow_steps is not None:
        changes["n_timesteps"] = args.flow_steps
    if args.temperature is not None:
        changes["temperature"] = args.temperature
    if args.prior or args.ode_weight is not None:  # FlowConfig.ode_weight: mu + w (ODE - mu); --prior is 0
        changes["ode_weight"] = 0.0 if args.prior else args.ode_weight
    if changes:
        net.cfg = dataclasses.replace(net.cfg, **changes)
    return net


def flow_mel(net, cache: str, utt_id: str) -> Tensor:
    """The flow's offline mel [1, M, T] of a corpus row's cached tokens and speaker embedding, with no
    prompt and seed 0: what gate (b)'s rows (``session.sh rank``) render."""
    tokens = _features(cache, "tokens")[utt_id].long()[None]
    emb = _features(cache, "embeddings")[utt_id].float()[None]
    with torch.no_grad():
        torch.manual_seed(0)
        empty = torch.zeros(1, 0, dtype=torch.long)
        return net.inference(
            tokens, empty, torch.zeros(1, 0, net.cfg.n_mels), emb, streaming=False, finalize=True
        )


def probe_flow(args, utt: Utt, wav: np.ndarray, listen: _Listener) -> dict:
    net = _flow_for_probe(args)
    tokens = _features(args.cache, "tokens")[utt.id].long()[None]
    ref = _mel(wav)
    mel = flow_mel(net, args.cache, utt.id)
    n = min(mel.shape[2], ref.shape[1])
    row = {"mel_l1": round(float((mel[0, :, :n] - ref[:, :n]).abs().mean()), 4)}
    gl = None
    if not (args.hift and args.no_griffin_lim):
        gl = griffin_lim(mel[0]).numpy()
        row["error_griffin_lim"], row["hyp_griffin_lim"] = listen(gl, utt)
        row["error_griffin_lim_ref"] = listen(griffin_lim(ref).numpy(), utt)[0]
    if args.hift:
        voc = network_from_run("hift", args.hift)
        with torch.no_grad():
            out = voc.inference(mel, generator=torch.Generator().manual_seed(0))[0][0].numpy()
        row["error_hift"], row["hyp_hift"] = listen(out, utt)
        row["_audio"] = out
    else:
        row["_audio"] = gl
    if args.reader:  # the flow's audio tokenised again and read back as phonemes, beside its input tokens
        row.update(_reread(args, row["_audio"], tokens[0], utt))
    return row


def _reread(args, audio: np.ndarray, tokens: Tensor | None, utt: Utt, wav: np.ndarray | None = None) -> dict:
    """Phoneme error of the input tokens (or of ``wav``'s, tokenised) and of the audio's own tokens
    (``--speech-tokenizer``), both read by ``--reader``: a network that renders what its input says keeps
    the second near the first, so the gap is what it loses and the first is what the tokens lose."""
    from ..default_model import default_model_dir

    path = args.speech_tokenizer or str(default_model_dir() / "speech_tokenizer.safetensors")
    tokenizer = network_from_run("speech_tokenizer", path)

    def tokenise(x: np.ndarray) -> Tensor:
        return tokenizer.tokens(torch.from_numpy(resample(x, RATES.sample_rate, 16000)))

    return _read_errors(
        args.reader, utt, **{"in": tokenise(wav) if tokens is None else tokens, "out": tokenise(audio)}
    )


def _read_errors(reader_path: str, utt: Utt, **codes: Tensor | list[int]) -> dict:
    """``reader_error_<name>``: the phoneme error of each named code sequence against the text."""
    reader = _reader(reader_path)
    row = {}
    for name, seq in codes.items():
        edits, units = reader.error(seq, utt.text, utt.language)
        row[f"reader_error_{name}"] = round(edits / max(units, 1), 4)
    row["reader_units"] = units
    return row


def probe_lm(args, utt: Utt, wav: np.ndarray, listen: _Listener) -> dict:
    import dataclasses

    from ..text import TextTokenizer
    from .lm import text_alignment, text_gain

    net = network_from_run("lm", args.run)
    if args.top_k is not None or args.top_p is not None:  # a sampling sweep without re-exporting the model
        net.cfg = dataclasses.replace(
            net.cfg,
            top_k=net.cfg.top_k if args.top_k is None else args.top_k,
            top_p=net.cfg.top_p if args.top_p is None else args.top_p,
        )
    run = Path(args.run)
    tok_dir = (
        Path(args.text_tokenizer) if args.text_tokenizer else (run if run.is_dir() else run.parent.parent)
    )
    tok = TextTokenizer.from_dir(
        tok_dir / "text_tokenizer" if (tok_dir / "text_tokenizer").is_dir() else tok_dir
    )
    speech = _features(args.cache, "tokens")[utt.id].long()
    text = torch.tensor(tok.encode(utt.text), dtype=torch.long)
    with torch.no_grad():
        hyp = greedy(net, text, max_len=2 * len(speech) + 10)
    n = min(len(hyp), len(speech))
    same = float((torch.tensor(hyp[:n]) == speech[:n]).sum()) / len(speech) if n else 0.0
    heads = text_alignment(net, text, speech)
    tf = text_gain(net, text, speech)
    best = max(range(len(heads)), key=lambda i: heads[i][1])
    read = {}
    if args.reader:  # what the tokens say, read back by the tokenizer's CTC head: reference vs sampled
        with torch.inference_mode():
            sampled = list(net.generate(text, generator=torch.Generator().manual_seed(args.seed)))
        read = _read_errors(args.reader, utt, ref=speech, sampled=sampled)
        read["sampled_length_ratio"] = round(len(sampled) / len(speech), 3)
    return {
        "teacher_forced_acc": round(tf["acc"], 4),
        "teacher_forced_loss": round(tf["loss"], 4),
        "text_gain": round(tf["gain"], 4),  # nats the text saves per position (train/lm.py text_gain)
        "free_running_match": round(same, 4),
        "length_ratio": round(len(hyp) / len(speech), 3),
        # the head that follows the text best: layer, head, its correlation and its share on the text
        "align_head": [best // net.cfg.num_heads, best % net.cfg.num_heads],
        "align_corr": round(heads[best][1], 3),
        "align_text_share": round(heads[best][0], 3),
        **read,
    }


@functools.cache
def _reader(path: str):
    from .tokenizer import PhonemeReader

    return PhonemeReader.load(path)


def greedy(net, text: Tensor, max_len: int) -> list[int]:
    """Top-1 uni-stream decoding (no sampling) until a stop id or ``max_len`` ids."""
    cache = net.new_cache(1, len(text) + max_len + 3)
    x, out = net.build_input(text), []
    while len(out) < max_len:
        tok = int(net.step(x, cache)[0].argmax())
        if tok in net.cfg.stop_ids:
            break
        out.append(tok)
        x = net.speech_embedding.weight[tok].view(1, 1, -1)
    return out


@functools.cache
def _token_mel_table(corpus: str, cache: str) -> Tensor:
    """[V, 2, M] mean log-mel of the two frames of each speech token over the train split (unseen tokens:
    the mean frame), from the 8-bit mel cache that ``extract mels`` writes."""
    from .flow import dequantize_mel

    tokens, mels = _features(cache, "tokens"), _features(cache, "mels")
    frames_per_token = RATES.samples_per_token // RATES.hop_length
    sums: Tensor | None = None
    counts = None
    for u in read_manifest(corpus, ("train",)):
        if u.id not in tokens or u.id not in mels:
            continue
        t, m = tokens[u.id].long(), dequantize_mel(mels[u.id]).double()  # [N], [M, T]
        n = min(len(t), m.shape[1] // frames_per_token)
        if sums is None:
            vocab = 6561
            sums = torch.zeros(vocab, frames_per_token, m.shape[0], dtype=torch.float64)
            counts = torch.zeros(vocab, dtype=torch.float64)
        frames = m[:, : n * frames_per_token].T.reshape(n, frames_per_token, m.shape[0])
        sums.index_add_(0, t[:n], frames)
        counts.index_add_(0, t[:n], torch.ones(n, dtype=torch.float64))
    if sums is None:
        raise SystemExit(f"tokens probe: no train utterance of {corpus} has both tokens and mels in {cache}")
    seen = counts > 0
    table = sums / counts.clamp(min=1)[:, None, None]
    table[~seen] = sums[seen].sum(0) / counts.sum()
    return table.float()


def probe_tokens(args, utt: Utt, wav: np.ndarray, listen: _Listener) -> dict:
    table = _token_mel_table(args.corpus, args.cache)
    tokens = _features(args.cache, "tokens")[utt.id].long()
    mel = table[tokens].reshape(-1, table.shape[2]).T  # [M, 2N]
    ref = _mel(wav)
    n = min(mel.shape[1], ref.shape[1])
    gl = griffin_lim(mel).numpy()
    err, hyp = listen(gl, utt)
    return {
        "mel_l1": round(float((mel[:, :n] - ref[:, :n]).abs().mean()), 4),
        "error_griffin_lim": err,
        "hyp_griffin_lim": hyp,
        "_audio": gl,
    }


PROBES = {"hift": probe_hift, "flow": probe_flow, "lm": probe_lm, "tokens": probe_tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("network", choices=sorted(PROBES))
    ap.add_argument("--run", default="", help="run dir, checkpoint or .safetensors of the network")
    ap.add_argument("--utts", nargs="+", required=True, help="corpus utterance ids")
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--cache", default="exp/cache", help="feature cache (tokens, embeddings)")
    ap.add_argument("--hift", default="", help="flow probe: also vocode with this HiFT run")
    ap.add_argument("--cfg-rate", type=float, default=None, help="flow probe: guidance strength")
    ap.add_argument("--flow-steps", type=int, default=None, help="flow probe: Euler steps")
    ap.add_argument("--temperature", type=float, default=None, help="flow probe: starting noise scale")
    ap.add_argument("--ode-weight", type=float, default=None, help="flow probe: mu + w (ODE - mu)")
    ap.add_argument("--prior", action="store_true", help="flow probe: render the encoder's mu (no ODE)")
    ap.add_argument(
        "--no-griffin-lim", action="store_true", help="flow probe with --hift: skip the Griffin-Lim rows"
    )
    ap.add_argument("--text-tokenizer", default="", help="lm probe: BPE directory (default: the run's)")
    ap.add_argument(
        "--reader",
        default="",
        help="lm probe: a PhonemeReader (default_model/phoneme_reader.safetensors) reads the reference "
        "tokens and tokens sampled from the text back as phonemes: reader_error_ref / reader_error_sampled; "
        "flow probe: it reads the input tokens and the tokens of the flow's audio (--speech-tokenizer): "
        "reader_error_in / reader_error_out; hift probe: the same for the recording and its copy-synthesis",
    )
    ap.add_argument(
        "--speech-tokenizer",
        default="",
        help="flow / hift probe with --reader: the tokenizer that tokenises the output audio again "
        "(default: the shipped default model's)",
    )
    ap.add_argument("--seed", type=int, default=0, help="lm probe: sampling seed")
    ap.add_argument("--top-k", type=int, default=None, help="lm probe: sampling top_k (default: model.s)")
    ap.add_argument("--top-p", type=float, default=None, help="lm probe: sampling top_p (default: model.s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default="", help="write each probe's audio here as <id>.wav")
    args = ap.parse_args(argv)
    if args.network != "tokens" and not args.run:
        ap.error(f"the {args.network} probe needs --run")
    torch.set_num_threads(args.threads)
    utts = read_manifest(args.corpus, None, ids=args.utts)
    listen = _Listener(args.threads)
    for utt in utts:
        # the LM probe needs no audio: it runs on recipes/lm_data (text and tokens only)
        wav = load_wav(utt, RATES.sample_rate) if args.network != "lm" else None
        row = {"id": utt.id, "network": args.network, "run": args.run}
        row.update(PROBES[args.network](args, utt, wav, listen))
        audio = row.pop("_audio", None)
        if args.network != "lm":
            row["ref_error"] = listen(wav, utt)[0]
        if args.save and audio is not None:
            from ..audio import write_audio_atomic

            write_audio_atomic(Path(args.save) / f"{utt.id}.wav", audio, RATES.sample_rate)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
