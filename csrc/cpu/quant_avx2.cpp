// AVX2 kernels over Q8_0 / Q4_0 weights: the int8 dot product of quant_simd.h as vpmaddubsw (u8 x
// s8 pairs to int16; no overflow: |w| <= 128 and |x| <= 127) then vpmaddwd against ones (pairs to
// int32). Compiled for AVX2 by the pragma and only called after the dispatcher checked the CPU has
// it.
#include <immintrin.h>

#include "quant.h"

#pragma GCC target("avx2,fma,f16c")

#include "quant_simd.h"  // after the pragma: its templates are compiled for AVX2

namespace sparseinfer {
namespace cpu {
namespace {

struct Avx2Dot {
  static __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
  }
};

}  // namespace

QuantKernels avx2_quant_kernels(QuantFormat f) { return simd_quant_kernels<Avx2Dot>(f); }

}  // namespace cpu
}  // namespace sparseinfer
