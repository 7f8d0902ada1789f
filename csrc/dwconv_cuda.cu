// Depthwise submanifold convolution on CUDA over a neighbour table (N, K), -1 = absent; every kernel (variants
// 1-3) treats an entry outside [0, N) as absent with one unsigned compare, as the CPU kernels do.
// fp32/fp64 and half/bf16 features, accumulation in fp32 (fp64 for fp64), weight in the accumulation type.
// The input gradient gathers over the transposed table, or over the same table with the taps reversed when the
// table is symmetric (no atomics either way); the weight gradient writes
// per-row-chunk partials that are summed in a fixed order, so every result is deterministic.
// Two sets of kernels (cuda_dw_variant): 2, where shapes allow, loads 16-byte channel vectors with 32-bit
// indexing (gather) and keeps every tap's weight-gradient sum in registers, reading each output-gradient row
// once instead of once per tap (issue 16 items 1-2); 1, the scalar kernels, for the rest and for comparison.
#include "cuda_utils.cuh"
#include "sparse_ops.h"

#include <type_traits>
#include <utility>

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
      // absent (-1) or out of range (a bad table: the kernels never validate it, on either device) reads nothing
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

// ---- variant 2 ------------------------------------------------------------------------------------------------
using cuda::aligned16;
using cuda::Raw16;
using cuda::Vec16;

// out[i, c:c+V] = bias + sum_k f[nbr[i, k], c:c+V] * w[k, c:c+V]: one thread per (R rows, V channels); the
// R rows share each weight vector and put R independent loads in flight per tap. Needs C % V == 0, 16-byte
// aligned f/out and n*max(C, K) < 2^31 (checked by the caller).
template <typename T, typename A, int R>
__global__ void gather_vec_kernel(const T* __restrict__ f, const int32_t* __restrict__ nbr, const A* __restrict__ w,
                                  const A* __restrict__ bias, T* __restrict__ out, int n, int C, int K) {
  constexpr int V = Vec16<T>::n;
  using Raw = Raw16<T>;
  const int cv_per_row = C / V;
  const int total = ((n + R - 1) / R) * cv_per_row;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const int grp = t / cv_per_row, c0 = (t - grp * cv_per_row) * V, i0 = grp * R;
    A acc[R][V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const A b = bias ? bias[c0 + v] : A(0);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][v] = b;
    }
    for (int k = 0; k < K; ++k) {
      A wk[V];
#pragma unroll
      for (int v = 0; v < V; ++v) wk[v] = __ldg(w + k * C + c0 + v);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int i = i0 + r;
        const int j = i < n ? __ldg(nbr + i * K + k) : -1;
        if (static_cast<uint32_t>(j) < static_cast<uint32_t>(n)) {  // absent (-1) or a bad entry reads nothing
          const Raw raw = __ldg(reinterpret_cast<const Raw*>(f + j * C + c0));
          const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[r][v] += static_cast<A>(x[v]) * wk[v];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (i0 + r >= n) break;
      Raw raw;
      T* o = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int v = 0; v < V; ++v) o[v] = static_cast<T>(acc[r][v]);
      *reinterpret_cast<Raw*>(out + (i0 + r) * C + c0) = raw;
    }
  }
}

// Rows per weight-gradient partial (variant 2): 128, halved (down to 32) while the grid would give an SM fewer
// than 4 blocks: atto's stage 2 at batch 64 had 456 blocks of 128 rows for 132 SMs and ran 0.82x variant 1.
constexpr int kRowsV2 = 128, kMinRowsV2 = 32;

int64_t weight_grad_rows(int64_t n, int64_t ctiles) {
  int64_t rows = kRowsV2;
  while (rows > kMinRowsV2 && ((n + rows - 1) / rows) * ctiles < 4 * cuda::num_sms()) rows /= 2;
  return rows;
}

