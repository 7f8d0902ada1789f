// Sparse GRN on CUDA: a segmented reduction over each sample's rows (split into row ranges whose
// partials are summed in a fixed order: deterministic), tiny (B, C) algebra with ATen, and one fused
// elementwise pass. Half/bf16 features accumulate in fp32.
#include "cuda_utils.cuh"
#include "sparse_ops.h"

namespace sparse_fcmae {
namespace {

constexpr int64_t kMinRowsPerSplit = 64;

// part1[s, b, c] = sum a*b1 (a*a if b1 == nullptr) and part2[s, b, c] = sum a over split s of sample b.
// grid (splits, B, ceil(C/32)), block (32 channels, 8 row lanes).
template <typename T, typename A>
__global__ void segment_sums_kernel(const T* __restrict__ a, const T* __restrict__ b1, const int64_t* __restrict__ perm,
                                    const int64_t* __restrict__ off, A* __restrict__ part1, A* __restrict__ part2,
                                    int64_t nb, int64_t C) {
  __shared__ A red1[8][33];
  __shared__ A red2[8][33];
  const int64_t s = blockIdx.x, b = blockIdx.y, c = blockIdx.z * 32 + threadIdx.x;
  const int64_t splits = gridDim.x;
  const int64_t beg = off[b], len = off[b + 1] - beg;
  const int64_t r0 = beg + len * s / splits, r1 = beg + len * (s + 1) / splits;
  A acc1 = 0, acc2 = 0;
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const int64_t row = perm[r] * C + c;
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

// out[i, c] = a[i, c] * s[batch[i], c] + (b2 ? b2[i, c] * t[batch[i], c] : u[c])
template <typename T, typename A>
__global__ void rowwise_kernel(const T* __restrict__ a, const A* __restrict__ s, const T* __restrict__ b2,
                               const A* __restrict__ t, const A* __restrict__ u, const int64_t* __restrict__ batch,
                               T* __restrict__ out, int64_t n, int64_t C) {
  const int64_t total = n * C;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / C, c = idx - i * C;
    const int64_t bc = batch[i] * C + c;
    A v = static_cast<A>(a[idx]) * s[bc];
    v += b2 ? static_cast<A>(b2[idx]) * t[bc] : u[c];
    out[idx] = static_cast<T>(v);
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Sums over each sample's rows: returns (sum a*b1 or a*a, sum a) as (B, C) in the accumulation type.
std::pair<at::Tensor, at::Tensor> segment_sums(const at::Tensor& a, const at::Tensor* b1, const at::Tensor& perm,
                                               const at::Tensor& offsets, bool want2) {
  const int64_t n = a.size(0), C = a.size(1), nb = offsets.size(0) - 1;
  const auto acc = acc_dtype(a.scalar_type());
  const int64_t sms = cuda::num_sms();
  const int64_t ctiles = (C + 31) / 32;
  const int64_t by_work = (2 * sms + nb * ctiles - 1) / std::max<int64_t>(1, nb * ctiles);
  const int64_t by_rows = std::max<int64_t>(1, n / std::max<int64_t>(1, nb) / kMinRowsPerSplit);
  const int64_t splits = std::max<int64_t>(1, std::min(by_work, by_rows));
  auto part1 = at::empty({splits, nb, C}, a.options().dtype(acc));
  auto part2 = want2 ? at::empty({splits, nb, C}, a.options().dtype(acc)) : at::Tensor();
  if (nb > 0 && C > 0) {
    dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(nb), static_cast<unsigned>(ctiles)), block(32, 8);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grn_segment_sums", [&] {
      using A = at::acc_type<scalar_t, true>;
      segment_sums_kernel<scalar_t, A><<<grid, block, 0, cuda::stream()>>>(
          a.data_ptr<scalar_t>(), b1 ? b1->data_ptr<scalar_t>() : nullptr, perm.data_ptr<int64_t>(),
          offsets.data_ptr<int64_t>(), part1.data_ptr<A>(), want2 ? part2.data_ptr<A>() : nullptr, nb, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {part1.sum(0), want2 ? part2.sum(0) : at::Tensor()};
}

void rowwise(const at::Tensor& a, const at::Tensor& s, const at::Tensor* b2, const at::Tensor* t, const at::Tensor* u,
             const at::Tensor& batch, at::Tensor& out) {
  const int64_t n = a.size(0), C = a.size(1);
  if (n * C == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grn_rowwise", [&] {
    using A = at::acc_type<scalar_t, true>;
    rowwise_kernel<scalar_t, A><<<cuda::grid_for(n * C), cuda::kThreads, 0, cuda::stream()>>>(
        a.data_ptr<scalar_t>(), s.data_ptr<A>(), b2 ? b2->data_ptr<scalar_t>() : nullptr,
        t ? t->data_ptr<A>() : nullptr, u ? u->data_ptr<A>() : nullptr, batch.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), n, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace sparse_fcmae

// Qualified definitions: a signature that drifts from sparse_ops.h is a compile error.
std::tuple<at::Tensor, at::Tensor> sparse_fcmae::grn_forward_cuda(const at::Tensor& x_, const at::Tensor& batch_,
                                                    const at::Tensor& perm_, const at::Tensor& offsets_,
                                                    const at::Tensor& gamma_, const at::Tensor& beta_, double eps) {
  check_grn_args(x_, batch_, perm_, offsets_, gamma_);
  c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous(), batch = batch_.contiguous(), perm = perm_.contiguous();
  const auto offsets = offsets_.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto gamma = gamma_.reshape({1, -1}).to(acc), beta = beta_.reshape({-1}).to(acc).contiguous();
  auto sums = segment_sums(x, nullptr, perm, offsets, false);
  auto g = sums.first.sqrt();                                        // (B, C)
  auto d = g.mean(1, true) + eps;                                    // (B, 1)
  auto coef = (gamma * (g / d) + 1).contiguous();                    // 1 + gamma * n
  auto y = at::empty_like(x);
  rowwise(x, coef, nullptr, nullptr, &beta, batch, y);
  return {y, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_fcmae::grn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_,
                                                                 const at::Tensor& batch_, const at::Tensor& perm_,
                                                                 const at::Tensor& offsets_, const at::Tensor& gamma_,
                                                                 const at::Tensor& g_, double eps) {
  check_grn_args(x_, batch_, perm_, offsets_, gamma_);
  TORCH_CHECK(grad_out.sizes() == x_.sizes(), "grn: grad_out must match x");
  c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous(), go = grad_out.to(x_.scalar_type()).contiguous();
  const auto batch = batch_.contiguous(), perm = perm_.contiguous(), offsets = offsets_.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto gamma = gamma_.reshape({1, -1}).to(acc);
  const auto g = g_.to(acc);
  const int64_t C = x.size(1);
  auto sums = segment_sums(go, &x, perm, offsets, true);
  const auto& sgx = sums.first;   // sum go * x per (b, c)
  const auto& sgo = sums.second;  // sum go per (b, c)
  auto d = g.mean(1, true) + eps;
  auto nrm = g / d;
  auto s = gamma * sgx;                                                  // dL/dn
  auto corr = (s * g).sum(1, true) / (d * d * static_cast<double>(C));  // (B, 1)
  auto dg = s / d - corr;                                                // dL/dg
  // dg/dx = x / g; channels with g = 0 are all zero and get no gradient through g (as the reference)
  auto amul = at::where(g > 0, dg / at::where(g > 0, g, at::ones_like(g)), at::zeros_like(g)).contiguous();
  auto coef = (gamma * nrm + 1).contiguous();
  auto gx = at::empty_like(x);
  rowwise(go, coef, &x, &amul, nullptr, batch, gx);
  return {gx, (nrm * sgx).sum(0), sgo.sum(0)};
}
