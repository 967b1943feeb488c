// The sparse FFN on the GPU, on the current stream, in three launches:
//   1. gather-GEMV: one warp per active neuron reads its W_in (and, unless every gate is exactly 0,
//      W_up) row once per tile of batch rows, with coalesced loads, and writes h (n, B) in fp32;
//   2. split-K axpy: a thread per output column, blockIdx.y splits the active neurons into chunks;
//      each thread accumulates h[j, b] * W_outᵀ[a_j, c] over its chunk (skipping neurons whose h is
//      0 for the whole tile, so their row is not read) and atomically adds into an fp32 (B, d)
//      buffer (the order of the atomics makes fp32 sums differ in the last bits from run to run);
//   3. the fp32 buffer is rounded into `out`.
// Not yet run on hardware (the development machine has no GPU); CI compiles it
// (scripts/compile_cuda.sh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>

#include "../activation.h"

namespace sparseinfer {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGemvTile = 4;   // batch rows per pass over a W_in / W_up row
constexpr int kAxpyTile = 8;   // batch rows per pass over a W_outᵀ column
constexpr int kMinChunk = 32;  // fewest neurons a split-K chunk gets

// Kernels take the activation as a plain int (Activation's underlying value).
constexpr int kRelu = static_cast<int>(Activation::kRelu);
constexpr int kRelu2 = static_cast<int>(Activation::kRelu2);
constexpr int kSilu = static_cast<int>(Activation::kSilu);
constexpr int kDRelu = static_cast<int>(Activation::kDRelu);

__device__ __forceinline__ float activate(int act, float z, float threshold) {
  switch (act) {
    case kRelu:
    case kDRelu:
      return z > 0.f ? z : 0.f;
    case kRelu2:
      return z > 0.f ? z * z : 0.f;
    case kSilu:
      return z / (1.f + __expf(-z));
    default:
      return z > threshold ? z : 0.f;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // in every lane
}

// acc[t] = W[a, :] · x[b0 + t, :] for t < nb, summed across the warp.
template <typename scalar_t>
__device__ __forceinline__ void warp_dots(const scalar_t* __restrict__ w,
                                          const scalar_t* __restrict__ x, int64_t b0, int nb,
                                          int64_t d, float* acc) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < kGemvTile; ++t) acc[t] = 0.f;
  for (int64_t c = lane; c < d; c += 32) {
    const float wc = static_cast<float>(w[c]);
#pragma unroll
    for (int t = 0; t < kGemvTile; ++t) {
      if (t < nb) acc[t] += wc * static_cast<float>(x[(b0 + t) * d + c]);
    }
  }
#pragma unroll
  for (int t = 0; t < kGemvTile; ++t) acc[t] = warp_sum(acc[t]);
}

template <typename scalar_t>
__global__ void gate_up_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w_in,
                               const scalar_t* __restrict__ w_up,
                               const int32_t* __restrict__ active,
                               const bool* __restrict__ row_mask, float* __restrict__ h, int64_t n,
                               int64_t B, int64_t d, int64_t m, int act, float threshold) {
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (j >= n) return;  // whole warps leave together
  const int64_t a = active[j];
  CUDA_KERNEL_ASSERT(a >= 0 && a < m);
  const int lane = threadIdx.x % 32;
  for (int64_t b0 = 0; b0 < B; b0 += kGemvTile) {
    const int nb = B - b0 < kGemvTile ? static_cast<int>(B - b0) : kGemvTile;
    float z[kGemvTile];
    warp_dots(w_in + a * d, x, b0, nb, d, z);
    bool any = false;
#pragma unroll
    for (int t = 0; t < kGemvTile; ++t) {
      const bool on = t < nb && (row_mask == nullptr || row_mask[(b0 + t) * m + a]);
      z[t] = on ? activate(act, z[t], threshold) : 0.f;
      any = any || z[t] != 0.f;
    }
    if (w_up != nullptr && any) {  // `any` is the same in every lane: the sums were all-reduced
      float up[kGemvTile];
      warp_dots(w_up + a * d, x, b0, nb, d, up);
#pragma unroll
      for (int t = 0; t < kGemvTile; ++t) {
        z[t] *= act == kDRelu ? fmaxf(up[t], 0.f) : up[t];
      }
    } else if (w_up != nullptr) {
#pragma unroll
      for (int t = 0; t < kGemvTile; ++t) z[t] = 0.f;
    }
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < kGemvTile; ++t) {
        if (t < nb) h[j * B + b0 + t] = z[t];
      }
    }
  }
}

