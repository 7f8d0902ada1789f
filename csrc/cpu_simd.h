// Small portable SIMD helpers for the CPU kernels: GCC/Clang vector extensions (32-byte vectors),
// which compile to SSE2 in the baseline build and to AVX2/FMA and AVX-512 in further copies of each hot
// loop (target attribute) picked at run time from the CPU's feature bits, so the binary stays
// portable across x86-64 CPUs without -march. (GCC's target_clones("arch=haswell") is not used: its
// resolver matches CPU models, and picked the slow baseline on a virtualised Xeon here.)
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(SPARSE_FCMAE_NO_MULTIVERSION)
#define SFC_AVX2_CLONE 1
#define SFC_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SFC_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#else
#define SFC_AVX2_CLONE 0
#define SFC_TARGET_AVX2
#define SFC_TARGET_AVX512
#endif
#define SFC_INLINE inline __attribute__((always_inline))

namespace sparse_fcmae {
namespace simd {

// Highest copy allowed (0 baseline, 1 AVX2/FMA, 2 AVX-512): lets tests run every copy on one machine.
inline int& isa_cap() {
  static int cap = 2;
  return cap;
}

// Whether the AVX-512 copies of the kernels (64-byte vectors) run on this CPU.
inline bool use_avx512() {
#if SFC_AVX2_CLONE
  if (isa_cap() < 2) return false;
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// Whether the AVX2/FMA copies of the kernels run on this CPU.
inline bool use_avx2() {
#if SFC_AVX2_CLONE
  if (isa_cap() < 1) return false;
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

template <typename T, int VB = 32>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int lanes = VB / sizeof(T);
};

template <typename T, int VB = 32>
SFC_INLINE typename Vec<T, VB>::type load(const T* p) {
  typename Vec<T, VB>::type v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename T, int VB = 32>
SFC_INLINE void store(T* p, typename Vec<T, VB>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

}  // namespace simd
}  // namespace sparse_fcmae
