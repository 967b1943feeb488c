"""Which kernel a dense projection should use, measured on this machine: our row kernels (``ops.linear``)
or torch's ``F.linear``, at each number of input rows.

Neither wins everywhere, and where the crossover lies depends on the CPU (native bf16 dot products or not,
AMX or not), torch's build, the thread count and the weight's shape: on a 2-core Sapphire Rapids (AMX) torch
won bf16 projections from 4 rows on, on an AVX2-only CPU our rows won at every batch size. So instead of a
rule keyed on CPU flags, the first load of a shape on a machine times both kernels on the model's own
weights at a ladder of row counts (``LADDER``) and keeps ``rows_up_to``: the most rows for which our kernels
won at every rung up to it (``EVERY_INPUT`` if they won at every rung). The results are cached in a JSON file
(``cache_path``) under a key of everything that could change them (``machine_key``), so later loads measure
nothing; deleting the file recalibrates, and ``$SPARSEINFER_DENSE_LINEAR`` (``torch``, ``rows`` or a number)
overrides the choice entirely.

Timing is honest about memory: at decode batch sizes a projection streams its weight from DRAM, so the
timed loop runs over several distinct weights of the shape (the model has one per layer) adding up to more
than the last-level cache, not over one weight that would stay cached. From ``COMPUTE_BOUND_ROWS`` rows on
both kernels are compute-bound and a slice of one weight is timed instead, which keeps a calibration of a
7B-shaped model to a few seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseinfer import ops

log = logging.getLogger(__name__)

EVERY_INPUT = 2**31 - 1  # rows_up_to where our kernels won at every rung: no input is too long for them
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)  # input rows timed, in order
COMPUTE_BOUND_ROWS = 16  # from here on a slice of one weight is timed (both kernels compute-bound)
STREAM_BYTES = 96 << 20  # weights timed per call at fewer rows: beyond any last-level cache seen here
SLICE_MACS = 1 << 26  # multiply-adds per timed call from COMPUTE_BOUND_ROWS on (~1 ms on 2 cores)
REPEATS = 3  # timed passes per kernel and rung, alternating kernels; the fastest pass counts
CACHE_VERSION = 1  # bump when the measurement changes meaning, so old entries are not trusted

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KERNELS: dict[str, Kernel] = {"rows": lambda x, w: ops.linear(x, w), "torch": lambda x, w: F.linear(x, w)}


def cache_path(name: str = "dense-linear.json") -> Path:
    """$XDG_CACHE_HOME/sparseinfer/``name``, else ~/.cache/sparseinfer/``name``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparseinfer" / name


@functools.cache
def _cpu_identity() -> str:
    """The CPU's model name and its flags (a VM can hide flags of the same model)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown cpu"
    first = text.split("\n\n", 1)[0]  # the first processor's block
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    name = " ".join(fields.get("model name", "unknown cpu").split())
    flags = " ".join(sorted(fields.get("flags", "").split()))
    return f"{name} flags:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def _extension_identity() -> str:
    """The compiled kernels' build: a rebuild (faster kernels) must not reuse old timings."""
    from sparseinfer import _C

    st = Path(_C.__file__).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def machine_key() -> str:
    """Everything the timings depend on besides the shape: CPU, torch, our kernels' build, threads."""
    return (
        f"v{CACHE_VERSION} | {_cpu_identity()} | torch {torch.__version__} | _C {_extension_identity()} | "
        f"{torch.get_num_threads()} threads"
    )


def shape_key(weight: torch.Tensor) -> str:
    """The cache entry of a (d_out, d_in) weight: dtype and shape."""
    return f"{str(weight.dtype).removeprefix('torch.')}:{weight.shape[0]}x{weight.shape[1]}"


