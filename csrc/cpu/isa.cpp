#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace sparseinfer {
namespace cpu {

Isa chosen_isa() {
  const char* forced = std::getenv("SPARSEINFER_CPU_ISA");
  const std::string isa = forced == nullptr ? "" : forced;
  const bool has_avx512 = __builtin_cpu_supports("avx512f");
  const bool has_bf16 =
      has_avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  if (isa.empty() || isa == "auto")
    return has_bf16     ? Isa::kAvx512Bf16
           : has_avx512 ? Isa::kAvx512
           : has_avx2   ? Isa::kAvx2
                        : Isa::kScalar;
  if (isa == "scalar") return Isa::kScalar;
  if (isa == "avx2") {
    TORCH_CHECK(has_avx2, "SPARSEINFER_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
    return Isa::kAvx2;
  }
  if (isa == "avx512") {
    TORCH_CHECK(has_avx512, "SPARSEINFER_CPU_ISA=avx512 but this CPU lacks AVX-512F");
    return Isa::kAvx512;
  }
  if (isa == "avx512bf16") {
    TORCH_CHECK(has_bf16, "SPARSEINFER_CPU_ISA=avx512bf16 but this CPU lacks AVX512_BF16");
    return Isa::kAvx512Bf16;
  }
  TORCH_CHECK(false, "SPARSEINFER_CPU_ISA must be auto, scalar, avx2, avx512 or avx512bf16; got '",
              isa, "'");
}

RowKernels choose_row_kernels(WeightType type) {
  switch (chosen_isa()) {
    case Isa::kAvx512Bf16:
      return avx512bf16_row_kernels(type);
    case Isa::kAvx512:
      return avx512_row_kernels(type);
    case Isa::kAvx2:
      return avx2_row_kernels(type);
    case Isa::kScalar:
      break;
  }
  return scalar_row_kernels(type);
}

QuantKernels choose_quant_kernels(QuantFormat format) {
  switch (chosen_isa()) {
    case Isa::kAvx512Bf16:  // (no bf16 in the quantized kernels)
    case Isa::kAvx512:
      if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bw")) {
        return avx512_quant_kernels(format);
      }
      return avx2_quant_kernels(format);  // every AVX-512 CPU has AVX2
    case Isa::kAvx2:
      return avx2_quant_kernels(format);
    case Isa::kScalar:
      break;
  }
  return scalar_quant_kernels(format);
}

}  // namespace cpu
}  // namespace sparseinfer
