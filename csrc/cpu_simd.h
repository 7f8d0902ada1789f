// Small portable SIMD helpers for the CPU kernels: GCC/Clang vector extensions (32-byte vectors),
// which compile to SSE2 in the baseline build and to AVX2/FMA in a second copy of each hot loop
// (target attribute) that is picked at run time from the CPU's feature bits, so the binary stays
// portable across x86-64 CPUs without -march. (GCC's target_clones("arch=haswell") is not used: its
// resolver matches CPU models, and picked the slow baseline on a virtualised Xeon here.)
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(SPARSE_FCMAE_NO_MULTIVERSION)
#define SFC_AVX2_CLONE 1
#define SFC_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define SFC_AVX2_CLONE 0
#define SFC_TARGET_AVX2
#endif
#define SFC_INLINE inline __attribute__((always_inline))

namespace sparse_fcmae {
namespace simd {

// Whether the AVX2/FMA copies of the kernels run on this CPU.
inline bool use_avx2() {
#if SFC_AVX2_CLONE
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

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
