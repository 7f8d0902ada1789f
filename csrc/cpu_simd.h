// Small portable SIMD helpers for the CPU kernels: GCC/Clang vector extensions (32-byte vectors),
// which compile to SSE2 by default and to AVX2/FMA in the "arch=haswell" clone (function
// multiversioning picks the clone at load time, so the build stays portable across x86-64 CPUs).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SPARSE_FCMAE_NO_MULTIVERSION)
#define SFC_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define SFC_MULTIVERSION
#endif
#define SFC_INLINE inline __attribute__((always_inline))

namespace sparse_fcmae {
namespace simd {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int lanes = 32 / sizeof(T);
};

template <typename T>
SFC_INLINE typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename T>
SFC_INLINE void store(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

}  // namespace simd
}  // namespace sparse_fcmae
