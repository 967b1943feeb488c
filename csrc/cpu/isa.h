// Which instruction set the CPU kernels run: the best the CPU has, or the one SPARSEINFER_CPU_ISA
// forces (scalar | avx2 | avx512 | avx512bf16), read per call (a getenv is ~100 ns against a ~ms
// op) so that tests can switch paths in-process. One place for the row kernels and the quantized
// ones.
#pragma once

#include "quant.h"
#include "row_kernels.h"

namespace sparseinfer {
namespace cpu {

enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Bf16 };

Isa chosen_isa();  // raises when SPARSEINFER_CPU_ISA names a path this CPU lacks
RowKernels choose_row_kernels(WeightType type);
// AVX-512 uses its VNNI int8 dot products where the CPU has AVX512_VNNI and AVX512VL; else AVX2's.
QuantKernels choose_quant_kernels(QuantFormat format);

}  // namespace cpu
}  // namespace sparseinfer
