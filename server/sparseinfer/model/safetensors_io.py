"""A memory-mapped reader of the safetensors format, single-file or sharded.

Format: an 8-byte little-endian header length n, n bytes of JSON ``{name: {dtype, shape, data_offsets: [begin,
end]}, "__metadata__": {...}}``, then the raw little-endian tensor bytes; offsets are relative to the end of
the header.

We map each file with ``mmap.ACCESS_COPY`` (a private copy-on-write mapping) and build tensors with
``torch.frombuffer``: no byte is read until a page is touched, the page cache is shared with the file, and a
13.5 GB bf16 7B checkpoint does not need a second 13.5 GB of RAM. ACCESS_COPY makes the tensors writable
(torch warns on read-only buffers) while guaranteeing that in-place edits never reach the file. A tensor keeps
its mapping alive through the buffer it was made from, so the mapping is never closed explicitly.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from sparseinfer.model.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit too
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
    """One .safetensors file: validated header, tensors served zero-copy from a private mapping."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = self.path.stat().st_size
                if size < 8:
                    raise CheckpointError(f"{self.path}: corrupt safetensors file ({size} bytes, no header)")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > _MAX_HEADER or 8 + header_len > size:
                    raise CheckpointError(
                        f"{self.path}: corrupt safetensors file: header length {header_len} does not fit "
                        f"in a file of {size} bytes (truncated or not a safetensors file?)"
                    )
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file: {e}") from e
        try:
            header = json.loads(bytes(self._map[8 : 8 + header_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors file: header is not valid JSON ({e})"
            ) from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors file: header is not a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self._entries[name] = self._validate(name, info, data_len)

    def _validate(
        self, name: str, info: object, data_len: int
    ) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: malformed header entry {info!r}") from e
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype_name}; supported: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype_name]
        if any(s < 0 for s in shape):
            raise CheckpointError(f"{where}: negative dimension in shape {list(shape)}")
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] fall outside the {data_len} data bytes of the file "
                "(truncated file?)"
            )
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: {end - begin} bytes for shape {list(shape)} {dtype_name}, which needs {expected}"
            )
        return dtype, shape, begin, numel

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor, sharing memory with the mapping (copied only when unaligned)."""
        dtype, shape, begin, numel = self._entries[name]
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self._data_start + begin
        if offset % dtype.itemsize:
            # safetensors does not promise alignment; misaligned typed loads are undefined on some CPUs.
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=numel * dtype.itemsize, offset=offset)
            return raw.clone().view(dtype).reshape(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset).view(shape)

    def buffer_range(self) -> tuple[int, int]:
        """Address range [start, end) of the mapping; tests use it to prove a tensor was not copied."""
        start = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr()
        return start, start + len(self._map)


class CheckpointTensors:
    """All tensors of a checkpoint directory: ``model.safetensors`` or the shards named by its index."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        self.files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
                raise CheckpointError(
                    f"{index}: not a valid safetensors index (needs a 'weight_map' object)"
                ) from e
            for name, shard in weight_map.items():
                if shard not in self.files:
                    if not (self.directory / shard).is_file():
                        raise CheckpointError(f"{index}: shard {shard!r} (holding {name!r}) does not exist")
                    self.files[shard] = SafetensorsFile(self.directory / shard)
                if name not in self.files[shard]:
                    raise CheckpointError(f"{index}: maps {name!r} to {shard!r}, which does not contain it")
                self._where[name] = self.files[shard]
        elif single.is_file():
            self.files[SINGLE_FILE] = SafetensorsFile(single)
            self._where = dict.fromkeys(self.files[SINGLE_FILE].keys(), self.files[SINGLE_FILE])
        else:
            raise CheckpointError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} "
                "(only safetensors checkpoints are supported)"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name].dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._where[name].tensor(name)
