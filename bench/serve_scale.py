"""Aggregate throughput of the speech API: one ``cosyvoice2 serve`` process with 2 torch threads against
Ray Serve with 1 and 2 replicas of 1 thread each, on the default model, in one run. Prints JSON.

    python bench/serve_scale.py --out serve_scale.json        # ~5 minutes on 2 cores

Each setup gets the same load: ``--concurrency`` clients sending ``--requests`` streamed speech requests
(pcm, a built-in voice, fixed seeds) after a warm-up; throughput is the audio seconds received per wall
second, from the first request to the last byte. The setups run one after another (never two at once),
and the machine's load average is recorded beside each, since other work on the machine skews them.
Needs the ray extra (pip install -e '.[serve,ray]').
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SR = 24000
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs back home across the green field."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout:g} s")


def one_request(url: str, voice: str, seed: int) -> dict:
    body = {"input": TEXT, "voice": voice, "response_format": "pcm", "seed": seed}
    t0 = time.perf_counter()
    first = None
    n = 0
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=600) as r:
        status = r.status_code
        replica = r.headers.get("x-replica")
        for chunk in r.iter_bytes():
            if chunk and first is None:
                first = time.perf_counter() - t0
            n += len(chunk)
    return {
        "status": status,
        "replica": replica,
        "audio_seconds": n / 2 / SR,
        "seconds": time.perf_counter() - t0,
        "first_byte_seconds": first,
    }


def drive(url: str, voice: str, requests: int, concurrency: int, warmup: int) -> dict:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: one_request(url, voice, 10_000 + i), range(warmup)))
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        results = list(pool.map(lambda i: one_request(url, voice, i), range(requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    audio = sum(r["audio_seconds"] for r in ok)
    firsts = [r["first_byte_seconds"] for r in ok if r["first_byte_seconds"] is not None]
    return {
        "requests": requests,
        "errors": len(results) - len(ok),
        "audio_seconds": round(audio, 2),
        "wall_seconds": round(wall, 2),
        "audio_seconds_per_wall_second": round(audio / wall, 3),
        "first_byte_p50_seconds": round(statistics.median(firsts), 3) if firsts else None,
        "request_seconds_p50": round(statistics.median(r["seconds"] for r in ok), 3) if ok else None,
        "replicas_seen": len({r["replica"] for r in ok if r["replica"]}),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def bench_single(args, voice: str) -> dict:
    port = free_port()
    data = tempfile.mkdtemp(prefix="cosyvoice2-bench-")
    cmd = [sys.executable, "-m", "cosyvoice2.cli", "serve", "--port", str(port), "--data-dir", data]
    cmd += ["--threads", "2", "--max-active", str(args.max_active), "--max-queue", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url)
        result = drive(url, voice, args.requests, args.concurrency, args.warmup)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)
    return {"setup": "cosyvoice2 serve: 1 process, 2 threads", **result}


def bench_ray(args, voice: str, replicas: int) -> dict:
    import ray
    from ray import serve

    from cosyvoice2.server.ray_serve import APP_NAME, build_app

    port = free_port()
    data = tempfile.mkdtemp(prefix="cosyvoice2-bench-")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {"data_dir": data, "replicas": replicas, "num_cpus": 1, "threads": 1}
        options.update(max_active=args.max_active, max_queue=64, max_queued=64)
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_up(url)
        result = drive(url, voice, args.requests, args.concurrency, args.warmup * replicas)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(data, ignore_errors=True)
    return {"setup": f"Ray Serve: {replicas} replica(s), 1 thread each", **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16, help="measured requests per setup")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests (per replica) before measuring")
    p.add_argument("--max-active", type=int, default=2, help="synthesis slots per server / replica")
    p.add_argument("--voice", default="fe_kal", help="a built-in speaker of the default model")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    t0 = time.time()
    results = [bench_single(args, args.voice), bench_ray(args, args.voice, 1), bench_ray(args, args.voice, 2)]
    report = {
        "benchmark": "serve_scale",
        "model": "default (src/cosyvoice2/assets/default_model)",
        "text": TEXT,
        "format": "pcm, streamed",
        "concurrency": args.concurrency,
        "max_active": args.max_active,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": results,
        "speedup_2_replicas_vs_1": round(
            results[2]["audio_seconds_per_wall_second"] / results[1]["audio_seconds_per_wall_second"], 3
        ),
        "speedup_2_replicas_vs_single_2_threads": round(
            results[2]["audio_seconds_per_wall_second"] / results[0]["audio_seconds_per_wall_second"], 3
        ),
        "total_seconds": round(time.time() - t0, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
