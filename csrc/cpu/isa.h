// Which instruction set the CPU kernels run: the best the CPU has, or the one SPARSEINFER_CPU_ISA
// forces (scalar | avx2 | avx512), read per call (a getenv is ~100 ns against a ~ms op) so that
// tests can switch paths in-process. One place for the row kernels and the quantized ones.
#pragma once

#include "quant.h"
#include "row_kernels.h"

namespace sparseinfer {
namespace cpu {

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa chosen_isa();  // raises when SPARSEINFER_CPU_ISA names a path this CPU lacks
RowKernels choose_row_kernels(WeightType type);
// The quantized kernels are AVX2's on an AVX-512 CPU too. The same kernels compiled for AVX-512
// VNNI (vpdpbusd) were measured on a 2-core Sapphire Rapids: GEMVs no faster (both ~28 GB/s of ~32,
// bandwidth-bound), and a whole q8_0 / q4_0 FFN 25% / 40% slower: the AVX-512 build of the dot
// products (EVEX code using ymm16-31, more register moves) was the slow part, even for Q4_0 whose
// source does not use VNNI. A 512-bit down-projection axpy was within 2% of AVX2's.
QuantKernels choose_quant_kernels(QuantFormat format);

}  // namespace cpu
}  // namespace sparseinfer
