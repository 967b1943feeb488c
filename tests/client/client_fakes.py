"""A scripted SparseInfer servicer on a real grpc server (port 0) for tests that need to control exactly what
the server answers: status codes for the error mapping, UNAVAILABLE sequences for retries, slow answers for
deadlines, and the metadata each call carried. Tests against the real model server live in
test_client_real_server.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sparseinfer_client._proto import sparseinfer_pb2 as pb
from sparseinfer_client._proto import sparseinfer_pb2_grpc as pb_grpc


def full_report(layers: int = 2) -> pb.SparsityReport:
    report = pb.SparsityReport(
        mode=pb.SPARSITY_MODE_PREDICTED,
        tokens=7,
        computed_share=0.25,
        hot_share=0.75,
        cold_share=0.25,
        ffn_bytes_read=1000,
        ffn_bytes_dense=4000,
    )
    for i in range(layers):
        layer = report.layers.add(predicted_active_share=0.1 * (i + 1))
        if i == 0:  # layer 0 measured, layer 1 not: exercises optional fields both ways
            layer.true_active_share = 0.05
            layer.recall = 0.9
    return report


def full_response(request: pb.GenerateRequest) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request.request_id or "srv-1",
        text="hello world",
        finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=3, generated_tokens=2),
        timings=pb.Timings(queue_s=0.001, prefill_s=0.002, ttft_s=0.003, per_token_s=0.004, total_s=0.007),
        sparsity=full_report(),
        seed=request.sampling.seed if request.sampling.HasField("seed") else 12345,
    )
    if request.details.tokens:
        for i, piece in enumerate(("hello", " world")):
            token = response.tokens.add(id=10 + i, text=piece)
            if request.details.logprobs:
                token.logprob = -0.5 * (i + 1)
    return response


@dataclass
class Script:
    """What the fake answers. ``fail_first`` codes are returned (in order) by the first calls of any rpc
    before it behaves normally; ``stream_fail_after`` makes GenerateStream abort with that code after
    sending one message; ``delay_s`` sleeps before answering."""

    fail_first: list[grpc.StatusCode] = field(default_factory=list)
    stream_fail_after: grpc.StatusCode | None = None
    delay_s: float = 0.0
    stream_chunks: int = 3
    chunk_delay_s: float = 0.0


class FakeServicer(pb_grpc.SparseInferServicer):
    def __init__(self) -> None:
        self.script = Script()
        self.calls: list[tuple[str, dict[str, str], object]] = []
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def _enter(self, name: str, request: object, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append((name, dict(context.invocation_metadata()), request))
            code = self.script.fail_first.pop(0) if self.script.fail_first else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        if self.script.delay_s:
            time.sleep(self.script.delay_s)

    def attempts(self, name: str) -> int:
        return sum(1 for call in self.calls if call[0] == name)

    def Generate(self, request, context):
        self._enter("Generate", request, context)
        return full_response(request)

    def GenerateStream(self, request, context):
        self._enter("GenerateStream", request, context)
        context.add_callback(self.cancelled.set)
        final = full_response(request)
        pieces = [f"t{i} " for i in range(self.script.stream_chunks)]
        for i, piece in enumerate(pieces):
            if i == 1 and self.script.stream_fail_after is not None:
                context.abort(self.script.stream_fail_after, "scripted mid-stream failure")
            message = pb.GenerateStreamResponse(request_id=final.request_id, text=piece)
            message.tokens.add(id=i, text=piece)
            if i == len(pieces) - 1:
                message.finish_reason = final.finish_reason
                message.usage.CopyFrom(final.usage)
                message.timings.CopyFrom(final.timings)
                message.sparsity.CopyFrom(final.sparsity)
                message.seed = final.seed
            yield message
            if self.script.chunk_delay_s:
                time.sleep(self.script.chunk_delay_s)

    def Tokenize(self, request, context):
        self._enter("Tokenize", request, context)
        ids = [ord(c) for c in request.text]
        return pb.TokenizeResponse(ids=ids, pieces=list(request.text))

    def ModelInfo(self, request, context):
        self._enter("ModelInfo", request, context)
        return pb.ModelInfoResponse(
            model_id="fake",
            architecture="llama",
            activation="relu2",
            num_layers=2,
            hidden_size=64,
            neurons_per_layer=[128, 128],
            vocab_size=512,
            max_context=256,
            dtype="float32",
            default_sparsity_mode=pb.SPARSITY_MODE_DENSE,
            available_sparsity_modes=[pb.SPARSITY_MODE_DENSE, pb.SPARSITY_MODE_ORACLE],
            cett_target=0.2,
            placement=pb.Placement(hot_device="cpu", cold_device="cpu", hot_neurons_per_layer=[128, 128]),
            limits=pb.Limits(max_batch_size=8, max_new_tokens=64, default_max_new_tokens=16),
            server_version="0.0-fake",
        )


@dataclass
class FakeServer:
    target: str
    servicer: FakeServicer
    health: health.HealthServicer
    stop: Callable[[], None]


def start_fake_server(interceptors: tuple = ()) -> FakeServer:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=interceptors)
    servicer = FakeServicer()
    pb_grpc.add_SparseInferServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("sparseinfer.v1.SparseInfer", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return FakeServer(f"127.0.0.1:{port}", servicer, health_servicer, lambda: server.stop(None))
