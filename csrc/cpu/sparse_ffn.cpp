// The sparse FFN on the CPU: down_proj(σ(x W_in[a]ᵀ) ⊙ (x W_up[a]ᵀ) ⊙ mask) over only the neurons a
// in `active`, reading one contiguous row of W_in, W_up and W_outᵀ per active neuron: decode is
// weight-bandwidth bound, so the bytes read (not the flops) set the speed.
//
// Two phases, each parallel and free of shared writes, so that the result is bit-identical for any
// thread count:
//   1. h (n, B): one task per active neuron reads its W_in / W_up rows once for all batch rows (the
//      rows stay in L1 between batch rows). Rows whose gate is exactly zero (ReLU family) or that
//      the row mask switches off skip the up projection; if none is left the neuron's W_up row is
//      not read.
//   2. y (B, d): the output columns are split into blocks (two per thread, handed out from a shared
//      counter, see parallel_chunks); each block accumulates
//      h[j, b] * W_outᵀ[a_j, block] over j in ascending order in an fp32 buffer. Neurons whose h is
//      0 for every batch row are skipped, so their W_outᵀ row is never read.
// The inner loops live in row_kernels_{scalar,avx2,avx512}.cpp, chosen per call from the CPU's
// features, or forced with SPARSEINFER_CPU_ISA=scalar|avx2|avx512 (how tests cover every path).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "../activation.h"
#include "row_kernels.h"

