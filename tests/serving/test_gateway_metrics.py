"""The gauges an inference gateway schedules by (the metrics module's docstring, docs/deployment.md), on a
real server with the bundled model: queued and running requests and the KV cache's utilization follow the
batcher and the engine while requests run, and all read 0 once it is idle."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_helpers import idle, slow_engine, wait_until

from sparseinfer.serving.config import Limits, ServeConfig
from sparseinfer.serving.server import start_server
from sparseinfer_client import NO_RETRY, Client

SLOTS = 4


@pytest.fixture(scope="module")
def bundled():
    config = ServeConfig(port=0, metrics_port=0, threads=1, limits=Limits(max_batch_size=SLOTS, max_queue=16))
    handle = start_server(config)  # model None: the bundled ReLU² model
    yield handle
    handle.stop(grace=0.5)


def gauges(handle) -> tuple[float, float, float]:
    """(queued, running, KV-cache utilization) as the server's registry has them."""
    get = handle.server.metrics.registry.get_sample_value
    return (
        get("sparseinfer_queue_length"),
        get("sparseinfer_batch_size"),
        get("sparseinfer_kv_cache_usage_ratio"),
    )


def engine_utilization(handle) -> float:
    """The share of cache slots the engine itself has handed out."""
    engine = handle.batcher.engine
    return (engine.cache.max_batch - engine.free_slots) / engine.cache.max_batch


def test_gauges_follow_running_and_queued_requests_then_read_zero(bundled):
    assert wait_until(lambda: idle(bundled)) and gauges(bundled) == (0, 0, 0)

    def generate(seed: int) -> int:
        with Client(bundled.address, retry=NO_RETRY, timeout=60) as c:
            return c.generate(
                "And it came to pass", max_new_tokens=60, seed=seed, ignore_eos=True
            ).usage.generated_tokens

    # Slowed decode steps keep each state below on screen for about a second.
    with slow_engine(bundled, 0.02), ThreadPoolExecutor(SLOTS + 2) as pool:
        first = [pool.submit(generate, seed) for seed in range(2)]
        # Two of four slots held, nothing waiting: half the cache, as the engine counts it.
        assert wait_until(lambda: gauges(bundled)[:2] == (0, 2)), gauges(bundled)
        assert wait_until(lambda: gauges(bundled)[2] == engine_utilization(bundled) == 0.5), gauges(bundled)
        rest = [pool.submit(generate, seed) for seed in range(2, SLOTS + 2)]
        # Every slot held and two requests waiting: the queue counts the waiting ones only.
        assert wait_until(lambda: gauges(bundled)[:2] == (2, SLOTS)), gauges(bundled)
        assert wait_until(lambda: gauges(bundled)[2] == engine_utilization(bundled) == 1.0), gauges(bundled)
        assert [f.result() for f in first + rest] == [60] * (SLOTS + 2)
    assert wait_until(lambda: idle(bundled))
    assert wait_until(lambda: gauges(bundled) == (0, 0, 0)), gauges(bundled)


def test_the_endpoint_exposes_the_gauges_at_zero_when_idle(bundled):
    with Client(bundled.address, retry=NO_RETRY, timeout=30) as c:
        c.generate("idle after this", max_new_tokens=4)
    assert wait_until(lambda: idle(bundled))
    url = f"http://127.0.0.1:{bundled.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "# TYPE sparseinfer_kv_cache_usage_ratio gauge" in text
    for name in ("queue_length", "batch_size", "kv_cache_usage_ratio"):
        assert f"\nsparseinfer_{name} 0.0\n" in text, name
