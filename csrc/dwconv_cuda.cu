// Depthwise submanifold convolution on CUDA over a neighbour table (N, K), -1 = absent.
// fp32/fp64 and half/bf16 features, accumulation in fp32 (fp64 for fp64), weight in the accumulation type.
// The input gradient gathers over the transposed table (no atomics); the weight gradient writes
// per-row-chunk partials that are summed in a fixed order, so every result is deterministic.
#include "cuda_utils.cuh"
#include "sparse_ops.h"

namespace sparse_fcmae {
namespace {

constexpr int64_t kChunk = 256;  // rows per weight-gradient partial

// out[i, c] = bias[c] + sum_k f[nbr[i, k], c] * w[k, c]; one thread per (i, c), consecutive threads
// take consecutive channels of a row, so the gathered row reads are coalesced.
template <typename T, typename A>
__global__ void gather_kernel(const T* __restrict__ f, const int32_t* __restrict__ nbr, const A* __restrict__ w,
                              const A* __restrict__ bias, T* __restrict__ out, int64_t n, int64_t C, int K) {
  const int64_t total = n * C;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / C, c = idx - i * C;
    const int32_t* nb = nbr + i * K;
    A acc = bias ? bias[c] : A(0);
    for (int k = 0; k < K; ++k) {
      const int32_t j = __ldg(nb + k);
      // absent (-1) or out of range (a bad table: not validated on the GPU, it would need a sync) reads nothing
      if (static_cast<uint32_t>(j) < static_cast<uint32_t>(n)) acc += static_cast<A>(f[int64_t(j) * C + c]) * w[int64_t(k) * C + c];
    }
    out[idx] = static_cast<T>(acc);
  }
}

// part[chunk, k, c] = sum_{i in chunk} go[i, c] * f[nbr[i, k], c]; block (32 channels x 8 row lanes).
template <typename T, typename A>
__global__ void weight_grad_kernel(const T* __restrict__ go, const T* __restrict__ f, const int32_t* __restrict__ nbr,
                                   A* __restrict__ part, int64_t n, int64_t C, int K) {
  __shared__ A red[8][33];
  const int64_t ch = blockIdx.x;
  const int k = blockIdx.y;
  const int64_t r0 = ch * kChunk, r1 = min(n, r0 + kChunk);
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    const int64_t c = c0 + threadIdx.x;
    A acc = 0;
    if (c < C) {
      for (int64_t i = r0 + threadIdx.y; i < r1; i += 8) {
        const int32_t j = __ldg(nbr + i * K + k);
        if (static_cast<uint32_t>(j) < static_cast<uint32_t>(n))
          acc += static_cast<A>(go[i * C + c]) * static_cast<A>(f[int64_t(j) * C + c]);
      }
    }
    red[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      A s = 0;
      for (int t = 0; t < 8; ++t) s += red[t][threadIdx.x];
      part[(ch * K + k) * C + c] = s;
    }
    __syncthreads();
  }
}

template <typename T, typename A>
void launch_gather(const at::Tensor& f, const at::Tensor& nbr, const at::Tensor& w, const A* bias, at::Tensor& out) {
  const int64_t n = f.size(0), C = f.size(1);
  if (n * C == 0) return;
  const cudaStream_t stream = cuda::stream();
  gather_kernel<T, A><<<cuda::grid_for(n * C), cuda::kThreads, 0, stream>>>(
      f.data_ptr<T>(), nbr.data_ptr<int32_t>(), w.data_ptr<A>(), bias, out.data_ptr<T>(), n, C,
      static_cast<int>(nbr.size(1)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace
}  // namespace sparse_fcmae

// Qualified definitions: a signature that drifts from sparse_ops.h is a compile error.
at::Tensor sparse_fcmae::dwconv_forward_cuda(const at::Tensor& feats_, const at::Tensor& nbr_, const at::Tensor& weight_,
                               const c10::optional<at::Tensor>& bias_) {
  check_dwconv_args(feats_, nbr_, weight_);
  c10::cuda::CUDAGuard guard(feats_.device());
  const auto feats = feats_.contiguous(), nbr = nbr_.contiguous();
  const auto acc = acc_dtype(feats.scalar_type());
  const auto weight = weight_.to(acc).contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    check_dwconv_bias(feats, *bias_);
    bias = bias_->reshape({-1}).to(acc).contiguous();
  }
  auto out = at::empty_like(feats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "dwconv_forward_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    launch_gather<scalar_t, A>(feats, nbr, weight, bias.defined() ? bias.data_ptr<A>() : nullptr, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_fcmae::dwconv_backward_cuda(const at::Tensor& grad_out,
                                                                    const at::Tensor& feats_, const at::Tensor& nbr_,
                                                                    const at::Tensor& nbr_t_,
                                                                    const at::Tensor& weight_, bool need_feats,
                                                                    bool need_weight, bool need_bias) {
  check_dwconv_backward_args(grad_out, feats_, nbr_, nbr_t_, weight_);
  c10::cuda::CUDAGuard guard(feats_.device());
  const auto feats = feats_.contiguous(), nbr = nbr_.contiguous(), nbr_t = nbr_t_.contiguous();
  const auto go = grad_out.to(feats.scalar_type()).contiguous();
  const auto acc = acc_dtype(feats.scalar_type());
  const auto weight = weight_.to(acc).contiguous();
  const int64_t n = feats.size(0), C = feats.size(1), K = nbr.size(1);
  at::Tensor gf, gw, gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "dwconv_backward_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    if (need_feats) {
      gf = at::empty_like(feats);
      launch_gather<scalar_t, A>(go, nbr_t, weight, nullptr, gf);
    }
    if (need_weight) {
      const int64_t nchunk = (n + kChunk - 1) / kChunk;
      if (nchunk == 0 || C == 0 || K == 0) {
        gw = at::zeros({K, C}, feats.options().dtype(acc));
      } else {
        auto part = at::empty({nchunk, K, C}, feats.options().dtype(acc));
        dim3 grid(static_cast<unsigned>(nchunk), static_cast<unsigned>(K)), block(32, 8);
        weight_grad_kernel<scalar_t, A><<<grid, block, 0, cuda::stream()>>>(
            go.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(), nbr.data_ptr<int32_t>(), part.data_ptr<A>(), n, C,
            static_cast<int>(K));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        gw = part.sum(0);
      }
    }
    if (need_bias) gb = go.sum(0, false, acc);
  });
  return {gf, gw, gb};
}
