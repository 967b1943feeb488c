// Leaving AVX-512 code for the rest of the extension, which is compiled for baseline x86-64 and so
// runs legacy-SSE scalar float code (movss, comiss) between kernel calls.
//
// The compiler's vzeroupper at a kernel's return cleans only zmm0-15; registers zmm16-31, which
// EVEX-encoded code allocates freely, keep whatever the kernel left in them. While they hold
// nonzero values every legacy-SSE instruction the caller runs afterwards is slowed down (the
// processor treats the vector state as dirty). Measured on a Sapphire Rapids core: the sparse FFN's
// gate rows, one 512-bit dot product per neuron with a few scalar instructions between them, read
// 8.8 GB/s with the rows in L2 and 18.6 GB/s once the kernel zeroes zmm16-31 before it returns.
// So every AVX-512 kernel is handed out wrapped in CleanExit.
//
// Included by the AVX-512 translation units only, after their `#pragma GCC target`.
#pragma once

namespace sparseinfer {
namespace cpu {
namespace {

inline void clear_high_zmm() {
  // Zeroing idioms: handled at register rename, no execution port.
  asm volatile(
      "vpxord %%zmm16, %%zmm16, %%zmm16\n\t"
      "vpxord %%zmm17, %%zmm17, %%zmm17\n\t"
      "vpxord %%zmm18, %%zmm18, %%zmm18\n\t"
      "vpxord %%zmm19, %%zmm19, %%zmm19\n\t"
      "vpxord %%zmm20, %%zmm20, %%zmm20\n\t"
      "vpxord %%zmm21, %%zmm21, %%zmm21\n\t"
      "vpxord %%zmm22, %%zmm22, %%zmm22\n\t"
      "vpxord %%zmm23, %%zmm23, %%zmm23\n\t"
      "vpxord %%zmm24, %%zmm24, %%zmm24\n\t"
      "vpxord %%zmm25, %%zmm25, %%zmm25\n\t"
      "vpxord %%zmm26, %%zmm26, %%zmm26\n\t"
      "vpxord %%zmm27, %%zmm27, %%zmm27\n\t"
      "vpxord %%zmm28, %%zmm28, %%zmm28\n\t"
      "vpxord %%zmm29, %%zmm29, %%zmm29\n\t"
      "vpxord %%zmm30, %%zmm30, %%zmm30\n\t"
      "vpxord %%zmm31, %%zmm31, %%zmm31\n\t"
      "vzeroupper" ::
          : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
            "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19",
            "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28",
            "xmm29", "xmm30", "xmm31");
}

// CleanExit<&kernel>::call: the kernel, then clear_high_zmm().
template <auto Kernel>
struct CleanExit;

template <class... Args, void (*Kernel)(Args...)>
struct CleanExit<Kernel> {
  static void call(Args... args) {
    Kernel(args...);
    clear_high_zmm();
  }
};

}  // namespace
}  // namespace cpu
}  // namespace sparseinfer
