// Sparse GRN on CUDA: a segmented reduction over each sample's rows (split into row ranges whose
// partials are summed in a fixed order: deterministic, no float atomics), a per-sample "finalize"
// kernel doing the (B, C) algebra of grn_algebra.h, and one fused elementwise pass. Forward: 3
// launches; backward: 4 (the 4th sums grad_gamma/grad_beta over samples). Half/bf16 features
// accumulate in fp32. Indices are not validated here (that needs a device sync; neither device's kernels
// do it, the public Python op checks a caller's segments, sparse_fcmae/ops/checks.py): a bad one reads nothing
// out of bounds and shows as NaN in the output instead, as on CPU (grn_cpu.cpp).
#include <cmath>

#include "cuda_utils.cuh"
#include "grn_algebra.h"
#include "sparse_ops.h"

namespace sparse_fcmae {
namespace {

constexpr int64_t kMinRowsPerSplit = 64;
constexpr int kFinalizeThreads = 256;  // block of the per-sample kernels; block_sum assumes this (power of 2)

// part1[s, b, c] = sum a*b1 (a*a if b1 == nullptr) and part2[s, b, c] = sum a over split s of sample b.
// grid (splits, B, ceil(C/32)), block (32 channels, 8 row lanes).
template <typename T, typename A>
__device__ __forceinline__ void segment_block(const T* __restrict__ a, const T* __restrict__ b1,
                                              const int64_t* __restrict__ perm, const int64_t* __restrict__ off,
                                              A* __restrict__ part1, A* __restrict__ part2, int64_t n, int64_t nb,
                                              int64_t C) {
  __shared__ A red1[8][33];
  __shared__ A red2[8][33];
  const int64_t s = blockIdx.x, b = blockIdx.y, c = blockIdx.z * 32 + threadIdx.x;
  const int64_t splits = gridDim.x;
  // offsets clamped into [0, n] and non-decreasing: bad offsets cannot send r outside perm.
  const int64_t beg = min(max(off[b], int64_t(0)), n), len = min(max(off[b + 1], beg), n) - beg;
  const int64_t r0 = beg + len * s / splits, r1 = beg + len * (s + 1) / splits;
  A acc1 = 0, acc2 = 0;
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const int64_t p = perm[r];
      if (static_cast<uint64_t>(p) >= static_cast<uint64_t>(n)) {  // bad row index: poison, don't read
        acc1 = acc2 = NAN;
        continue;
      }
      const int64_t row = p * C + c;
      const A av = static_cast<A>(a[row]);
      acc1 += av * (b1 ? static_cast<A>(b1[row]) : av);
      acc2 += av;
    }
  }
  red1[threadIdx.y][threadIdx.x] = acc1;
  red2[threadIdx.y][threadIdx.x] = acc2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    A s1 = 0, s2 = 0;
    for (int t = 0; t < 8; ++t) {
      s1 += red1[t][threadIdx.x];
      s2 += red2[t][threadIdx.x];
    }
    part1[(s * nb + b) * C + c] = s1;
    if (part2) part2[(s * nb + b) * C + c] = s2;
  }
}

template <typename T, typename A>
__global__ void segment_sums_kernel(const T* __restrict__ a, const T* __restrict__ b1, const int64_t* __restrict__ perm,
                                    const int64_t* __restrict__ off, A* __restrict__ part1, A* __restrict__ part2,
                                    int64_t n, int64_t nb, int64_t C) {
  segment_block<T, A>(a, b1, perm, off, part1, part2, n, nb, C);
}

// This thread's index in a block of kFinalizeThreads threads: (256) for the separate finalize kernels, (32, 8)
// for the fused ones.
__device__ __forceinline__ int block_tid() { return threadIdx.y * blockDim.x + threadIdx.x; }

// Fixed-order tree sum over the block (kFinalizeThreads threads): deterministic, and every thread gets the
// result. sh is reusable after it returns.
template <typename A>
__device__ A block_sum(A v, A* sh) {
  const int t = block_tid();
  sh[t] = v;
  __syncthreads();
  for (int w = kFinalizeThreads / 2; w > 0; w >>= 1) {
    if (t < w) sh[t] += sh[t + w];
    __syncthreads();
  }
  const A r = sh[0];
  __syncthreads();
  return r;
}

