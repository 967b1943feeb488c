// How the down-projection axpys (row_kernels_simd.h, quant_simd.h, quant_avx512.cpp) walk their
// batch rows: up to kAxpyPassRows rows per pass over the weights, so that a weight block is widened
// (or dequantized) once for all of them, where once per row made the batch-16 down projection
// compute-bound. Included after each file's `#pragma GCC target`, inside an anonymous namespace
// (see row_kernels_simd.h), so every ISA gets its own copy.
#pragma once

#include <cstdint>
#include <type_traits>

namespace sparseinfer {
namespace cpu {
namespace {

constexpr int kAxpyPassRows = 4;

// For each pass: dst[k] = buf + rows[k0 + k] * ldb and coef[k][i] = coefs[i][rows[k0 + k]] for its
// nr rows, then pass(std::integral_constant<int, nr>, fetch, dst, coef), where fetch is `nexts` on
// the first pass (which streams the weights from memory) and nullptr after. The row count is a
// compile-time constant, so that a one-row pass compiles to the plain batch-1 loop.
template <int kNw, class Next, class Pass>
inline void axpy_passes(const float* const* coefs, const int32_t* rows, int nrows, float* buf,
                        int64_t ldb, const Next* const* nexts, const Pass& pass) {
  constexpr int kR = kAxpyPassRows;
  for (int k0 = 0; k0 < nrows; k0 += kR) {
    const int nr = nrows - k0 < kR ? nrows - k0 : kR;
    float* dst[kR];
    float coef[kR][kNw];
    for (int k = 0; k < nr; ++k) {
      dst[k] = buf + rows[k0 + k] * ldb;
      for (int i = 0; i < kNw; ++i) coef[k][i] = coefs[i][rows[k0 + k]];
    }
    const Next* const* fetch = k0 == 0 ? nexts : nullptr;
    switch (nr) {
      case 1:
        pass(std::integral_constant<int, 1>{}, fetch, dst, coef);
        break;
      case 2:
        pass(std::integral_constant<int, 2>{}, fetch, dst, coef);
        break;
      case 3:
        pass(std::integral_constant<int, 3>{}, fetch, dst, coef);
        break;
      default:
        pass(std::integral_constant<int, 4>{}, fetch, dst, coef);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace sparseinfer
