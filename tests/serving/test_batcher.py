"""The continuous batcher against a fake engine: no model, no grpc.

The fake engine's token for (seed, position) is a fixed function, so the expected output of every request is
known independently of the batcher; the fake also logs every prefill/decode call so scheduling properties
(join/leave between steps, one batched prefill between decodes, slot freed within a step) can be checked
directly.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sparseinfer.engine.accounting import SparsityTally
from sparseinfer.engine.errors import InvalidRequest, StepFailed
from sparseinfer.engine.sampling import SamplingParams
from sparseinfer.engine.sequence import Sequence
from sparseinfer.serving.batcher import Batcher
from sparseinfer.serving.config import Limits
from sparseinfer.serving.requests import BatchRequest, Completion, ErrorKind, ServingError, TokenChunk

VOCAB = 50


def expected_token(seed: int, position: int) -> int:
    return (seed * 31 + position * 7) % (VOCAB - 2) + 2  # never 0/1 (1 is EOS)


class Decoder:
    def __init__(self) -> None:
        self.n = 0

    def step(self, ids):
        new = ids[self.n :]
        self.n = len(ids)
        return "".join(f"<{t}>" for t in new)

    def flush(self):
        return ""


class FakeEngine:
    max_bytes_per_token = 4  # a token per character, of at most 4 UTF-8 bytes

    def __init__(self, slots: int = 4, max_seq: int = 128, step_s: float = 0.002) -> None:
        self.max_seq = max_seq
        self._free = list(range(slots))
        self.step_s = step_s
        self.log: list[tuple[str, tuple]] = []  # ("prefill", (rid, ...)) / ("decode", (rid, ...))
        self.released: list = []
        self.fail_prefill: set = set()
        self.fail_decode: set = set()  # rids whose decode raises inside the "forward"
        self.lock = threading.Lock()
        self.gate = threading.Event()  # every prefill waits for it (once logged): clear it to hold the engine
        self.gate.set()

    @property
    def free_slots(self):
        return len(self._free)

    def encode(self, text):
        return [ord(c) % VOCAB for c in text]

    def start(self, prompt, params, request_id=None, sparsity_mode=None):
        params.validate()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequest("prompt", "must contain at least one token")
        if len(ids) + params.max_new_tokens > self.max_seq:
            raise InvalidRequest(
                "max_new_tokens", f"={params.max_new_tokens} plus the prompt exceeds the context"
            )
        if sparsity_mode not in (None, "dense"):
            raise InvalidRequest("sparsity_mode", f"{sparsity_mode!r} needs sparse execution")
        return Sequence(ids, params, Decoder(), frozenset({1}), request_id, sparsity=SparsityTally())

    def _token(self, seq):
        return expected_token(seq.params.seed, len(seq.output_ids))

    def prefill_batch(self, seqs):
        """All or nothing, like the real engine: a failure leaves every slot free."""
        self.log.append(("prefill", tuple(s.request_id for s in seqs)))
        self.gate.wait()
        if any(s.request_id in self.fail_prefill for s in seqs):
            raise StepFailed("prefill", False, RuntimeError("injected prefill failure"))
        assert len(seqs) <= len(self._free)
        time.sleep(self.step_s)
        events = []
        for seq in seqs:
            seq.slot = self._free.pop()
            seq.sparsity.record_step(len(seq.prompt_ids))
            events.append(seq.append(self._token(seq)))
        for seq in seqs:
            if seq.finished:
                self.release(seq)
        return events

    def decode_step(self, seqs):
        self.log.append(("decode", tuple(s.request_id for s in seqs)))
        for s in seqs:
            assert s.slot is not None and not s.finished
        if any(s.request_id in self.fail_decode for s in seqs):
            raise StepFailed("decode", False, RuntimeError("injected decode failure"))  # nothing committed
        time.sleep(self.step_s)
        events = []
        for s in seqs:
            s.sparsity.record_step(1)
            events.append(s.append(self._token(s)))
        for s in seqs:
            if s.finished:
                self.release(s)
        return events

    def release(self, seq):
        if seq.slot is not None:
            self._free.append(seq.slot)
            seq.slot = None
            self.released.append(seq.request_id)


def request(rid, n=5, seed=None, prompt="hello", deadline=None, mode=None, stream=True, interval=1):
    seed = seed if seed is not None else hash(rid) % 1000
    params = SamplingParams(max_new_tokens=n, seed=seed, ignore_eos=True)
    return BatchRequest(prompt, params, rid, mode, deadline, stream, interval)


async def collect(ticket):
    chunks, final = [], None
    async for item in ticket:
        if isinstance(item, TokenChunk):
            chunks.append(item)
        else:
            final = item
            if final.last is not None:
                chunks.append(final.last)
    return [t for c in chunks for t in c.token_ids], final


@pytest.fixture
def make_batcher():
    made = []

    def make(engine=None, **limits):
        engine = engine or FakeEngine()
        b = Batcher(engine, Limits(**{"max_batch_size": 4, "max_queue": 8, **limits}))
        b.start()
        made.append(b)
        return b, engine

    yield make
    for b in made:
        b.close(timeout=5)


def test_requests_join_and_leave_between_steps(make_batcher):
    async def main():
        b, engine = make_batcher()
        long = await b.submit(request("long", n=30, seed=3))
        await asyncio.sleep(0.02)  # "long" is decoding alone by now
        shorts = [await b.submit(request(f"s{i}", n=6, seed=10 + i)) for i in range(3)]
        results = await asyncio.gather(collect(long), *(collect(t) for t in shorts))
        for (tokens, final), seed, n in zip(results, [3, 10, 11, 12], [30, 6, 6, 6], strict=True):
            assert tokens == [expected_token(seed, p) for p in range(n)]
            assert isinstance(final, Completion) and final.finish_reason == "length"
            assert final.completion_tokens == n and final.sparsity.tokens == 5 + n - 1
        sizes = [len(rids) for kind, rids in engine.log if kind == "decode"]
        assert max(sizes) == 4  # the shorts joined the running "long"
        assert sizes[-1] == 1  # ... and left before it finished
        # At most one (batched) prefill between two decode steps while anything is running.
        kinds = [kind for kind, _ in engine.log]
        first_decode = kinds.index("decode")
        assert "prefill,prefill" not in ",".join(kinds[first_decode:])

    asyncio.run(main())


def test_full_queue_is_refused_at_once(make_batcher):
    async def main():
        engine = FakeEngine(slots=1, step_s=0.01)
        b, _ = make_batcher(engine, max_batch_size=1, max_queue=2)
        tickets = [await b.submit(request("running", n=40))]
        while engine.free_slots:  # it holds the only slot: the next two wait in the queue
            await asyncio.sleep(0.001)
        tickets += [await b.submit(request(f"r{i}", n=20)) for i in range(2)]
        assert b.queued == 2
        t0 = time.perf_counter()
        with pytest.raises(ServingError) as err:
            await b.submit(request("one-too-many"))
        assert err.value.kind is ErrorKind.OVERLOADED and time.perf_counter() - t0 < 0.05
        for t in tickets:
            t.cancel()

    asyncio.run(main())


def test_cancel_frees_the_slot_within_one_step(make_batcher):
    async def main():
        b, engine = make_batcher(FakeEngine(step_s=0.005))
        keep = await b.submit(request("keep", n=40))
        gone = await b.submit(request("gone", n=40))
        seen = 0
        async for item in gone:
            seen += len(item.token_ids)
            if seen == 3:
                break
        n_before = len(engine.log)
        gone.cancel()
        await collect(keep)
        after = [rids for kind, rids in engine.log[n_before:] if kind == "decode"]
        # The step that may already have been running when cancel() was called can still include it;
        # no later step does.
        assert all("gone" not in rids for rids in after[1:])
        assert "gone" in engine.released

    asyncio.run(main())


def test_deadline_stops_work(make_batcher):
    async def main():
        b, engine = make_batcher(FakeEngine(step_s=0.005))
        t = await b.submit(request("late", n=60, deadline=time.monotonic() + 0.05))
        with pytest.raises(ServingError) as err:
            await collect(t)
        assert err.value.kind is ErrorKind.DEADLINE
        decodes = [rids for kind, rids in engine.log if kind == "decode"]
        assert 0 < len(decodes) < 59 and "late" in engine.released

    asyncio.run(main())


def test_engine_failures_fail_only_the_affected_request(make_batcher):
    async def main():
        b, engine = make_batcher()
        engine.fail_prefill.add("bad-prefill")
        ok1 = await b.submit(request("ok1", n=8, seed=1))
        bad1 = await b.submit(request("bad-prefill", n=8))
        ok2 = await b.submit(request("ok2", n=8, seed=2))
        bad2 = await b.submit(request("bad-decode", n=8))
        engine.fail_decode.add("bad-decode")
        results = await asyncio.gather(*(collect(t) for t in (ok1, bad1, ok2, bad2)), return_exceptions=True)
        assert results[0][0] == [expected_token(1, p) for p in range(8)]
        assert results[2][0] == [expected_token(2, p) for p in range(8)]
        for r in (results[1], results[3]):
            assert isinstance(r, ServingError) and r.kind is ErrorKind.INTERNAL
        # Serving continues, and every slot came back.
        tokens, _ = await collect(await b.submit(request("after", n=3, seed=4)))
        assert tokens == [expected_token(4, p) for p in range(3)]
        assert engine.free_slots == 4

    asyncio.run(main())


@pytest.mark.parametrize(
    ("req", "limits", "field"),
    [
        (request("a", n=600), {}, "max_new_tokens"),
        (request("a", n=0), {}, "max_new_tokens"),
        (request("a", prompt=""), {}, "prompt"),
        (request("a", prompt="x" * 20), {"max_prompt_tokens": 10}, "prompt"),
        (request("a", prompt="x" * 20, n=20), {"max_total_tokens": 30}, "max_new_tokens"),
        (request("a", mode="oracle"), {}, "sparsity_mode"),
    ],
)
def test_invalid_requests_name_the_field(make_batcher, req, limits, field):
    async def main():
        b, _ = make_batcher(**limits)
        with pytest.raises(ServingError) as err:
            await b.submit(req)
        assert err.value.kind is ErrorKind.INVALID and err.value.field == field

    asyncio.run(main())


def test_close_finishes_running_then_cancels_past_grace(make_batcher):
    async def main():
        b, _ = make_batcher(FakeEngine(slots=1, step_s=0.005), max_batch_size=1)
        tokens, _ = await collect(await b.submit(request("quick", n=3, seed=5)))
        assert tokens == [expected_token(5, p) for p in range(3)]
        slow = await b.submit(request("slow", n=60))
        waiting = await b.submit(request("waiting", n=3))
        await asyncio.sleep(0.03)
        t0 = time.monotonic()
        await asyncio.to_thread(b.close, 0.02, 5)
        assert time.monotonic() - t0 < 1.0
        tokens, final = await collect(slow)
        assert final.finish_reason == "cancelled" and 0 < len(tokens) < 60
        with pytest.raises(ServingError) as err:
            await collect(waiting)
        assert err.value.kind is ErrorKind.UNAVAILABLE
        with pytest.raises(ServingError) as err:
            await b.submit(request("late"))
        assert err.value.kind is ErrorKind.UNAVAILABLE

    asyncio.run(main())


def test_close_returns_as_soon_as_the_drain_is_done(make_batcher):
    async def main():
        b, _ = make_batcher(FakeEngine(step_s=0.005))
        ticket = await b.submit(request("drain", n=10, seed=6))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await asyncio.to_thread(b.close, 30.0, 10)
        assert time.monotonic() - t0 < 2.0
        tokens, final = await collect(ticket)
        assert final.finish_reason == "length" and tokens == [expected_token(6, p) for p in range(10)]

    asyncio.run(main())


def test_token_budget_holds_requests_back_in_order(make_batcher):
    async def main():
        # Each request reserves 5 prompt + 15 new = 20 tokens; a budget of 30 admits one at a time.
        b, engine = make_batcher(FakeEngine(step_s=0.001), max_total_tokens=30)
        tickets = [await b.submit(request(f"t{i}", n=15, seed=i)) for i in range(3)]
        results = await asyncio.gather(*(collect(t) for t in tickets))
        for i, (tokens, _) in enumerate(results):
            assert tokens == [expected_token(i, p) for p in range(15)]
        assert max(len(rids) for kind, rids in engine.log if kind == "decode") == 1
        assert [rids[0] for kind, rids in engine.log if kind == "prefill"] == ["t0", "t1", "t2"]

    asyncio.run(main())


def test_a_burst_is_prefilled_together_within_the_prefill_token_cap(make_batcher):
    async def main():
        # Prompts of 5 tokens; at most 12 prefill tokens (padding included) -> two prompts per prefill.
        engine = FakeEngine(step_s=0.005)
        b, _ = make_batcher(engine, max_prefill_tokens=12)
        # The blocker (8 tokens: too long to share a prefill under the cap) busies the engine while the
        # burst arrives.
        engine.gate.clear()
        blocker = await b.submit(request("blocker", n=1, seed=9, prompt="x" * 8))
        while not engine.log:  # the blocker's prefill has begun, alone: the rest arrive while it runs
            await asyncio.sleep(0.001)
        tickets = [await b.submit(request(f"r{i}", n=4, seed=i)) for i in range(4)]
        engine.gate.set()
        results = await asyncio.gather(collect(blocker), *(collect(t) for t in tickets))
        for i, (tokens, final) in enumerate(results[1:]):
            assert tokens == [expected_token(i, p) for p in range(4)]
            assert final.sparsity.tokens == 5 + 3
        prefills = [rids for kind, rids in engine.log if kind == "prefill"]
        assert [len(rids) for rids in prefills[1:]] == [2, 2]
        assert [rid for rids in prefills for rid in rids] == ["blocker", "r0", "r1", "r2", "r3"]  # FIFO

    asyncio.run(main())


def test_a_failed_batched_prefill_is_retried_one_by_one(make_batcher):
    async def main():
        engine = FakeEngine(step_s=0.005)
        b, _ = make_batcher(engine)
        engine.fail_prefill.add("bad")
        engine.gate.clear()
        blocker = await b.submit(request("blocker", n=1, seed=9))
        while not engine.log:  # the blocker's prefill has begun, alone: the rest arrive while it runs
            await asyncio.sleep(0.001)
        tickets = [await b.submit(request(rid, n=3, seed=i)) for i, rid in enumerate(("a", "bad", "c"))]
        engine.gate.set()
        results = await asyncio.gather(
            collect(blocker), *(collect(t) for t in tickets), return_exceptions=True
        )
        assert results[1][0] == [expected_token(0, p) for p in range(3)]
        assert results[3][0] == [expected_token(2, p) for p in range(3)]
        assert isinstance(results[2], ServingError) and results[2].kind is ErrorKind.INTERNAL
        prefills = [rids for kind, rids in engine.log if kind == "prefill"]
        failed_at = next(i for i, rids in enumerate(prefills) if "bad" in rids)
        together = prefills[failed_at]
        assert len(together) > 1 and {"a", "bad", "c"} <= set(together)
        assert prefills[failed_at + 1 :] == [(rid,) for rid in together]  # then each alone, in order
        assert engine.free_slots == 4

    asyncio.run(main())


def test_a_unary_request_gets_all_its_tokens_with_the_completion_alone(make_batcher):
    async def main():
        b, _ = make_batcher(FakeEngine(step_s=0.002))
        streamed = await b.submit(request("streamed", n=6, seed=7))
        unary = await b.submit(request("unary", n=6, seed=7, stream=False))
        items = [item async for item in unary]
        assert len(items) == 1 and isinstance(items[0], Completion)  # one wake-up, not one per token
        final = items[0]
        expected = [expected_token(7, p) for p in range(6)]
        assert list(final.last.token_ids) == expected and final.completion_tokens == 6
        assert final.last.text == "".join(f"<{t}>" for t in expected)
        tokens, _ = await collect(streamed)  # the same request streamed: the same tokens
        assert tokens == expected

    asyncio.run(main())


def test_a_unary_request_cut_at_shutdown_keeps_its_tokens(make_batcher):
    async def main():
        b, _ = make_batcher(FakeEngine(slots=1, step_s=0.005), max_batch_size=1)
        ticket = await b.submit(request("slow", n=60, seed=3, stream=False))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(b.close, 0.0, 5)
        items = [item async for item in ticket]
        assert len(items) == 1 and items[0].finish_reason == "cancelled"
        got = list(items[0].last.token_ids)
        assert 0 < len(got) < 60 and got == [expected_token(3, p) for p in range(len(got))]
        assert items[0].completion_tokens == len(got)

    asyncio.run(main())


def test_a_stream_interval_sends_the_first_token_then_every_n_tokens(make_batcher):
    async def main():
        b, _ = make_batcher(FakeEngine(step_s=0.002))
        ticket = await b.submit(request("chunked", n=9, seed=5, interval=3))
        items = [item async for item in ticket]
        chunks, final = items[:-1], items[-1]
        # Tokens 1, 2-4, 5-7 as chunks; 8 is held and goes with the completion, which carries 9.
        assert [len(c.token_ids) for c in chunks] == [1, 3, 3]
        assert isinstance(final, Completion) and list(final.last.token_ids) == [
            expected_token(5, 7),
            expected_token(5, 8),
        ]
        expected = [expected_token(5, p) for p in range(9)]
        assert [t for c in chunks for t in c.token_ids] + list(final.last.token_ids) == expected
        assert "".join(c.text for c in chunks) + final.last.text == "".join(f"<{t}>" for t in expected)
        tokens, _ = await collect(await b.submit(request("each", n=9, seed=5)))  # interval 1: the same tokens
        assert tokens == expected

    asyncio.run(main())


def test_a_chunked_stream_gets_its_held_tokens_before_an_error(make_batcher):
    async def main():
        b, _ = make_batcher(FakeEngine(step_s=0.005))
        ticket = await b.submit(request("late", n=60, seed=6, deadline=time.monotonic() + 0.05, interval=100))
        got = []
        with pytest.raises(ServingError) as err:
            async for item in ticket:
                got.extend(item.token_ids)
        assert err.value.kind is ErrorKind.DEADLINE
        # The first token at once, then everything sampled before the deadline, none lost in the holding.
        assert len(got) > 1 and got == [expected_token(6, p) for p in range(len(got))]

    asyncio.run(main())
