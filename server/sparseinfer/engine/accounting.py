"""Per-request sparsity accounting: what each request's FFNs computed, where, and how much it read.

The engine fills a ``SparsityTally`` (one per ``Sequence``, ``seq.sparsity``) at every prefill and decode
step; the server reads ``seq.sparsity.report()`` and returns it to the caller. Counting rules:

- Every token whose FFNs ran counts: all prompt tokens at prefill, one token per decode step.
- "Computed" neurons are the request's OWN active set (its rows of the batch's row mask), not the batch's
  union, so a request's numbers never depend on its batch-mates. In dense mode every neuron is computed.
- Bytes are counted per step (a step reads each needed weight row once, however many of the request's
  tokens use it): ``ffn_bytes_read`` sums, over steps and layers, the union of the request's rows' active
  sets times the bytes of one neuron (its gate/up row and its down-projection column); ``ffn_bytes_dense``
  is what a dense FFN reads for the same steps (every neuron of every layer once per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparseinfer.model.step import MODES, SparsityMode


@dataclass(frozen=True)
class LayerSparsity:
    """One layer's numbers for one request."""

    # Mean over this request's counted tokens of (neurons selected for the token / m).
    predicted_active_share: float
    # Mean over the measured tokens of the share truly active (|h_i|·‖W_out[:,i]‖ > ε_l); None if unmeasured.
    true_active_share: float | None
    # Truly-active neurons that were computed / truly-active neurons (over the measured tokens); None if
    # unmeasured; 1.0 when measured and nothing was truly active (nothing was missed).
    recall: float | None


@dataclass(frozen=True)
class SparsityReport:
    """How sparse one request ran (the server returns this; see the module docstring for counting rules)."""

    mode: str  # a SparsityMode
    tokens: int  # tokens whose FFNs were counted (prompt + generated)
    computed_share: float  # neurons computed for this request / neurons a dense FFN computes (all layers)
    layers: tuple[LayerSparsity, ...]
    hot_share: float  # of this request's computed neurons, the share served by the hot (GPU) tier
    cold_share: float  # ... by the cold (CPU) tier (hot_share + cold_share == 1 when any computed)
    ffn_bytes_read: int  # FFN weight bytes this request's own active set needs (what it reads alone)
    ffn_bytes_dense: int  # FFN weight bytes a dense FFN reads for the same tokens


@dataclass
class _LayerCounts:
    tokens: int = 0  # tokens counted at this layer
    selected: int = 0  # Σ over tokens of neurons computed for the token
    measured_tokens: int = 0  # tokens whose true active set was measured
    truly_active: int = 0  # Σ over measured tokens of truly-active neurons
    truly_computed: int = 0  # Σ over measured tokens of truly-active neurons that were computed


@dataclass
class SparsityTally:
    """Mutable per-request accumulator; the engine records into it, ``report()`` freezes a snapshot.

    ``layer_neurons[l]`` is layer l's FFN width m_l and ``neuron_bytes[l]`` the weight bytes of one of its
    neurons; both are set by the engine when it creates the sequence (a bare ``SparsityTally()`` is an empty
    dense tally, so a ``Sequence`` built outside a ``Engine`` still has one).
    """

    mode: str = SparsityMode.DENSE
    layer_neurons: tuple[int, ...] = ()
    neuron_bytes: tuple[int, ...] = ()
    tokens: int = 0
    hot: int = 0  # Σ over tokens and layers of computed neurons served by the hot tier
    cold: int = 0  # ... by the cold tier
    bytes_read: int = 0
    bytes_dense: int = 0
    _layers: list[_LayerCounts] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sparsity mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if len(self.layer_neurons) != len(self.neuron_bytes):
            raise ValueError("layer_neurons and neuron_bytes must have one entry per layer")
        self._layers = [_LayerCounts() for _ in self.layer_neurons]

    def record_step(self, tokens: int) -> None:
        """Count one forward step of ``tokens`` of this request's tokens (the dense reference reads every
        layer's weights once per step)."""
        if tokens <= 0:
            raise ValueError(f"tokens must be > 0, got {tokens}")
        self.tokens += tokens
        self.bytes_dense += sum(m * b for m, b in zip(self.layer_neurons, self.neuron_bytes, strict=True))

    def record_layer(
        self,
        layer: int,
        tokens: int,
        selected: int,
        hot: int,
        union: int,
        truly_active: int | None = None,
        truly_computed: int | None = None,
    ) -> None:
        """Record layer ``layer`` of one step for this request.

        ``selected``: Σ over the request's ``tokens`` of neurons computed for each; ``hot``: how many of
        those the hot tier served; ``union``: neurons computed for at least one of the request's tokens
        (what the step reads for it); ``truly_active`` / ``truly_computed``: Σ over the tokens of
        truly-active neurons and of those that were computed, when the true set was measured.
        """
        counts = self._layers[layer]
        m = self.layer_neurons[layer]
        if not 0 <= selected <= tokens * m or not 0 <= hot <= selected or not 0 <= union <= m:
            raise ValueError(f"inconsistent counts at layer {layer}: {tokens=} {selected=} {hot=} {union=}")
        counts.tokens += tokens
        counts.selected += selected
        self.hot += hot
        self.cold += selected - hot
        self.bytes_read += union * self.neuron_bytes[layer]
        if truly_active is not None:
            if truly_computed is None or not 0 <= truly_computed <= truly_active:
                raise ValueError(f"truly_computed must be in [0, truly_active] at layer {layer}")
            counts.measured_tokens += tokens
            counts.truly_active += truly_active
            counts.truly_computed += truly_computed

    def report(self) -> SparsityReport:
        """A frozen snapshot of everything recorded so far."""
        layers = []
        for m, c in zip(self.layer_neurons, self._layers, strict=True):
            measured = c.measured_tokens > 0
            recall = c.truly_computed / c.truly_active if c.truly_active else 1.0
            layers.append(
                LayerSparsity(
                    predicted_active_share=c.selected / (c.tokens * m) if c.tokens else 0.0,
                    true_active_share=c.truly_active / (c.measured_tokens * m) if measured else None,
                    recall=recall if measured else None,
                )
            )
        denominator = sum(c.tokens * m for m, c in zip(self.layer_neurons, self._layers, strict=True))
        computed = self.hot + self.cold
        return SparsityReport(
            mode=self.mode,
            tokens=self.tokens,
            computed_share=computed / denominator if denominator else 0.0,
            layers=tuple(layers),
            hot_share=self.hot / computed if computed else 0.0,
            cold_share=self.cold / computed if computed else 0.0,
            ffn_bytes_read=self.bytes_read,
            ffn_bytes_dense=self.bytes_dense,
        )