// Forward algebra of sample b (the whole block): g = sqrt(sum of the split partials of sum x^2, in split
// order), d = mean_c g + eps, coef = 1 + gamma * g / d. Writes g and coef (B, C). Partials are read with __ldcg
// (L2, never a stale L1 line): in the fused kernel other SMs wrote them.
template <typename A>
__device__ void forward_finalize_sample(const A* __restrict__ part, int64_t splits, const A* __restrict__ gamma,
                                        A* __restrict__ g, A* __restrict__ coef, int64_t b, int64_t nb, int64_t C,
                                        double eps) {
  __shared__ A sh[kFinalizeThreads];
  const int t = block_tid();
  A gsum = 0;
  for (int64_t c = t; c < C; c += kFinalizeThreads) {
    A ss = 0;
    for (int64_t s = 0; s < splits; ++s) ss += __ldcg(part + (s * nb + b) * C + c);
    const A gc = grn::norm(ss);
    g[b * C + c] = gc;
    gsum += gc;
  }
  const A d = grn::denom(block_sum(gsum, sh), C, eps);
  // same c per thread as above: each thread reads back only the g it wrote
  for (int64_t c = t; c < C; c += kFinalizeThreads) coef[b * C + c] = grn::coef(gamma[c], g[b * C + c], d);
}

// Backward algebra of sample b (the whole block), from the split partials of sgx = sum go*x and sgo = sum go:
// coef = 1 + gamma * n and amul (grad_x = go * coef + x * amul), and sample b's summands of grad_gamma
// (n * sgx, into pgg) and grad_beta (sgo, into pgb).
template <typename A>
__device__ void backward_finalize_sample(const A* __restrict__ part1, const A* __restrict__ part2, int64_t splits,
                                         const A* __restrict__ gamma, const A* __restrict__ g, A* __restrict__ coef,
                                         A* __restrict__ amul, A* __restrict__ pgg, A* __restrict__ pgb, int64_t b,
                                         int64_t nb, int64_t C, double eps) {
  __shared__ A sh[kFinalizeThreads];
  const int t = block_tid();
  const A* gb = g + b * C;
  A gsum = 0, dot = 0;
  for (int64_t c = t; c < C; c += kFinalizeThreads) {
    A sgx = 0, sgo = 0;
    for (int64_t s = 0; s < splits; ++s) {
      sgx += __ldcg(part1 + (s * nb + b) * C + c);
      sgo += __ldcg(part2 + (s * nb + b) * C + c);
    }
    pgg[b * C + c] = sgx;  // parked until d is known; the same thread rewrites it below
    pgb[b * C + c] = sgo;
    gsum += gb[c];
    dot += grn::dot_term(gamma[c], sgx, gb[c]);
  }
  const A d = grn::denom(block_sum(gsum, sh), C, eps);
  const A corr = grn::corr(block_sum(dot, sh), d, C);
  for (int64_t c = t; c < C; c += kFinalizeThreads) {
    const int64_t i = b * C + c;
    const A sgx = pgg[i];
    coef[i] = grn::coef(gamma[c], gb[c], d);
    amul[i] = grn::amul(gamma[c], sgx, gb[c], d, corr);
    pgg[i] = grn::ggamma_term(gb[c], d, sgx);
  }
}

// grad_gamma[c], grad_beta[c]: the samples' summands added in sample order (deterministic).
template <typename A>
__device__ __forceinline__ void sum_samples_channel(const A* __restrict__ pgg, const A* __restrict__ pgb,
                                                    A* __restrict__ ggamma, A* __restrict__ gbeta, int64_t nb,
                                                    int64_t C, int64_t c) {
  A s1 = 0, s2 = 0;
  for (int64_t b = 0; b < nb; ++b) {
    s1 += __ldcg(pgg + b * C + c);
    s2 += __ldcg(pgb + b * C + c);
  }
  ggamma[c] = s1;
  gbeta[c] = s2;
}

// Forward, one block per sample.
template <typename A>
__global__ void forward_finalize_kernel(const A* __restrict__ part, int64_t splits, const A* __restrict__ gamma,
                                        A* __restrict__ g, A* __restrict__ coef, int64_t nb, int64_t C, double eps) {
  forward_finalize_sample<A>(part, splits, gamma, g, coef, blockIdx.x, nb, C, eps);
}

