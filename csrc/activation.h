// The FFN activations the sparse kernels apply, by the names the Python side passes (model.config's
// SUPPORTED_ACTIVATIONS): one enum and one parser for the CPU and the CUDA sources. Each source
// applies σ with its own math (std::exp on the CPU, __expf on the GPU).
#pragma once

#include <c10/util/Exception.h>

#include <string>
#include <string_view>

namespace sparseinfer {

enum class Activation : int { kRelu, kRelu2, kSilu, kFatRelu, kDRelu };

inline Activation parse_activation(std::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "relu2") return Activation::kRelu2;
  if (name == "silu") return Activation::kSilu;
  if (name == "fatrelu") return Activation::kFatRelu;
  if (name == "drelu") return Activation::kDRelu;
  TORCH_CHECK(false,
              "sparse_ffn: activation must be one of relu, relu2, silu, fatrelu, drelu; got '",
              std::string(name), "'");
}

}  // namespace sparseinfer
