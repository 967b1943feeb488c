"""Sampling parameters and the per-request token sampler.

Every request carries its own ``SamplingParams`` and its own ``torch.Generator`` seeded from the request
seed, and a batch of logits is processed row by row with each row's own parameters. A request therefore
draws the same tokens whether it runs alone or batched with others (given the same logits), which is what
makes a seed meaningful behind a continuous batcher.

Logits are processed in the order Hugging Face ``generate`` uses: repetition penalty, temperature, top-k,
top-p; then greedy argmax (temperature 0) or one multinomial draw.

Log-probabilities (``SamplingParams.logprobs``): the natural log of the probability the token was drawn
with, i.e. ``log_softmax`` of the processed logits at that token. Greedy decoding draws from no
distribution, so for it the value is ``log_softmax`` of the penalised raw logits (temperature 1, no
filters): the model's own probability of the token after the repetition penalty. They are computed after
the token is chosen and only for requests that ask, so they never change tokens and cost nothing otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparseinfer.engine.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature=0`` is greedy (top_k/top_p are then irrelevant); ``top_k=0`` and ``top_p=1.0`` are off;
    ``repetition_penalty=1.0`` is off and otherwise follows HF: logits of tokens seen in prompt or output
    are divided by it when positive and multiplied by it when negative. ``seed=None`` draws a fresh seed.
    ``stop`` strings end generation when they appear in the decoded text (they are not emitted).
    ``logprobs`` makes every generated token carry its log-probability (see the module docstring).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int | None = None) -> SamplingParams:
        """Raise ``InvalidRequest`` naming the offending field; return self so calls can be chained.

        The one place the sampling rules live: the server maps ``InvalidRequest.field`` to the field's
        path on the wire. Every value accepted here is computable by ``process_logits``.
        """

        def bad(name: str, detail: str) -> InvalidRequest:
            return InvalidRequest(name, detail)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise bad("max_new_tokens", f"must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens <= 0:
            raise bad("max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise bad("max_new_tokens", f"must be <= {max_new_tokens_limit}, got {self.max_new_tokens}")
        # `not (x >= 0)` rather than `x < 0` so that NaN is rejected too.
        if not (self.temperature >= 0.0) or math.isinf(self.temperature):
            raise bad("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0.0) or math.isinf(self.repetition_penalty):
            raise bad("repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty:g}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64
        ):
            raise bad("seed", f"must be an int in [0, 2**64) or None, got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise bad("stop", f"must be a tuple of strings, got {self.stop!r}")
        for i, stop in enumerate(self.stop):
            if stop == "":
                raise bad(f"stop[{i}]", "must be a non-empty string")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", f"must be a bool, got {self.logprobs!r}")
        return self


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Apply repetition penalty → temperature → top-k → top-p to fp32 logits ``(V,)`` or ``(B, V)``.

    ``seen`` is a bool mask shaped like ``logits`` (tokens in prompt + output) or None when the penalty
    is off. Filtered entries become ``-inf``. With temperature 0 only the penalty applies (greedy argmax
    is invariant to the rest). Returns a new tensor; the input is not modified.

    Every value ``SamplingParams.validate`` accepts is computable here, whatever fp32 can represent: the
    penalty and temperature are clamped into fp32's normal range (a penalty or temperature beyond it gives
    the same order and, to fp32 precision, the same distribution), and every intermediate is clamped to
    ±fp32 max, so finite logits stay finite: no +inf, no NaN, and a row keeps at least one finite entry
    (top-k and top-p always keep the most likely token).
    """
    out = logits.float()
    top, tiny = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny
    if params.repetition_penalty != 1.0 and seen is not None:
        penalty = min(max(params.repetition_penalty, tiny), top)
        penalized = torch.where(out < 0, out * penalty, out / penalty)
        out = torch.where(seen, penalized, out).clamp(-top, top)
    if params.greedy:
        return out if out is not logits else out.clone()
    if params.temperature != 1.0:
        out = (out / min(max(params.temperature, tiny), top)).clamp(-top, top)
    if 0 < params.top_k < out.shape[-1]:
        # Keep everything tied with the k-th largest, as HF does, so the result does not depend on sort order.
        kth = torch.topk(out, params.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if params.top_p < 1.0:
        out = _top_p(out, params.top_p)
    return out if out is not logits else out.clone()


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # Sorted ascending, a token is dropped when the probability mass at or below it is <= 1 - top_p, i.e.
    # the remaining (larger) tokens already cover top_p. The most likely token always survives.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def fresh_seed() -> int:
    """A seed from OS entropy; never touches torch's global RNG (other requests may depend on it)."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class RequestSampler:
    """Sampling state of one request: its params, its own RNG and the set of tokens it has seen."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else fresh_seed()
        self._generator: torch.Generator | None = None
        # Seen tokens are only tracked when the penalty needs them; kept as ids until the vocab size and
        # device are known from the first logits row, then as a bool mask updated in place.
        self._pending_ids: list[int] = list(prompt_ids) if params.repetition_penalty != 1.0 else []
        self._seen: torch.Tensor | None = None

    @property
    def needs_processing(self) -> bool:
        """False when plain argmax of the raw logits is the answer (the batched fast path)."""
        return not self.params.greedy or self.params.repetition_penalty != 1.0

    def observe(self, token_id: int) -> None:
        """Record a generated token (for the repetition penalty)."""
        if self.params.repetition_penalty == 1.0:
            return
        if self._seen is None:
            self._pending_ids.append(token_id)
        else:
            self._seen[token_id] = True

    def _seen_mask(self, row: torch.Tensor) -> torch.Tensor | None:
        if self.params.repetition_penalty == 1.0:
            return None
        if self._seen is None:
            self._seen = torch.zeros(row.shape[-1], dtype=torch.bool, device=row.device)
            if self._pending_ids:
                ids = torch.tensor(self._pending_ids, dtype=torch.long, device=row.device)
                # Ids beyond the logits width (an embedding larger than lm_head) can never be sampled.
                self._seen[ids[ids < row.shape[-1]]] = True
            self._pending_ids = []
        return self._seen

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def sample_row(self, row: torch.Tensor) -> int:
        """Pick the next token from one row of logits ``(V,)``."""
        return self.pick(row)[0]

    def pick(self, row: torch.Tensor) -> tuple[int, float | None]:
        """The next token from one row of logits ``(V,)`` and, when requested, its log-probability."""
        processed = process_logits(row, self.params, self._seen_mask(row))  # (V,) fp32
        if self.params.greedy:
            token = int(processed.argmax())
        else:
            probs = processed.softmax(dim=-1)  # (V,)
            token = int(torch.multinomial(probs, 1, generator=self._rng(row.device)))
        return token, token_logprob(processed, token) if self.params.logprobs else None


def token_logprob(row: torch.Tensor, token: int) -> float:
    """``log_softmax(row)[token]`` in fp32 for one row of logits ``(V,)`` (-inf entries are filtered out)."""
    return float(torch.log_softmax(row.float(), dim=-1)[token])


class UnsampleableRow(ValueError):
    """A row of logits no distribution can be drawn from: it holds NaN or +inf, or no finite entry."""


def sample_batch(logits: torch.Tensor, samplers: Sequence[RequestSampler]) -> list[int]:
    """Next token for each row of ``logits`` ``(B, V)``, row b using ``samplers[b]``; raises the first row's
    failure if any row fails."""
    tokens = []
    for picked in sample_batch_scored(logits, samplers):
        if isinstance(picked, Exception):
            raise picked
        tokens.append(picked[0])
    return tokens


def sample_batch_scored(
    logits: torch.Tensor, samplers: Sequence[RequestSampler]
) -> list[tuple[int, float | None] | Exception]:
    """(token, log-probability or None) for each row of ``logits`` ``(B, V)``, row b using ``samplers[b]``.

    Plain greedy rows share one batched argmax; every other row is processed alone with its own params
    and RNG, so no row's result depends on the others. A log-probability is computed from its own row
    only, and only for a request that asked for it. A row that cannot be sampled (``UnsampleableRow``),
    or whose sampler raises, gets the exception in its place; the other rows are unaffected.
    """
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"expected logits (B={len(samplers)}, V), got {tuple(logits.shape)}")
    # A NaN or +inf anywhere in a row, or no finite value at all, and no distribution can be drawn from it.
    # A finite row sum proves every entry finite: one reduction and one host sync for the usual batch (the
    # full test took 170 us per 32000-token row, 1% of a decode step); rows whose sum is not finite (-inf
    # entries, or an overflow) get the full test.
    sane = logits.sum(-1, dtype=torch.float32).isfinite().tolist()  # (B,)
    if not all(sane):
        sane = (~(logits.isnan() | logits.isposinf()).any(-1) & logits.isfinite().any(-1)).tolist()  # (B,)
    tokens = [0] * len(samplers)
    plain = [b for b, s in enumerate(samplers) if not s.needs_processing]
    if plain:
        picked = logits[plain].argmax(dim=-1).tolist() if len(plain) < len(samplers) else None
        if picked is None:
            picked = logits.argmax(dim=-1).tolist()
        for b, token in zip(plain, picked, strict=True):
            tokens[b] = token
    scored: list[tuple[int, float | None] | Exception] = []
    for b, sampler in enumerate(samplers):
        if not sane[b]:
            scored.append(UnsampleableRow("the model's logits for this request are not finite"))
            continue
        try:
            if sampler.needs_processing:
                scored.append(sampler.pick(logits[b]))
            elif sampler.params.logprobs:  # plain greedy: the processed logits are the raw ones
                scored.append((tokens[b], token_logprob(logits[b], tokens[b])))
            else:
                scored.append((tokens[b], None))
        except Exception as e:  # this row's own failure: it must not take its batch-mates with it
            scored.append(e)
    return scored
