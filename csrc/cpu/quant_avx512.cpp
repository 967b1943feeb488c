// AVX-512 VNNI kernels over Q8_0 / Q4_0 weights: quant_simd.h's kernels with the int8 dot product
// as one vpdpbusd (u8 x s8, four products summed into int32) on 256-bit registers (AVX512_VL), and
// two of them on 512-bit registers: the interleaved dot products (the GEMVs and the sparse FFN's
// gate / up rows) and the down projection's axpy. Only called when the CPU has AVX512F, AVX512VL,
// AVX512BW and AVX512_VNNI; the tests run them wherever a machine has those.
#include <immintrin.h>

#include "quant.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
// GCC 12's own AVX-512 headers trip these on _mm512_undefined_*() (a known false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "avx512_exit.h"
#include "quant_simd.h"  // after the pragma: its templates are compiled for AVX-512 VNNI

namespace sparseinfer {
namespace cpu {
namespace {

struct VnniDot {
  static __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
  }
};

// A block's 32 signed weights as two 16-lane int32 vectors (q - 8 for Q4_0, the same integers as
// quant_simd.h's block_q): for Q8_0 one vpmovsxbd per 16 weights, where the 256-bit axpy needs
// four widenings and three shuffles.
template <QuantFormat F>
inline void block_q_512(const uint8_t* blk, __m512i* lo, __m512i* hi) {
  if constexpr (F == QuantFormat::kQ8_0) {
    *lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    *hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
  } else {
    // The 16 bytes widened once; each int32 lane then holds its two nibbles (the high one shifted
    // out of the byte's upper bits, which are zero).
    const __m512i t =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    const __m512i eight = _mm512_set1_epi32(8);
    *lo = _mm512_sub_epi32(_mm512_and_si512(t, _mm512_set1_epi32(15)), eight);
    *hi = _mm512_sub_epi32(_mm512_srli_epi32(t, 4), eight);
  }
}

// The axpy of quant_simd.h (same terms, same order: one FMA per (coef, weight) pair in ascending
// i, so bit-identical results), 16 lanes wide. Still compute-bound: every weight costs a widening,
// a conversion and an FMA on the two 512-bit ports. Measured on one Sapphire Rapids core with the
// rows in L2, through sparse_ffn with zmm16-31 cleared (avx512_exit.h): 13 GB/s of Q8_0 rows and
// 6.5 of Q4_0, against ~18 GB/s the core reads from DRAM. (Before that fix: 9.5 and 5.1.) Widening
// a Q4_0 block before splitting its nibbles (block_q_512: one widening and four integer ops per
// 32 weights, where there were two widenings and five ops) took Q4_0 from 6.6 to 7.1 GB/s on one
// core and from 11.8 to 13.4 on two (sparse_ffn non-gated minus gate-only, ~1100 of 11008 rows of
// 4096). Summing the down projection in int8 dot products would need W_outᵀ's per-block scales
// folded into quantized coefficients; not done.
// One pass of qaxpys512_n over the weights for kRows batch rows (dst[k]: row k's output, coef[k]:
// its kNw coefficients): a block's weights are widened and converted once for all of them (once
// per row made the batch-16 down projection compute-bound). `nexts` (or nullptr) are prefetched.
template <QuantFormat F, int kNw, int kRows>
void qaxpys512_pass(const uint8_t* const* ws, const uint8_t* const* nexts, float* const* dst,
                    const float (*coef)[kNw], int64_t nblk) {
  constexpr int64_t bb = block_bytes(F);
  for (int64_t b = 0; b < nblk; ++b) {
    __m512 w0[kNw], w1[kNw];
    float scale[kNw];
#pragma GCC unroll 4
    for (int i = 0; i < kNw; ++i) {
      const uint8_t* blk = ws[i] + b * bb;
      if (nexts != nullptr && nexts[i] != nullptr) prefetch_block<F>(nexts[i], b);
      __m512i lo, hi;
      block_q_512<F>(blk, &lo, &hi);
      w0[i] = _mm512_cvtepi32_ps(lo);
      w1[i] = _mm512_cvtepi32_ps(hi);
      scale[i] = scale_of(blk);
    }
#pragma GCC unroll 4
    for (int k = 0; k < kRows; ++k) {
      float* out = dst[k] + b * kQK;
      __m512 acc0 = _mm512_loadu_ps(out), acc1 = _mm512_loadu_ps(out + 16);
#pragma GCC unroll 4
      for (int i = 0; i < kNw; ++i) {
        const __m512 a = _mm512_set1_ps(coef[k][i] * scale[i]);
        acc0 = _mm512_fmadd_ps(a, w0[i], acc0);
        acc1 = _mm512_fmadd_ps(a, w1[i], acc1);
      }
      _mm512_storeu_ps(out, acc0);
      _mm512_storeu_ps(out + 16, acc1);
    }
  }
}

template <QuantFormat F, int kNw>
void qaxpys512_n(const uint8_t* const* ws, const uint8_t* const* nexts, const float* const* coefs,
                 const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t nblk) {
  axpy_passes<kNw>(
      coefs, rows, nrows, buf, ldb, nexts,
      [&](auto kRows, const uint8_t* const* fetch, float* const* dst, const float (*coef)[kNw]) {
        qaxpys512_pass<F, kNw, decltype(kRows)::value>(ws, fetch, dst, coef, nblk);
      });
}

template <QuantFormat F>
void qaxpys512(const uint8_t* const* ws, int nw, const uint8_t* const* nexts,
               const float* const* coefs, const int32_t* rows, int nrows, float* buf, int64_t ldb,
               int64_t nblk) {
  switch (nw) {
    case 1:
      return qaxpys512_n<F, 1>(ws, nexts, coefs, rows, nrows, buf, ldb, nblk);
    case 2:
      return qaxpys512_n<F, 2>(ws, nexts, coefs, rows, nrows, buf, ldb, nblk);
    case 3:
      return qaxpys512_n<F, 3>(ws, nexts, coefs, rows, nrows, buf, ldb, nblk);
    default:
      return qaxpys512_n<F, 4>(ws, nexts, coefs, rows, nrows, buf, ldb, nblk);
  }
}

// One run (8 blocks) of an interleaved row against kRows x rows, added into their 8 run lanes.
template <QuantFormat F, int kRows>
inline void run_512(const uint8_t* run, int64_t g, const int8_t* const* xq, const float* const* xs,
                    const int32_t* const* xsum, __m256* acc) {
  constexpr int kShift = F == QuantFormat::kQ8_0 ? 7 : 3;  // the offset: 128 or 8
  const __m512i low4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(run)));
  __m512i s0[kRows], s1[kRows];
  for (int r = 0; r < kRows; ++r) s0[r] = s1[r] = _mm512_setzero_si512();
  if constexpr (F == QuantFormat::kQ4_0) {
    // Chunks 2h, 2h + 1: low nibbles meet x chunks 2h, 2h + 1, high ones 2h + 4, 2h + 5.
    for (int h = 0; h < 2; ++h) {
      const __m512i wv = _mm512_loadu_si512(run + 16 + 64 * h);
      const __m512i lo = _mm512_and_si512(wv, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
      for (int r = 0; r < kRows; ++r) {
        const int8_t* xr = xq[r] + g * kGroup * kQK;
        s0[r] = _mm512_dpbusd_epi32(s0[r], lo, _mm512_loadu_si512(xr + 64 * h));
        s1[r] = _mm512_dpbusd_epi32(s1[r], hi, _mm512_loadu_si512(xr + 128 + 64 * h));
      }
    }
  } else {
    for (int h = 0; h < 4; ++h) {  // chunks 2h, 2h + 1; two chains (even / odd pairs)
      const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(run + 16 + 64 * h), flip);
      for (int r = 0; r < kRows; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq[r] + g * kGroup * kQK + 64 * h);
        __m512i& s = h & 1 ? s1[r] : s0[r];
        s = _mm512_dpbusd_epi32(s, wu, xv);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m512i s = _mm512_add_epi32(s0[r], s1[r]);
    const __m256i lanes =  // lane j: block j of the run (the two chunk halves added)
        _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    const __m256i sx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xsum[r] + g * kGroup));
    const __m256i isum = _mm256_sub_epi32(lanes, _mm256_slli_epi32(sx, kShift));
    const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(xs[r] + g * kGroup));
    acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[r]);
  }
}

