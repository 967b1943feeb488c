"""The grpc.aio server: SparseInfer + health + reflection, auth, TLS, keepalive, message limits, draining.

``AsyncServer`` is the server on an existing event loop (``sparseinfer serve`` runs it on a loop from
``new_event_loop``, uvloop by default, with SIGTERM/SIGINT handlers); ``start_server(config)`` runs one on
its own thread and returns a handle with ``.port`` and ``.stop(grace)`` for tests, benchmarks and embedding.

Shutdown (SIGTERM, ``stop``): health turns NOT_SERVING (load balancers and Kubernetes stop sending), new
generations answer UNAVAILABLE, running and queued requests continue for up to the grace period; after it,
running requests end with finish reason CANCELLED and what they generated, queued ones fail UNAVAILABLE.
Then the gRPC server stops and the engine thread exits.

Keepalive: the server pings a connection only after 2 minutes without traffic and waits 20 s for the
answer, so a dead peer is noticed; it never closes a connection for being idle or old (no
max_connection_idle/age) because a long generation on a unary call sends nothing until it ends. Clients may
ping every 10 s during calls without being told to go away (``max_ping_strikes`` 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sparseinfer._proto import sparseinfer_pb2 as pb
from sparseinfer.serving.auth import BearerTokenInterceptor
from sparseinfer.serving.batcher import Batcher
from sparseinfer.serving.chat_template import load_chat_template
from sparseinfer.serving.config import (
    MAX_SEND_MESSAGE_BYTES,
    ServeConfig,
    new_event_loop,
)
from sparseinfer.serving.engine_thread import EngineThread
from sparseinfer.serving.metrics import ServerMetrics
from sparseinfer.serving.model_setup import Served, load_served
from sparseinfer.serving.openai_api import HttpSite, OpenAIApi
from sparseinfer.serving.servicer import SparseInferServicer, add_to_server

log = logging.getLogger("sparseinfer.serving.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SparseInfer"].full_name

# The receive limit is the served model's own (``Limits.request_bytes``, under MAX_RECEIVE_MESSAGE_BYTES),
# added in ``AsyncServer.start``.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 120_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep probing a peer during a long silent generation
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # accept client pings every 10 s ...
    ("grpc.http2.max_ping_strikes", 0),  # ... and never GOAWAY a client that pings more often
    ("grpc.so_reuseport", 0),  # two servers must never share a port by accident
]


class AsyncServer:
    """One server on the running event loop: ``await start()``, then ``await shutdown(grace)``."""

    def __init__(self, config: ServeConfig, served: Served | None = None) -> None:
        config.validate()
        self.config = config
        # Loading and decoding share one thread (see engine_thread): a second thread's torch work would
        # slow every parallel op of a decode step.
        self.engine_thread = EngineThread()
        try:
            self.served = (
                served if served is not None else self.engine_thread.call(lambda: load_served(config))
            )
        except BaseException:
            self.engine_thread.stop()
            raise
        self.metrics = ServerMetrics()
        self.batcher = Batcher(self.served.engine, config.limits, self.metrics, self.engine_thread)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer: SparseInferServicer | None = None
        self.http: HttpSite | None = None
        self.http_port: int | None = None

    async def start(self) -> int:
        """Bind, start serving and return the bound port."""
        cfg = self.config
        interceptors = [BearerTokenInterceptor(cfg.auth_token)] if cfg.auth_token else []
        receive = ("grpc.max_receive_message_length", self.batcher.max_request_bytes)
        server = grpc.aio.server(interceptors=interceptors, options=[*SERVER_OPTIONS, receive])
        tokenizer = self.served.engine.tokenizer
        servicer = SparseInferServicer(
            self.batcher,
            self.metrics,
            tokenizer.encode,
            lambda token_id: tokenizer.decode([token_id]),
            self.served.description,
        )
        add_to_server(servicer, server)
        self._servicer = servicer
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self.batcher.start()
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_host, cfg.metrics_port)
        if cfg.http_port is not None:
            self.http = self._http_site()
            self.http_port = await self.http.start(cfg.host, cfg.http_port, self._ssl_context())
        log.info(
            "serving",
            extra={"address": f"{cfg.host}:{self.port}", "model": str(self.served.model_dir)},
        )
        return self.port

    def _http_site(self) -> HttpSite:
        tokenizer = self.served.engine.tokenizer
        api = OpenAIApi(
            self.batcher,
            self.metrics,
            self.served.description,
            tokenizer.encode,
            lambda token_id: tokenizer.decode([token_id]),
            load_chat_template(self.served.model_dir),
            self.config.auth_token,
        )
        return HttpSite(api)

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The gRPC port's certificate for the HTTP port too (None: plain HTTP, like gRPC without TLS)."""
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        return context

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, finish in-flight work for up to ``grace`` seconds, stop."""
        grace = self.config.grace_period if grace is None else grace
        log.info("draining", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.api.draining = True  # its /health answers 503 from now on
        self.batcher.stop_accepting()
        await asyncio.to_thread(self.batcher.close, grace)
        self.engine_thread.stop()
        if self._server is not None:
            # Every ticket has ended by now; a short grace lets handlers send their final messages.
            await self._server.stop(1.0)
            self._server = None
        if self._servicer is not None:
            self._servicer.close()
        if self.http is not None:
            await self.http.stop()  # every ticket has ended: its streams have sent their last event
            self.http = None
        self.metrics.close()
        log.info("stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class ServerHandle:
    """A server running on its own thread and event loop (``start_server``)."""

    def __init__(
        self, server: AsyncServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self.server = server
        self.port = server.port
        self.metrics_port = server.metrics_port
        self.http_port = server.http_port
        self.batcher = server.batcher
        self._loop = loop
        self._thread = thread
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.server.config.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Drain and stop (see ``AsyncServer.shutdown``); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(config: ServeConfig, served: Served | None = None) -> ServerHandle:
    """Load the model (unless ``served`` is given), start a server on a background thread, return its handle
    once it accepts calls (``config.port=0`` picks a free port: ``handle.port``)."""
    server = AsyncServer(config, served)
    loop = new_event_loop(config.event_loop)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as e:
            failure.append(e)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name="sparseinfer-grpc", daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        server.batcher.close()
        server.engine_thread.stop()
        raise failure[0]
    return ServerHandle(server, loop, thread)


async def serve(
    config: ServeConfig, stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
) -> int:
    """Serve until one of ``stop_signals``, then drain for ``config.grace_period``; return the exit status.

    A second stop signal while draining cuts the drain short (``Batcher.end_grace_now``): running requests
    end at once with finish reason CANCELLED and what they generated, queued ones fail UNAVAILABLE, and the
    process exits promptly with status 128 + the signal's number (as if the signal had killed it, but with
    every stream closed properly and the log flushed). A drain that completes exits 0."""
    server = AsyncServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    first: asyncio.Future[signal.Signals] = loop.create_future()
    forced: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if not first.done():
            first.set_result(sig)
        elif not forced:
            forced.append(sig)
            log.warning(
                "second stop signal while draining: ending in-flight requests now and exiting",
                extra={"signal": sig.name, "in_flight": server.batcher.in_flight},
            )
            server.batcher.end_grace_now()

    for sig in stop_signals:
        loop.add_signal_handler(sig, on_signal, sig)
    print(f"sparseinfer: serving {server.served.model_dir} on {config.host}:{server.port}", flush=True)
    if server.http_port is not None:
        print(f"sparseinfer: OpenAI API on http://{config.host}:{server.http_port}/v1", flush=True)
    if server.metrics_port is not None:
        print(
            f"sparseinfer: metrics on http://{config.metrics_host}:{server.metrics_port}/metrics", flush=True
        )
    sig = await first
    log.info("stop signal received", extra={"signal": sig.name})
    try:
        await server.shutdown()
    finally:
        for s in stop_signals:
            loop.remove_signal_handler(s)
    return 128 + int(forced[0]) if forced else 0