// part[chunk, k, c] = sum_{i in chunk} go[i, c] * f[nbr[i, k], c] for every tap k, and (with_bias)
// part[chunk, K, c] = sum_{i in chunk} go[i, c]. Block: 32 channels x 8 row lanes, one (row chunk, channel
// tile) each; a thread reads each output-gradient value once and keeps K + 1 sums in registers (K is a template
// argument so the sums stay registers), then the 8 row lanes are summed in a fixed order through shared memory.
template <typename T, typename A, int K>
__global__ void __launch_bounds__(256) weight_grad_reg_kernel(const T* __restrict__ go, const T* __restrict__ f,
                                                              const int32_t* __restrict__ nbr, A* __restrict__ part,
                                                              int n, int C, int rows, bool with_bias) {
  constexpr int kTapTile = 8;
  __shared__ A red[kTapTile][8][33];
  const int chunk = blockIdx.x, c = blockIdx.y * 32 + threadIdx.x;
  const int r0 = chunk * rows, r1 = min(n, r0 + rows);
  A acc[K + 1];
#pragma unroll
  for (int k = 0; k <= K; ++k) acc[k] = A(0);
  if (c < C) {
    for (int i = r0 + threadIdx.y; i < r1; i += 8) {
      const A g = static_cast<A>(go[i * C + c]);
      acc[K] += g;
      const int32_t* nb = nbr + i * K;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = __ldg(nb + k);
        if (static_cast<uint32_t>(j) < static_cast<uint32_t>(n)) acc[k] += g * static_cast<A>(f[j * C + c]);
      }
    }
  }
  const int taps = with_bias ? K + 1 : K;  // rows of part per chunk
#pragma unroll
  for (int k0 = 0; k0 < K + 1; k0 += kTapTile) {
    if (k0 >= taps) break;
#pragma unroll
    for (int kk = 0; kk < kTapTile; ++kk)
      if (k0 + kk <= K) red[kk][threadIdx.y][threadIdx.x] = acc[k0 + kk];
    __syncthreads();
    // 256 threads = kTapTile taps x 32 channels: each sums its 8 row lanes in order
    const int kk = threadIdx.y, k = k0 + kk;
    if (k < taps && c < C) {
      A s = 0;
#pragma unroll
      for (int y = 0; y < 8; ++y) s += red[kk][y][threadIdx.x];
      part[(static_cast<int64_t>(chunk) * taps + k) * C + c] = s;
    }
    __syncthreads();
  }
}

