// float32 / bfloat16 element access shared by the kernels: bf16 is carried as its uint16_t
// bits; conversions round to nearest even, as torch does.
#pragma once

#include <cmath>
#include <cstdint>

namespace talkloop {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
}

// x rounded to bf16 precision, as a float (finite x).
inline float round_bf16(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  return __builtin_bit_cast(float, (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u);
}

// x as the element type T would store it (tag dispatch on T).
inline float as_stored(float x, float) { return x; }
inline float as_stored(float x, uint16_t) { return round_bf16(x); }

inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, uint16_t* out) {  // a select, not a branch: loops vectorize
  const uint16_t rounded = static_cast<uint16_t>(__builtin_bit_cast(uint32_t, round_bf16(x)) >> 16);
  *out = std::isnan(x) ? uint16_t{0x7FC0} : rounded;
}

}  // namespace talkloop