def _time(kernel: Kernel, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> float:
    """Seconds per weight of one pass of ``kernel`` over ``weights``."""
    start = time.perf_counter()
    for w in weights:
        kernel(x, w)
    return (time.perf_counter() - start) / len(weights)


def measure(weights: Sequence[torch.Tensor], n: int) -> dict[str, float]:
    """Seconds per call of each kernel (``KERNELS``) on ``n`` input rows over weights of one shape, the
    fastest of ``REPEATS`` passes, the kernels alternating so that both see the same machine."""
    d_out, d_in = weights[0].shape
    if n >= COMPUTE_BOUND_ROWS:
        rows = max(1, min(d_out, SLICE_MACS // (n * d_in)))
        timed = [weights[0][:rows]]
    else:
        per = weights[0].numel() * weights[0].element_size()
        timed = list(weights[: max(1, math.ceil(STREAM_BYTES / per))])
    x = torch.randn(n, d_in, dtype=weights[0].dtype)
    best = dict.fromkeys(KERNELS, math.inf)
    with torch.inference_mode():
        for kernel in KERNELS.values():  # warm: first-call dispatch, oneDNN's primitive cache
            kernel(x, timed[0])
        for _ in range(REPEATS):
            for name, kernel in KERNELS.items():
                best[name] = min(best[name], _time(kernel, x, timed))
    return best


def choose(weights: Sequence[torch.Tensor], timer: Callable[..., dict[str, float]] = measure) -> dict:
    """Walk ``LADDER`` up until torch wins (confirmed by a second measurement, so that one noisy pass does
    not decide); returns the cache entry: ``rows_up_to`` and the seconds measured per rung."""
    seconds: dict[str, list[float]] = {}
    up_to = EVERY_INPUT
    for n in LADDER:
        t = timer(weights, n)
        if t["torch"] < t["rows"]:
            again = timer(weights, n)
            t = {k: min(t[k], again[k]) for k in t}
        seconds[str(n)] = [t["rows"], t["torch"]]
        if t["torch"] < t["rows"]:
            up_to = LADDER[LADDER.index(n) - 1] if n != LADDER[0] else 0
            break
    return {"rows_up_to": up_to, "seconds [rows, torch]": seconds}


class Calibration:
    """Measurements per key (a weight shape) on this machine, read from and written to ``path``: here the
    measured ``rows_up_to`` per weight shape (``rows_up_to``); ``engine.ffn_calibration`` keeps its own
    entries in another file through ``measured``."""

    def __init__(self, path: Path | None = None, timer: Callable[..., dict[str, float]] = measure) -> None:
        self.path = path if path is not None else cache_path()
        self.timer = timer
        self._entries: dict[str, dict[str, dict]] = {}  # machine_key -> shape_key -> entry, read on first use

    def _load(self, key: str) -> dict[str, dict]:
        if key not in self._entries:
            self._entries[key] = self._read().get(key, {})
        return self._entries[key]

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # unreadable or corrupt: recalibrate rather than fail a load
            log.warning("ignoring the calibration cache %s: %s", self.path, e)
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, key: str) -> None:
        """Merge this machine's entries into the file (another process may have added others) atomically."""
        data = self._read()
        data[key] = {**data.get(key, {}), **self._entries[key]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home: keep the choice for this process only
            log.warning("could not write the calibration cache %s: %s", self.path, e)

    def chosen(self) -> dict[str, int]:
        """``rows_up_to`` per shape (``shape_key``) known for this machine (what a benchmark reports)."""
        return {k: int(v["rows_up_to"]) for k, v in sorted(self._load(machine_key()).items())}

    def entries(self) -> dict[str, dict]:
        """Every entry known for this machine, by key."""
        return dict(sorted(self._load(machine_key()).items()))

    def measured(self, key: str, measure: Callable[[], dict], describe: Callable[[dict], str]) -> dict:
        """This machine's entry under ``key``: from the cache, else ``measure()``d now, logged with
        ``describe`` and written to the file."""
        machine = machine_key()  # read per call: the thread count may have changed since the last load
        entries = self._load(machine)
        if key not in entries:
            start = time.perf_counter()
            entries[key] = measure()
            log.info(
                "%s: %s (calibrated in %.2f s)", key, describe(entries[key]), time.perf_counter() - start
            )
            self._write(machine)
        return entries[key]

    def rows_up_to(self, weights: Sequence[torch.Tensor]) -> int:
        """``rows_up_to`` for CPU weights of one shape and dtype (several: one per layer, see the module
        docstring), measured the first time this machine sees the shape."""

        def describe(entry: dict) -> str:
            up_to = entry["rows_up_to"]
            shown = "every input" if up_to == EVERY_INPUT else f"inputs of up to {up_to} rows"
            return f"dense projections: our row kernels for {shown}, torch beyond"

        entry = self.measured(shape_key(weights[0]), lambda: choose(weights, self.timer), describe)
        return int(entry["rows_up_to"])


@functools.cache
def calibration() -> Calibration:
    """The process's calibration, on the default cache file."""
    return Calibration()
