"""llama.cpp, the baseline: built once from the llama.cpp that the PyPI sdist of llama-cpp-python vendors
(pinned), and driven as a user would: its own converter to GGUF, llama-quantize, llama-bench.

``locate(llama_cpp, cache)`` returns the tools, building them into ``cache`` the first time (about 16
minutes on 2 cores: pip downloads the sdist, cmake builds llama-bench and llama-quantize with
-DGGML_NATIVE=ON). ``--llama-cpp DIR`` points at an existing llama.cpp tree instead: DIR holds
convert_hf_to_gguf.py and gguf-py, and its tools are in DIR/build/bin (or DIR/bin).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is the baseline
TOOLS = ("llama-bench", "llama-quantize")
CONVERTER_NEEDS = ("sentencepiece", "transformers")  # the bench extra: imported by convert_hf_to_gguf.py


def default_cache() -> Path:
    """Where the build lives: $XDG_CACHE_HOME/sparseinfer, else ~/.cache/sparseinfer."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparseinfer"


class LlamaBenchCrashed(RuntimeError):
    """llama-bench killed by a signal (a crash of llama.cpp itself, not a usage error)."""


@dataclass(frozen=True)
class LlamaCpp:
    src: Path  # the llama.cpp tree: convert_hf_to_gguf.py, gguf-py/
    bin: Path  # llama-bench, llama-quantize
    version: str

    def convert(self, checkpoint: Path, out: Path, log: TextIO) -> Path:
        """``checkpoint`` (a Hugging Face directory) -> ``out``, a bf16 GGUF, with llama.cpp's own converter
        (``gguf_convert`` wraps it for our tokenizers)."""
        if _newer(out, checkpoint / "model.safetensors"):
            return out
        missing = [m for m in CONVERTER_NEEDS if importlib.util.find_spec(m) is None]
        if missing:  # else the converter dies on the import, deep in a traceback
            raise RuntimeError(
                f"llama.cpp's convert_hf_to_gguf.py needs {', '.join(missing)}: "
                "pip install 'sparseinfer[bench]'"
            )
        tmp = out.with_suffix(".partial")
        cmd = [sys.executable, "-m", "sparseinfer.bench.gguf_convert", str(self.src), str(checkpoint)]
        cmd += ["--outfile", str(tmp), "--outtype", "bf16"]
        _run(cmd, log, "convert_hf_to_gguf.py")
        tmp.rename(out)
        return out

    def quantize(self, source: Path, out: Path, kind: str, log: TextIO) -> Path:
        """``source`` GGUF -> ``out`` in llama-quantize's ``kind`` (Q8_0, Q4_0, ...)."""
        if _newer(out, source):
            return out
        tmp = out.with_suffix(".partial")
        _run([str(self.bin / "llama-quantize"), str(source), str(tmp), kind], log, "llama-quantize")
        tmp.rename(out)
        return out

    def bench(
        self, model: Path, threads: int, prompt: int, generate: int, repack: bool = True
    ) -> dict[str, Any]:
        """One llama-bench run (one repetition): its JSON record (``avg_ts``: tokens/s). ``repack`` False:
        ``--repack 0``, the weights as the file holds them (no AMX or interleaved copies)."""
        cmd = [str(self.bin / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(prompt)]
        cmd += ["-n", str(generate), "-r", "1", "-o", "json"]
        if not repack:
            cmd += ["--repack", "0"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode < 0:
            raise LlamaBenchCrashed(f"llama-bench died of signal {-done.returncode}: {' '.join(cmd)}")
        if done.returncode != 0:
            raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        (record,) = json.loads(done.stdout)
        return record


def _newer(out: Path, source: Path) -> bool:
    """Whether ``out`` exists and was made after ``source`` last changed (then it is reused)."""
    return out.is_file() and out.stat().st_mtime >= source.stat().st_mtime


def _run(cmd: list[str], log: TextIO, what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(f"{what} failed with status {done.returncode} (output above)")


def locate(llama_cpp: Path | None, cache: Path, log: TextIO) -> LlamaCpp:
    """The tools of ``llama_cpp`` (a llama.cpp tree), else of the pinned build in ``cache`` (built once)."""
    if llama_cpp is not None:
        for bin_dir in (llama_cpp / "build" / "bin", llama_cpp / "bin"):
            if all((bin_dir / t).is_file() for t in TOOLS):
                if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
                    raise FileNotFoundError(f"--llama-cpp {llama_cpp}: no convert_hf_to_gguf.py there")
                return LlamaCpp(llama_cpp, bin_dir, "local")
        raise FileNotFoundError(f"--llama-cpp {llama_cpp}: no {' or '.join(TOOLS)} in build/bin or bin")
    root = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    src, build = root / "src", root / "build"
    marker = root / "built.json"
    if marker.is_file():
        return LlamaCpp(src, build / "bin", LLAMA_CPP_PYTHON)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"building llama.cpp needs {tool} on PATH (or pass --llama-cpp DIR)")
    log.write(
        f"building llama.cpp from llama-cpp-python=={LLAMA_CPP_PYTHON} into {root} "
        "(once; about 16 minutes on 2 cores) ...\n"
    )
    log.flush()
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / "download"
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(downloads),
         f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        log, "pip download",
    )  # fmt: skip
    (sdist,) = downloads.glob("llama_cpp_python-*.tar.gz")
    if src.exists():
        shutil.rmtree(src)
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(src, members=[m for m in members if m.name], filter="data")
    jobs = str(os.cpu_count() or 1)
    _run(
        ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"],
        log, "cmake configure",
    )  # fmt: skip
    _run(["cmake", "--build", str(build), "-j", jobs, "--target", *TOOLS], log, "cmake build")
    marker.write_text(json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON, "sdist": sdist.name}))
    return LlamaCpp(src, build / "bin", LLAMA_CPP_PYTHON)
