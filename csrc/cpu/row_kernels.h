// The inner loops of the CPU sparse FFN, one implementation per instruction set
// (row_kernels_*.cpp), behind plain function pointers. This header is ATen-free on purpose: the
// AVX2 / AVX-512 files are compiled under `#pragma GCC target`, and no inline function from a torch
// header may be compiled there (the linker could keep that copy and run AVX-512 code on a CPU
// without it).
#pragma once

#include <cstdint>

namespace sparseinfer {
namespace cpu {

enum class WeightType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Rows handled by one call of `dots` / `dots_bf16` / `axpys`; callers split longer lists.
constexpr int kMaxDotRows = 2;
constexpr int kMaxBf16DotRows = 4;
constexpr int kMaxAxpyWeights = 4;

struct RowKernels {
  // out[r] = sum_c w[c] * xs[r][c], c < d, for r < nrows (nrows <= kMaxDotRows). The weight row is
  // read once for all rows. The summation order depends only on d (not on threads or on how many
  // rows share the call), so a row's result never depends on the batch it came in.
  // `next` is the weight row the caller reads after this one (or nullptr): it is prefetched (into
  // L2) while this row streams in, because rows of different neurons are not adjacent and the
  // hardware prefetcher stops at page boundaries.
  void (*dots)(const void* w, const void* next, const float* const* xs, int nrows, int64_t d,
               float* out);
  // buf[rows[k] * ldb + c] += sum_i coefs[i][rows[k]] * ws[i][c] for c < len, k < nrows, i < nw
  // (nw <= kMaxAxpyWeights): nw weight rows stream at once and each buf element is loaded and
  // stored once per call. Each term is one fused multiply-add, applied in ascending i, so an
  // element's value depends only on the sequence of (coef, weight) pairs, not on how calls group
  // them or where len splits d. `nexts` (nw pointers or nullptr) are the rows read after these:
  // prefetched.
  void (*axpys)(const void* const* ws, int nw, const void* const* nexts, const float* const* coefs,
                const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t len);
  // `dots` over bf16 weights with x rows left in bf16 (nrows <= kMaxBf16DotRows), on the CPU's bf16
  // dot product; nullptr where the CPU has none (or the weights are not bf16): use `dots`.
  void (*dots_bf16)(const void* w, const void* next, const uint16_t* const* xs, int nrows,
                    int64_t d, float* out) = nullptr;
  // out[r * ldo + i] = row i . xs[r] over n consecutive weight rows (row i at w + i * row_bytes),
  // r < nrows <= kMaxBf16DotRows: `dots_bf16` row after row (the same sums), in one call. Present
  // where dots_bf16 is.
  void (*gemv_bf16)(const void* w, int64_t row_bytes, int64_t n, const uint16_t* const* xs,
                    int nrows, int64_t d, float* out, int64_t ldo) = nullptr;
  // out[i] = ws[i] . x for i < nw <= kMaxBf16DotRows scattered rows, read together (each row's sum
  // as dots_bf16 computes it); `nexts` (nw entries, each may be nullptr) are prefetched. Present
  // where dots_bf16 is.
  void (*gather_bf16)(const void* const* ws, const void* const* nexts, int nw, const uint16_t* x,
                      int64_t d, float* out) = nullptr;
};

RowKernels scalar_row_kernels(WeightType type);
RowKernels avx2_row_kernels(WeightType type);
RowKernels avx512_row_kernels(WeightType type);
RowKernels avx512bf16_row_kernels(WeightType type);  // avx512_row_kernels plus dots_bf16

}  // namespace cpu
}  // namespace sparseinfer
