// PyTorch operators that tch (the Rust binding under Burn's LibTorch backend) does not wrap,
// because they take a `bool[3]` output mask. Built only with the worker's `libtorch` feature.
//
// Tensors cross the boundary as `at::Tensor*`, the handle tch uses: inputs are borrowed, and
// every output is a new heap handle that the Rust side takes over (tch frees it on drop), or
// null where the mask did not ask for it. Errors come back as a message in a thread-local
// buffer instead of a C++ exception unwinding into Rust.

#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/native_batch_norm_backward.h>

#include <array>
#include <exception>
#include <string>
#include <tuple>

namespace {

thread_local std::string last_error;

at::Tensor* handle(const at::Tensor& tensor) {
  return tensor.defined() ? new at::Tensor(tensor) : nullptr;
}

void publish(const std::tuple<at::Tensor, at::Tensor, at::Tensor>& result, at::Tensor** out) {
  out[0] = handle(std::get<0>(result));
  out[1] = handle(std::get<1>(result));
  out[2] = handle(std::get<2>(result));
}

}  // namespace

extern "C" {

// The message of the last failed call on this thread.
const char* effnet_aten_last_error() { return last_error.c_str(); }

// aten::convolution_backward for a 2-d, non-transposed convolution: the gradients of the
// input, the weight and the bias (out[0..3]) that `mask` asks for. Returns 0, or -1 with
// effnet_aten_last_error set.
int effnet_conv2d_backward(const at::Tensor* grad_output, const at::Tensor* input,
                           const at::Tensor* weight, const int64_t* stride,
                           const int64_t* padding, const int64_t* dilation, int64_t groups,
                           const int* mask, at::Tensor** out) {
  try {
    const std::array<bool, 3> output_mask{mask[0] != 0, mask[1] != 0, mask[2] != 0};
    const int64_t bias_size = weight->size(0);
    publish(at::convolution_backward(*grad_output, *input, *weight,
                                     at::IntArrayRef(&bias_size, 1), at::IntArrayRef(stride, 2),
                                     at::IntArrayRef(padding, 2), at::IntArrayRef(dilation, 2),
                                     /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
                                     output_mask),
            out);
    return 0;
  } catch (const std::exception& error) {
    last_error = error.what();
    return -1;
  }
}

// aten::native_batch_norm_backward in training mode: the gradients of the input, gamma and
// beta (out[0..3]) that `mask` asks for, from the batch mean and inverse standard deviation
// the forward saved. Returns 0, or -1 with effnet_aten_last_error set.
int effnet_batch_norm_backward(const at::Tensor* grad_output, const at::Tensor* input,
                               const at::Tensor* gamma, const at::Tensor* save_mean,
                               const at::Tensor* save_invstd, double epsilon, const int* mask,
                               at::Tensor** out) {
  try {
    const std::array<bool, 3> output_mask{mask[0] != 0, mask[1] != 0, mask[2] != 0};
    publish(at::native_batch_norm_backward(*grad_output, *input, *gamma, std::nullopt,
                                           std::nullopt, *save_mean, *save_invstd,
                                           /*train=*/true, epsilon, output_mask),
            out);
    return 0;
  } catch (const std::exception& error) {
    last_error = error.what();
    return -1;
  }
}

}  // extern "C"
