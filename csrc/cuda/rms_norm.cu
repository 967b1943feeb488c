// RMSNorm on the GPU: one block per row, fp32 accumulation, a warp-shuffle then shared-memory
// reduction of the sum of squares. Runs on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace sparseinfer {
namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;  // valid in thread 0
}

template <typename scalar_t>
__global__ void rms_norm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                scalar_t* __restrict__ y, int64_t d, float eps) {
  const scalar_t* xr = x + blockIdx.x * d;
  scalar_t* yr = y + blockIdx.x * d;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = static_cast<float>(xr[i]);
    sum_sq += v * v;
  }
  __shared__ float inv_rms;
  sum_sq = block_sum(sum_sq);
  if (threadIdx.x == 0) inv_rms = rsqrtf(sum_sq / static_cast<float>(d) + eps);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const scalar_t normed = static_cast<scalar_t>(static_cast<float>(xr[i]) * inv_rms);
    yr[i] = static_cast<scalar_t>(static_cast<float>(normed) * static_cast<float>(w[i]));
  }
}

void rms_norm_out_cuda(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have at least one dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must have shape (", x.size(-1), "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight dtype differs from x dtype");
  TORCH_CHECK(
      out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.is_contiguous(),
      "rms_norm_out: out must be contiguous and match x in shape and dtype");
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device() && out.device() == x.device(),
              "rms_norm: all tensors must be on the same CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t d = x.size(-1);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cuda", [&] {
    rms_norm_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), d, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  rms_norm_out_cuda(x, weight, eps, out);
  return out;
}

}  // namespace
}  // namespace sparseinfer

TORCH_LIBRARY_IMPL(sparseinfer, CUDA, m) { m.impl("rms_norm", &sparseinfer::rms_norm_cuda); }
