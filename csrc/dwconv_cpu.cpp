// Depthwise submanifold convolution on CPU over a neighbour table (N, K), -1 = absent.
// Forward: one output row per iteration, channel tiles held in SIMD registers across the K taps.
// Backward for the input is the same gather over the transposed table (no atomics); the weight
// gradient sums fixed-size row chunks into private partials that are then added in chunk order,
// so results are bitwise deterministic whatever the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_simd.h"
#include "sparse_ops.h"

namespace sparse_fcmae {
namespace {

constexpr int64_t kChunk = 256;  // rows per weight-gradient partial

// out[i, c0:c0+NV*L] = bias + sum_k feats[nbr[i, k], ...] * w[k, ...]
template <typename T, int NV>
SFC_INLINE void gather_tile(const T* f, const int32_t* nb, const T* w, const T* bias, T* o, int64_t C, int64_t K,
                            int64_t c0) {
  using vec = typename simd::Vec<T>::type;
  constexpr int L = simd::Vec<T>::lanes;
  vec acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = bias ? simd::load(bias + c0 + v * L) : vec{};
  for (int64_t k = 0; k < K; ++k) {
    const int32_t j = nb[k];
    if (j < 0) continue;
    const T* fr = f + int64_t(j) * C + c0;
    const T* wk = w + k * C + c0;
    for (int v = 0; v < NV; ++v) acc[v] += simd::load(fr + v * L) * simd::load(wk + v * L);
  }
  for (int v = 0; v < NV; ++v) simd::store(o + c0 + v * L, acc[v]);
}

template <typename T>
SFC_INLINE void gather_rows(const T* f, const int32_t* nbr, const T* w, const T* bias, T* out, int64_t C, int64_t K,
                            int64_t begin, int64_t end) {
  constexpr int L = simd::Vec<T>::lanes;
  for (int64_t i = begin; i < end; ++i) {
    const int32_t* nb = nbr + i * K;
    T* o = out + i * C;
    int64_t c0 = 0;
    for (; c0 + 4 * L <= C; c0 += 4 * L) gather_tile<T, 4>(f, nb, w, bias, o, C, K, c0);
    for (; c0 + L <= C; c0 += L) gather_tile<T, 1>(f, nb, w, bias, o, C, K, c0);
    for (; c0 < C; ++c0) {  // channel tail
      T acc = bias ? bias[c0] : T(0);
      for (int64_t k = 0; k < K; ++k) {
        const int32_t j = nb[k];
        if (j >= 0) acc += f[int64_t(j) * C + c0] * w[k * C + c0];
      }
      o[c0] = acc;
    }
  }
}

// part[k, :] += go[i, :] * feats[nbr[i, k], :] for the rows of one chunk; partb[:] += go[i, :]
template <typename T>
SFC_INLINE void weight_grad_rows(const T* go, const T* f, const int32_t* nbr, T* part, T* partb, int64_t C, int64_t K,
                                 int64_t begin, int64_t end) {
  using vec = typename simd::Vec<T>::type;
  constexpr int L = simd::Vec<T>::lanes;
  for (int64_t i = begin; i < end; ++i) {
    const int32_t* nb = nbr + i * K;
    const T* gr = go + i * C;
    if (partb) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) partb[c] += gr[c];
    }
    int64_t c0 = 0;
    for (; c0 + 2 * L <= C; c0 += 2 * L) {
      const vec g0 = simd::load(gr + c0), g1 = simd::load(gr + c0 + L);
      for (int64_t k = 0; k < K; ++k) {
        const int32_t j = nb[k];
        if (j < 0) continue;
        const T* fr = f + int64_t(j) * C + c0;
        T* pk = part + k * C + c0;
        simd::store(pk, simd::load(pk) + g0 * simd::load(fr));
        simd::store(pk + L, simd::load(pk + L) + g1 * simd::load(fr + L));
      }
    }
    for (; c0 + L <= C; c0 += L) {
      const vec g0 = simd::load(gr + c0);
      for (int64_t k = 0; k < K; ++k) {
        const int32_t j = nb[k];
        if (j < 0) continue;
        T* pk = part + k * C + c0;
        simd::store(pk, simd::load(pk) + g0 * simd::load(f + int64_t(j) * C + c0));
      }
    }
    for (; c0 < C; ++c0) {
      for (int64_t k = 0; k < K; ++k) {
        const int32_t j = nb[k];
        if (j >= 0) part[k * C + c0] += gr[c0] * f[int64_t(j) * C + c0];
      }
    }
  }
}

// Non-template entry points, one per dtype, so the multiversioned clones are plain functions.
#define SFC_DEFINE_RANGE_FNS(T, SUFFIX)                                                                         \
  SFC_MULTIVERSION void gather_range_##SUFFIX(const T* f, const int32_t* nbr, const T* w, const T* bias, T* out, \
                                              int64_t C, int64_t K, int64_t begin, int64_t end) {               \
    gather_rows<T>(f, nbr, w, bias, out, C, K, begin, end);                                                     \
  }                                                                                                             \
  SFC_MULTIVERSION void weight_grad_range_##SUFFIX(const T* go, const T* f, const int32_t* nbr, T* part,         \
                                                   T* partb, int64_t C, int64_t K, int64_t begin, int64_t end) { \
    weight_grad_rows<T>(go, f, nbr, part, partb, C, K, begin, end);                                             \
  }
SFC_DEFINE_RANGE_FNS(float, f32)
SFC_DEFINE_RANGE_FNS(double, f64)
#undef SFC_DEFINE_RANGE_FNS

