"""A tiny model and tokenizer that honour the model contract, for testing the generation loop alone.

``FakeModel`` computes each position's logits from the whole token history of its row, so the loop only
reproduces a no-cache forward if it feeds the right tokens into the right cache slots at the right
positions. It keeps its "cache" (the history) per slot and trusts ``cache.lengths`` the way a real KV
cache does: positions at or beyond ``lengths[slot]`` are stale. ``ScriptedModel`` emits a fixed token
script, for testing stop strings and EOS. ``ByteTokenizer`` is byte-level (token id = byte), so multi-byte
characters span several tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

BOS, EOS = 256, 257
VOCAB = 260


class ByteTokenizer:
    eos_token_ids = frozenset({EOS})
    bos_token_id = BOS

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([BOS] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def fake_config(max_positions: int = 128) -> SimpleNamespace:
    # The fields KVCache reads (tiny, the fake model keeps its own history) plus those the generator reads.
    return SimpleNamespace(
        vocab_size=VOCAB,
        max_position_embeddings=max_positions,
        eos_token_ids=(EOS,),
        num_layers=1,
        num_kv_heads=1,
        head_dim=1,
    )


class _HistoryModel(torch.nn.Module):
    def __init__(self, max_positions: int) -> None:
        super().__init__()
        self.config = fake_config(max_positions)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the generator a dtype and device
        self.history: dict[int, list[int]] = {}
        self.calls: list[tuple[int, int]] = []  # (B, T) of every forward, to check batching

    def row_logits(self, full: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens, cache=None, slots=None, last_only=False, step=None):
        lengths = torch.tensor(step.lengths) if step is not None and step.lengths is not None else None
        batch, steps = tokens.shape
        self.calls.append((batch, steps))
        rows = []
        for b in range(batch):
            if cache is None:
                past: list[int] = []
            else:
                slot, start = int(slots[b]), int(cache.lengths[slots[b]])
                past = self.history.get(slot, [])[:start]
                assert len(past) == start, "cache length claims positions that were never written"
            real = steps if lengths is None else int(lengths[b])  # right padding past ``real``
            new = tokens[b].tolist()[:real]
            logits = [self.row_logits(past + new[: t + 1]) for t in range(real)]
            if cache is not None:
                self.history[slot] = past + new
            rows.append(torch.stack(logits[-1:] if last_only else logits))
        if cache is not None:
            cache.advance(slots.tolist(), steps if lengths is None else lengths.tolist())
        return torch.stack(rows)  # (B, T or 1, V)


class FakeModel(_HistoryModel):
    """Logits depend on the last token, the position and the mean embedding of the whole prefix."""

    def __init__(self, max_positions: int = 128, seed: int = 0) -> None:
        super().__init__(max_positions)
        g = torch.Generator().manual_seed(seed)
        self.last = torch.randn(VOCAB, VOCAB, generator=g) * 3
        self.pos = torch.randn(max_positions, VOCAB, generator=g)
        self.ctx = torch.randn(VOCAB, VOCAB, generator=g) * 2

    def row_logits(self, full: list[int]) -> torch.Tensor:
        ids = torch.tensor(full)
        return self.last[full[-1]] + self.pos[len(full) - 1] + self.ctx[ids].mean(0)


class ScriptedModel(_HistoryModel):
    """After a prompt of ``prompt_len`` tokens, emits ``script`` token by token, then EOS."""

    def __init__(self, script: list[int], prompt_len: int, max_positions: int = 128) -> None:
        super().__init__(max_positions)
        self.script, self.prompt_len = list(script), prompt_len

    def row_logits(self, full: list[int]) -> torch.Tensor:
        i = len(full) - self.prompt_len
        token = self.script[i] if 0 <= i < len(self.script) else EOS
        return torch.nn.functional.one_hot(torch.tensor(token), VOCAB).float() * 10


def naive_greedy(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos: int | None
) -> list[int]:
    """The oracle: a full no-cache forward per token, argmax, stop at EOS."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out