namespace sparseinfer {
namespace {

// σ applied to the gate (or, non-gated, the whole) projection.
inline float activate(Activation act, float z, float threshold) {
  switch (act) {
    case Activation::kRelu:
    case Activation::kDRelu:
      return z > 0.f ? z : 0.f;
    case Activation::kRelu2:
      return z > 0.f ? z * z : 0.f;
    case Activation::kSilu:
      return z / (1.f + std::exp(-z));
    case Activation::kFatRelu:
      return z > threshold ? z : 0.f;
  }
  return 0.f;
}

cpu::RowKernels choose_kernels_impl(cpu::WeightType type) {
  // Read per call (a getenv is ~100 ns against a ~ms op) so that tests can switch paths in-process.
  const char* forced = std::getenv("SPARSEINFER_CPU_ISA");
  const std::string isa = forced == nullptr ? "" : forced;
  const bool has_avx512 = __builtin_cpu_supports("avx512f");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  if (isa.empty() || isa == "auto") {
    if (has_avx512) return cpu::avx512_row_kernels(type);
    if (has_avx2) return cpu::avx2_row_kernels(type);
    return cpu::scalar_row_kernels(type);
  }
  if (isa == "scalar") return cpu::scalar_row_kernels(type);
  if (isa == "avx2") {
    TORCH_CHECK(has_avx2, "SPARSEINFER_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
    return cpu::avx2_row_kernels(type);
  }
  if (isa == "avx512") {
    TORCH_CHECK(has_avx512, "SPARSEINFER_CPU_ISA=avx512 but this CPU lacks AVX-512F");
    return cpu::avx512_row_kernels(type);
  }
  TORCH_CHECK(false, "SPARSEINFER_CPU_ISA must be auto, scalar, avx2 or avx512; got '", isa, "'");
}

cpu::WeightType weight_type_impl(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cpu::WeightType::kF32;
    case at::kBFloat16:
      return cpu::WeightType::kBF16;
    case at::kHalf:
      return cpu::WeightType::kF16;
    default:
      TORCH_CHECK(false, "sparse_ffn: x must be float32, bfloat16 or float16, got ", t);
  }
}

void check_weight(const char* name, const at::Tensor& w, const at::Tensor& x, int64_t m) {
  TORCH_CHECK(w.device().is_cpu(), "sparse_ffn: ", name, " must be on the CPU");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == m && w.size(1) == x.size(1), "sparse_ffn: ", name,
              " must have shape (m, d) = (", m, ", ", x.size(1), "), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "sparse_ffn: ", name, " dtype ", w.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  // Weights are never copied behind the caller's back: a hidden copy would cost more than the op.
  TORCH_CHECK(w.is_contiguous(), "sparse_ffn: ", name, " must be contiguous");
}

void check_args(const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& w_up,
                const at::Tensor& w_out_t, const at::Tensor& active,
                const std::optional<at::Tensor>& row_mask, const at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu(), "sparse_ffn: x must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "sparse_ffn: x must have shape (B, d), got ", x.sizes());
  const int64_t m = w_in.dim() == 2 ? w_in.size(0) : -1;
  weight_type_impl(x.scalar_type());
  check_weight("w_in", w_in, x, m);
  if (w_up.has_value()) check_weight("w_up", *w_up, x, m);
  check_weight("w_out_t", w_out_t, x, m);
  TORCH_CHECK(active.device().is_cpu(), "sparse_ffn: active must be on the CPU");
  TORCH_CHECK(active.dim() == 1 && active.scalar_type() == at::kInt,
              "sparse_ffn: active must be a 1-D int32 tensor, got ", active.scalar_type(), " ",
              active.sizes());
  if (row_mask.has_value()) {
    TORCH_CHECK(row_mask->device().is_cpu(), "sparse_ffn: row_mask must be on the CPU");
    TORCH_CHECK(row_mask->scalar_type() == at::kBool && row_mask->dim() == 2 &&
                    row_mask->size(0) == x.size(0) && row_mask->size(1) == m,
                "sparse_ffn: row_mask must be bool of shape (B, m) = (", x.size(0), ", ", m,
                "), got ", row_mask->scalar_type(), " ", row_mask->sizes());
  }
  TORCH_CHECK(out.device().is_cpu() && out.sizes() == x.sizes() &&
                  out.scalar_type() == x.scalar_type() && out.is_contiguous(),
              "sparse_ffn_out: out must be a contiguous CPU tensor matching x in shape and dtype");
}

// fp32 (B, ld) block -> the caller's dtype.
void store_row(const float* src, int64_t len, at::ScalarType type, void* dst) {
  if (type == at::kFloat) {
    std::memcpy(dst, src, len * sizeof(float));
  } else if (type == at::kBFloat16) {
    auto* d = static_cast<c10::BFloat16*>(dst);
    for (int64_t c = 0; c < len; ++c) d[c] = c10::BFloat16(src[c]);
  } else {
    auto* d = static_cast<c10::Half*>(dst);
    for (int64_t c = 0; c < len; ++c) d[c] = c10::Half(src[c]);
  }
}

// Runs fn(begin, end) over [0, count) in chunks of `chunk`, handed out from a shared counter
// instead of one even split per thread: where cores are shared (other processes, the engine's own
// threads) a preempted thread then holds back only its current chunk, not 1/threads of the work.
// Which thread runs a chunk never changes its result, so the output stays bit-identical for any
// thread count.
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

void sparse_ffn_out_cpu(const at::Tensor& x, const at::Tensor& w_in,
                        const std::optional<at::Tensor>& w_up, const at::Tensor& w_out_t,
                        const at::Tensor& active, const std::optional<at::Tensor>& row_mask,
                        c10::string_view activation, double threshold, at::Tensor& out) {
  check_args(x, w_in, w_up, w_out_t, active, row_mask, out);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const float thr = static_cast<float>(threshold);
  const int64_t B = x.size(0), d = x.size(1), m = w_in.size(0);
  const at::Tensor act_c = active.contiguous();
  const int32_t* idx = act_c.const_data_ptr<int32_t>();
  const int64_t n = act_c.numel();
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(idx[j] >= 0 && idx[j] < m, "sparse_ffn: active[", j, "] = ", idx[j],
                " is out of range [0, ", m, ")");
  }
  if (B == 0 || d == 0) return;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();  // (B, d)
  const at::Tensor mask_c = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  const bool* mask = row_mask.has_value() ? mask_c.const_data_ptr<bool>() : nullptr;
  const cpu::RowKernels k = choose_kernels_impl(weight_type_impl(x.scalar_type()));
  const int64_t esize = static_cast<int64_t>(x.element_size());
  const auto* w_in_p = static_cast<const char*>(w_in.const_data_ptr());
  const auto* w_up_p =
      w_up.has_value() ? static_cast<const char*>(w_up->const_data_ptr()) : nullptr;
  const auto* w_out_p = static_cast<const char*>(w_out_t.const_data_ptr());
  const float* xp = x32.const_data_ptr<float>();
  std::vector<float> h(static_cast<size_t>(n * B));  // (n, B): one neuron's batch values together

