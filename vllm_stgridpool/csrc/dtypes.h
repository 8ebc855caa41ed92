// Loads, stores and accumulators shared by the stage's CPU kernels (norm_pool.cpp, area_resize.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace stgridpool {

inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline float load(const at::BFloat16* p) {
  const uint32_t bits = static_cast<uint32_t>(p->x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline void store(float* p, float value) { *p = value; }
inline void store(double* p, double value) { *p = value; }
inline void store(at::BFloat16* p, float value) {  // round to nearest even; value is finite
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  p->x = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };

template <typename T, typename A> inline A largest() { return static_cast<A>(std::numeric_limits<T>::max()); }

// Writes n values rounded to T: NaN becomes 0 and values beyond T's range its largest value.
template <typename T, typename A>
inline void store_finite(T* target, const A* values, int64_t n) {
  const A top = largest<T, A>();
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    A v = values[d] == values[d] ? values[d] : A(0);
    v = v > top ? top : v;
    v = v < -top ? -top : v;
    store(target + d, v);
  }
}

}  // namespace stgridpool
