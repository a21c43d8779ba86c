"""The server on Ray Serve: the same FastAPI app in every replica, one model per replica, behind Ray's
HTTP proxy.

``cosyvoice2 serve --ray`` (``serve_ray``) starts it on a local Ray instance or joins a running cluster
(``--ray-address``); ``serve run deploy/serve.yaml``, ``serve deploy`` and KubeRay's RayService use
``build_app`` (``import_path: cosyvoice2.server.ray_serve:build_app``) with the same options as ``args``.

Each replica is one ``CosyVoice2Replica``: it loads the model once, sets torch's threads from its CPU
share (``ray_actor_options.num_cpus``, rounded, at least 1), and serves ``create_app`` through Serve's
FastAPI ingress, so every route (the OpenAI speech API, streamed responses, the WebSocket, /health,
/metrics, the page) behaves as in ``cosyvoice2 serve``. Every HTTP response carries ``X-Replica``, and
/health and /metrics describe the replica that answered.

Replicas share the voice library through ``voice_db`` (PostgreSQL) and ``voice_files`` (a directory every
node mounts, or S3); what cannot be shared (loaded voices, the model's prompt cache of a voice) stays in
each replica and is rebuilt by the first request a replica serves with that voice. Without ``voice_db``
the replicas share SQLite + files in ``data_dir``, which works only while they run on one machine.

Ray routes a request to the replica with fewer requests in flight (of two picked at random); a replica
accepts ``max_active`` + ``max_queue`` synthesis requests (its own queue, as in ``cosyvoice2 serve``) plus
a few cheap ones, and Ray's proxy holds at most ``max_queued`` more (then 503). Autoscaling (``autoscale``
= (min, max)) targets ``max_active`` requests in flight per replica.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

from ray import serve

from cosyvoice2.errors import CosyVoiceError

log = logging.getLogger("cosyvoice2.server")

APP_NAME = "cosyvoice2"
DEPLOYMENT_NAME = "CosyVoice2"
CHEAP_REQUESTS = 4  # /health, /metrics, voice listing: room for them beside a full synthesis queue


@dataclass
class ReplicaOptions:
    """What a replica is built from: plain values, so they travel as deployment arguments or YAML ``args``.

    ``api_key`` None reads $COSYVOICE2_API_KEY on the replica's node; ``voice_db`` None reads
    $COSYVOICE2_VOICE_DB (so a password can come from a secret instead of the config file)."""

    model: str | None = None
    threads: int | None = None  # None: from the replica's CPU share
    compute: str = "exact"  # "exact" | "fast" (cosyvoice2.cpu.plan, on the replica's own CPU)
    int8: bool = False
    flow_steps: int | None = None
    cfg_steps: int | None = None  # flow sampler levers of cosyvoice2.load (None: official)
    first_chunk_steps: int | None = None
    data_dir: str | None = None
    voice_db: str | None = None
    voice_files: str | None = None
    voice_namespace: str = "default"
    api_key: str | None = None
    max_active: int = 2
    max_queue: int = 8
    queue_timeout: float = 30.0
    request_timeout: float = 300.0
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=lambda: ["*"])

    @classmethod
    def from_dict(cls, args: dict | None) -> ReplicaOptions:
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise CosyVoiceError(f"unknown cosyvoice2 option(s) {unknown}; known: {sorted(known)}")
        opts = cls(**args)
        if opts.max_active < 1 or opts.max_queue < 0:
            raise CosyVoiceError("max_active must be at least 1 and max_queue at least 0")
        return opts

    def settings(self, replica_id: str | None):
        from .app import Settings

        return Settings(
            data_dir=self.data_dir,
            api_key=self.api_key or os.environ.get("COSYVOICE2_API_KEY") or None,
            max_active=self.max_active,
            max_queue=self.max_queue,
            queue_timeout=self.queue_timeout,
            request_timeout=self.request_timeout,
            cors_origins=list(self.cors_origins),
            allowed_hosts=list(self.allowed_hosts),
            voice_db=self.voice_db or os.environ.get("COSYVOICE2_VOICE_DB") or None,
            voice_files=self.voice_files or os.environ.get("COSYVOICE2_VOICE_FILES") or None,
            voice_namespace=self.voice_namespace,
            shared_voices=True,  # other replicas use the same library
            replica_id=replica_id,
        )


def cpu_share_threads() -> int:
    """Torch threads for this replica: its Ray CPU share, rounded, at least 1."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, round(cpus))


