// Shared helpers for the CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace sparse_fcmae {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over m elements (capped: each thread loops).
inline int grid_for(int64_t m) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((m + kThreads - 1) / kThreads, sms * 16)));
}

}  // namespace cuda
}  // namespace sparse_fcmae