// variant 2's gather where it applies; false: the caller runs the scalar kernel
template <typename T, typename A>
bool launch_gather_vec(const at::Tensor& f, const at::Tensor& nbr, const at::Tensor& w, const A* bias, at::Tensor& out) {
  constexpr int V = Vec16<T>::n;
  const int64_t n = f.size(0), C = f.size(1), K = nbr.size(1);
  if (cuda_dw_variant() < 2 || C % V != 0 || n * std::max(C, K) >= (int64_t(1) << 31) || K == 0 ||
      !aligned16(f.data_ptr()) || !aligned16(out.data_ptr()))
    return false;
  if (n * C == 0) return true;
  // 4 rows a thread where that still leaves every SM 2048 threads (variant 3: always, for tests); else 1
  const int64_t vecs = n * (C / V);
  const cudaStream_t stream = cuda::stream();
  if (cuda_dw_variant() == 3 || vecs / 4 >= cuda::num_sms() * 2048) {
    gather_vec_kernel<T, A, 4><<<cuda::grid_for(vecs / 4 + 1), cuda::kThreads, 0, stream>>>(
        f.data_ptr<T>(), nbr.data_ptr<int32_t>(), w.data_ptr<A>(), bias, out.data_ptr<T>(), int(n), int(C), int(K));
  } else {
    gather_vec_kernel<T, A, 1><<<cuda::grid_for(vecs), cuda::kThreads, 0, stream>>>(
        f.data_ptr<T>(), nbr.data_ptr<int32_t>(), w.data_ptr<A>(), bias, out.data_ptr<T>(), int(n), int(C), int(K));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// variant 2's weight (and bias) gradient for the tap counts the model uses (3x3, 5x5, 7x7, 3x3x3);
// undefined tensors: the caller runs the per-tap kernel
template <typename T, typename A>
std::pair<at::Tensor, at::Tensor> weight_grad_reg(const at::Tensor& go, const at::Tensor& f, const at::Tensor& nbr,
                                                  bool with_bias, at::ScalarType acc) {
  const int64_t n = f.size(0), C = f.size(1), K = nbr.size(1);
  if (cuda_dw_variant() < 2 || n == 0 || C == 0 || n * std::max(C, K) >= (int64_t(1) << 31) ||
      (K != 9 && K != 25 && K != 27 && K != 49))
    return {};
  const int64_t ctiles = (C + 31) / 32, rows = weight_grad_rows(n, ctiles);
  const int64_t nchunk = (n + rows - 1) / rows, taps = with_bias ? K + 1 : K;
  auto part = at::empty({nchunk, taps, C}, f.options().dtype(acc));
  dim3 grid(static_cast<unsigned>(nchunk), static_cast<unsigned>(ctiles)), block(32, 8);
  const cudaStream_t stream = cuda::stream();
#define SPARSE_FCMAE_WG_CASE(TAPS)                                                                              \
  case TAPS:                                                                                                   \
    weight_grad_reg_kernel<T, A, TAPS><<<grid, block, 0, stream>>>(go.data_ptr<T>(), f.data_ptr<T>(),            \
                                                                   nbr.data_ptr<int32_t>(), part.data_ptr<A>(), \
                                                                   int(n), int(C), int(rows), with_bias);       \
    break;
  switch (K) {
    SPARSE_FCMAE_WG_CASE(9)
    SPARSE_FCMAE_WG_CASE(25)
    SPARSE_FCMAE_WG_CASE(27)
    SPARSE_FCMAE_WG_CASE(49)
    default: return {};
  }
#undef SPARSE_FCMAE_WG_CASE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // two separate sums, never views of one tensor: a custom op's outputs may not alias (torch.library checks)
  if (!with_bias) return {part.sum(0), at::Tensor()};
  return {part.narrow(1, 0, K).sum(0), part.select(1, K).sum(0)};
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
    const A* b = bias.defined() ? bias.data_ptr<A>() : nullptr;
    if (!launch_gather_vec<scalar_t, A>(feats, nbr, weight, b, out)) launch_gather<scalar_t, A>(feats, nbr, weight, b, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_fcmae::dwconv_backward_cuda(const at::Tensor& grad_out,
                                                                    const at::Tensor& feats_, const at::Tensor& nbr_,
                                                                    const c10::optional<at::Tensor>& nbr_t_,
                                                                    const at::Tensor& weight_, bool need_feats,
                                                                    bool need_weight, bool need_bias) {
  check_dwconv_backward_args(grad_out, feats_, nbr_, nbr_t_, weight_);
  c10::cuda::CUDAGuard guard(feats_.device());
  const auto feats = feats_.contiguous(), nbr = nbr_.contiguous();
  const auto go = grad_out.to(feats.scalar_type()).contiguous();
  const auto acc = acc_dtype(feats.scalar_type());
  const auto weight = weight_.to(acc).contiguous();
  at::Tensor nbr_in, weight_in;  // not a structured binding: the dispatch lambda captures them (C++17)
  std::tie(nbr_in, weight_in) = input_grad_table(nbr, nbr_t_, weight);
  const int64_t n = feats.size(0), C = feats.size(1), K = nbr.size(1);
  at::Tensor gf, gw, gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "dwconv_backward_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    if (need_feats) {
      gf = at::empty_like(feats);
      if (!launch_gather_vec<scalar_t, A>(go, nbr_in, weight_in, nullptr, gf))
        launch_gather<scalar_t, A>(go, nbr_in, weight_in, nullptr, gf);
    }
    if (need_weight) std::tie(gw, gb) = weight_grad_reg<scalar_t, A>(go, feats, nbr, need_bias, acc);
    if (need_weight && !gw.defined()) {
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
    if (need_bias && !gb.defined()) gb = go.sum(0, false, acc);
  });
  return {gf, gw, gb};
}