template <typename scalar_t>
__global__ void down_kernel(const scalar_t* __restrict__ w_out_t,
                            const int32_t* __restrict__ active, const float* __restrict__ h,
                            float* __restrict__ out32, int64_t n, int64_t B, int64_t d,
                            int64_t chunk) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t j1 = j0 + chunk < n ? j0 + chunk : n;
  for (int64_t b0 = 0; b0 < B; b0 += kAxpyTile) {
    const int nb = B - b0 < kAxpyTile ? static_cast<int>(B - b0) : kAxpyTile;
    float acc[kAxpyTile] = {};
    for (int64_t j = j0; j < j1; ++j) {
      float hv[kAxpyTile];
      bool any = false;
#pragma unroll
      for (int t = 0; t < kAxpyTile; ++t) {
        hv[t] = t < nb ? h[j * B + b0 + t] : 0.f;
        any = any || hv[t] != 0.f;
      }
      if (!any) continue;  // uniform across the block: the row is not read
      const float wc = static_cast<float>(w_out_t[static_cast<int64_t>(active[j]) * d + c]);
#pragma unroll
      for (int t = 0; t < kAxpyTile; ++t) acc[t] = fmaf(hv[t], wc, acc[t]);
    }
#pragma unroll
    for (int t = 0; t < kAxpyTile; ++t) {
      if (t < nb && acc[t] != 0.f) atomicAdd(out32 + (b0 + t) * d + c, acc[t]);
    }
  }
}

template <typename scalar_t>
__global__ void store_kernel(const float* __restrict__ src, scalar_t* __restrict__ dst,
                             int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) dst[i] = static_cast<scalar_t>(src[i]);
}

void check_weight(const char* name, const at::Tensor& w, const at::Tensor& x, int64_t m) {
  TORCH_CHECK(w.device() == x.device(), "sparse_ffn: ", name, " must be on x's device");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == m && w.size(1) == x.size(1), "sparse_ffn: ", name,
              " must have shape (m, d) = (", m, ", ", x.size(1), "), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "sparse_ffn: ", name, " dtype ", w.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(w.is_contiguous(), "sparse_ffn: ", name, " must be contiguous");
}

