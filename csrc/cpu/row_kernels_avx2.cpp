// AVX2 + FMA (+ F16C for fp16) row kernels: the 8-lane vector type the kernels of
// row_kernels_simd.h are instantiated with. Compiled for those extensions by the pragma below and
// only called after the dispatcher (sparse_ffn.cpp) has checked that the CPU has them, so the
// extension still loads and runs on a CPU without AVX2. Weights are widened to fp32 in registers
// (bf16: a 16-bit shift; fp16: vcvtph2ps) and every product accumulates in fp32 with FMA.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "row_kernels.h"

#pragma GCC target("avx2,fma,f16c")

#include "row_kernels_simd.h"  // after the pragma: its templates are compiled for AVX2

namespace sparseinfer {
namespace cpu {
namespace {

struct Avx2 {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float a) { return _mm256_set1_ps(a); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static float hsum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <WeightType kType>
  static Vec weights(const void* w, int64_t c) {
    if constexpr (kType == WeightType::kF32) {
      return _mm256_loadu_ps(static_cast<const float*>(w) + c);
    } else {
      const __m128i h = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + c));  // 8 x 16 bit
      if constexpr (kType == WeightType::kBF16) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        return _mm256_cvtph_ps(h);
      }
    }
  }
};

}  // namespace

RowKernels avx2_row_kernels(WeightType type) { return simd_row_kernels<Avx2>(type); }

}  // namespace cpu
}  // namespace sparseinfer
