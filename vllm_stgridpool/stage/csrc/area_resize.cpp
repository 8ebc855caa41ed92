// area_resize_into: a CPU frame resized by area interpolation (the windows
// [floor(i * H / h), ceil((i + 1) * H / h)) of adaptive average pooling),
// written straight into its places in the mosaics, each cropped to its
// rows and columns: no tile is materialised and copied. Each output sums
// its window row by row in float32 (float64 for float64) and divides by the
// window's height, then by its width, as ATen's adaptive average pooling
// does, so the result is area interpolation's bit for bit (its 1 x 1 output,
// a mean, may differ in the last bit).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dtypes.h"
#include "kernels.h"

namespace stgridpool {
namespace {

// One output's area average over `blocks` blocks of channels, its sums in registers: `source` is the frame
// at the first block's channels, the window rows [h0, h1) and columns [w0, w1), and the result goes to
// channel offset d of every target. The columns the next output of the row adds (up to next_w1) are fetched
// meanwhile: measured 15% off float32 D = 896 frames read from memory, no change at bfloat16 D = 3584.
template <typename T, int blocks>
inline void window_blocks(const T* source, int64_t fs0, int64_t fs1, int64_t h0, int64_t h1, int64_t w0,
                          int64_t w1, int64_t next_w1, typename Accumulator<T>::type rows_in,
                          typename Accumulator<T>::type cols_in,
                          const std::vector<T*>& targets, int64_t d) {
  using V = typename Block<T>::vector;
  constexpr int64_t block = Block<T>::size;
  V acc[4 * blocks] = {};
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w1; w < next_w1; ++w) {
      for (int k = 0; k < blocks; ++k) prefetch_block(source + h * fs0 + w * fs1 + k * block);
    }
  }
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const T* token = source + h * fs0 + w * fs1;
#pragma GCC unroll 8
      for (int b = 0; b < 4 * blocks; ++b) acc[b] += Block<T>::load(token + (b / 4) * block, b % 4);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < 4 * blocks; ++b) acc[b] = acc[b] / rows_in / cols_in;  // as ATen's adaptive pooling
  for (T* target : targets) {
    for (int k = 0; k < blocks; ++k) Block<T>::store(target + d + k * block, acc + 4 * k);
  }
}

template <typename T>
void resize(const at::Tensor& frame, const std::vector<at::Tensor>& places, int64_t out_h, int64_t out_w) {
  using A = typename Accumulator<T>::type;
  const int64_t in_h = frame.size(0), in_w = frame.size(1), dim = frame.size(2);
  const int64_t fs0 = frame.stride(0), fs1 = frame.stride(1);
  const T* source = frame.const_data_ptr<T>();
  std::vector<T*> targets;
  std::vector<int64_t> rows, cols, ts0, ts1;
  for (const auto& place : places) {
    targets.push_back(place.mutable_data_ptr<T>());
    rows.push_back(place.size(0));
    cols.push_back(place.size(1));
    ts0.push_back(place.stride(0));
    ts1.push_back(place.stride(1));
  }
  const int64_t count = static_cast<int64_t>(places.size());
  at::parallel_for(0, out_h * out_w, 8, [=](int64_t begin, int64_t end) {
    constexpr int64_t block = Block<T>::size;
    alignas(32) A sums[block];
    std::vector<T*> here;  // this output's token in each place that keeps it (places are cropped)
    for (int64_t o = begin; o < end; ++o) {
      const int64_t i = o / out_w, j = o % out_w;
      here.clear();
      for (int64_t p = 0; p < count; ++p) {
        if (i < rows[p] && j < cols[p]) here.push_back(targets[p] + i * ts0[p] + j * ts1[p]);
      }
      if (here.empty()) continue;  // cropped away everywhere
      const int64_t h0 = (i * in_h) / out_h, h1 = ((i + 1) * in_h + out_h - 1) / out_h;
      const int64_t w0 = (j * in_w) / out_w, w1 = ((j + 1) * in_w + out_w - 1) / out_w;
      const A rows_in = static_cast<A>(h1 - h0), cols_in = static_cast<A>(w1 - w0);
      const int64_t next_w1 = j + 1 < out_w ? ((j + 2) * in_w + out_w - 1) / out_w : w1;
      // Two blocks at a time while they last (bfloat16 D = 3584 frames 10-15% faster than one), then one.
      int64_t d = 0;
      for (; d + 2 * block <= dim; d += 2 * block) {
        window_blocks<T, 2>(source + d, fs0, fs1, h0, h1, w0, w1, next_w1, rows_in, cols_in, here, d);
      }
      for (; d + block <= dim; d += block) {
        window_blocks<T, 1>(source + d, fs0, fs1, h0, h1, w0, w1, next_w1, rows_in, cols_in, here, d);
      }
      for (int64_t n = 0; n < dim - d; ++n) {  // the last dim % block channels
        A s = 0;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) s += load(source + h * fs0 + w * fs1 + d + n);
        }
        sums[n] = s / rows_in / cols_in;
      }
      for (T* target : here) store_finite(target + d, sums, dim - d);
    }
  });
}

}  // namespace

void area_resize_into(const at::Tensor& frame, at::TensorList places, int64_t height, int64_t width) {
  TORCH_CHECK(frame.device().is_cpu() && frame.dim() == 3 && frame.stride(2) == 1,
              "area_resize_into: a (H, W, D) CPU frame with D innermost");
  TORCH_CHECK(height >= 1 && width >= 1 && height <= frame.size(0) && width <= frame.size(1),
              "area_resize_into: area interpolation shrinks");
  for (const auto& place : places) {
    TORCH_CHECK(place.device().is_cpu() && place.dim() == 3 && place.stride(2) == 1 &&
                    place.scalar_type() == frame.scalar_type() && place.size(2) == frame.size(2) &&
                    place.size(0) <= height && place.size(1) <= width,
                "area_resize_into: each place is a (rows <= height, cols <= width, D) CPU view like the frame");
  }
  const std::vector<at::Tensor> targets(places.begin(), places.end());
  // float32, float64 and bfloat16 (ops.py sends no other dtype).
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, frame.scalar_type(), "area_resize_into", [&] {
    resize<scalar_t>(frame, targets, height, width);
  });
}

}  // namespace stgridpool

TORCH_LIBRARY_FRAGMENT(stgridpool, m) {
  m.def("area_resize_into(Tensor frame, Tensor(a!)[] places, int height, int width) -> ()");
}

TORCH_LIBRARY_IMPL(stgridpool, CPU, m) { m.impl("area_resize_into", &stgridpool::area_resize_into); }
