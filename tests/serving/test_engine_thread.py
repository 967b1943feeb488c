"""serving.engine_thread: one thread, jobs in order, the server loads and decodes on it."""

import threading

import pytest

from sparseinfer.serving import model_setup, server
from sparseinfer.serving.config import ServeConfig
from sparseinfer.serving.engine_thread import EngineThread
from sparseinfer_client import Client


def test_jobs_run_in_order_on_one_thread():
    engine = EngineThread(name="t-engine")
    seen: list[tuple[int, str]] = []
    futures = [
        engine.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(20)
    ]
    for f in futures:
        f.result(timeout=5)
    engine.stop(timeout=5)
    assert seen == [(i, "t-engine") for i in range(20)]


def test_errors_reach_the_caller_and_the_thread_survives():
    engine = EngineThread()
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0)
    assert engine.call(lambda: 6 * 7) == 42
    engine.stop(timeout=5)
    assert not engine._thread.is_alive()


def test_server_loads_and_decodes_on_the_engine_thread(tiny_llama_checkpoint, monkeypatch):
    threads: dict[str, str] = {}
    load = model_setup.load_served

    def recording_load(config):
        threads["load"] = threading.current_thread().name
        served = load(config)
        decode_step = served.engine.decode_step

        def recording_step(seqs):
            threads["decode"] = threading.current_thread().name
            return decode_step(seqs)

        served.engine.decode_step = recording_step
        return served

    monkeypatch.setattr(server, "load_served", recording_load)
    handle = server.start_server(ServeConfig(model=tiny_llama_checkpoint, port=0))
    try:
        with Client(handle.address) as client:
            assert client.generate("hello", max_new_tokens=3, ignore_eos=True).usage.generated_tokens == 3
    finally:
        handle.stop(grace=1.0)
    assert threads == {"load": "sparseinfer-engine", "decode": "sparseinfer-engine"}
