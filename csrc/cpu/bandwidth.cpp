// read_bytes(buf): reads every byte of a large CPU tensor once, on all of torch's threads, and
// returns a checksum (so the reads cannot be optimised away). Timed by the benchmarks, it is the
// machine's read bandwidth against which every kernel is measured: a plain streaming read, no
// arithmetic to speak of (64-bit integer adds over 16 KiB chunks handed out dynamically, as the
// kernels' work is).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <immintrin.h>

#include <atomic>

#include "weights.h"

namespace sparseinfer {
namespace {

// Plain 256-bit loads, four independent adds: with no software prefetch, which on the development
// machine cost a quarter of the bandwidth (the hardware prefetchers do better on a sequential
// stream).
__attribute__((target("avx2"))) uint64_t sum_avx2(const uint64_t* p, int64_t begin, int64_t end) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    a = _mm256_add_epi64(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi64(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    c = _mm256_add_epi64(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    d = _mm256_add_epi64(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
  uint64_t total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < end; ++i) total += p[i];
  return total;
}

uint64_t sum_plain(const uint64_t* p, int64_t begin, int64_t end) {
  uint64_t total = 0;
  for (int64_t i = begin; i < end; ++i) total += p[i];
  return total;
}

int64_t read_bytes_cpu(const at::Tensor& buf) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(),
              "read_bytes: buf must be a contiguous CPU tensor");
  const auto* p = static_cast<const uint64_t*>(buf.const_data_ptr());
  const int64_t words = buf.numel() * buf.element_size() / 8;
  const bool avx2 = __builtin_cpu_supports("avx2");
  std::atomic<uint64_t> total{0};
  cpu::parallel_chunks(words, /*chunk=*/32768, [&](int64_t begin, int64_t end) {
    const uint64_t s = avx2 ? sum_avx2(p, begin, end) : sum_plain(p, begin, end);
    total.fetch_add(s, std::memory_order_relaxed);
  });
  return static_cast<int64_t>(total.load());
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) { m.impl("read_bytes", &sparseinfer::read_bytes_cpu); }
