"""Autoregressive generation over a KV cache: a step-level core plus thin loops on top.

The core is three calls a batcher can drive: ``start`` (validate + tokenize into a ``Sequence``),
``prefill_batch`` (run prompts, each into its own cache slot, in one right-padded forward, and sample
their first tokens; ``prefill`` for one) and ``decode_step`` (one batched forward over any set of live
sequences, each at its own length). Sequences give their slot back as soon as they finish.
``generate_stream``, ``generate`` and ``generate_batch`` are loops over it.

Context length: a request whose prompt plus ``max_new_tokens`` exceeds the generator's ``max_seq`` is
rejected with a ``ValueError`` naming ``max_new_tokens`` instead of being silently shortened, so a caller
always gets the budget it asked for or an error it can act on.

Sparsity: with a ``SparseRuntime`` (``engine.modes``) installed, every request runs in its own sparsity mode
(``start(..., sparsity_mode=)``, default the runtime's); without one every request runs dense. Either way each
step's FFN work is counted into ``seq.sparsity`` (see ``engine.accounting``).

A ``Engine`` is not thread-safe: one thread (the CLI, or the server's batcher loop) drives it.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch

from sparseinfer.engine.accounting import SparsityTally
from sparseinfer.engine.errors import InvalidRequest, RequestFailed, StepFailed
from sparseinfer.engine.modes import SparseRuntime, validate_mode
from sparseinfer.engine.placement import neuron_bytes
from sparseinfer.engine.sampling import SamplingParams, sample_batch_scored
from sparseinfer.engine.sequence import GenerationEvent, GenerationResult, Sequence, StepOutcome
from sparseinfer.model.kv_cache import CacheFullError, KVCache
from sparseinfer.model.step import ForwardStep, SparsityMode
from sparseinfer.model.tokenizer import IncrementalDecoder, Tokenizer

Prompt = str | SequenceABC[int]


class Engine:
    """Generates text with ``model`` into a KV cache of ``max_batch`` slots of ``max_seq`` positions.

    ``max_seq`` defaults to (and is capped at) the model's context length. ``cache`` lets a caller supply
    a pre-built cache instead (it must have at least ``max_batch`` slots of ``max_seq`` positions).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        max_batch: int = 1,
        max_seq: int | None = None,
        cache: KVCache | None = None,
        sparsity: SparseRuntime | None = None,
    ) -> None:
        if max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {max_batch}")
        context = int(model.config.max_position_embeddings)
        if max_seq is not None and max_seq <= 0:
            raise ValueError(f"max_seq must be > 0, got {max_seq}")
        self.model = model
        self.sparsity = sparsity
        # Per-layer FFN width and bytes per neuron, for the per-request accounting (none for a model without
        # the decoder's FFN layout, e.g. the generation loop's test doubles).
        self._layer_neurons: tuple[int, ...] = ()
        self._neuron_bytes: tuple[int, ...] = ()
        if sparsity is not None:
            self._layer_neurons, self._neuron_bytes = sparsity.layer_neurons, sparsity.neuron_bytes
        elif hasattr(model, "layers") and hasattr(model.config, "intermediate_size"):
            L = len(model.layers)
            self._layer_neurons = (int(model.config.intermediate_size),) * L
            self._neuron_bytes = (neuron_bytes(model),) * L
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq = min(max_seq, context) if max_seq is not None else context
        weight = next(model.parameters())
        self.device = weight.device
        self.cache = (
            cache
            if cache is not None
            else KVCache(model.config, max_batch, self.max_seq, dtype=weight.dtype, device=self.device)
        )
        if cache is not None:
            self.max_seq = min(self.max_seq, cache.max_seq)
        # EOS ids from both the tokenizer and config.json: checkpoints disagree on which lists them all.
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(model.config.eos_token_ids)

    # ---- step-level core -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """``text``'s prompt token ids with the checkpoint's BOS convention (as ``start`` encodes text)."""
        return self.tokenizer.encode(text)

    @property
    def max_bytes_per_token(self) -> int:
        """No token stands for more UTF-8 bytes of text than this (``Tokenizer.max_bytes_per_token``)."""
        return self.tokenizer.max_bytes_per_token

    def start(
        self, prompt: Prompt, params: SamplingParams, request_id: Any = None, sparsity_mode: str | None = None
    ) -> Sequence:
        """Validate ``params``, tokenize ``prompt`` and check it fits; no compute yet.

        Text is encoded with the checkpoint's own BOS convention; token ids are used as given.
        ``sparsity_mode`` ("dense" | "oracle" | "predicted") overrides the generator's default for this
        request; a mode this generator cannot run (no sparse runtime, or its sidecar section missing) raises
        here.
        """
        params.validate()
        mode = self._mode(sparsity_mode)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequest("prompt", "must contain at least one token")
        vocab = int(self.model.config.vocab_size)
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest("prompt", f"token ids must be in [0, {vocab})")
        if len(ids) >= self.max_seq:
            raise InvalidRequest("prompt", f"has {len(ids)} tokens but the context length is {self.max_seq}")
        if len(ids) + params.max_new_tokens > self.max_seq:
            raise InvalidRequest(
                "max_new_tokens",
                f"({params.max_new_tokens}) plus the prompt's {len(ids)} tokens exceeds the context length "
                f"{self.max_seq}; lower max_new_tokens to at most {self.max_seq - len(ids)}",
            )
        decoder = IncrementalDecoder(self.tokenizer, ids)
        tally = SparsityTally(mode, self._layer_neurons, self._neuron_bytes)
        return Sequence(ids, params, decoder, self.eos_token_ids, request_id, sparsity=tally)

    def _mode(self, requested: str | None) -> str:
        if self.sparsity is not None:
            return self.sparsity.check_mode(requested if requested is not None else self.sparsity.config.mode)
        mode = validate_mode(requested if requested is not None else SparsityMode.DENSE)
        if mode != SparsityMode.DENSE:
            raise InvalidRequest(
                "sparsity_mode",
                f"{mode!r} needs sparse execution, but this generator runs the model dense "
                "(build it with a SparseRuntime, e.g. `sparseinfer generate --sparsity oracle`)",
            )
        return mode

    def _forward(
        self,
        seqs: SequenceABC[Sequence],
        tokens: torch.Tensor,
        slots: torch.Tensor,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """The model forward of one step, with each row's sparsity mode and the step's accounting.

        ``lengths``: each row's real tokens when ``tokens`` (B, T) is right-padded; None: all T are real.
        Returns the logits after each row's last real token, (B, 1, V). The rows' tallies advance only
        once the forward has completed (a forward that raises leaves them as they were)."""
        T = tokens.shape[1]
        padded = lengths is not None and min(lengths) < T
        modes = [s.sparsity.mode for s in seqs]
        rows = lengths if padded else None
        step = self.sparsity.step(modes, rows) if self.sparsity is not None else ForwardStep.of(modes, rows)
        logits = self.model(tokens, cache=self.cache, slots=slots, last_only=True, step=step)
        step.commit([s.sparsity for s in seqs], T)
        return logits

    @property
    def free_slots(self) -> int:
        return self.cache.num_free

    def prefill(self, seq: Sequence) -> GenerationEvent:
        """Take a cache slot for ``seq``, run its whole prompt and sample its first token (raises
        ``RequestFailed`` where ``prefill_batch`` would return it)."""
        (outcome,) = self.prefill_batch([seq])
        return _event(outcome)

    @torch.inference_mode()
    def prefill_batch(self, seqs: SequenceABC[Sequence]) -> list[StepOutcome]:
        """Prefill several sequences in one forward: the prompts right-padded to the longest, each row into
        its own cache slot; returns one first-token event per sequence.

        Each row computes only its own tokens (the padding selects no sparse neuron and is not counted), so
        a sequence's tokens and sparsity report are those it gets when prefilled alone. All or nothing: if
        anything raises, every slot is released and every tally is as it was, so the caller may retry
        the sequences (e.g. one at a time to find the one that fails).
        """
        if not seqs:
            return []
        for seq in seqs:
            if seq.slot is not None or seq.prefilled or seq.finished:
                raise RuntimeError(f"sequence {seq.request_id!r} was already prefilled")
        if len(seqs) > self.cache.num_free:
            free = self.cache.num_free
            raise CacheFullError(f"{len(seqs)} prompts to prefill but {free} free KV-cache slots")
        tallies = [copy.deepcopy(s.sparsity) for s in seqs]
        try:
            for seq in seqs:
                seq.slot = self.cache.allocate()
            lengths = [len(s.prompt_ids) for s in seqs]
            T = max(lengths)
            # Any valid id pads: the padding's outputs are never read and its keys/values never attended.
            rows = [s.prompt_ids + [0] * (T - n) for s, n in zip(seqs, lengths, strict=True)]
            tokens = torch.tensor(rows, dtype=torch.long, device=self.device)  # (B, T)
            slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)  # (B,)
            logits = self._forward(seqs, tokens, slots, lengths)  # (B, 1, V)
        except BaseException as e:
            for seq, tally in zip(seqs, tallies, strict=True):
                self.release(seq)
                seq.sparsity = tally
            if isinstance(e, Exception):
                raise StepFailed("prefill", committed=False, cause=e) from e
            raise
        return self._sample(seqs, logits, "prefill")

    @torch.inference_mode()
    def decode_step(self, seqs: SequenceABC[Sequence]) -> list[StepOutcome]:
        """One batched forward feeding each sequence its last token; returns one event per sequence.

        The sequences may be at different lengths: each row attends over its own slot's cache.
        """
        if not seqs:
            return []
        for seq in seqs:
            if seq.slot is None or seq.finished:
                raise RuntimeError(f"sequence {seq.request_id!r} is not live (prefill it first)")
        tokens = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=self.device)  # (B, 1)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)  # (B,)
        try:
            logits = self._forward(seqs, tokens, slots)  # (B, 1, V)
        except Exception as e:  # the cache lengths and tallies advance only once the forward is done
            raise StepFailed("decode", committed=False, cause=e) from e
        return self._sample(seqs, logits, "decode")

    def _sample(self, seqs: SequenceABC[Sequence], logits: torch.Tensor, kind: str) -> list[StepOutcome]:
        """Sample each row's token after a committed forward and turn it into the row's outcome: its event,
        or ``RequestFailed`` for a row that failed alone (its sequence ends, its slot is freed)."""
        try:
            picked = sample_batch_scored(logits[:, -1, :], [s.sampler for s in seqs])
        except BaseException as e:
            for seq in seqs:
                self.release(seq)
            if isinstance(e, Exception):
                raise StepFailed(kind, committed=True, cause=e) from e
            raise
        outcomes: list[StepOutcome] = []
        for seq, choice in zip(seqs, picked, strict=True):
            if not isinstance(choice, Exception):
                try:
                    outcomes.append(seq.append(*choice))
                    continue
                except Exception as e:  # e.g. its detokenizer: this row's own failure
                    choice = e
            failure = RequestFailed(seq.request_id, f"{kind} failed for this request: {choice}")
            failure.__cause__ = choice
            seq.fail(failure)
            outcomes.append(failure)
        for seq in seqs:
            if seq.finished:
                self.release(seq)
        return outcomes

    def release(self, seq: Sequence) -> None:
        """Give ``seq``'s cache slot back (idempotent); a batcher calls this for cancelled requests."""
        if seq.slot is not None:
            self.cache.free(seq.slot)
            seq.slot = None

    # ---- loops -----------------------------------------------------------------------------------------

    def generate_stream(
        self, prompt: Prompt, params: SamplingParams, sparsity_mode: str | None = None
    ) -> Iterator[GenerationEvent]:
        """Stream one request's events; the last has ``finish_reason`` and ``stats``.

        Invalid params or prompts raise here, at the call, not at the first ``next()``. Closing the
        iterator early releases the cache slot.
        """
        return self._drive_one(self.start(prompt, params, sparsity_mode=sparsity_mode))

    def generate(
        self, prompt: Prompt, params: SamplingParams, sparsity_mode: str | None = None
    ) -> GenerationResult:
        """Run one request to completion."""
        seq = self.start(prompt, params, sparsity_mode=sparsity_mode)
        return GenerationResult.collect(self._drive_one(seq), seq.seed)

    def stream(self, seq: Sequence) -> Iterator[GenerationEvent]:
        """Stream the events of a sequence from ``start`` (prefill, then decode steps until it finishes);
        closing the iterator early releases the cache slot."""
        return self._drive_one(seq)

    def _drive_one(self, seq: Sequence) -> Iterator[GenerationEvent]:
        try:
            yield self.prefill(seq)
            while not seq.finished:
                (outcome,) = self.decode_step([seq])
                yield _event(outcome)
        finally:
            self.release(seq)

    def generate_batch(
        self,
        prompts: SequenceABC[Prompt],
        params: SamplingParams | SequenceABC[SamplingParams],
        sparsity_modes: SequenceABC[str | None] | None = None,
    ) -> list[GenerationResult]:
        """Run requests together: decode steps are batched over all live sequences.

        Up to ``max_batch`` run at once; waiting requests are prefilled together as soon as slots free up
        (the same admit-then-step loop the server's continuous batcher runs). ``params`` is one value for all
        or one per prompt; ``sparsity_modes`` one mode (or None: the default) per prompt. Results come back
        in prompt order.
        """
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        modes = list(sparsity_modes) if sparsity_modes is not None else [None] * len(prompts)
        if len(modes) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(modes)} sparsity_modes")
        # Validate everything before any compute so one bad request cannot leave others half-done.
        seqs = [
            self.start(p, sp, request_id=i, sparsity_mode=mo)
            for i, (p, sp, mo) in enumerate(zip(prompts, params_list, modes, strict=True))
        ]
        events: list[list[GenerationEvent]] = [[] for _ in seqs]
        waiting = deque(seqs)
        running: list[Sequence] = []
        try:
            while waiting or running:
                admitted = [waiting.popleft() for _ in range(min(len(waiting), self.free_slots))]
                for seq, outcome in zip(admitted, self.prefill_batch(admitted), strict=True):
                    events[seq.request_id].append(_event(outcome))
                    if not seq.finished:
                        running.append(seq)
                if running:
                    for seq, outcome in zip(running, self.decode_step(running), strict=True):
                        events[seq.request_id].append(_event(outcome))
                    running = [s for s in running if not s.finished]
        finally:
            for seq in seqs:
                self.release(seq)
        return [GenerationResult.collect(ev, seq.seed) for ev, seq in zip(events, seqs, strict=True)]


def _event(outcome: StepOutcome) -> GenerationEvent:
    """A step's outcome for a caller that runs requests to completion: a failed request raises."""
    if isinstance(outcome, RequestFailed):
        raise outcome
    return outcome