inline void gather_range(const float* f, const int32_t* nbr, const float* w, const float* bias, float* out, int64_t C,
                         int64_t K, int64_t b, int64_t e) {
  gather_range_f32(f, nbr, w, bias, out, C, K, b, e);
}
inline void gather_range(const double* f, const int32_t* nbr, const double* w, const double* bias, double* out,
                         int64_t C, int64_t K, int64_t b, int64_t e) {
  gather_range_f64(f, nbr, w, bias, out, C, K, b, e);
}
inline void weight_grad_range(const float* go, const float* f, const int32_t* nbr, float* part, float* partb, int64_t C,
                              int64_t K, int64_t b, int64_t e) {
  weight_grad_range_f32(go, f, nbr, part, partb, C, K, b, e);
}
inline void weight_grad_range(const double* go, const double* f, const int32_t* nbr, double* part, double* partb,
                              int64_t C, int64_t K, int64_t b, int64_t e) {
  weight_grad_range_f64(go, f, nbr, part, partb, C, K, b, e);
}

template <typename T>
void gather(const at::Tensor& f, const at::Tensor& nbr, const at::Tensor& w, const T* bias, at::Tensor& out) {
  const int64_t n = f.size(0), C = f.size(1), K = nbr.size(1);
  const T* fp = f.data_ptr<T>();
  const int32_t* np = nbr.data_ptr<int32_t>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // ~K*C multiply-adds per row: aim for >= 16k of them per task
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * C));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { gather_range(fp, np, wp, bias, op, C, K, b, e); });
}

template <typename T>
void sum_chunks(const T* part, int64_t nchunk, int64_t m, T* out) {
  at::parallel_for(0, m, 1024, [&](int64_t b, int64_t e) {
    std::fill(out + b, out + e, T(0));
    for (int64_t ch = 0; ch < nchunk; ++ch) {
      const T* src = part + ch * m;
#pragma omp simd
      for (int64_t t = b; t < e; ++t) out[t] += src[t];
    }
  });
}

void check_table_range(const at::Tensor& nbr, int64_t n) {
  // One cheap pass: an index outside [-1, N) would read out of bounds.
  if (nbr.numel() == 0) return;
  const auto mm = at::aminmax(nbr);
  TORCH_CHECK(std::get<0>(mm).item<int32_t>() >= -1 && std::get<1>(mm).item<int32_t>() < n,
              "dwconv: neighbour table has entries outside [-1, N)");
}

}  // namespace
}  // namespace sparse_fcmae

// Qualified definitions: a signature that drifts from sparse_ops.h is a compile error.
at::Tensor sparse_fcmae::dwconv_forward_cpu(const at::Tensor& feats_, const at::Tensor& nbr_, const at::Tensor& weight_,
                              const c10::optional<at::Tensor>& bias_) {
  check_dwconv_args(feats_, nbr_, weight_);
  const auto feats = feats_.contiguous(), nbr = nbr_.contiguous();
  const auto weight = weight_.to(feats.scalar_type()).contiguous();
  check_table_range(nbr, feats.size(0));
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->numel() == feats.size(1), "dwconv: bias must have C elements");
    bias = bias_->reshape({-1}).to(feats.scalar_type()).contiguous();
  }
  auto out = at::empty_like(feats);
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "dwconv_forward_cpu", [&] {
    gather<scalar_t>(feats, nbr, weight, bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_fcmae::dwconv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& feats_,
                                                                   const at::Tensor& nbr_, const at::Tensor& nbr_t_,
                                                                   const at::Tensor& weight_, bool need_feats,
                                                                   bool need_weight, bool need_bias) {
  check_dwconv_args(feats_, nbr_, weight_);
  TORCH_CHECK(nbr_t_.sizes() == nbr_.sizes() && nbr_t_.scalar_type() == at::kInt,
              "dwconv: transposed table must be int32 like the table");
  TORCH_CHECK(grad_out.sizes() == feats_.sizes(), "dwconv: grad_out must match feats");
  const auto feats = feats_.contiguous(), nbr = nbr_.contiguous(), nbr_t = nbr_t_.contiguous();
  const auto go = grad_out.to(feats.scalar_type()).contiguous();
  const auto weight = weight_.to(feats.scalar_type()).contiguous();
  const int64_t n = feats.size(0), C = feats.size(1), K = nbr.size(1);
  at::Tensor gf, gw, gb;
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "dwconv_backward_cpu", [&] {
    using T = scalar_t;
    if (need_feats) {
      check_table_range(nbr_t, n);
      gf = at::empty_like(feats);
      gather<T>(go, nbr_t, weight, nullptr, gf);
    }
    if (need_weight || need_bias) {
      const int64_t nchunk = (n + kChunk - 1) / kChunk;
      auto part = at::zeros({std::max<int64_t>(nchunk, 1), K, C}, feats.options());
      auto partb = at::zeros({std::max<int64_t>(nchunk, 1), C}, feats.options());
      T *pp = part.data_ptr<T>(), *pb = partb.data_ptr<T>();
      const T *gop = go.data_ptr<T>(), *fp = feats.data_ptr<T>();
      const int32_t* np = nbr.data_ptr<int32_t>();
      at::parallel_for(0, nchunk, 1, [&](int64_t b, int64_t e) {
        for (int64_t ch = b; ch < e; ++ch)
          weight_grad_range(gop, fp, np, pp + ch * K * C, need_bias ? pb + ch * C : nullptr, C, K, ch * kChunk,
                            std::min(n, (ch + 1) * kChunk));
      });
      // chunk partials are added in chunk order (deterministic whatever the thread count)
      gw = at::empty({K, C}, feats.options());
      gb = at::empty({C}, feats.options());
      sum_chunks<T>(pp, nchunk, K * C, gw.data_ptr<T>());
      sum_chunks<T>(pb, nchunk, C, gb.data_ptr<T>());
    }
  });
  return {gf, gw, gb};
}
