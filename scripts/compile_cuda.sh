#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu to an object file with nvcc against the installed torch's headers,
# without linking. CI has no GPU and a CPU build of torch, so this is how a CUDA compile error fails
# CI. Usage: scripts/compile_cuda.sh [PYTHON]   (the python whose torch to compile against)
set -euo pipefail
python=${1:-python}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$nvcc" ] || { echo "compile_cuda: nvcc not found (set NVCC)" >&2; exit 1; }

mapfile -t includes < <("$python" - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths() + [sysconfig.get_paths()["include"]]:
    print(path)
PY
)
abi=$("$python" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
flags=(-c -std=c++17 -O3 --use_fast_math "-D_GLIBCXX_USE_CXX11_ABI=$abi" -DTORCH_EXTENSION_NAME=_C
       -arch=sm_90 -Xcompiler -fPIC)
for inc in "${includes[@]}"; do flags+=(-isystem "$inc"); done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# A CPU build of torch ships c10/cuda headers but not the one header CMake generates for CUDA
# builds; supply what a CUDA build generates (c10_cuda is a shared library) so the rest resolves.
if ! "$python" -c "import sys, torch.utils.cpp_extension as e, os; sys.exit(not any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in e.include_paths()))"; then
  mkdir -p "$out/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
  flags+=(-isystem "$out/shim")
fi
shopt -s nullglob
sources=(csrc/cuda/*.cu)
[ ${#sources[@]} -gt 0 ] || { echo "compile_cuda: no csrc/cuda/*.cu" >&2; exit 1; }
for src in "${sources[@]}"; do
  echo "nvcc -c $src"
  "$nvcc" "${flags[@]}" "$src" -o "$out/$(basename "$src").o"
done
echo "compile_cuda: ${#sources[@]} CUDA source(s) compiled"