// Backward, one block per sample.
template <typename A>
__global__ void backward_finalize_kernel(const A* __restrict__ part1, const A* __restrict__ part2, int64_t splits,
                                         const A* __restrict__ gamma, const A* __restrict__ g, A* __restrict__ coef,
                                         A* __restrict__ amul, A* __restrict__ pgg, A* __restrict__ pgb, int64_t nb,
                                         int64_t C, double eps) {
  backward_finalize_sample<A>(part1, part2, splits, gamma, g, coef, amul, pgg, pgb, blockIdx.x, nb, C, eps);
}

// grad_gamma[c] = sum_b pgg[b, c], grad_beta[c] = sum_b pgb[b, c], b in order: deterministic.
template <typename A>
__global__ void sum_samples_kernel(const A* __restrict__ pgg, const A* __restrict__ pgb, A* __restrict__ ggamma,
                                   A* __restrict__ gbeta, int64_t nb, int64_t C) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x)
    sum_samples_channel<A>(pgg, pgb, ggamma, gbeta, nb, C, c);
}

// out[i, c] = a[i, c] * s[batch[i], c] + (b2 ? b2[i, c] * t[batch[i], c] : u[c]); NaN where batch[i]
// is not a sample (instead of reading outside s and t).
template <typename T, typename A>
__global__ void rowwise_kernel(const T* __restrict__ a, const A* __restrict__ s, const T* __restrict__ b2,
                               const A* __restrict__ t, const A* __restrict__ u, const int64_t* __restrict__ batch,
                               T* __restrict__ out, int64_t n, int64_t nb, int64_t C) {
  const int64_t total = n * C;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / C, c = idx - i * C;
    const int64_t bi = batch[i];
    if (static_cast<uint64_t>(bi) >= static_cast<uint64_t>(nb)) {
      out[idx] = static_cast<T>(static_cast<A>(NAN));
      continue;
    }
    const int64_t bc = bi * C + c;
    A v = static_cast<A>(a[idx]) * s[bc];
    v += b2 ? static_cast<A>(b2[idx]) * t[bc] : u[c];
    out[idx] = static_cast<T>(v);
  }
}

// ---- variant 2: each sample's algebra in the last of its segment-sum blocks (2 launches forward, 2 backward) ----
// Every block of sample b (splits x channel tiles) writes its partials, fences, and takes a ticket on count[b];
// the block that draws the last ticket sees all of b's partials and runs b's finalize. The sums keep their fixed
// order whichever block runs them: deterministic. The counters start at zero (a memset, not a kernel).

// True in exactly one of the `total` blocks that call it with the same counter, once all of them have called it.
__device__ __forceinline__ bool last_block(unsigned* counter, unsigned total) {
  __shared__ bool last;
  __threadfence();  // this block's global writes are visible device-wide before its ticket
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(counter, 1u) == total - 1;
  __syncthreads();
  return last;
}

// segment_sums_kernel, then forward_finalize_kernel's work for the sample in its last block.
template <typename T, typename A>
__global__ void __launch_bounds__(256) forward_fused_kernel(const T* __restrict__ x, const int64_t* __restrict__ perm,
                                                            const int64_t* __restrict__ off, A* __restrict__ part,
                                                            unsigned* __restrict__ count, const A* __restrict__ gamma,
                                                            A* __restrict__ g, A* __restrict__ coef, int64_t n,
                                                            int64_t nb, int64_t C, double eps) {
  segment_block<T, A>(x, nullptr, perm, off, part, nullptr, n, nb, C);
  if (!last_block(count + blockIdx.y, gridDim.x * gridDim.z)) return;
  forward_finalize_sample<A>(part, gridDim.x, gamma, g, coef, blockIdx.y, nb, C, eps);
}

// segment_sums_kernel (sum go*x, sum go), backward_finalize_kernel's work for the sample in its last block, and
// sum_samples_kernel's in the last of those (count[nb] counts the finished samples).
template <typename T, typename A>
__global__ void __launch_bounds__(256) backward_fused_kernel(
    const T* __restrict__ go, const T* __restrict__ x, const int64_t* __restrict__ perm, const int64_t* __restrict__ off,
    A* __restrict__ part1, A* __restrict__ part2, unsigned* __restrict__ count, const A* __restrict__ gamma,
    const A* __restrict__ g, A* __restrict__ coef, A* __restrict__ amul, A* __restrict__ pgg, A* __restrict__ pgb,
    A* __restrict__ ggamma, A* __restrict__ gbeta, int64_t n, int64_t nb, int64_t C, double eps) {
  segment_block<T, A>(go, x, perm, off, part1, part2, n, nb, C);
  if (!last_block(count + blockIdx.y, gridDim.x * gridDim.z)) return;
  backward_finalize_sample<A>(part1, part2, gridDim.x, gamma, g, coef, amul, pgg, pgb, blockIdx.y, nb, C, eps);
  if (!last_block(count + nb, static_cast<unsigned>(nb))) return;
  for (int64_t c = block_tid(); c < C; c += kFinalizeThreads) sum_samples_channel<A>(pgg, pgb, ggamma, gbeta, nb, C, c);
}

