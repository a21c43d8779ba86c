"""Train the default model's networks on a lent GPU machine for a few minutes (see recipes/README.md).

A session may be lent one GPU machine for ~15 minutes in all (the `device` tool of this workplace): the
machine gets a copy of the working tree plus up to 64 MiB of carried files and returns at most 8 files of
16 MiB. So the data goes as features (8-bit mels, tokens, embeddings) and a FLAC subset for the vocoder,
every trainer runs time-boxed (``train.max_minutes``) side by side on the one GPU, and what comes back is
each run's final weights (fp16 where large, split to fit) and the logs.

    python recipes/gpu.py pack --runs flow,flow_big,hift,hift_gan,lm      # here: fill .gpu/ (git-ignored)
    python recipes/gpu.py hide-model     # here: untrack the shipped model (51 MB) so it does not travel
    # device tool: carry [".gpu"], command (the wheels are soundfile/soxr/cffi/pycparser for Python 3.12):
    #   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl &&
    #   PYTHONPATH=/tmp/site python3 recipes/gpu.py device --minutes 4
    python recipes/gpu.py restore-model  # here, at once after the call: the model is tracked again
    python recipes/gpu.py unpack FILES_DIR                                # here: exp/gpu/<run>/ckpt/...

Runs (recipes/conf_gpu/<run>.toml): flow / flow_big read ``.gpu/corpus_flow`` (manifest only) and
``.gpu/cache``; hift / hift_gan read ``.gpu/corpus_hift`` (a speaker-balanced FLAC subset of the train
split); lm reads ``.gpu/corpus_lm`` (manifest) and ``.gpu/cache_lm`` (speech tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".gpu"
CONF = ROOT / "recipes" / "conf_gpu"
MAX_FILE = 15 * 2**20  # returned files must stay under the 16 MiB limit


def _copy_manifest(src: Path, dst: Path, keep=None) -> list[dict]:
    rows = [json.loads(line) for line in open(src / "manifest.jsonl", encoding="utf-8") if line.strip()]
    rows = [r for r in rows if keep is None or keep(r)]
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return rows


def pack(args: argparse.Namespace) -> None:
    import torch

    runs = set(args.runs.split(","))
    PACK.mkdir(exist_ok=True)
    for sub in ("corpus_flow", "corpus_hift", "corpus_lm", "cache", "cache_lm", "init"):
        shutil.rmtree(PACK / sub, ignore_errors=True)
    if runs & {"flow", "flow_big"}:
        _copy_manifest(Path(args.corpus), PACK / "corpus_flow")
        (PACK / "cache").mkdir()
        for name in ("tokens", "embeddings", "speakers", "mels"):
            shutil.copy2(Path(args.cache) / f"{name}.safetensors", PACK / "cache")
    if runs & {"hift", "hift_gan"}:
        corpus = Path(args.corpus)
        rows = [
            json.loads(line) for line in open(corpus / "manifest.jsonl", encoding="utf-8") if line.strip()
        ]
        by_spk: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r["split"] == "train":
                by_spk[r["speaker"]].append(r)
        chosen, size, budget = [], 0, args.hift_mb * 2**20
        while any(by_spk.values()) and size < budget:  # round-robin over speakers: every voice is in
            for spk in sorted(by_spk):
                if by_spk[spk] and size < budget:
                    r = by_spk[spk].pop(0)
                    chosen.append(r)
                    size += (corpus / r["audio"]).stat().st_size
        ids = {r["id"] for r in chosen}
        _copy_manifest(corpus, PACK / "corpus_hift", lambda r: r["id"] in ids)
        for r in chosen:
            dst = PACK / "corpus_hift" / r["audio"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(corpus / r["audio"], dst)
        print(f"hift subset: {len(chosen)} utterances, {sum(r['duration'] for r in chosen) / 60:.1f} min")
        (PACK / "init").mkdir(exist_ok=True)
        ckpt = torch.load(args.hift_init, map_location="cpu", weights_only=True)
        torch.save({"model": ckpt["model"]}, PACK / "init" / "hift_gen.pt")
    if "lm" in runs:
        _copy_manifest(Path(args.lm_corpus), PACK / "corpus_lm")
        (PACK / "cache_lm").mkdir()
        shutil.copy2(Path(args.lm_cache) / "tokens.safetensors", PACK / "cache_lm")
        (PACK / "init").mkdir(exist_ok=True)
        shutil.copytree(args.text_tokenizer, PACK / "init" / "tokenizer")
    total = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    print(f".gpu: {total / 2**20:.1f} MiB")


def _slim(run: str, out: Path) -> None:
    """The run's latest checkpoint -> $OUT/<run>[.k].pt: step, config, train time and the weights only
    (fp16 for the flow and the LM, whose inference loads them as fp16 anyway), split to fit the limit."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from cosyvoice2.train.common import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(ROOT / "exp" / "gpu" / run)
    if path is None:
        print(f"[gpu] {run}: no checkpoint", flush=True)
        return
    ckpt = load_checkpoint(path)
    model = ckpt["model"]
    if not run.startswith("hift"):
        model = {k: v.half() if v.is_floating_point() else v for k, v in model.items()}
    meta = {k: ckpt[k] for k in ("step", "config", "train_seconds") if k in ckpt}
    parts: list[dict] = [{}]
    size = 0
    for k, v in model.items():
        n = v.numel() * v.element_size()
        if parts[-1] and size + n > MAX_FILE:
            parts.append({})
            size = 0
        parts[-1][k] = v
        size += n
    for i, part in enumerate(parts):
        name = f"{run}.pt" if len(parts) == 1 else f"{run}.{i}.pt"
        torch.save({**meta, "model": part, "part": i, "parts": len(parts)}, out / name)
    print(f"[gpu] {run}: step {ckpt['step']} -> {len(parts)} file(s)", flush=True)


