// Every op schema of the extension, and nothing else. Kernels register per device under the same
// name (cpu/*.cpp, cuda/*.cu); the dispatcher picks one from the tensors' device.
#include <torch/library.h>

TORCH_LIBRARY(sparseinfer, m) {
  // y = weight * (x / sqrt(mean(x^2, -1) + eps)), over the last dim; fp32 accumulation. Rounds the
  // normalised x to x's dtype before the weight multiply, in Hugging Face LlamaRMSNorm's order
  // (the fp32 sum of squares may differ from torch's by an ulp: another summation order).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_out(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
}
