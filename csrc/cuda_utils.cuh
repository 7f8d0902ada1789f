// Shared helpers for the CUDA kernels.
#pragma once
// Only c10's light CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which
// a bare CUDA toolkit may lack (torch's wheels ship them separately).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace sparse_fcmae {
namespace cuda {

constexpr int kThreads = 256;

// The SM count of the current device, asked once per device (a driver call per launch otherwise).
inline int64_t num_sms() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int& sms = cached[dev < kMaxDevices ? dev : 0];
  if (sms == 0 || dev >= kMaxDevices) C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// 16 bytes of T: the unit of a vector load (float4, 8 x bf16/half, double2).
template <typename T> struct Vec16 { static constexpr int n = 16 / sizeof(T); };
template <typename T> using Raw16 = typename std::conditional<sizeof(T) == 8, double2, float4>::type;

// Whether data can be read and written in 16-byte vectors.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Blocks for a grid-stride loop over m elements (capped: each thread loops).
inline int grid_for(int64_t m) {
  const int64_t sms = num_sms();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((m + kThreads - 1) / kThreads, sms * 16)));
}

}  // namespace cuda
}  // namespace sparse_fcmae
