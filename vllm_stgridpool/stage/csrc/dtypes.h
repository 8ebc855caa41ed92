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

// Blocks of channels loaded into four 32-byte vectors of the accumulator type (vector extensions of GCC 12+
// and Clang, lowered to AVX2 where the build targets it, else to SSE, NEON or scalar code): the kernels keep
// a block's sums in registers across a window's tokens, each lane adding in the order the scalar loop would,
// and round and store a block in vector code (a scalar store of bfloat16 cost a third of the resize).
typedef float floats __attribute__((vector_size(32)));
typedef double doubles __attribute__((vector_size(32)));
typedef uint16_t halves __attribute__((vector_size(32)));

template <typename T, typename A> inline A largest() { return static_cast<A>(std::numeric_limits<T>::max()); }

// store_finite's rule on a vector of lanes: NaN becomes 0 and values beyond +-top become +-top.
template <typename V, typename A>
inline V finite_lanes(V v, A top) {
  const V zero = {}, high = zero + top, low = zero - top;
  v = v == v ? v : zero;
  v = v > high ? high : v;
  return v < low ? low : v;
}

template <typename T> struct Block;

template <> struct Block<float> {
  using vector = floats;
  static constexpr int64_t size = 32;
  static vector load(const float* p, int b) {  // channels 8b to 8b + 7
    vector v;
    std::memcpy(&v, p + 8 * b, sizeof(v));
    return v;
  }
  static void store(float* out, const vector v[4]) {  // as store_finite
    for (int b = 0; b < 4; ++b) {
      const vector x = finite_lanes(v[b], largest<float, float>());
      std::memcpy(out + 8 * b, &x, sizeof(x));
    }
  }
};

template <> struct Block<double> {
  using vector = doubles;
  static constexpr int64_t size = 16;
  static vector load(const double* p, int b) {
    vector v;
    std::memcpy(&v, p + 4 * b, sizeof(v));
    return v;
  }
  static void store(double* out, const vector v[4]) {
    for (int b = 0; b < 4; ++b) {
      const vector x = finite_lanes(v[b], largest<double, double>());
      std::memcpy(out + 4 * b, &x, sizeof(x));
    }
  }
};

// bfloat16 widens to float exactly by a 16-bit shift. Interleaving 16 channels with zeros within 128-bit
// halves (one instruction on AVX2, where a widening conversion takes three) puts channels 0-3 and 8-11 in
// one vector and 4-7 and 12-15 in the next; store puts the block back in channel order.
template <> struct Block<at::BFloat16> {
  using vector = floats;
  static constexpr int64_t size = 32;
  static vector load(const at::BFloat16* p, int b) {
    halves h;
    std::memcpy(&h, p + 16 * (b / 2), sizeof(h));
    const halves zero = {};
    const halves wide = b % 2 == 0
        ? __builtin_shufflevector(zero, h, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27)
        : __builtin_shufflevector(zero, h, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
    vector v;
    std::memcpy(&v, &wide, sizeof(v));
    return v;
  }
  // As store_finite, then rounded to nearest even; the high 16 bits of each lane are picked back into
  // channel order (the inverse of load's interleaving).
  static void store(at::BFloat16* out, const vector v[4]) {
    typedef uint32_t words __attribute__((vector_size(32)));
    for (int half = 0; half < 2; ++half) {
      halves rounded[2];
      for (int q = 0; q < 2; ++q) {
        const vector x = finite_lanes(v[2 * half + q], largest<at::BFloat16, float>());
        words bits;
        std::memcpy(&bits, &x, sizeof(bits));
        bits += 0x7FFFu + ((bits >> 16) & 1u);
        std::memcpy(&rounded[q], &bits, sizeof(bits));
      }
      const halves h = __builtin_shufflevector(rounded[0], rounded[1],
                                               1, 3, 5, 7, 17, 19, 21, 23, 9, 11, 13, 15, 25, 27, 29, 31);
      std::memcpy(out + 16 * half, &h, sizeof(h));
    }
  }
};

// Asks for the cache lines of one block of channels starting at p, ahead of their use.
template <typename T>
inline void prefetch_block(const T* p) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t line = 0; line < Block<T>::size * static_cast<int64_t>(sizeof(T)); line += 64)
    __builtin_prefetch(bytes + line);
}

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