  // Phase 1: h.
  parallel_chunks(n, /*chunk=*/16, [&](int64_t begin, int64_t end) {
    std::vector<const float*> xs(B);
    std::vector<int32_t> rows(B);
    std::vector<float> z(B), up(B);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t a = idx[j];
      float* hj = h.data() + j * B;
      int nrows = 0;  // the batch rows this neuron serves
      for (int64_t b = 0; b < B; ++b) {
        hj[b] = 0.f;
        if (mask == nullptr || mask[b * m + a]) rows[nrows++] = static_cast<int32_t>(b);
      }
      // Gate / input projection for the served rows, kMaxDotRows at a time.
      // The row read next (W_up's, else the next neuron's W_in) is prefetched meanwhile.
      const char* next_row = nullptr;
      auto project = [&](const char* w, int count, float* res) {
        for (int r0 = 0; r0 < count; r0 += cpu::kMaxDotRows) {
          const int nr = std::min(cpu::kMaxDotRows, count - r0);
          for (int r = 0; r < nr; ++r) xs[r] = xp + rows[r0 + r] * d;
          const bool last = r0 + nr >= count;
          k.dots(w + a * d * esize, last ? next_row : nullptr, xs.data(), nr, d, res + r0);
        }
      };
      const char* next_in = j + 1 < n ? w_in_p + idx[j + 1] * d * esize : nullptr;
      next_row = w_up_p != nullptr ? w_up_p + a * d * esize : next_in;
      project(w_in_p, nrows, z.data());
      int kept = 0;
      for (int r = 0; r < nrows; ++r) {
        const float g = activate(act, z[r], thr);
        if (w_up_p == nullptr) {
          hj[rows[r]] = g;
        } else if (g != 0.f) {  // an exact zero gate makes h zero whatever up is
          z[kept] = g;
          rows[kept++] = rows[r];
        }
      }
      if (w_up_p == nullptr || kept == 0) continue;
      next_row = next_in;
      project(w_up_p, kept, up.data());
      for (int r = 0; r < kept; ++r) {
        const float u = act == Activation::kDRelu ? (up[r] > 0.f ? up[r] : 0.f) : up[r];
        hj[rows[r]] = z[r] * u;
      }
    }
  });

  // Phase 2: y. Blocks are multiples of 64 columns, so every column has the same position in its
  // block's vector loop whatever the thread count.
  // Two blocks per thread (for the dynamic hand-out above), but at least 512 columns each: every
  // block reads a segment of each active W_out^T row, and short segments stream poorly.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t blk = std::max<int64_t>(512, (d + 2 * threads - 1) / (2 * threads) + 63) / 64 * 64;
  const int64_t nblk = (d + blk - 1) / blk;
  const at::ScalarType out_type = out.scalar_type();
  char* out_p = static_cast<char*>(out.mutable_data_ptr());
  // Neurons with h != 0 in some row: the others' W_outᵀ rows are never read.
  std::vector<int64_t> live;
  live.reserve(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    const float* hj = h.data() + j * B;
    if (std::any_of(hj, hj + B, [](float v) { return v != 0.f; })) live.push_back(j);
  }
  const int64_t n_live = static_cast<int64_t>(live.size());
  constexpr int kGroup = cpu::kMaxAxpyWeights;
  parallel_chunks(nblk, /*chunk=*/1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> rows(B);
    const void* ws[kGroup];
    const void* nexts[kGroup];
    const float* coefs[kGroup];
    for (int64_t blk_i = begin; blk_i < end; ++blk_i) {
      const int64_t c0 = blk_i * blk;
      const int64_t len = std::min(blk, d - c0);
      std::vector<float> acc(static_cast<size_t>(B * len), 0.f);  // (B, len)
      auto row_of = [&](int64_t l) { return w_out_p + (idx[live[l]] * d + c0) * esize; };
      for (int64_t g0 = 0; g0 < n_live; g0 += kGroup) {
        const int nw = static_cast<int>(std::min<int64_t>(kGroup, n_live - g0));
        for (int i = 0; i < nw; ++i) {
          ws[i] = row_of(g0 + i);
          coefs[i] = h.data() + live[g0 + i] * B;
          nexts[i] = g0 + 2 * kGroup + i < n_live ? row_of(g0 + 2 * kGroup + i) : nullptr;
        }
        int nz = 0;  // batch rows with a nonzero coefficient in this group
        for (int64_t b = 0; b < B; ++b) {
          bool any = false;
          for (int i = 0; i < nw; ++i) any = any || coefs[i][b] != 0.f;
          if (any) rows[nz++] = static_cast<int32_t>(b);
        }
        k.axpys(ws, nw, nexts, coefs, rows.data(), nz, acc.data(), len, len);
      }
      for (int64_t b = 0; b < B; ++b) {
        store_row(acc.data() + b * len, len, out_type, out_p + (b * d + c0) * esize);
      }
    }
  });
}

at::Tensor sparse_ffn_cpu(const at::Tensor& x, const at::Tensor& w_in,
                          const std::optional<at::Tensor>& w_up, const at::Tensor& w_out_t,
                          const at::Tensor& active, const std::optional<at::Tensor>& row_mask,
                          c10::string_view activation, double threshold) {
  TORCH_CHECK(x.dim() == 2, "sparse_ffn: x must have shape (B, d), got ", x.sizes());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  sparse_ffn_out_cpu(x, w_in, w_up, w_out_t, active, row_mask, activation, threshold, out);
  return out;
}

}  // namespace

namespace cpu {
RowKernels choose_row_kernels(WeightType type) { return choose_kernels_impl(type); }
WeightType weight_type_of(at::ScalarType type) { return weight_type_impl(type); }
}  // namespace cpu
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CPU, m) {
  m.impl("sparse_ffn", &sparseinfer::sparse_ffn_cpu);
  m.impl("sparse_ffn_out", &sparseinfer::sparse_ffn_out_cpu);
}
