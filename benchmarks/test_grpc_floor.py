"""The Python gRPC stack's own cost per streamed message, with no model and no batcher (pytest-benchmark).

Run: ``pytest benchmarks/test_grpc_floor.py``. A ``grpc.aio`` servicer on its own event-loop thread answers
GenerateStream with MESSAGES prebuilt one-token responses; the benchmark consumes the stream in this thread,
through the raw stub and through ``sparseinfer_client.Client`` (both with a deadline, as the client sets
one). Time per message (``extra_info``) is the floor under the server's per-token streaming overhead:
``bench serve`` compares the server with the engine alone, and on a small machine this cost comes out of
the engine's cores. On the 2-core development VM: 190-245 µs per message, both sides together.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from sparseinfer_client import Client
from sparseinfer_client._proto import sparseinfer_pb2 as pb
from sparseinfer_client._proto import sparseinfer_pb2_grpc as pb_grpc

MESSAGES = 1000


class _Streamer(pb_grpc.SparseInferServicer):
    def __init__(self) -> None:
        token = pb.Token(id=42, text="ab")
        self.chunk = pb.GenerateStreamResponse(request_id="r", text="ab", tokens=[token])
        usage = pb.Usage(prompt_tokens=1, generated_tokens=MESSAGES)
        self.last = pb.GenerateStreamResponse(
            request_id="r", text="ab", tokens=[token], finish_reason=pb.FINISH_REASON_LENGTH, usage=usage
        )

    async def GenerateStream(self, request, context):
        for _ in range(MESSAGES - 1):
            yield self.chunk
        yield self.last


@pytest.fixture(scope="module")
def address():
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder = {}

    async def serve():
        server = grpc.aio.server()
        pb_grpc.add_SparseInferServicer_to_server(_Streamer(), server)
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["server"] = server
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(30)
    started.wait(30)
    yield f"127.0.0.1:{holder['port']}"
    asyncio.run_coroutine_threadsafe(holder["server"].stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def test_stream_raw_stub(benchmark, address):
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SparseInferStub(channel)

        def consume() -> int:
            return sum(1 for _ in stub.GenerateStream(pb.GenerateRequest(text="x"), timeout=60))

        assert benchmark(consume) == MESSAGES
    benchmark.extra_info["messages_per_stream"] = MESSAGES
    benchmark.extra_info["us_per_message"] = benchmark.stats["median"] / MESSAGES * 1e6


def test_stream_sparseinfer_client(benchmark, address):
    with Client(address, timeout=60) as client:

        def consume() -> int:
            return sum(1 for _ in client.generate_stream("x"))

        assert benchmark(consume) == MESSAGES
    benchmark.extra_info["messages_per_stream"] = MESSAGES
    benchmark.extra_info["us_per_message"] = benchmark.stats["median"] / MESSAGES * 1e6
