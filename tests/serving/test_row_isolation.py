"""One bad request never harms its batch-mates, through the real server (reliability issue, item 1).

A "mate" streams in the same batch while a fuzzed request runs: the fuzzed one may only succeed or answer
INVALID_ARGUMENT naming a field, and the mate always gets exactly the tokens it gets alone. A request whose
own logits are NaN (its prompt holds a token whose embedding is NaN) fails alone with INTERNAL.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from serving_helpers import idle, wait_until

from sparseinfer.model.random_checkpoint import write_random_checkpoint
from sparseinfer.serving.config import Limits, ServeConfig
from sparseinfer.serving.server import start_server
from sparseinfer_client._proto import sparseinfer_pb2 as pb
from sparseinfer_client._proto import sparseinfer_pb2_grpc as pb_grpc

DOUBLES = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
MATES = (
    {"temperature": 0.0},  # greedy
    {"temperature": 0.8, "top_k": 20, "seed": 7},  # sampled with its own seed
)


def mate_request(i: int, n: int = 60) -> pb.GenerateRequest:
    r = pb.GenerateRequest(text=f"the mate number {i}", request_id=f"mate{i}")
    r.stopping.max_new_tokens = n
    r.stopping.ignore_eos = True
    for name, value in MATES[i].items():
        setattr(r.sampling, name, value)
    r.details.tokens = True
    return r


def stream_ids(stub, request) -> list[int]:
    return [t.id for m in stub.GenerateStream(request, timeout=30) for t in m.tokens]


class Mates:
    """Streams both mates in the background; ``check()`` compares their tokens with what they get alone."""

    def __init__(self, stub) -> None:
        self.stub = stub
        self.alone = [stream_ids(stub, mate_request(i)) for i in range(len(MATES))]

    def __enter__(self) -> Mates:
        self.got: list[list[int]] = [[] for _ in MATES]
        self.started = [threading.Event() for _ in MATES]

        def run(i):
            for m in self.stub.GenerateStream(mate_request(i), timeout=30):
                self.got[i].extend(t.id for t in m.tokens)
                self.started[i].set()

        self.threads = [threading.Thread(target=run, args=(i,)) for i in range(len(MATES))]
        for t in self.threads:
            t.start()
        for e in self.started:
            assert e.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        for t in self.threads:
            t.join(30)
        assert self.got == self.alone


@pytest.fixture(scope="module")
def mates(server):
    with grpc.insecure_channel(server.address) as channel:
        yield Mates(pb_grpc.SparseInferStub(channel))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    temperature=DOUBLES,
    top_k=st.integers(-(2**31), 2**31 - 1),
    top_p=DOUBLES,
    repetition_penalty=DOUBLES,
    seed=st.integers(0, 2**64 - 1),
    max_new_tokens=st.integers(-(2**31), 2**31 - 1),
    stream_interval=st.integers(0, 2**32 - 1),
    logprobs=st.booleans(),
)
@example(1e300, 0, 1.0, 1e300, 1, 6, 1, False)  # overflowed fp32 before the sampler clamped its scalars
@example(5e-324, 0, 5e-324, 5e-324, 2**64 - 1, 6, 2**32 - 1, True)
def test_fuzzed_values_never_fail_a_batch_mate(
    server,
    mates,
    temperature,
    top_k,
    top_p,
    repetition_penalty,
    seed,
    max_new_tokens,
    stream_interval,
    logprobs,
):
    r = pb.GenerateRequest(text="a fuzzed request", stream_interval=stream_interval)
    r.sampling.temperature = temperature
    r.sampling.top_k = top_k
    r.sampling.top_p = top_p
    r.sampling.repetition_penalty = repetition_penalty
    r.sampling.seed = seed
    # Small when valid (the mates must outlive it); zero, negative or over the limit as drawn.
    r.stopping.max_new_tokens = min(max_new_tokens, 12) if 0 < max_new_tokens <= 200 else max_new_tokens
    r.details.logprobs = logprobs
    with mates:
        try:
            messages = list(mates.stub.GenerateStream(r, timeout=30))
            assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
            assert e.details().split(":")[0] in {
                "sampling.temperature", "sampling.top_k", "sampling.top_p", "sampling.repetition_penalty",
                "stopping.max_new_tokens",
            }  # fmt: skip
    assert wait_until(lambda: idle(server))


POISON = 7  # the token whose embedding is NaN


@pytest.fixture(scope="module")
def poisoned_server(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("poisoned"), tie=False)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.embed_tokens.weight"][POISON] = float("nan")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = ServeConfig(model=path, port=0, limits=Limits(max_batch_size=4, max_new_tokens=100))
    handle = start_server(config)
    yield handle
    handle.stop(grace=1.0)


def test_a_request_with_nan_logits_fails_alone(poisoned_server):
    def ids_request(ids, rid, n):
        r = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), request_id=rid)
        r.stopping.max_new_tokens = n
        r.stopping.ignore_eos = True
        r.sampling.temperature = 0.0
        r.details.tokens = True
        return r

    with grpc.insecure_channel(poisoned_server.address) as channel:
        stub = pb_grpc.SparseInferStub(channel)
        mate = ids_request([3, 4, 5], "mate", 60)
        alone = stream_ids(stub, mate)
        got, started = [], threading.Event()

        def run():
            for m in stub.GenerateStream(mate, timeout=30):
                got.extend(t.id for t in m.tokens)
                started.set()

        t = threading.Thread(target=run)
        t.start()
        assert started.wait(10)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(ids_request([3, POISON, 5], "victim", 5), timeout=30)
        t.join(30)
    assert err.value.code() == grpc.StatusCode.INTERNAL and "not finite" in err.value.details()
    assert got == alone
    assert wait_until(lambda: idle(poisoned_server))
