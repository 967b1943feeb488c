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

// kW weight rows against kX rows of x: out[i * kX + r] = ws[i] . xs[r]. Per pair four accumulator
// chains (128 weights a step), then the last d % 128 weights in masked 32-weight blocks into the
// first chain: the same order for every kW and kX, so a pair's result depends neither on its batch
// mates nor on the rows read beside it. nexts[i] (or nullptr): this step's cache lines of the row
// read after ws[i], into L2. kW x kX <= 4 keeps the accumulators in registers.
template <int kW, int kX>
void dots_bf16_tile(const uint16_t* const* ws, const char* const* nexts, const uint16_t* const* xs,
                    int64_t d, float* out) {
  constexpr int kChains = 4;
  __m512 acc[kW][kX][kChains];
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kX; ++r)
      for (int u = 0; u < kChains; ++u) acc[i][r][u] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 * kChains <= d; c += 32 * kChains) {
    for (int i = 0; i < kW; ++i) {
      if (nexts[i] != nullptr) {
        for (int u = 0; u < kChains; ++u) _mm_prefetch(nexts[i] + 2 * c + 64 * u, _MM_HINT_T2);
      }
      __m512bh wv[kChains];
      for (int u = 0; u < kChains; ++u) wv[u] = bf16_block(ws[i] + c + 32 * u);
      for (int r = 0; r < kX; ++r) {
        for (int u = 0; u < kChains; ++u)
          acc[i][r][u] = _mm512_dpbf16_ps(acc[i][r][u], wv[u], bf16_block(xs[r] + c + 32 * u));
      }
    }
  }
  for (; c < d; c += 32) {
    const int64_t n = d - c < 32 ? d - c : 32;
    const __mmask32 m = n == 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
    for (int i = 0; i < kW; ++i) {
      const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, ws[i] + c));
      for (int r = 0; r < kX; ++r) {
        const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, xs[r] + c));
        acc[i][r][0] = _mm512_dpbf16_ps(acc[i][r][0], wv, xv);
      }
    }
  }
  for (int i = 0; i < kW; ++i) {
    for (int r = 0; r < kX; ++r) {
      const __m512* a = acc[i][r];
      out[i * kX + r] =
          _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    }
  }
}

// kRows rows of x against one weight row.
template <int kRows>
void dots_bf16_n(const void* w_row, const void* next, const uint16_t* const* xs, int64_t d,
                 float* out) {
  const uint16_t* const ws[1] = {static_cast<const uint16_t*>(w_row)};
  const char* const nexts[1] = {static_cast<const char*>(next)};
  dots_bf16_tile<1, kRows>(ws, nexts, xs, d, out);
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
// rows' misses in flight at once.
template <int kNw>
void gather_bf16_n(const void* const* ws, const void* const* nexts, const uint16_t* x, int64_t d,
                   float* out) {
  const uint16_t* w[kNw];
  const char* nx[kNw];
  for (int i = 0; i < kNw; ++i) {
    w[i] = static_cast<const uint16_t*>(ws[i]);
    nx[i] = static_cast<const char*>(nexts[i]);
  }
  const uint16_t* const xs[1] = {x};
  dots_bf16_tile<kNw, 1>(w, nx, xs, d, out);
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
