# Thin shortcuts; each target is one command you could type yourself. Assumes the venv from README.md.
PY ?= .venv/bin/python
.PHONY: install test lint format cuda-check bench

install:  ## build the extension in place and install sparseinfer with its test extras
	.venv/bin/pip install --no-build-isolation -e ".[test]"

test:
	$(PY) -m pytest

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu

format:
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
	.venv/bin/clang-format -i csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu

cuda-check:  ## compile every csrc/cuda/*.cu with nvcc (no link, no GPU needed)
	scripts/compile_cuda.sh $(PY)

bench:
	$(PY) -m pytest benchmarks