def device(args: argparse.Namespace) -> None:
    out = Path(os.environ.get("OUT", "/tmp/gpu_out"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    logs = ROOT / "exp" / "gpu" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for run in args.runs.split(","):
        module = "lm" if run == "lm" else "hift" if run.startswith("hift") else "flow"
        cmd = [sys.executable, "-m", f"cosyvoice2.train.{module}", "--config", str(CONF / f"{run}.toml")]
        cmd += [f"--set=train.max_minutes={args.minutes}"] + [f"--set={s}" for s in args.set]
        log = open(logs / f"{run}.log", "w")
        procs[run] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        print(f"[gpu] started {run}", flush=True)
    deadline = t0 + args.minutes * 60 + args.grace
    while any(p.poll() is None for p, _ in procs.values()) and time.time() < deadline:
        time.sleep(5)
    for run, (p, log) in procs.items():
        if p.poll() is None:
            print(f"[gpu] {run}: past the deadline, stopped", flush=True)
            p.kill()
            p.wait()
        log.close()
        print(f"[gpu] {run}: exit {p.returncode}", flush=True)
        tail = (logs / f"{run}.log").read_text(errors="replace").replace("\r", "\n").splitlines()[-6:]
        print("\n".join(f"    {line[:300]}" for line in tail), flush=True)
        _slim(run, out)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for run in procs:
            for f in (ROOT / "exp" / "gpu" / run / "log.jsonl", logs / f"{run}.log"):
                if f.is_file():
                    tar.add(f, arcname=f"{run}/{f.name}")
    print(f"[gpu] done in {time.time() - t0:.0f} s", flush=True)


def unpack(args: argparse.Namespace) -> None:
    """$OUT files -> exp/gpu/<run>/ckpt/step_N.pt (+ latest): what export and probe read."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from cosyvoice2.train.common import save_checkpoint

    src = Path(args.files)
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(src.glob("*.pt")):
        groups[f.name.split(".")[0]].append(f)
    for run, files in groups.items():
        parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
        model = {}
        for p in sorted(parts, key=lambda p: p["part"]):
            model.update({k: v.float() if v.is_floating_point() else v for k, v in p["model"].items()})
        payload = {k: parts[0][k] for k in ("step", "config", "train_seconds") if k in parts[0]}
        out_dir = Path(args.out) / run
        save_checkpoint(out_dir, {**payload, "model": model}, keep=1)
        print(f"{run}: step {payload['step']} -> {out_dir}")
    if (src / "logs.tar.gz").is_file():
        with tarfile.open(src / "logs.tar.gz") as tar:
            tar.extractall(Path(args.out) / "logs", filter="data")


MODEL = "src/cosyvoice2/assets/default_model"


def _exclude_file() -> Path:
    git_dir = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True, text=True)
    return (ROOT / git_dir.stdout.strip()) / "info" / "exclude"


def hide_model(args: argparse.Namespace) -> None:
    """Untrack the shipped model (files stay on disk) and ignore it locally: the working tree that travels
    to the GPU machine is limited to 64 MiB, and the model alone is 51 MB. ``restore-model`` undoes it."""
    subprocess.run(["git", "rm", "-r", "-q", "--cached", MODEL], cwd=ROOT, check=True)
    with open(_exclude_file(), "a", encoding="utf-8") as f:
        f.write(f"/{MODEL}/\n")
    print(f"{MODEL} untracked and ignored: run `python recipes/gpu.py restore-model` after the call")


def restore_model(args: argparse.Namespace) -> None:
    path = _exclude_file()
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(x for x in lines if x.strip() != f"/{MODEL}/"), encoding="utf-8")
    subprocess.run(["git", "reset", "-q", "HEAD", "--", MODEL], cwd=ROOT, check=True)
    print(f"{MODEL} tracked again")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--runs", default="flow,flow_big,hift,hift_gan,lm")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--cache", default="exp/cache")
    p.add_argument("--lm-corpus", default="data/corpus_big")
    p.add_argument("--lm-cache", default="exp/cache_big")
    p.add_argument("--text-tokenizer", default="src/cosyvoice2/assets/default_model/tokenizer")
    p.add_argument("--hift-init", default="exp/b3/hift2/ckpt/step_0004500.pt")
    p.add_argument("--hift-mb", type=float, default=38.0, help="FLAC subset size for the vocoder runs")
    p.set_defaults(fn=pack)
    p = sub.add_parser("device")
    p.add_argument("--runs", default="flow,flow_big,hift,hift_gan,lm")
    p.add_argument("--minutes", type=float, default=4.0, help="each run's training budget")
    p.add_argument("--grace", type=float, default=75.0, help="seconds for start-up and the final save")
    p.add_argument("--set", action="append", default=[], help="extra override for every run")
    p.set_defaults(fn=device)
    p = sub.add_parser("unpack")
    p.add_argument("files")
    p.add_argument("--out", default="exp/gpu")
    p.set_defaults(fn=unpack)
    sub.add_parser("hide-model").set_defaults(fn=hide_model)
    sub.add_parser("restore-model").set_defaults(fn=restore_model)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
