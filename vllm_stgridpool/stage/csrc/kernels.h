// The stage's CPU kernels as C++ functions: the dispatcher's ops call them, and so does run_plan, which
// runs a video's plan in one op call.
#pragma once

#include <ATen/ATen.h>

namespace stgridpool {

// NSP of x (N, H, W, D) written into out (N, H', W', D); norm_p 1 or 2.
void norm_pool_into(const at::Tensor& x, const at::Tensor& out, int64_t k, double temperature, double norm_p);

// frame (H, W, D) resized by area interpolation to (height, width), written into each place (the tile's
// top-left rows x cols).
void area_resize_into(const at::Tensor& frame, at::TensorList places, int64_t height, int64_t width);

}  // namespace stgridpool