// rowwise_kernel in 16-byte vectors: block (32, 8), a warp per row walking its V-channel vectors (no division
// per element, one load in flight per operand). Needs C % V == 0, 16-byte aligned a/b2/out, n*C < 2^31.
template <typename T, typename A>
__global__ void rowwise_vec_kernel(const T* __restrict__ a, const A* __restrict__ s, const T* __restrict__ b2,
                                   const A* __restrict__ t, const A* __restrict__ u, const int64_t* __restrict__ batch,
                                   T* __restrict__ out, int n, int nb, int C) {
  constexpr int V = cuda::Vec16<T>::n;
  using Raw = cuda::Raw16<T>;
  const int cv = C / V;
  for (int i = blockIdx.x * blockDim.y + threadIdx.y; i < n; i += gridDim.x * blockDim.y) {
    const int64_t bi = batch[i];
    const bool bad = static_cast<uint64_t>(bi) >= static_cast<uint64_t>(nb);  // not a sample: NaN, read nothing
    const int bc = bad ? 0 : static_cast<int>(bi) * C;  // s and t are (nb, C)
    const int row = i * C;
    for (int j = threadIdx.x; j < cv; j += blockDim.x) {
      const int c0 = j * V;
      const Raw ra = __ldg(reinterpret_cast<const Raw*>(a + row + c0));
      Raw rb = ra;
      if (b2) rb = __ldg(reinterpret_cast<const Raw*>(b2 + row + c0));
      const T* av = reinterpret_cast<const T*>(&ra);
      const T* bv = reinterpret_cast<const T*>(&rb);
      Raw ro;
      T* o = reinterpret_cast<T*>(&ro);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        A val = static_cast<A>(NAN);
        if (!bad) {  // the same for the whole warp (one row): no divergence
          val = static_cast<A>(av[v]) * s[bc + c0 + v];
          val += b2 ? static_cast<A>(bv[v]) * t[bc + c0 + v] : u[c0 + v];
        }
        o[v] = static_cast<T>(val);
      }
      *reinterpret_cast<Raw*>(out + row + c0) = ro;
    }
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Split partials of the sums over each sample's rows, (splits, B, C) in the accumulation type:
// p1 = sum a*b1 (a*a if b1 == nullptr), p2 = sum a (if want2). The finalize kernels add the splits.
struct Partials {
  at::Tensor p1, p2;
  int64_t splits;
};

// Row splits per sample: enough blocks for 2 per SM, at least kMinRowsPerSplit rows each.
int64_t num_splits(int64_t n, int64_t nb, int64_t C) {
  const int64_t sms = cuda::num_sms();
  const int64_t ctiles = (C + 31) / 32;
  const int64_t by_work = (2 * sms + nb * ctiles - 1) / std::max<int64_t>(1, nb * ctiles);
  const int64_t by_rows = std::max<int64_t>(1, n / std::max<int64_t>(1, nb) / kMinRowsPerSplit);
  return std::max<int64_t>(1, std::min(by_work, by_rows));
}

// m zeroed ticket counters for last_block, on the current stream.
at::Tensor counters(int64_t m, const at::Tensor& like) {
  auto cnt = at::empty({m}, like.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(cnt.data_ptr(), 0, m * sizeof(int32_t), cuda::stream()));
  return cnt;
}

Partials segment_partials(const at::Tensor& a, const at::Tensor* b1, const at::Tensor& perm, const at::Tensor& offsets,
                          bool want2) {
  const int64_t n = a.size(0), C = a.size(1), nb = offsets.size(0) - 1;
  const auto acc = acc_dtype(a.scalar_type());
  const int64_t ctiles = (C + 31) / 32;
  const int64_t splits = num_splits(n, nb, C);
  auto part1 = at::empty({splits, nb, C}, a.options().dtype(acc));
  auto part2 = want2 ? at::empty({splits, nb, C}, a.options().dtype(acc)) : at::Tensor();
  if (nb > 0 && C > 0) {
    dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(nb), static_cast<unsigned>(ctiles)), block(32, 8);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grn_segment_sums", [&] {
      using A = at::acc_type<scalar_t, true>;
      segment_sums_kernel<scalar_t, A><<<grid, block, 0, cuda::stream()>>>(
          a.data_ptr<scalar_t>(), b1 ? b1->data_ptr<scalar_t>() : nullptr, perm.data_ptr<int64_t>(),
          offsets.data_ptr<int64_t>(), part1.data_ptr<A>(), want2 ? part2.data_ptr<A>() : nullptr, n, nb, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {part1, part2, splits};
}

void rowwise(const at::Tensor& a, const at::Tensor& s, const at::Tensor* b2, const at::Tensor* t, const at::Tensor* u,
             const at::Tensor& batch, int64_t nb, at::Tensor& out) {
  const int64_t n = a.size(0), C = a.size(1);
  if (n * C == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grn_rowwise", [&] {
    using A = at::acc_type<scalar_t, true>;
    // variant 1 keeps the scalar pass too: the whole earlier GRN, the fallback should the new kernels fail
    const bool vec = cuda_grn_variant() >= 2 && C % cuda::Vec16<scalar_t>::n == 0 && n * C < (int64_t(1) << 31) &&
                     cuda::aligned16(a.data_ptr()) && cuda::aligned16(out.data_ptr()) &&
                     (b2 == nullptr || cuda::aligned16(b2->data_ptr()));
    if (vec) {
      const int64_t blocks = std::min<int64_t>((n + 7) / 8, cuda::num_sms() * 16);
      rowwise_vec_kernel<scalar_t, A><<<static_cast<unsigned>(blocks), dim3(32, 8), 0, cuda::stream()>>>(
          a.data_ptr<scalar_t>(), s.data_ptr<A>(), b2 ? b2->data_ptr<scalar_t>() : nullptr,
          t ? t->data_ptr<A>() : nullptr, u ? u->data_ptr<A>() : nullptr, batch.data_ptr<int64_t>(),
          out.data_ptr<scalar_t>(), static_cast<int>(n), static_cast<int>(nb), static_cast<int>(C));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    rowwise_kernel<scalar_t, A><<<cuda::grid_for(n * C), cuda::kThreads, 0, cuda::stream()>>>(
        a.data_ptr<scalar_t>(), s.data_ptr<A>(), b2 ? b2->data_ptr<scalar_t>() : nullptr,
        t ? t->data_ptr<A>() : nullptr, u ? u->data_ptr<A>() : nullptr, batch.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), n, nb, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace sparse_fcmae

// Qualified definitions: a signature that drifts from sparse_ops.h is a compile error.
// Launches: forward segment sums, finalize, rowwise (3); backward the same plus sum_samples (4). The
// .contiguous()/.to() below are no-ops for the usual contiguous fp32 parameters.
std::tuple<at::Tensor, at::Tensor> sparse_fcmae::grn_forward_cuda(const at::Tensor& x_, const at::Tensor& batch_,
                                                    const at::Tensor& perm_, const at::Tensor& offsets_,
                                                    const at::Tensor& gamma_, const at::Tensor& beta_, double eps) {
  check_grn_forward_args(x_, batch_, perm_, offsets_, gamma_, beta_);
  c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous(), batch = batch_.contiguous(), perm = perm_.contiguous();
  const auto offsets = offsets_.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto gamma = gamma_.reshape({-1}).to(acc).contiguous(), beta = beta_.reshape({-1}).to(acc).contiguous();
  const int64_t C = x.size(1), nb = offsets.size(0) - 1;
  auto y = at::empty_like(x);
  auto g = at::empty({nb, C}, x.options().dtype(acc));
  if (C == 0) return {y, g};
  auto coef = at::empty({nb, C}, x.options().dtype(acc));  // 1 + gamma * n
  if (cuda_grn_variant() >= 2 && nb > 0) {
    const int64_t n = x.size(0), splits = num_splits(n, nb, C);
    auto part = at::empty({splits, nb, C}, x.options().dtype(acc));
    auto count = counters(nb, x);
    dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(nb), static_cast<unsigned>((C + 31) / 32));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grn_forward_fused", [&] {
      using A = at::acc_type<scalar_t, true>;
      forward_fused_kernel<scalar_t, A><<<grid, dim3(32, 8), 0, cuda::stream()>>>(
          x.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), part.data_ptr<A>(),
          reinterpret_cast<unsigned*>(count.data_ptr<int32_t>()), gamma.data_ptr<A>(), g.data_ptr<A>(),
          coef.data_ptr<A>(), n, nb, C, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    rowwise(x, coef, nullptr, nullptr, &beta, batch, nb, y);
    return {y, g};
  }
  const auto part = segment_partials(x, nullptr, perm, offsets, false);
  if (nb > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "grn_forward_finalize", [&] {
      forward_finalize_kernel<scalar_t><<<static_cast<unsigned>(nb), kFinalizeThreads, 0, cuda::stream()>>>(
          part.p1.data_ptr<scalar_t>(), part.splits, gamma.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
          coef.data_ptr<scalar_t>(), nb, C, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  rowwise(x, coef, nullptr, nullptr, &beta, batch, nb, y);
  return {y, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_fcmae::grn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_,
                                                                 const at::Tensor& batch_, const at::Tensor& perm_,
                                                                 const at::Tensor& offsets_, const at::Tensor& gamma_,
                                                                 const at::Tensor& g_, double eps) {
  check_grn_backward_args(grad_out, x_, batch_, perm_, offsets_, gamma_, g_);
  c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous(), go = grad_out.to(x_.scalar_type()).contiguous();
  const auto batch = batch_.contiguous(), perm = perm_.contiguous(), offsets = offsets_.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto gamma = gamma_.reshape({-1}).to(acc).contiguous();
  const auto g = g_.to(acc).contiguous();
  const int64_t C = x.size(1), nb = offsets.size(0) - 1;
  auto gx = at::empty_like(x);
  auto ggamma = at::empty({C}, x.options().dtype(acc)), gbeta = at::empty({C}, x.options().dtype(acc));
  if (C == 0) return {gx, ggamma, gbeta};
  const auto opts = x.options().dtype(acc);
  auto coef = at::empty({nb, C}, opts), amul = at::empty({nb, C}, opts);
  auto pgg = at::empty({nb, C}, opts), pgb = at::empty({nb, C}, opts);  // per-sample summands of the param grads
  if (cuda_grn_variant() >= 2 && nb > 0) {
    const int64_t n = x.size(0), splits = num_splits(n, nb, C);
    auto part1 = at::empty({splits, nb, C}, opts), part2 = at::empty({splits, nb, C}, opts);
    auto count = counters(nb + 1, x);  // a ticket counter per sample, and one for the finished samples
    dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(nb), static_cast<unsigned>((C + 31) / 32));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grn_backward_fused", [&] {
      using A = at::acc_type<scalar_t, true>;
      backward_fused_kernel<scalar_t, A><<<grid, dim3(32, 8), 0, cuda::stream()>>>(
          go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
          part1.data_ptr<A>(), part2.data_ptr<A>(), reinterpret_cast<unsigned*>(count.data_ptr<int32_t>()),
          gamma.data_ptr<A>(), g.data_ptr<A>(), coef.data_ptr<A>(), amul.data_ptr<A>(), pgg.data_ptr<A>(),
          pgb.data_ptr<A>(), ggamma.data_ptr<A>(), gbeta.data_ptr<A>(), n, nb, C, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    rowwise(go, coef, &x, &amul, nullptr, batch, nb, gx);
    return {gx, ggamma, gbeta};
  }
  const auto part = segment_partials(go, &x, perm, offsets, true);  // sum go * x, sum go
  AT_DISPATCH_FLOATING_TYPES(acc, "grn_backward_finalize", [&] {
    using A = scalar_t;
    if (nb > 0) {
      backward_finalize_kernel<A><<<static_cast<unsigned>(nb), kFinalizeThreads, 0, cuda::stream()>>>(
          part.p1.data_ptr<A>(), part.p2.data_ptr<A>(), part.splits, gamma.data_ptr<A>(), g.data_ptr<A>(),
          coef.data_ptr<A>(), amul.data_ptr<A>(), pgg.data_ptr<A>(), pgb.data_ptr<A>(), nb, C, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    rowwise(go, coef, &x, &amul, nullptr, batch, nb, gx);
    // runs with nb == 0 too: the parameter gradients are then zeros
    sum_samples_kernel<A><<<cuda::grid_for(C), cuda::kThreads, 0, cuda::stream()>>>(
        pgg.data_ptr<A>(), pgb.data_ptr<A>(), ggamma.data_ptr<A>(), gbeta.data_ptr<A>(), nb, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, ggamma, gbeta};
}
