// AVX-512F row kernels: the 16-lane vector type the kernels of row_kernels_simd.h are instantiated
// with. Compiled for those extensions by the pragma below and only called after the dispatcher
// (sparse_ffn.cpp) has checked that the CPU has them, so the extension still loads and runs on a
// CPU without AVX-512. Weights are widened to fp32 in registers (bf16: a 16-bit shift; fp16:
// vcvtph2ps) and every product accumulates in fp32 with FMA. The tests force this path with
// SPARSEINFER_CPU_ISA=avx512 wherever the CPU has AVX-512F.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "row_kernels.h"

#pragma GCC target("avx512f,avx2,fma,f16c")
// GCC 12's own AVX-512 headers trip these on _mm512_undefined_*() (a known false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "avx512_exit.h"
#include "row_kernels_simd.h"  // after the pragma: its templates are compiled for AVX-512

namespace sparseinfer {
namespace cpu {
namespace {

struct Avx512 {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float a) { return _mm512_set1_ps(a); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
  template <WeightType kType>
  static Vec weights(const void* w, int64_t c) {
    if constexpr (kType == WeightType::kF32) {
      return _mm512_loadu_ps(static_cast<const float*>(w) + c);
    } else {
      const __m256i h = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + c));  // 16 x 16 bit
      if constexpr (kType == WeightType::kBF16) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        return _mm512_cvtph_ps(h);
      }
    }
  }
};

template <WeightType T>
RowKernels kernels_512() {
  return RowKernels{&CleanExit<&dots<Avx512, T>>::call, &CleanExit<&axpys<Avx512, T>>::call};
}

}  // namespace

// Each kernel wrapped in CleanExit (avx512_exit.h).
RowKernels avx512_row_kernels(WeightType type) {
  switch (type) {
    case WeightType::kBF16:
      return kernels_512<WeightType::kBF16>();
    case WeightType::kF16:
      return kernels_512<WeightType::kF16>();
    case WeightType::kF32:
      break;
  }
  return kernels_512<WeightType::kF32>();
}

}  // namespace cpu
}  // namespace sparseinfer
