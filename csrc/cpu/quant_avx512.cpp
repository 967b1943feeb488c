// AVX-512 VNNI kernels over Q8_0 / Q4_0 weights: the int8 dot product of quant_simd.h as one
// vpdpbusd (u8 x s8, four products summed into int32) on 256-bit registers (AVX512_VL). Only called
// when the CPU has AVX512F, AVX512VL and AVX512_VNNI; not yet run on such hardware (the development
// machine has AVX2 only), so the dispatcher's tests cover it only where a machine has them.
#include <immintrin.h>

#include "quant.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")

#include "quant_simd.h"  // after the pragma: its templates are compiled for AVX-512 VNNI

namespace sparseinfer {
namespace cpu {
namespace {

struct VnniDot {
  static __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
  }
};

}  // namespace

QuantKernels avx512_quant_kernels(QuantFormat f) { return simd_quant_kernels<VnniDot>(f); }

}  // namespace cpu
}  // namespace sparseinfer
