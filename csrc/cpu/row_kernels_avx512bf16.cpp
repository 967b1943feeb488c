// AVX512_BF16 dot products over bf16 weight rows: x stays in bf16 and one vdpbf16ps multiplies 32
// weight / x pairs and adds each pair's two products into 16 fp32 lanes, where the AVX-512F kernels
// widen every weight to fp32 and spend an FMA per weight. Measured on 2 Sapphire Rapids cores
// against them: ops.linear over bf16 4096 x 4096 rows at batch 1 25.7 -> 27.6 GB/s, the sparse FFN
// at batch 16 (where the widening made it compute-bound) 125 -> 136 tok/s of decode. Four chains
// per row: with two, batch-1 rows streamed slower than the FMA kernel's. The products of two bf16
// values are exact in fp32; the sums round differently from the FMA kernels (and the instruction
// treats bf16 subnormals as zero), so results agree with them to fp32 rounding, not bit for bit.
// The axpys stay the AVX-512F ones. Only called when the CPU has AVX512_BF16; the tests force this
// path with SPARSEINFER_CPU_ISA=avx512bf16 wherever it has.
#include <immintrin.h>

#include <cstdint>

#include "row_kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512bf16,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "avx512_exit.h"

namespace sparseinfer {
namespace cpu {
namespace {

inline __m512bh bf16_block(const uint16_t* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
}

// kRows rows of x against one weight row, four accumulator chains per row (128 weights a step),
// then the last d % 128 weights in masked 32-weight blocks into the first chain: the same order for
// every kRows, so a row's result does not depend on its batch mates.
template <int kRows>
void dots_bf16_n(const void* w_row, const void* next, const uint16_t* const* xs, int64_t d,
                 float* out) {
  const auto* w = static_cast<const uint16_t*>(w_row);
  const char* nx = static_cast<const char*>(next);
  constexpr int kChains = 4;
  __m512 acc[kRows][kChains];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < kChains; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 * kChains <= d; c += 32 * kChains) {
    if (nx != nullptr) {  // this step's cache lines of the next row, into L2
      for (int u = 0; u < kChains; ++u) _mm_prefetch(nx + 2 * c + 64 * u, _MM_HINT_T2);
    }
    __m512bh wv[kChains];
    for (int u = 0; u < kChains; ++u) wv[u] = bf16_block(w + c + 32 * u);
    for (int r = 0; r < kRows; ++r) {
      for (int u = 0; u < kChains; ++u)
        acc[r][u] = _mm512_dpbf16_ps(acc[r][u], wv[u], bf16_block(xs[r] + c + 32 * u));
    }
  }
  for (; c < d; c += 32) {
    const int64_t n = d - c < 32 ? d - c : 32;
    const __mmask32 m = n == 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
    const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, w + c));
    for (int r = 0; r < kRows; ++r) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, xs[r] + c));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wv, xv);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    out[r] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
  }
}

void dots_bf16(const void* w, const void* next, const uint16_t* const* xs, int nrows, int64_t d,
               float* out) {
  switch (nrows) {
    case 1:
      return dots_bf16_n<1>(w, next, xs, d, out);
    case 2:
      return dots_bf16_n<2>(w, next, xs, d, out);
    case 3:
      return dots_bf16_n<3>(w, next, xs, d, out);
    default:
      return dots_bf16_n<4>(w, next, xs, d, out);
  }
}

// kNw scattered weight rows against one x row, their loads interleaved so that a core has all kNw
// rows' misses in flight at once. Per row the sums of dots_bf16_n<1> in its order (bit-identical).
template <int kNw>
void gather_bf16_n(const void* const* ws, const void* const* nexts, const uint16_t* x, int64_t d,
                   float* out) {
  constexpr int kChains = 4;
  const uint16_t* w[kNw];
  const char* nx[kNw];
  for (int i = 0; i < kNw; ++i) {
    w[i] = static_cast<const uint16_t*>(ws[i]);
    nx[i] = static_cast<const char*>(nexts[i]);
  }
  __m512 acc[kNw][kChains];
  for (int i = 0; i < kNw; ++i)
    for (int u = 0; u < kChains; ++u) acc[i][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 * kChains <= d; c += 32 * kChains) {
    __m512bh xv[kChains];
    for (int u = 0; u < kChains; ++u) xv[u] = bf16_block(x + c + 32 * u);
    for (int i = 0; i < kNw; ++i) {
      if (nx[i] != nullptr) {
        for (int u = 0; u < kChains; ++u) _mm_prefetch(nx[i] + 2 * c + 64 * u, _MM_HINT_T2);
      }
      for (int u = 0; u < kChains; ++u)
        acc[i][u] = _mm512_dpbf16_ps(acc[i][u], bf16_block(w[i] + c + 32 * u), xv[u]);
    }
  }
  for (; c < d; c += 32) {
    const int64_t n = d - c < 32 ? d - c : 32;
    const __mmask32 m = n == 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
    const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, x + c));
    for (int i = 0; i < kNw; ++i) {
      const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, w[i] + c));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], wv, xv);
    }
  }
  for (int i = 0; i < kNw; ++i) {
    out[i] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3])));
  }
}

void gather_bf16(const void* const* ws, const void* const* nexts, int nw, const uint16_t* x,
                 int64_t d, float* out) {
  switch (nw) {
    case 1:
      return gather_bf16_n<1>(ws, nexts, x, d, out);
    case 2:
      return gather_bf16_n<2>(ws, nexts, x, d, out);
    case 3:
      return gather_bf16_n<3>(ws, nexts, x, d, out);
    default:
      return gather_bf16_n<4>(ws, nexts, x, d, out);
  }
}

// Consecutive rows in one call, without the per-row call through the kernel table and CleanExit
// (which kept a batch-1 ops.linear ~8% below the same loop called directly). At batch 1 without the
// next-row prefetch either: within one matrix the hardware prefetcher already streams the rows in
// order, and the extra requests cost bandwidth (a 4096 x 4096 GEMV on 2 Zen 4 cores: 45 GB/s with
// them, 58 without, standalone). With 2-4 rows of x the kernel does 2-4x the work per byte and the
// prefetch pays again (4 rows: 22 GB/s with it, 19 without), so it stays there.
void gemv_bf16(const void* w, int64_t row_bytes, int64_t n, const uint16_t* const* xs, int nrows,
               int64_t d, float* out, int64_t ldo) {
  const char* row = static_cast<const char*>(w);
  float res[kMaxBf16DotRows];
  for (int64_t i = 0; i < n; ++i, row += row_bytes) {
    const char* next = i + 1 < n ? row + row_bytes : nullptr;
    switch (nrows) {
      case 1:
        dots_bf16_n<1>(row, nullptr, xs, d, out + i);
        continue;
      case 2:
        dots_bf16_n<2>(row, next, xs, d, res);
        break;
      case 3:
        dots_bf16_n<3>(row, next, xs, d, res);
        break;
      default:
        dots_bf16_n<4>(row, next, xs, d, res);
    }
    for (int r = 0; r < nrows; ++r) out[r * ldo + i] = res[r];
  }
}

}  // namespace

RowKernels avx512bf16_row_kernels(WeightType type) {
  RowKernels k = avx512_row_kernels(type);
  if (type == WeightType::kBF16) {
    k.dots_bf16 = &CleanExit<&dots_bf16>::call;
    k.gemv_bf16 = &CleanExit<&gemv_bf16>::call;
    k.gather_bf16 = &CleanExit<&gather_bf16>::call;
  }
  return k;
}

}  // namespace cpu
}  // namespace sparseinfer
