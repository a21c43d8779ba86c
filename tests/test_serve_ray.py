"""The server on Ray Serve, end to end with real parts: a local Ray instance running 2 replicas of the
default model, their voice library in a PostgreSQL server (Debian's ``postgresql``, started in a
temporary directory) and a shared directory, and every request through Ray's HTTP proxy.

Covers streamed speech with the official ``openai`` client and the WebSocket, a voice created through the
proxy and then used by 20 requests that both replicas serve, a replica killed in the middle of a stream
(the client sees a cut stream; Ray starts a new replica, which serves the voice from the shared library),
PostgreSQL restarted between requests, and the single server's malformed requests, all answered 4xx.

Skipped when Ray Serve, psycopg or PostgreSQL's binaries are missing (``scripts/setup_scale_test.sh``
installs them; ``scripts/test.sh`` runs it). About two minutes on 2 cores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ws_client = pytest.importorskip("websockets.sync.client")
from pg_server import PostgresServer, free_port, skip_reason  # noqa: E402
from test_server import (  # noqa: E402 - the single server's malformed-request set
    SPEECH_JSON_CASES,
    SPEECH_RAW_CASES,
    WS_BAD_SESSIONS,
    _tone,
    assert_error,
    pcm,
    upload_voice,
)
from websockets.exceptions import ConnectionClosed  # noqa: E402

from cosyvoice2.server.ray_serve import APP_NAME, DEPLOYMENT_NAME, build_app  # noqa: E402

SR = 24000
SHORT = "Hi."
PROMPT_TEXT = "Hello there, this is the voice that every replica should know."
LONG = " ".join(["This sentence keeps the replica busy while the test pulls the plug on it."] * 5)


class Cluster:
    def __init__(self, port: int, pg: PostgresServer, files: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/v1/audio/speech/stream"
        self.pg = pg
        self.files = files
        self.voice_id: str | None = None

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def running_replicas(self) -> int:
        app = serve.status().applications.get(APP_NAME)
        if app is None:
            return 0
        states = app.deployments[DEPLOYMENT_NAME].replica_states
        return int(states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def cluster():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="cosyvoice2-ray-test-"))
    pg = PostgresServer().start()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "voice_db": pg.url,
                "voice_files": str(root / "voices"),
                "data_dir": str(root / "data"),
                "replicas": 2,
                "num_cpus": 1,
                "max_active": 2,
                "max_queue": 8,
                "request_timeout": 120.0,
                "allowed_hosts": ["127.0.0.1"],
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield Cluster(port, pg, root / "voices")
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        pg.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_voice(cluster):
    """A voice created through the proxy from speech the model made; returns its JSON."""
    with cluster.client() as c:
        body = {"input": PROMPT_TEXT, "voice": "alloy", "response_format": "wav", "seed": 1, "stream": False}
        r = c.post("/v1/audio/speech", json=body)
        assert r.status_code == 200, r.text
        created = upload_voice(c, r.content, name="Shared")
        assert created.status_code == 201, created.text
    cluster.voice_id = created.json()["id"]
    return created.json()


def _speak(cluster: Cluster, voice: str, seed: int) -> tuple[int, str | None, int]:
    """(status, replica, audio bytes); an error status comes back as a value (with the replica's logged
    errors appended), so that a failing assertion shows which replica failed and why."""
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=voice, input=SHORT, response_format="pcm", extra_body={"seed": seed}
        ) as resp:
            audio = b"".join(resp.iter_bytes())
            return resp.status_code, resp.headers.get("x-replica"), len(audio)
    except openai.APIStatusError as e:
        replica = e.response.headers.get("x-replica")
        return e.status_code, f"{replica}: {e.body} {_replica_errors(replica)}", 0


def _replica_errors(replica: str | None) -> str:
    """The ERROR records (with their tracebacks) in a replica's Ray log, for failure messages."""
    try:
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
        lines: list[str] = []
        for path in sorted(logs.glob(f"replica_*{replica or ''}*.log")):
            keep = False
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("INFO", "WARNING", "DEBUG")):
                    keep = False
                if line.startswith("ERROR"):
                    keep = True
                if keep:
                    lines.append(line)
        return "\n".join(lines[-80:]) or "(no errors logged)"
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"(replica logs unreadable: {e})"


