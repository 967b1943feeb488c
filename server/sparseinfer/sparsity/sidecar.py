"""The sparsity sidecar: what the offline tools learned about a checkpoint, stored next to it.

    <dir>/sparsity.safetensors   tensors of every section
    <dir>/sparsity.json          manifest: format, model fingerprint, and one entry per section

<dir> is the checkpoint directory unless the user passes ``--sidecar DIR`` (e.g. for a read-only checkpoint).
Sections and the tensors they own (the names are the contract between the tools):

    calibration   thresholds (L,) float32 = ε_l             (sparseinfer calibrate)
    profile       profile.frequency (L, m) float32          (sparseinfer profile)
    predictor     predictor.{l}.w1/b1/w2/b2, predictor.score_threshold (L,)   (sparseinfer train-predictor)

Profile and predictor depend on the thresholds, so writing a new calibration drops them. The manifest records
a ``model_fingerprint`` (see ``model_fingerprint``); loading against a different model is a ``SidecarError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS_FILE = "sparsity.safetensors"
MANIFEST_FILE = "sparsity.json"
FORMAT_VERSION = 1
SECTIONS = ("calibration", "profile", "predictor")
# The command that writes each section, named in "run this first" errors.
PRODUCERS = {
    "calibration": "sparseinfer calibrate MODEL --cett 0.2 --text FILE",
    "profile": "sparseinfer profile MODEL --text FILE",
    "predictor": "sparseinfer train-predictor MODEL --text FILE",
}
DEPENDENTS = {"calibration": ("profile", "predictor")}  # sections invalidated when this one is rewritten
_SAMPLE = 4096  # bytes hashed at the start, middle and end of every tensor


class SidecarError(ValueError):
    """A missing, incomplete or mismatched sidecar; the message says what to run."""


def section_of(tensor_name: str) -> str:
    """The section a tensor name belongs to (``thresholds`` is calibration's; others are prefixed)."""
    if tensor_name == "thresholds" or tensor_name.startswith("calibration."):
        return "calibration"
    prefix = tensor_name.split(".", 1)[0]
    if prefix in SECTIONS:
        return prefix
    raise ValueError(f"tensor {tensor_name!r} belongs to no sidecar section {SECTIONS}")


def _hash_safetensors(h: Any, file: Path) -> None:
    """Feed the header (names, dtypes, shapes, offsets) and a few blocks of each tensor's bytes into h."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header_bytes = f.read(header_len)
        h.update(header_bytes)
        header = json.loads(header_bytes)
        base = 8 + header_len
        for name in sorted(k for k in header if k != "__metadata__"):
            start, end = header[name]["data_offsets"]
            size = end - start
            for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                f.seek(base + start + offset)
                h.update(f.read(min(_SAMPLE, size - offset)))


def model_fingerprint(checkpoint_dir: str | Path) -> str:
    """sha256 over config.json and, for every weight file, its header plus 3 × 4 KiB samples of each tensor.

    Reads a few MB even for a 13 GB checkpoint, yet any re-trained, re-quantised or re-shaped model differs in
    the header or in the sampled bytes of almost every tensor.
    """
    root = Path(checkpoint_dir)
    h = hashlib.sha256()
    config = root / "config.json"
    if not config.is_file():
        raise SidecarError(f"{root}: no config.json, not a checkpoint directory")
    h.update(config.read_bytes())
    for file in sorted(root.glob("*.safetensors")):
        if file.name == TENSORS_FILE:
            continue
        h.update(file.name.encode())
        _hash_safetensors(h, file)
    return h.hexdigest()


_fingerprint = model_fingerprint  # Sidecar.load's parameter of the same name shadows the function


class Sidecar:
    """The sidecar of one checkpoint, in memory: ``tensors`` (name -> tensor) and per-section manifests."""

    def __init__(
        self,
        directory: str | Path,
        model_fingerprint: str,
        tensors: dict[str, torch.Tensor] | None = None,
        sections: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.model_fingerprint = model_fingerprint
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.sections: dict[str, dict[str, Any]] = dict(sections or {})

    # ---- files ----
    @staticmethod
    def exists(directory: str | Path) -> bool:
        d = Path(directory)
        return (d / MANIFEST_FILE).is_file() and (d / TENSORS_FILE).is_file()

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        model_fingerprint: str | None = None,
        sidecar_dir: str | Path | None = None,
    ) -> Sidecar:
        """Read the sidecar of ``checkpoint_dir`` (from ``sidecar_dir`` when given).

        ``model_fingerprint`` defaults to the checkpoint's own; a sidecar recorded for another fingerprint, or
        none at all, raises SidecarError.
        """
        directory = Path(sidecar_dir) if sidecar_dir is not None else Path(checkpoint_dir)
        if not cls.exists(directory):
            raise SidecarError(
                f"{directory}: no sparsity sidecar ({MANIFEST_FILE} + {TENSORS_FILE}); "
                f"run `{PRODUCERS['calibration']}` first"
            )
        if model_fingerprint is None:
            model_fingerprint = _fingerprint(checkpoint_dir)
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SidecarError(f"{directory / MANIFEST_FILE}: not valid JSON ({e})") from e
        if manifest.get("format") != FORMAT_VERSION:
            raise SidecarError(
                f"{directory / MANIFEST_FILE}: field 'format' is {manifest.get('format')!r}, "
                f"expected {FORMAT_VERSION}; re-run `{PRODUCERS['calibration']}`"
            )
        recorded = manifest.get("model_fingerprint")
        if recorded != model_fingerprint:
            raise SidecarError(
                f"{directory}: the sparsity sidecar was written for another model (model_fingerprint "
                f"{str(recorded)[:12]}… ≠ {model_fingerprint[:12]}… of {checkpoint_dir}); "
                f"re-run `{PRODUCERS['calibration']}` for this model"
            )
        tensors = load_file(str(directory / TENSORS_FILE))
        return cls(directory, model_fingerprint, tensors, manifest.get("sections", {}))

    @classmethod
    def open(cls, checkpoint_dir: str | Path, sidecar_dir: str | Path | None = None) -> Sidecar:
        """The existing sidecar (fingerprint-checked), or an empty one for this checkpoint."""
        directory = Path(sidecar_dir) if sidecar_dir is not None else Path(checkpoint_dir)
        fingerprint = model_fingerprint(checkpoint_dir)
        if cls.exists(directory):
            return cls.load(checkpoint_dir, fingerprint, sidecar_dir)
        return cls(directory, fingerprint)

    def save(self) -> None:
        """Write both files (via temporary files and rename, so a crash never leaves half a sidecar)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.tensors.items()}
        manifest = {
            "format": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "sections": self.sections,
        }
        tmp_t = self.directory / (TENSORS_FILE + ".tmp")
        tmp_m = self.directory / (MANIFEST_FILE + ".tmp")
        save_file(tensors, str(tmp_t), metadata={"format": "pt"})
        tmp_m.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        os.replace(tmp_t, self.directory / TENSORS_FILE)
        os.replace(tmp_m, self.directory / MANIFEST_FILE)

    # ---- sections ----
    def has(self, section: str) -> bool:
        return section in self.sections

    def require(self, section: str) -> dict[str, Any]:
        """The section's manifest; SidecarError naming the command that writes it when absent."""
        if section not in SECTIONS:
            raise ValueError(f"unknown sidecar section {section!r}; expected one of {SECTIONS}")
        if section not in self.sections:
            raise SidecarError(
                f"{self.directory}: the sparsity sidecar has no {section} section; "
                f"run `{PRODUCERS[section]}` first"
            )
        return self.sections[section]

    def section_tensors(self, section: str) -> dict[str, torch.Tensor]:
        """The tensors a section owns (full names)."""
        self.require(section)
        return {k: v for k, v in self.tensors.items() if section_of(k) == section}

    def set_section(self, section: str, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Replace a section's tensors and manifest (and drop the sections that depend on it)."""
        for name in tensors:
            if section_of(name) != section:
                raise ValueError(f"tensor {name!r} does not belong to section {section!r}")
        self.drop(section)
        for dependent in DEPENDENTS.get(section, ()):
            self.drop(dependent)
        self.tensors.update(tensors)
        self.sections[section] = manifest

    def drop(self, section: str) -> None:
        self.sections.pop(section, None)
        for name in [k for k in self.tensors if section_of(k) == section]:
            del self.tensors[name]

    @property
    def thresholds(self) -> torch.Tensor:
        """ε_l per layer (L,) float32 from the calibration section."""
        self.require("calibration")
        return self.tensors["thresholds"]


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the sidecar manifest")