void sparse_ffn_out_cuda(const at::Tensor& x, const at::Tensor& w_in,
                         const std::optional<at::Tensor>& w_up, const at::Tensor& w_out_t,
                         const at::Tensor& active, const std::optional<at::Tensor>& row_mask,
                         c10::string_view activation, double threshold, at::Tensor& out) {
  TORCH_CHECK(x.is_cuda(), "sparse_ffn: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "sparse_ffn: x must have shape (B, d), got ", x.sizes());
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
              "sparse_ffn: x must be float32, bfloat16 or float16, got ", type);
  const int64_t m = w_in.dim() == 2 ? w_in.size(0) : -1;
  check_weight("w_in", w_in, x, m);
  if (w_up.has_value()) check_weight("w_up", *w_up, x, m);
  check_weight("w_out_t", w_out_t, x, m);
  TORCH_CHECK(
      active.device() == x.device() && active.dim() == 1 && active.scalar_type() == at::kInt,
      "sparse_ffn: active must be a 1-D int32 tensor on x's device");
  if (row_mask.has_value()) {
    TORCH_CHECK(row_mask->device() == x.device() && row_mask->scalar_type() == at::kBool &&
                    row_mask->dim() == 2 && row_mask->size(0) == x.size(0) &&
                    row_mask->size(1) == m,
                "sparse_ffn: row_mask must be bool of shape (B, m) = (", x.size(0), ", ", m,
                ") on x's device");
  }
  TORCH_CHECK(out.device() == x.device() && out.sizes() == x.sizes() && out.scalar_type() == type &&
                  out.is_contiguous(),
              "sparse_ffn_out: out must be a contiguous tensor on x's device matching x in shape "
              "and dtype");
  const int act =
      static_cast<int>(parse_activation(std::string_view(activation.data(), activation.size())));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), d = x.size(1), n = active.numel();
  if (B == 0 || d == 0) return;
  if (n == 0) {
    out.zero_();
    return;
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor ac = active.contiguous();
  const at::Tensor mc = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  at::Tensor h = at::empty({n, B}, x.options().dtype(at::kFloat));      // (n, B)
  at::Tensor out32 = at::zeros({B, d}, x.options().dtype(at::kFloat));  // (B, d)
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Enough (column tile, neuron chunk) blocks to fill every SM a few times over.
  const int64_t col_tiles = (d + kThreads - 1) / kThreads;
  const int64_t want_splits = std::max<int64_t>(1, 4 * sms / col_tiles);
  const int64_t chunk = std::max<int64_t>(kMinChunk, (n + want_splits - 1) / want_splits);
  const int64_t splits = (n + chunk - 1) / chunk;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "sparse_ffn_cuda", [&] {
    const scalar_t* w_up_p = w_up.has_value() ? w_up->const_data_ptr<scalar_t>() : nullptr;
    const bool* mask_p = row_mask.has_value() ? mc.const_data_ptr<bool>() : nullptr;
    const unsigned gemv_blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
    gate_up_kernel<scalar_t><<<gemv_blocks, kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), w_in.const_data_ptr<scalar_t>(), w_up_p,
        ac.const_data_ptr<int32_t>(), mask_p, h.mutable_data_ptr<float>(), n, B, d, m, act,
        static_cast<float>(threshold));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
    down_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        w_out_t.const_data_ptr<scalar_t>(), ac.const_data_ptr<int32_t>(), h.const_data_ptr<float>(),
        out32.mutable_data_ptr<float>(), n, B, d, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t count = B * d;
    store_kernel<scalar_t>
        <<<static_cast<unsigned>((count + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
            out32.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor sparse_ffn_cuda(const at::Tensor& x, const at::Tensor& w_in,
                           const std::optional<at::Tensor>& w_up, const at::Tensor& w_out_t,
                           const at::Tensor& active, const std::optional<at::Tensor>& row_mask,
                           c10::string_view activation, double threshold,
                           c10::string_view weight_format) {
  TORCH_CHECK(
      weight_format == "none",
      "sparse_ffn: the CUDA kernels take weights in x's dtype only (weight_format none), got ",
      std::string(weight_format.data(), weight_format.size()));
  TORCH_CHECK(x.dim() == 2, "sparse_ffn: x must have shape (B, d), got ", x.sizes());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  sparse_ffn_out_cuda(x, w_in, w_up, w_out_t, active, row_mask, activation, threshold, out);
  return out;
}

// cuBLAS's GEMV is already at bandwidth on the GPU; the op exists for the CPU (see cpu/linear.cpp).
at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, c10::string_view weight_format) {
  TORCH_CHECK(weight_format == "none",
              "linear: the CUDA path takes weights in x's dtype only (weight_format none), got ",
              std::string(weight_format.data(), weight_format.size()));
  TORCH_CHECK(x.dim() >= 1, "linear: x must have shape (..., d), got a scalar");
  return at::linear(x, weight, bias);
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CUDA, m) {
  m.impl("linear", &sparseinfer::linear_cuda);
  m.impl("sparse_ffn", &sparseinfer::sparse_ffn_cuda);
}