def test_streamed_speech_through_the_proxy(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=SHORT, response_format="pcm", extra_body={"seed": 0}
    ) as resp:
        assert resp.headers["content-type"] == "audio/pcm" and resp.headers["x-sample-rate"] == str(SR)
        assert resp.headers["x-replica"]
        chunks = [c for c in resp.iter_bytes() if c]
    audio = pcm(b"".join(chunks))
    assert len(audio) > SR // 4 and abs(audio).max() > 0
    # The WebSocket: text in as pieces, audio out as frames.
    with ws_client.connect(cluster.ws_url, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", "voice": "alloy", "format": "pcm", "seed": 0}))
        assert json.loads(ws.recv(timeout=60))["type"] == "started"
        for piece in ("Hi ", "there."):
            ws.send(json.dumps({"type": "text", "text": piece}))
        ws.send(json.dumps({"type": "end"}))
        frames = bytearray()
        while isinstance(msg := ws.recv(timeout=60), bytes):
            frames += msg
    done = json.loads(msg)
    assert done["type"] == "done" and done["bytes"] == len(frames) > 0
    with cluster.client() as c:
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["replica"] and health["max_active"] == 2
        assert "cosyvoice2_requests_total" in c.get("/metrics").text
        assert "AudioContext" in c.get("/").text


def test_a_voice_made_through_one_replica_is_served_by_both(cluster, shared_voice):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: _speak(cluster, "Shared", i), range(20)))
    assert all(status == 200 and n > SR // 4 for status, _, n in results), results
    served = {replica for _, replica, _ in results}
    assert len(served) == 2, f"requests reached only {served}"
    with cluster.client() as c:
        for _ in range(4):  # the library, read through either replica
            assert c.get(f"/v1/voices/{shared_voice['id']}").json() == shared_voice
        assert_error(upload_voice(c, _tone(2.0), name="Shared"), 409, "voice_name_taken")


def test_malformed_requests_get_4xx_through_the_proxy(cluster, shared_voice):
    with cluster.client(timeout=30) as c:
        for case in SPEECH_JSON_CASES:
            r = c.post(
                "/v1/audio/speech", content=json.dumps(case), headers={"Content-Type": "application/json"}
            )
            assert_error(r)
        for body, ctype in SPEECH_RAW_CASES:
            assert_error(
                c.post("/v1/audio/speech", content=body, headers={"Content-Type": ctype} if ctype else {})
            )
        voice_cases = [
            upload_voice(c, b"this is not audio at all", mime="text/plain", filename="x.txt"),
            upload_voice(c, b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk", mime="audio/wav"),
            upload_voice(c, b"", mime="audio/wav"),
            upload_voice(c, _tone(0.1), mime="audio/wav"),
            upload_voice(c, _tone(40.0, sr=8000), mime="audio/wav"),
            upload_voice(c, _tone(2.0), name="x" * 300),
            upload_voice(c, _tone(2.0), name="bad\nname"),
            upload_voice(c, _tone(2.0), text="t" * 5000),
            c.post("/v1/voices", data={"text": "no audio field"}),
            c.post("/v1/voices", json={"audio": "base64?"}),
            c.post("/v1/voices", content=b"garbage", headers={"Content-Type": "multipart/form-data"}),
            c.post("/v1/voices", files={"audio": ("big.wav", b"\0" * (11 * 1024 * 1024), "audio/wav")}),
        ]
        for r in voice_cases:
            assert_error(r)
        for bad in ("..", "../../etc/passwd", "%2e%2e%2fvoices.sqlite3", "v_zzzzzzzzzzzzzzzz", "x" * 5000):
            assert_error(c.get(f"/v1/voices/{bad}"), 404)
            assert_error(c.delete(f"/v1/voices/{bad}"), 404)
        assert_error(c.get("/v1/nothing"), 404, "not_found")
        assert [v["id"] for v in c.get("/v1/voices").json()["data"]] == [shared_voice["id"]]
    for messages, code in WS_BAD_SESSIONS:
        with ws_client.connect(cluster.ws_url, open_timeout=30) as ws:
            for m in messages:
                ws.send(m)
            error = None
            with contextlib.suppress(ConnectionClosed):
                while True:
                    msg = ws.recv(timeout=30)
                    if isinstance(msg, str) and json.loads(msg)["type"] == "error":
                        error = json.loads(msg)["error"]
            assert error is not None and error["code"] == code, (messages[-1][:60], error)


def test_postgres_restart_between_requests(cluster, shared_voice):
    assert (r := _speak(cluster, "Shared", 0))[0] == 200, r
    cluster.pg.stop()  # down: a clear 503 to retry, not a 500 or a hang
    try:
        with cluster.client() as c:
            r = c.post("/v1/audio/speech", json={"input": SHORT, "voice": "Shared", "response_format": "pcm"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "voice_library_unavailable", r.text
        assert r.headers["retry-after"]
    finally:
        cluster.pg.start()
    assert (r := _speak(cluster, "Shared", 0))[0] == 200, r
    cluster.pg.restart()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # enough to reach both replicas' pools
        results = list(pool.map(lambda i: _speak(cluster, "Shared", i), range(6)))
    assert [status for status, _, _ in results] == [200] * 6, results
    with cluster.client() as c:
        assert c.get(f"/v1/voices/{shared_voice['id']}").json() == shared_voice


def test_a_replica_killed_mid_stream(cluster, shared_voice):
    before = _replicas_seen(cluster)
    body = {"input": LONG, "voice": "Shared", "response_format": "pcm", "seed": 0}
    received, failure = 0, None
    t0 = time.monotonic()
    with cluster.client(timeout=60) as c, c.stream("POST", "/v1/audio/speech", json=body) as r:
        assert r.status_code == 200
        victim = r.headers["x-replica"]
        chunks = r.iter_bytes()
        received += len(next(chunks))
        actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve")
        ray.kill(actor, no_restart=True)
        try:
            for chunk in chunks:
                received += len(chunk)
        except (httpx.TransportError, httpx.StreamError) as e:  # a clean error: the connection is cut
            failure = e
    # Cut short: the whole text is over 15 s of audio; the client got an error, or the stream just ended.
    assert failure is not None or received / 2 / SR < 10.0, (received, failure)
    assert time.monotonic() - t0 < 60
    # The other replica answers at once. Ray starts a new replica in the killed one's place; the new one
    # serves the voice it never saw made (from PostgreSQL and the shared files; it builds its own prompt
    # cache on its first request).
    assert (r := _speak(cluster, "Shared", 1))[0] == 200, r
    deadline = time.monotonic() + 120
    new: set[str] = set()
    while not new and time.monotonic() < deadline:
        new = _replicas_seen(cluster) - before
        time.sleep(0.5)
    assert new and victim not in new, (before, new)
    served: set[str] = set()
    # Ray's router picks replicas by its own queue-length probes: a newcomer can go unpicked for a few
    # rounds (seen in a clean-clone run: 8 rounds of 4 all went to the survivor), so rounds go on until a
    # deadline.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: _speak(cluster, "Shared", i), range(4)))
        assert [s for s, _, _ in results] == [200] * 4, results
        served |= {replica for _, replica, _ in results}
        if served & new:
            break
    assert served & new, (new, served)
    assert cluster.running_replicas() == 2, serve.status()
    with cluster.client() as c:
        assert c.get(f"/v1/voices/{shared_voice['id']}").json() == shared_voice


def _replicas_seen(cluster: Cluster) -> set[str]:
    with cluster.client() as c, concurrent.futures.ThreadPoolExecutor(8) as pool:
        return set(pool.map(lambda _: c.get("/health").headers["x-replica"], range(16)))


def test_the_serve_config_file_builds_the_application():
    """deploy/serve.yaml is a valid Serve config whose import path builds this application."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    built = builder(app.args)
    assert type(built).__name__ == "Application"
    spec = yaml.safe_load((path.parent / "rayservice.yaml").read_text())
    nested = ServeDeploySchema.model_validate(yaml.safe_load(spec["spec"]["serveConfigV2"]))
    assert nested.applications[0].import_path == app.import_path