// qdots_i8_n on 512-bit registers: two 32-byte chunks of a run per load, so half the instructions
// per weight byte. Measured end to end on a Sapphire Rapids (benchmarks/results/README.md), batch-1
// decode of the dense model: +7% in Q8_0, +3% in Q4_0. The weights meet x unsigned: Q8_0 as w + 128
// (one xor, no sign tricks), Q4_0 as its stored nibbles (q + 8); the offset comes off once per run
// as 128 (8) times the block's x sum. Integer sums are exact, and the float steps are qdots_i8_n's,
// so the results are bit-identical to the 256-bit kernel's.
template <QuantFormat F, int kRows>
void qdots_i8_512_n(const uint8_t* w, const uint8_t* next, const int8_t* const* xq,
                    const float* const* xs, const int32_t* const* xsum, int64_t nblk, float* out) {
  constexpr int64_t run_bytes = kGroup * block_bytes(F);
  const int64_t runs = nblk / kGroup;
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < runs; ++g) {
    if (next != nullptr) prefetch_run<F>(next, g);
    run_512<F, kRows>(w + g * run_bytes, g, xq, xs, xsum, acc);
  }
  finish_i8_rows<VnniDot, F, kRows>(w, next, xq, xs, runs, nblk, acc, out);
}

template <QuantFormat F>
void qdots_i8_512(const uint8_t* w, const uint8_t* next, const int8_t* const* xq,
                  const float* const* xs, const int32_t* const* xsum, int nrows, int64_t nblk,
                  float* out) {
  switch (nrows) {
    case 1:
      return qdots_i8_512_n<F, 1>(w, next, xq, xs, xsum, nblk, out);
    case 2:
      return qdots_i8_512_n<F, 2>(w, next, xq, xs, xsum, nblk, out);
    case 3:
      return qdots_i8_512_n<F, 3>(w, next, xq, xs, xsum, nblk, out);
    default:
      return qdots_i8_512_n<F, 4>(w, next, xq, xs, xsum, nblk, out);
  }
}

template <QuantFormat F>
QuantKernels kernels_512() {
  return QuantKernels{
      &CleanExit<&qdots<VnniDot, F>>::call,
      &CleanExit<&qdots_i8_512<F>>::call,
      &CleanExit<&qaxpys512<F>>::call,
      &CleanExit<&quantize_x>::call,
      &CleanExit<
          &qgemv_i8<VnniDot, F, &qdots_i8_512<F>, &run_512<F, 1>, &qdots_i8_512_n<F, 1>>>::call,
      &CleanExit<&qgather_i8<VnniDot, F, &run_512<F, 1>>>::call};
}

}  // namespace

// Each kernel wrapped in CleanExit (avx512_exit.h).
QuantKernels avx512_quant_kernels(QuantFormat f) {
  return f == QuantFormat::kQ8_0 ? kernels_512<QuantFormat::kQ8_0>()
                                 : kernels_512<QuantFormat::kQ4_0>();
}

}  // namespace cpu
}  // namespace sparseinfer
