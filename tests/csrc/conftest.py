"""Fixtures for the kernel tests: run a test once per CPU instruction-set path this machine has."""

from pathlib import Path

import pytest


def available_isas() -> list[str]:
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        flags = set()
    isas = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        isas.append("avx2")
    if "avx512f" in flags:
        isas.append("avx512")
    if {"avx512f", "avx512bw", "avx512_bf16"} <= flags:
        isas.append("avx512bf16")  # the AVX-512 kernels plus bf16 dot products (vdpbf16ps)
    return isas


@pytest.fixture(params=available_isas())
def isa(request, monkeypatch):
    """Forces the sparse kernels onto one path (SPARSEINFER_CPU_ISA) for the test."""
    monkeypatch.setenv("SPARSEINFER_CPU_ISA", request.param)
    return request.param
