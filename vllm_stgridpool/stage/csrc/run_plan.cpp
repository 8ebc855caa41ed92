// run_plan: one video's plan in one op call. ops.py would otherwise walk the plan's steps in Python, a
// kernel call per step (about a hundred per 64-frame video, each some microseconds of Python and
// dispatch); here the same steps call the same kernels. The program is native.py's flat encoding of the
// plan (native._program), mosaics named by their buffers:
//   POOL_FRAMES start stop
//   RESIZE from_input source height width count, then count x (slot top left rows cols)
//   POOL_MOSAIC slot row
// The profiler sees each kernel under its op's name, as when ops.py calls them one by one.

#include <ATen/record_function.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"

namespace stgridpool {
namespace {

enum Code : int64_t { POOL_FRAMES = 0, RESIZE = 1, POOL_MOSAIC = 2 };

// The tile of `source` resized to (height, width), written into each place: area interpolation, or the
// frame itself where the tile has the frame's size (a one-frame mosaic).
void resize_step(const at::Tensor& source, const std::vector<at::Tensor>& places, int64_t height,
                 int64_t width) {
  if (height == source.size(0) && width == source.size(1)) {
    for (const auto& place : places) place.copy_(source.narrow(0, 0, place.size(0)).narrow(1, 0, place.size(1)));
    return;
  }
  RECORD_FUNCTION("stgridpool::area_resize_into", std::vector<c10::IValue>());
  area_resize_into(source, places, height, width);
}

void pool_step(const at::Tensor& x, const at::Tensor& out, int64_t k, double temperature, double norm_p) {
  RECORD_FUNCTION("stgridpool::norm_pool_into", std::vector<c10::IValue>());
  norm_pool_into(x, out, k, temperature, norm_p);
}

void run_plan(const at::Tensor& frames, const at::Tensor& pooled, const at::Tensor& buffers,
              at::IntArrayRef program, int64_t k, double temperature, double norm_p) {
  TORCH_CHECK(frames.dim() == 4 && pooled.dim() == 4 && buffers.dim() == 4,
              "run_plan: (T, H, W, D) frames, pooled rows and mosaic buffers");
  const int64_t size = static_cast<int64_t>(program.size());
  auto next = [&](int64_t& at) {
    TORCH_CHECK(at < size, "run_plan: the program ends inside a step");
    return program[at++];
  };
  int64_t at = 0;
  while (at < size) {
    const int64_t code = next(at);
    if (code == POOL_FRAMES) {
      const int64_t start = next(at), stop = next(at);
      pool_step(frames.slice(0, start, stop), pooled.slice(0, start, stop), k, temperature, norm_p);
    } else if (code == RESIZE) {
      const bool from_input = next(at) != 0;
      const int64_t source = next(at), height = next(at), width = next(at), count = next(at);
      std::vector<at::Tensor> places;
      for (int64_t p = 0; p < count; ++p) {
        const int64_t slot = next(at), top = next(at), left = next(at), rows = next(at), cols = next(at);
        places.push_back(buffers.select(0, slot).slice(0, top, top + rows).slice(1, left, left + cols));
      }
      resize_step((from_input ? frames : buffers).select(0, source), places, height, width);
    } else {
      TORCH_CHECK(code == POOL_MOSAIC, "run_plan: unknown step code ", code);
      const int64_t slot = next(at), row = next(at);
      pool_step(buffers.slice(0, slot, slot + 1), pooled.slice(0, row, row + 1), k, temperature, norm_p);
    }
  }
}

}  // namespace
}  // namespace stgridpool

TORCH_LIBRARY_FRAGMENT(stgridpool, m) {
  m.def("run_plan(Tensor frames, Tensor(a!) pooled, Tensor(b!) buffers, int[] program, int kernel_size, "
        "float temperature, float norm_p) -> ()");
}

TORCH_LIBRARY_IMPL(stgridpool, CPU, m) { m.impl("run_plan", &stgridpool::run_plan); }
