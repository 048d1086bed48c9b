// What the C++ extensions of this folder that pick their ISA at run time share: x86 detection (with <immintrin.h>),
// KITELM_INLINE, the -Wpsabi note, and bfloat16 ↔ float32 as bit patterns. Each source includes it; the build key in
// kitelm/ops/extension.py hashes this header with the compiler flags, so a change here rebuilds every extension.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KITELM_X86 1
#else
#define KITELM_X86 0
#endif

// The kernel templates hold vector types without a target of their own; they are always inlined into wrappers that
// have one, so the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#define KITELM_INLINE inline __attribute__((always_inline))

namespace kitelm {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as c10::BFloat16 (NaN kept quiet); branch-free.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded);
}

}  // namespace kitelm