@serve.ingress()
class CosyVoice2Replica:
    """One model and one app per replica (``serve.ingress`` calls ``__serve_build_asgi_app__`` after
    ``__init__``, in the replica)."""

    def __init__(self, options: dict | None = None) -> None:
        import torch

        import cosyvoice2

        self.options = ReplicaOptions.from_dict(options)
        self.threads = self.options.threads or cpu_share_threads()
        torch.set_num_threads(self.threads)
        try:
            replica_id = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - outside a replica (unit use)
            replica_id = f"pid{os.getpid()}"
        self.replica_id = replica_id
        t0 = time.perf_counter()
        load_opts: dict = {"lm_quant": "int8", "flow_quant": "int8"} if self.options.int8 else {}
        for name in ("flow_steps", "cfg_steps", "first_chunk_steps"):
            if getattr(self.options, name) is not None:
                load_opts[name] = getattr(self.options, name)
        self.tts = cosyvoice2.load(self.options.model, compute=self.options.compute, **load_opts)
        plan = self.tts.compute_plan
        log.info(
            "replica %s: model loaded in %.1f s, %d torch thread(s), compute %s (LM %s, flow %s)",
            replica_id,
            time.perf_counter() - t0,
            self.threads,
            plan.compute,
            plan.lm,
            plan.flow,
        )

    def __serve_build_asgi_app__(self):
        from .app import create_app

        settings = self.options.settings(self.replica_id)
        app = create_app(self.tts, settings)
        log.info("replica %s: voices: %s", self.replica_id, app.state.server.store.describe())
        return app


def deployment_options(
    max_active: int = 2,
    max_queue: int = 8,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    num_cpus: float = 1.0,
    max_queued: int | None = None,
) -> dict:
    """``serve.deployment`` options for ``CosyVoice2Replica`` (the YAML's ``deployments`` entry may
    override any of them)."""
    opts: dict = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": float(num_cpus)},
        "max_ongoing_requests": max_active + max_queue + CHEAP_REQUESTS,
        "max_queued_requests": max_queue if max_queued is None else max_queued,
        "graceful_shutdown_timeout_s": 60.0,  # let streams in flight finish when a replica is scaled down
        "health_check_period_s": 10.0,
    }
    if autoscale is not None:
        lo, hi = autoscale
        if not 0 <= lo <= hi or hi < 1:
            raise CosyVoiceError(f"autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {lo}:{hi}")
        opts["autoscaling_config"] = {
            "min_replicas": lo,
            "initial_replicas": max(lo, 1),
            "max_replicas": hi,
            "target_ongoing_requests": max_active,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 120.0,
        }
    else:
        if replicas < 1:
            raise CosyVoiceError(f"replicas must be at least 1, got {replicas}")
        opts["num_replicas"] = replicas
    return opts


def build_app(args: dict):
    """The Serve application (``import_path: cosyvoice2.server.ray_serve:build_app``). ``args`` are
    ``ReplicaOptions`` fields, plus ``replicas``, ``autoscale`` ([min, max]), ``num_cpus`` and
    ``max_queued`` for the deployment."""
    args = dict(args or {})
    deploy = {k: args.pop(k) for k in ("replicas", "autoscale", "num_cpus", "max_queued") if k in args}
    options = ReplicaOptions.from_dict(args)
    autoscale = deploy.get("autoscale")
    dep = serve.deployment(
        CosyVoice2Replica,
        **deployment_options(
            max_active=options.max_active,
            max_queue=options.max_queue,
            replicas=int(deploy.get("replicas", 1)),
            autoscale=tuple(int(x) for x in autoscale) if autoscale else None,
            num_cpus=float(deploy.get("num_cpus", 1.0)),
            max_queued=deploy.get("max_queued"),
        ),
    )
    return dep.bind(dataclasses.asdict(options))


def serve_ray(
    options: ReplicaOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    num_cpus: float = 1.0,
    max_queued: int | None = None,
) -> None:
    """``cosyvoice2 serve --ray``: deploy on a Ray cluster (``address``; None: start a local one) and
    serve until interrupted; then remove the application (and stop the local cluster)."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    init: dict = {"address": address, "include_dashboard": False, "log_to_driver": True}
    if address is None:
        init["_node_ip_address"] = "127.0.0.1" if host in ("127.0.0.1", "localhost") else None
    ray.init(**{k: v for k, v in init.items() if v is not None})
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        shared_db = options.voice_db or os.environ.get("COSYVOICE2_VOICE_DB")
        if len(nodes) > 1 and not shared_db:
            log.warning(
                "%d Ray nodes but no --voice-db: each node keeps its own SQLite voice library, so a voice "
                "made on one node is unknown on the others; use PostgreSQL and shared voice files",
                len(nodes),
            )
        serve.start(http_options={"host": host, "port": port})
        args = dataclasses.asdict(options)
        args.update(replicas=replicas, num_cpus=num_cpus, max_queued=max_queued)
        if autoscale is not None:
            args["autoscale"] = list(autoscale)
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        log.info(
            "cosyvoice2 on Ray Serve: http://%s:%d (%s, %g CPU per replica)",
            host if ":" not in host else f"[{host}]",
            port,
            f"{autoscale[0]}-{autoscale[1]} replicas" if autoscale else f"{replicas} replica(s)",
            num_cpus,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.delete(APP_NAME)
            if address is None:
                serve.shutdown()
        finally:
            ray.shutdown()
