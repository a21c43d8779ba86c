"""Soak test of ``cosyvoice2 serve``: mixed requests with cancellations at a fixed concurrency, against a
server this script starts on loopback. Prints one JSON document: responses by status and error code,
per request kind, latencies, and the server's RSS (after warm-up and at the end).

    nice python bench/soak.py                                   # 200 requests, concurrency 8, 4 + 4 slots
    nice python bench/soak.py --requests 40 --concurrency 4 --max-active 2 --max-queue 2 --model DIR

It only ever talks to 127.0.0.1, sends at most ``--requests`` requests (plus a few setup ones), gives
each at most ``--request-timeout`` seconds, stops by itself after ``--max-seconds`` and always stops the
server. Targets (issue #14): no 5xx, no 429 while concurrency <= max-active + max-queue, RSS growth
after warm-up under 10 %.

Request kinds (drawn in a fixed order from ``--seed``): ``http_stream`` (streamed pcm/mp3, read to the
end), ``http_full`` (``stream: false`` wav), ``http_cancel`` (first bytes, then the client hangs up),
``ws_stream`` (text in pieces, audio to "done"), ``ws_cancel`` (a "cancel" after the first audio),
``ws_drop`` (the socket vanishes after the first audio), ``bad`` (a malformed request: 4xx expected),
``voices`` (the library listing). Voices: the model's built-in speakers, the default voice and one
voice cloned, at start, from audio the server made.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

HOST = "127.0.0.1"  # loopback only, always
KINDS = ("http_stream", "http_full", "http_cancel", "ws_stream", "ws_cancel", "ws_drop", "bad", "voices")
WEIGHTS = (5, 3, 2, 4, 2, 2, 1, 1)
TEXTS = (
    "Hello there.",
    "The weather is nice today.",
    "Please call me back when you can.",
    "Thanks, that was quick.",
    "We will meet at noon.",
)


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (Linux /proc), None when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Soak:
    def __init__(self, url: str, voices: list[str | None], timeout: float, rng: random.Random) -> None:
        self.url = url
        self.ws_url = url.replace("http://", "ws://") + "/v1/audio/speech/stream"
        self.voices = voices
        self.timeout = timeout
        self.rng = rng
        self.lock = threading.Lock()

    def _pick(self) -> tuple[str, str | None, int]:
        with self.lock:
            return self.rng.choice(TEXTS), self.rng.choice(self.voices), self.rng.randrange(1000)

    # -- request kinds: each returns (outcome, error code or None); outcome is an HTTP status or a word --

    def http_stream(self, fmt: str = "pcm") -> tuple[object, str | None]:
        text, voice, seed = self._pick()
        body = {"input": text, "voice": voice, "seed": seed, "response_format": fmt}
        with httpx.stream("POST", self.url + "/v1/audio/speech", json=body, timeout=self.timeout) as r:
            data = b"".join(r.iter_bytes())
            return r.status_code, _code(r, data)

    def http_full(self) -> tuple[object, str | None]:
        text, voice, seed = self._pick()
        body = {"input": text, "voice": voice, "seed": seed, "response_format": "wav", "stream": False}
        r = httpx.post(self.url + "/v1/audio/speech", json=body, timeout=self.timeout)
        return r.status_code, _code(r, r.content)

    def http_cancel(self) -> tuple[object, str | None]:
        text, voice, seed = self._pick()
        body = {"input": text + " " + text, "voice": voice, "seed": seed, "response_format": "pcm"}
        with httpx.stream("POST", self.url + "/v1/audio/speech", json=body, timeout=self.timeout) as r:
            if r.status_code != 200:
                return r.status_code, _code(r, r.read())
            next(r.iter_bytes(), None)  # the first audio, then hang up
        return "cancelled", None

    def ws(self, ending: str) -> tuple[object, str | None]:
        text, voice, seed = self._pick()
        words = text.split(" ")
        with ws_connect(self.ws_url, open_timeout=self.timeout, close_timeout=5) as ws:
            ws.send(json.dumps({"type": "start", "voice": voice, "seed": seed, "format": "pcm"}))
            for i, word in enumerate(words):
                ws.send(json.dumps({"type": "text", "text": word + (" " if i < len(words) - 1 else "")}))
            ws.send(json.dumps({"type": "end"}))
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    msg = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                except ConnectionClosed:
                    return "closed_early", None
                if isinstance(msg, bytes):
                    if ending == "cancel":
                        ending = "cancelled"
                        with contextlib.suppress(ConnectionClosed):  # it may have finished already
                            ws.send(json.dumps({"type": "cancel"}))
                    elif ending == "drop":
                        ws.socket.shutdown(socket.SHUT_RDWR)
                        return "dropped", None
                    continue
                kind = json.loads(msg)
                if kind["type"] in ("done", "cancelled"):
                    return ("ok" if kind["type"] == "done" else "cancelled"), None
                if kind["type"] == "error":
                    err = kind["error"]
                    return _ws_status(err["code"]), err["code"]

    def bad(self) -> tuple[object, str | None]:
        with self.lock:
            body = self.rng.choice(BAD_BODIES)
        r = httpx.post(
            self.url + "/v1/audio/speech",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=self.timeout,
        )
        return r.status_code, _code(r, r.content)

    def voices_list(self) -> tuple[object, str | None]:
        r = httpx.get(self.url + "/v1/voices", timeout=self.timeout)
        return r.status_code, _code(r, r.content)

    def run(self, kind: str) -> dict:
        t0 = time.monotonic()
        try:
            if kind == "http_stream":
                outcome, code = self.http_stream("mp3" if self.rng.random() < 0.3 else "pcm")
            elif kind == "http_full":
                outcome, code = self.http_full()
            elif kind == "http_cancel":
                outcome, code = self.http_cancel()
            elif kind == "ws_stream":
                outcome, code = self.ws("done")
            elif kind == "ws_cancel":
                outcome, code = self.ws("cancel")
            elif kind == "ws_drop":
                outcome, code = self.ws("drop")
            elif kind == "bad":
                outcome, code = self.bad()
            else:
                outcome, code = self.voices_list()
        except Exception as e:  # noqa: BLE001 - a transport failure is a result too
            outcome, code = "exception", f"{type(e).__name__}: {str(e)[:120]}"
        return {"kind": kind, "outcome": outcome, "code": code, "seconds": time.monotonic() - t0}


BAD_BODIES = (
    b'{"input": "hi", "voice": "alloy", "speed": 1' + b"0" * 400 + b"}",  # float() would overflow
    b'{"input": "hi", "seed": ' + b"7" * 5000 + b"}",  # past Python's int digit limit
    b'{"input": "a \\ud800 b", "voice": "alloy"}',  # a lone surrogate
    b'{"input": "hi", "voice": "alloy", "speed": "fast"}',
)


def drive(soak: Soak, kinds: list[str], concurrency: int, deadline: float, on_result=None) -> list[dict]:
    """Run ``kinds`` with ``concurrency`` requests in flight until all are done or ``deadline``
    (time.monotonic()) passes; ``on_result(results)`` is called after each finished request."""
    results: list[dict] = []
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        pending: set = set()
        for kind in kinds:
            if time.monotonic() > deadline:
                break
            pending.add(pool.submit(soak.run, kind))
            if len(pending) >= concurrency:
                done, pending = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
                for f in done:
                    results.append(f.result())
                    if on_result is not None:
                        on_result(results)
        for f in concurrent.futures.as_completed(pending):
            results.append(f.result())
    return results


def _code(r: httpx.Response, data: bytes) -> str | None:
    if r.status_code < 400:
        return None
    with contextlib.suppress(Exception):
        return json.loads(data)["error"]["code"]
    return "?"


def _ws_status(code: str) -> object:
    return {"rate_limited": 429, "internal_error": 500}.get(code, "ws_error")


def start_server(args, data_dir: str, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "cosyvoice2.cli",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--data-dir",
        data_dir,
        "--max-active",
        str(args.max_active),
        "--max-queue",
        str(args.max_queue),
        "--queue-timeout",
        str(args.queue_timeout),
    ]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "COSYVOICE2_API_KEY": ""}
    log = open(Path(data_dir) / "server.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the server did not start")


def setup_voices(url: str, timeout: float) -> list[str | None]:
    """The built-in speakers (up to 3), the default voice, and a voice cloned from the server's own audio."""
    info = httpx.get(url + "/v1/voices", timeout=timeout).json()
    voices: list[str | None] = list(info.get("builtin", [])[:3]) + [None]
    body = {"input": "This is a prompt for a cloned voice, a few seconds long.", "response_format": "wav"}
    body |= {"voice": voices[0], "seed": 1, "stream": False}
    r = httpx.post(url + "/v1/audio/speech", json=body, timeout=timeout)
    if r.status_code == 200:
        files = {"audio": ("prompt.wav", io.BytesIO(r.content), "audio/wav")}
        up = httpx.post(url + "/v1/voices", files=files, data={"name": "soak"}, timeout=timeout)
        if up.status_code == 201:
            voices.append(up.json()["id"])
    return voices


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-active", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--queue-timeout", type=float, default=120.0)
    p.add_argument("--warmup", type=int, default=40, help="requests before the RSS baseline")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--max-seconds", type=float, default=1500.0, help="stop everything after this long")
    p.add_argument("--model", help="model directory (default: the shipped default model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if not 0 < args.requests <= 10_000 or not 0 < args.concurrency <= 64:
        p.error("--requests must be 1..10000 and --concurrency 1..64")

    rng = random.Random(args.seed)
    kinds = rng.choices(KINDS, WEIGHTS, k=args.requests)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cosyvoice2-soak-") as data_dir:
        port = free_port()
        url = f"http://{HOST}:{port}"
        proc = start_server(args, data_dir, port)
        samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                rss = rss_mb(proc.pid)
                if rss is not None:
                    samples.append((time.monotonic() - t_start, rss))

        sampler = threading.Thread(target=sample, daemon=True)
        results: list[dict] = []
        rss_marks: dict[str, float | None] = {}
        try:
            wait_ready(url, proc, timeout=120)
            sampler.start()
            rss_marks["ready"] = rss_mb(proc.pid)
            voices = setup_voices(url, args.request_timeout)
            soak = Soak(url, voices, args.request_timeout, rng)

            def mark(done: list[dict]) -> None:
                if len(done) == args.warmup:
                    rss_marks["after_warmup"] = rss_mb(proc.pid)

            results = drive(soak, kinds, args.concurrency, t_start + args.max_seconds, mark)
            time.sleep(2.0)  # cancelled requests wind down
            rss_marks["end"] = rss_mb(proc.pid)
            health = httpx.get(url + "/health", timeout=10).json()
            metrics = httpx.get(url + "/metrics", timeout=10).text
        finally:
            stop.set()
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            server_log = (Path(data_dir) / "server.log").read_text(errors="replace")

    report = summarize(args, results, rss_marks, samples, health, metrics, time.monotonic() - t_start)
    report["server_log_tracebacks"] = server_log.count("Traceback")
    if "Traceback" in server_log:  # the first one, to act on
        at = server_log.index("Traceback")
        report["server_log_first_traceback"] = server_log[max(0, at - 300) : at + 3000]
    lines = server_log.splitlines()
    report["server_log_errors"] = sum(" ERROR " in line or "ERROR:" in line for line in lines)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["target_met"] else 1


def summarize(args, results, rss_marks, samples, health, metrics, wall) -> dict:
    by_outcome = collections.Counter(str(r["outcome"]) for r in results)
    by_code = collections.Counter(r["code"] for r in results if r["code"])
    per_kind: dict[str, dict] = {}
    for kind in KINDS:
        rows = [r for r in results if r["kind"] == kind]
        if rows:
            per_kind[kind] = {
                "n": len(rows),
                "outcomes": dict(collections.Counter(str(r["outcome"]) for r in rows)),
                "p50_s": percentile([r["seconds"] for r in rows], 0.5),
                "p95_s": percentile([r["seconds"] for r in rows], 0.95),
            }
    n5xx = sum(1 for r in results if isinstance(r["outcome"], int) and r["outcome"] >= 500)
    n429 = sum(1 for r in results if r["outcome"] == 429)
    exceptions = [r["code"] for r in results if r["outcome"] == "exception"]
    warm, end = rss_marks.get("after_warmup"), rss_marks.get("end")
    growth = None if not warm or not end else round(100 * (end - warm) / warm, 1)
    peak = max((rss for _, rss in samples), default=None)
    expect_no_429 = args.concurrency <= args.max_active + args.max_queue
    return {
        "requests": len(results),
        "concurrency": args.concurrency,
        "max_active": args.max_active,
        "max_queue": args.max_queue,
        "wall_seconds": round(wall, 1),
        "by_outcome": dict(by_outcome),
        "by_error_code": dict(by_code),
        "http_5xx": n5xx,
        "http_429": n429,
        "client_exceptions": exceptions[:10],
        "per_kind": per_kind,
        "rss_mb": {k: None if v is None else round(v, 1) for k, v in rss_marks.items()} | {"peak": peak},
        "rss_growth_after_warmup_pct": growth,
        "server_health": health,
        "server_rejected_total": _metric(metrics, "cosyvoice2_rejected_total"),
        "server_queue_waits": _metric(metrics, "cosyvoice2_queue_wait_seconds_count"),
        "target_met": n5xx == 0
        and not exceptions
        and (n429 == 0 or not expect_no_429)
        and growth is not None
        and growth < 10.0,
    }


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


if __name__ == "__main__":
    sys.exit(main())
