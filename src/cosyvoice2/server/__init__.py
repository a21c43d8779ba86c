"""``cosyvoice2 serve``: an OpenAI-compatible speech API with WebSocket streaming, a voice library and a page.

    from cosyvoice2.server import create_app, Settings, serve
    serve(model=None, host="127.0.0.1", port=8000, data_dir=None, api_key=None, max_active=2, cors_origins=[],
          max_queue=8)

See ``cosyvoice2.server.app`` for the routes and the WebSocket protocol. Needs the ``serve`` extra
(fastapi, uvicorn, python-multipart, websockets). ``cosyvoice2.server.ray_serve`` runs the same app as
replicas on Ray Serve (the ``ray`` extra), with the voice library of ``voices.py`` shared through
PostgreSQL and a shared directory or S3.
"""

from __future__ import annotations

import logging
import os

from .app import Settings, create_app

__all__ = ["Settings", "create_app", "serve", "uvicorn_config"]

log = logging.getLogger("cosyvoice2.server")

WS_MAX_MESSAGE_BYTES = 256 * 1024  # one WebSocket message (text pieces are small; this bounds a frame)


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """The uvicorn configuration ``serve`` uses (tests use it too, so they run what users run)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws="websockets-sansio" if _has_sansio() else "auto",
        ws_max_size=WS_MAX_MESSAGE_BYTES,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers
        server_header=False,
        proxy_headers=False,
    )


def _has_sansio() -> bool:
    try:
        import uvicorn.protocols.websockets.websockets_sansio_impl  # noqa: F401
        import websockets  # noqa: F401
    except ImportError:
        return False
    return True


def serve(
    model: str | None,
    host: str,
    port: int,
    data_dir: str | None,
    api_key: str | None,
    max_active: int,
    cors_origins: list[str],
    max_queue: int = 8,
    queue_timeout: float = 30.0,
    request_timeout: float = 300.0,
    allowed_hosts: list[str] | None = None,
    threads: int | None = None,
    voice_db: str | None = None,
    voice_files: str | None = None,
    voice_namespace: str = "default",
    compute: str = "exact",
    cfg_steps: int | None = None,
    first_chunk_steps: int | None = None,
) -> None:
    """Load ``model`` (a model directory; None: the default model) and serve it until interrupted.

    ``compute``: "exact" (float32, the official numbers) or "fast" (the precision this CPU runs fastest,
    ``cosyvoice2.cpu.plan``); a server-wide setting, since the model is loaded once for every request.
    ``cfg_steps`` and ``first_chunk_steps`` (None: official) are the flow sampler's levers of
    ``cosyvoice2.load``, server-wide too.

    ``data_dir`` holds the voice library (None: $XDG_DATA_HOME/cosyvoice2, i.e. ~/.local/share/cosyvoice2).
    ``api_key`` (None: $COSYVOICE2_API_KEY if set, else no auth) is required as ``Authorization: Bearer``
    on every route except ``/``, ``/static/*`` and ``/health``. ``max_active`` synthesis requests run at
    once, ``max_queue`` more wait up to ``queue_timeout`` seconds for a slot; beyond that 429. A request
    may hold its slot ``request_timeout`` seconds. ``cors_origins`` ([] = CORS off) are the browser origins
    allowed to call the API. Without an API key only requests whose Host is a loopback name, ``host``
    itself or one of ``allowed_hosts`` are answered ("*": any; the default when ``host`` is a wildcard
    address such as 0.0.0.0, whose names are not known here). ``threads``: torch's CPU threads (None: its
    default). ``voice_db`` (None: $COSYVOICE2_VOICE_DB, else SQLite in ``data_dir``) and ``voice_files``
    (None: ``data_dir``/voices) place the voice library elsewhere, e.g. PostgreSQL + S3 shared by several
    servers (see ``voices.py``).
    """
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - the serve extra is missing
        from cosyvoice2.errors import CosyVoiceError

        raise CosyVoiceError("the server needs the serve extra: pip install 'cosyvoice2[serve]'") from e
    import cosyvoice2
    from cosyvoice2.errors import CosyVoiceError

    if max_active < 1:
        raise CosyVoiceError(f"max_active must be at least 1, got {max_active}")
    if max_queue < 0:
        raise CosyVoiceError(f"max_queue must be at least 0, got {max_queue}")
    if queue_timeout <= 0 or request_timeout <= 0:
        raise CosyVoiceError("queue_timeout and request_timeout must be positive")
    api_key = api_key or os.environ.get("COSYVOICE2_API_KEY") or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use it", host)
    hosts = list(allowed_hosts or [])
    if host in ("0.0.0.0", "::", ""):
        hosts = hosts or ["*"]
    else:
        hosts.append(host)
    if threads is not None:
        if threads < 1:
            raise CosyVoiceError(f"threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    tts = cosyvoice2.load(model, compute=compute, cfg_steps=cfg_steps, first_chunk_steps=first_chunk_steps)
    plan = tts.compute_plan
    log.info("compute %s on a %s CPU: LM %s, flow %s", plan.compute, plan.cpu_kind, plan.lm, plan.flow)
    if (plan.cfg_steps, plan.first_chunk_steps) != (None, None):
        log.info("flow: guided steps %s, first-chunk steps %s", plan.cfg_steps, plan.first_chunk_steps)
    settings = Settings(
        data_dir=data_dir,
        api_key=api_key,
        max_active=max_active,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        request_timeout=request_timeout,
        cors_origins=list(cors_origins or []),
        allowed_hosts=hosts,
        voice_db=voice_db or os.environ.get("COSYVOICE2_VOICE_DB") or None,
        voice_files=voice_files,
        voice_namespace=voice_namespace,
    )
    app = create_app(tts, settings)
    log.info(
        "cosyvoice2 serving on http://%s:%d (voices: %s; %d synthesis slots + %d queued, auth %s)",
        host if ":" not in host else f"[{host}]",
        port,
        app.state.server.store.describe(),
        max_active,
        max_queue,
        "on" if api_key else "off",
    )
    uvicorn.Server(uvicorn_config(app, host, port)).run()
