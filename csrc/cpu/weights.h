// How the CPU ops see a weight matrix and the activations it multiplies: dense (a float tensor in
// x's dtype, read by the row kernels from fp32 x) or block-quantized (a uint8 tensor of ggml Q8_0 /
// Q4_0 rows, read by the quantized kernels from x quantized to Q8_0). One place for the checks and
// for the two kinds of dot product and axpy, so that every op handles both alike.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string_view>
#include <vector>

#include "isa.h"

namespace sparseinfer {
namespace cpu {

// A quantized format and layout: plain ggml rows, or interleaved for dot products ("_i8", quant.h).
struct WeightFormat {
  QuantFormat format;
  bool interleaved = false;
  WeightFormat plain() const { return WeightFormat{format, false}; }
};

// "none" (the weights are in x's dtype), "q8_0", "q4_0", "q8_0_i8" or "q4_0_i8".
std::optional<WeightFormat> parse_weight_format(std::string_view name, const char* op);
WeightType weight_type_of(at::ScalarType type);  // x's dtype -> the row kernels' weight type

// A (rows, cols) weight matrix, checked: dense, contiguous, in `x_type`; or uint8 (rows, cols / 32
// * block_bytes) for a quantized format (cols % 32 == 0).
struct WeightMatrix {
  const char* data = nullptr;
  int64_t rows = 0, cols = 0, row_bytes = 0;
  std::optional<WeightFormat> format;
  const char* row(int64_t i) const { return data + i * row_bytes; }
  // The part of a row from column c0 on (c0 % 32 == 0 when quantized).
  const char* segment(const char* row, int64_t c0) const;
};
WeightMatrix weight_matrix(const at::Tensor& w, std::optional<WeightFormat> format, int64_t rows,
                           int64_t cols, at::ScalarType x_type, const char* op, const char* name);

// The activations x (B, d) prepared for one op's dot products with `format` weights: fp32, and, for
// quantized weights, quantized to Q8_0 once for all the op's rows.
class Activations {
 public:
  // `format`: the weights the dot products meet (an interleaved format quantizes x interleaved).
  Activations(const at::Tensor& x, std::optional<WeightFormat> format);
  // res[k] = w_row . x[rows[k]] for k < count.
  void dots(const char* w_row, const char* next, const int32_t* rows, int count, float* res) const;
  // res[i] = ws[i] . x[0] for i < nw <= kMaxGatherRows (x has one row): scattered rows computed
  // together where the kernels can (interleaved quantized rows, bf16 rows on AVX512_BF16), else one
  // after another. nexts: nw rows read after these (prefetched; entries may be nullptr).
  void gather(const char* const* ws, const char* const* nexts, int nw, float* res) const;
  // out[b * (end - begin) + i - begin] = w.row(i) . x[b] for every row b of x, begin <= i < end: a
  // dense GEMV/GEMM over consecutive rows (interleaved quantized rows in one kernel call per 4 rows
  // of x).
  void gemv(const WeightMatrix& w, int64_t begin, int64_t end, float* out) const;
  // buf[rows[k] * ldb + c] += sum_i coefs[i][rows[k]] * ws[i][c], c < len, over nw <= 4 row
  // segments.
  void axpys(const char* const* ws, int nw, const char* const* nexts, const float* const* coefs,
             const int32_t* rows, int nrows, float* buf, int64_t ldb, int64_t len) const;
  int64_t d() const { return d_; }

 private:
  int64_t d_, rows_;
  std::optional<WeightFormat> format_;
  const float* x32_ = nullptr;  // (rows_, d_): x itself (fp32), own_ or kept_
  std::vector<float> own_;
  at::Tensor kept_;
  // (rows_, d_): x in bf16, where the row kernels take it so (dots_bf16): x itself or kept16_.
  const uint16_t* x16_ = nullptr;
  at::Tensor kept16_;
  RowKernels rk_{};
  QuantKernels qk_{};
  QuantizedRows xq_;
};

// Requests every cache line of a row (into L1): for rows read out of order, ahead of their turn.
inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
}

// Runs fn(begin, end) over [0, count) in chunks of `chunk`, handed out from a shared counter
// instead of one even split per thread: where cores are shared (other processes, the engine's own
// threads) a preempted thread then holds back only its current chunk, not 1/threads of the work.
// Which thread runs a chunk never changes its result, so outputs stay bit-identical for any thread
// count.
template <typename Fn>
void parallel_chunks(int64_t count, int64_t chunk, const Fn& fn) {
  const int64_t nchunks = (count + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(std::max(1, at::get_num_threads()), nchunks);
  std::atomic<int64_t> next{0};
  // One task per worker (inside another parallel region at::parallel_for runs inline: one worker).
  at::parallel_for(0, workers, /*grain_size=*/1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) {
      fn(c * chunk, std::min(count, (c + 1) * chunk));
    }
  });
}

}  // namespace cpu
}  // namespace sparseinfer
