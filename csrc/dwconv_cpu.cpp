// Depthwise submanifold convolution on CPU over a neighbour table (N, K), -1 = absent.
// Memory-safe for any table: an entry outside [0, N) counts as absent (one unsigned compare, as on CUDA), so
// the table is not validated here on every call (issue 16): the public Python op checks a user's table once
// (sparse_fcmae/ops/checks.py), and the model's cached tables are correct by construction.
// Forward: one output row per iteration, channel tiles held in SIMD registers across the K taps.
// Backward for the input is the same gather over the transposed table, or over the table itself with the taps
// reversed when it is symmetric (no atomics); the weight
// gradient sums fixed-size row chunks into private partials that are then added in chunk order,
// so results are bitwise deterministic whatever the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_simd.h"
#include "sparse_ops.h"

namespace sparse_fcmae {
namespace {

constexpr int64_t kChunk = 256;  // rows per weight-gradient partial

// The bound of the unsigned test `(uint32_t)j < bound` that keeps an entry j: exactly the j in [0, n) (-1 and
// every other negative entry are >= 2^31 unsigned; a row count past 2^31 is capped, an int32 never reaches it).
inline uint32_t row_bound(int64_t n) { return static_cast<uint32_t>(std::min<int64_t>(n, int64_t(1) << 31)); }
SFC_INLINE bool present(int32_t j, uint32_t bound) { return static_cast<uint32_t>(j) < bound; }

// out[i, c0:c0+NV*L] = bias + sum_k feats[nbr[i, k], ...] * w[k, ...] for R consecutive rows at once
// (the weight vectors are loaded once for R rows). Absent neighbours read a zero row instead of
// branching: the pattern of absent taps at patch borders is irregular and mispredicts. An entry outside
// [0, n) (a bad table) is absent too: it reads the zero row, never outside f.
// VB is the vector width in bytes (32: SSE2/AVX2 copies, 64: AVX-512 copy).
template <typename T, int VB, int NV, int R>
SFC_INLINE void gather_tile(const T* f, const T* zero, uint32_t n, const int32_t* nb, const T* w, const T* bias, T* o,
                            int64_t C, int64_t K, int64_t c0) {
  using vec = typename simd::Vec<T, VB>::type;
  constexpr int L = simd::Vec<T, VB>::lanes;
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = bias ? simd::load<T, VB>(bias + c0 + v * L) : vec{};
  for (int64_t k = 0; k < K; ++k) {
    const T* fr[R];
    for (int r = 0; r < R; ++r) {
      const int32_t j = nb[r * K + k];
      fr[r] = present(j, n) ? f + int64_t(j) * C + c0 : zero;
    }
    const T* wk = w + k * C + c0;
    for (int v = 0; v < NV; ++v) {
      const vec wv = simd::load<T, VB>(wk + v * L);
      for (int r = 0; r < R; ++r) acc[r][v] += simd::load<T, VB>(fr[r] + v * L) * wv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) simd::store<T, VB>(o + r * C + c0 + v * L, acc[r][v]);
}

// Rows are processed in blocks of kRowBlock, and within a block one channel tile at a time: the
// tile's slice of the neighbourhood (the image rows around the block) then stays in L1.
constexpr int64_t kRowBlock = 64;

template <typename T, int VB, int NV>
SFC_INLINE void gather_tile_rows(const T* f, const T* zero, uint32_t n, const int32_t* nbr, const T* w, const T* bias,
                                 T* out, int64_t C, int64_t K, int64_t c0, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) gather_tile<T, VB, NV, 4>(f, zero, n, nbr + i * K, w, bias, out + i * C, C, K, c0);
  for (; i < end; ++i) gather_tile<T, VB, NV, 1>(f, zero, n, nbr + i * K, w, bias, out + i * C, C, K, c0);
}

template <typename T, int VB>
SFC_INLINE void gather_rows(const T* f, const T* zero, uint32_t n, const int32_t* nbr, const T* w, const T* bias,
                            T* out, int64_t C, int64_t K, int64_t begin, int64_t end) {
  constexpr int L = simd::Vec<T, VB>::lanes;
  constexpr int L32 = simd::Vec<T, 32>::lanes;
  for (int64_t rb = begin; rb < end; rb += kRowBlock) {
    const int64_t re = std::min(end, rb + kRowBlock);
    int64_t c0 = 0;
    for (; c0 + 2 * L <= C; c0 += 2 * L) gather_tile_rows<T, VB, 2>(f, zero, n, nbr, w, bias, out, C, K, c0, rb, re);
    for (; c0 + L <= C; c0 += L) gather_tile_rows<T, VB, 1>(f, zero, n, nbr, w, bias, out, C, K, c0, rb, re);
    for (; c0 + L32 <= C; c0 += L32) gather_tile_rows<T, 32, 1>(f, zero, n, nbr, w, bias, out, C, K, c0, rb, re);
    for (; c0 < C; ++c0) {  // channel tail
      for (int64_t i = rb; i < re; ++i) {
        const int32_t* nb = nbr + i * K;
        T acc = bias ? bias[c0] : T(0);
        for (int64_t k = 0; k < K; ++k) {
          const int32_t j = nb[k];
          if (present(j, n)) acc += f[int64_t(j) * C + c0] * w[k * C + c0];
        }
        out[i * C + c0] = acc;
      }
    }
  }
}

// part[k, c0:c0+NV*L] = sum_{i in [begin, end)} go[i, ...] * feats[nbr[i, k], ...] for KB taps at once,
// accumulated in registers over the rows (one go load feeds KB multiply-adds).
template <typename T, int VB, int NV, int KB>
SFC_INLINE void weight_grad_tile(const T* go, const T* f, const T* zero, uint32_t n, const int32_t* nbr, T* part,
                                 int64_t C, int64_t K, int64_t k0, int64_t c0, int64_t begin, int64_t end) {
  using vec = typename simd::Vec<T, VB>::type;
  constexpr int L = simd::Vec<T, VB>::lanes;
  vec acc[KB][NV];
  for (int q = 0; q < KB; ++q)
    for (int v = 0; v < NV; ++v) acc[q][v] = vec{};
  for (int64_t i = begin; i < end; ++i) {
    const int32_t* nb = nbr + i * K + k0;
    vec g[NV];
    for (int v = 0; v < NV; ++v) g[v] = simd::load<T, VB>(go + i * C + c0 + v * L);
    for (int q = 0; q < KB; ++q) {
      const int32_t j = nb[q];
      const T* fr = present(j, n) ? f + int64_t(j) * C + c0 : zero;
      for (int v = 0; v < NV; ++v) acc[q][v] += g[v] * simd::load<T, VB>(fr + v * L);
    }
  }
  for (int q = 0; q < KB; ++q)
    for (int v = 0; v < NV; ++v) simd::store<T, VB>(part + (k0 + q) * C + c0 + v * L, acc[q][v]);
}

template <typename T, int VB, int NV>
SFC_INLINE void weight_grad_taps(const T* go, const T* f, const T* zero, uint32_t n, const int32_t* nbr, T* part,
                                 int64_t C, int64_t K, int64_t c0, int64_t begin, int64_t end) {
  int64_t k0 = 0;
  for (; k0 + 4 <= K; k0 += 4) weight_grad_tile<T, VB, NV, 4>(go, f, zero, n, nbr, part, C, K, k0, c0, begin, end);
  for (; k0 < K; ++k0) weight_grad_tile<T, VB, NV, 1>(go, f, zero, n, nbr, part, C, K, k0, c0, begin, end);
}

// part (K, C) = weight gradient of the rows [begin, end); partb (C) = their bias gradient.
template <typename T, int VB>
SFC_INLINE void weight_grad_rows(const T* go, const T* f, const T* zero, uint32_t n, const int32_t* nbr, T* part,
                                 T* partb, int64_t C, int64_t K, int64_t begin, int64_t end) {
  constexpr int L = simd::Vec<T, VB>::lanes;
  constexpr int L32 = simd::Vec<T, 32>::lanes;
  if (partb) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gr = go + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) partb[c] += gr[c];
    }
  }
  int64_t c0 = 0;
  for (; c0 + 2 * L <= C; c0 += 2 * L) weight_grad_taps<T, VB, 2>(go, f, zero, n, nbr, part, C, K, c0, begin, end);
  for (; c0 + L <= C; c0 += L) weight_grad_taps<T, VB, 1>(go, f, zero, n, nbr, part, C, K, c0, begin, end);
  for (; c0 + L32 <= C; c0 += L32) weight_grad_taps<T, 32, 1>(go, f, zero, n, nbr, part, C, K, c0, begin, end);
  for (; c0 < C; ++c0) {
    for (int64_t k = 0; k < K; ++k) {
      T acc = 0;
      for (int64_t i = begin; i < end; ++i) {
        const int32_t j = nbr[i * K + k];
        if (present(j, n)) acc += go[i * C + c0] * f[int64_t(j) * C + c0];
      }
      part[k * C + c0] = acc;
    }
  }
}

// Non-template entry points per dtype: baseline, AVX2/FMA and AVX-512 copies, chosen at run time.
#define SFC_DEFINE_RANGE_FNS(T, VB, ATTR, SUFFIX)                                                              \
  ATTR void gather_range_##SUFFIX(const T* f, const T* zero, uint32_t n, const int32_t* nbr, const T* w,       \
                                  const T* bias, T* out, int64_t C, int64_t K, int64_t begin, int64_t end) {   \
    gather_rows<T, VB>(f, zero, n, nbr, w, bias, out, C, K, begin, end);                                        \
  }                                                                                                             \
  ATTR void weight_grad_range_##SUFFIX(const T* go, const T* f, const T* zero, uint32_t n, const int32_t* nbr,  \
                                       T* part, T* partb, int64_t C, int64_t K, int64_t begin, int64_t end) {   \
    weight_grad_rows<T, VB>(go, f, zero, n, nbr, part, partb, C, K, begin, end);                                \
  }
SFC_DEFINE_RANGE_FNS(float, 32, , f32)
SFC_DEFINE_RANGE_FNS(double, 32, , f64)
#if SFC_AVX2_CLONE
SFC_DEFINE_RANGE_FNS(float, 32, SFC_TARGET_AVX2, f32_avx2)
SFC_DEFINE_RANGE_FNS(double, 32, SFC_TARGET_AVX2, f64_avx2)
SFC_DEFINE_RANGE_FNS(float, 64, SFC_TARGET_AVX512, f32_avx512)
SFC_DEFINE_RANGE_FNS(double, 64, SFC_TARGET_AVX512, f64_avx512)
#define SFC_PICK(name, ...)                                          \
  (simd::use_avx512()  ? name##_avx512(__VA_ARGS__)                  \
   : simd::use_avx2() ? name##_avx2(__VA_ARGS__)                     \
                      : name(__VA_ARGS__))
#else
#define SFC_PICK(name, ...) name(__VA_ARGS__)
#endif
#undef SFC_DEFINE_RANGE_FNS

inline void gather_range(const float* f, const float* z, uint32_t n, const int32_t* nbr, const float* w,
                         const float* bias, float* out, int64_t C, int64_t K, int64_t b, int64_t e) {
  SFC_PICK(gather_range_f32, f, z, n, nbr, w, bias, out, C, K, b, e);
}
inline void gather_range(const double* f, const double* z, uint32_t n, const int32_t* nbr, const double* w,
                         const double* bias, double* out, int64_t C, int64_t K, int64_t b, int64_t e) {
  SFC_PICK(gather_range_f64, f, z, n, nbr, w, bias, out, C, K, b, e);
}
inline void weight_grad_range(const float* go, const float* f, const float* z, uint32_t n, const int32_t* nbr,
                              float* part, float* partb, int64_t C, int64_t K, int64_t b, int64_t e) {
  SFC_PICK(weight_grad_range_f32, go, f, z, n, nbr, part, partb, C, K, b, e);
}
inline void weight_grad_range(const double* go, const double* f, const double* z, uint32_t n, const int32_t* nbr,
                              double* part, double* partb, int64_t C, int64_t K, int64_t b, int64_t e) {
  SFC_PICK(weight_grad_range_f64, go, f, z, n, nbr, part, partb, C, K, b, e);
}
#undef SFC_PICK

template <typename T>
void gather(const at::Tensor& f, const at::Tensor& nbr, const at::Tensor& w, const T* bias, at::Tensor& out) {
  const int64_t n = f.size(0), C = f.size(1), K = nbr.size(1);
  const T* fp = f.data_ptr<T>();
  const int32_t* np = nbr.data_ptr<int32_t>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const std::vector<T> zero(C + 64, T(0));  // the row an absent (or out-of-range) neighbour reads
  const uint32_t bound = row_bound(n);
  // ~K*C multiply-adds per row: aim for >= 16k of them per task
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * C));
  at::parallel_for(0, n, grain,
                   [&](int64_t b, int64_t e) { gather_range(fp, zero.data(), bound, np, wp, bias, op, C, K, b, e); });
}

template <typename T>
void sum_chunks(const T* part, int64_t nchunk, int64_t m, T* out) {
  at::parallel_for(0, m, 16384, [&](int64_t b, int64_t e) {  // small: one thread unless large
    std::fill(out + b, out + e, T(0));
    for (int64_t ch = 0; ch < nchunk; ++ch) {
      const T* src = part + ch * m;
#pragma omp simd
      for (int64_t t = b; t < e; ++t) out[t] += src[t];
    }
  });
}

}  // namespace
}  // namespace sparse_fcmae

// Qualified definitions: a signature that drifts from sparse_ops.h is a compile error.
at::Tensor sparse_fcmae::dwconv_forward_cpu(const at::Tensor& feats_, const at::Tensor& nbr_, const at::Tensor& weight_,
                              const c10::optional<at::Tensor>& bias_) {
  check_dwconv_args(feats_, nbr_, weight_);
  const auto feats = feats_.contiguous(), nbr = nbr_.contiguous();
  const auto weight = weight_.to(feats.scalar_type()).contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    check_dwconv_bias(feats, *bias_);
    bias = bias_->reshape({-1}).to(feats.scalar_type()).contiguous();
  }
  auto out = at::empty_like(feats);
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "dwconv_forward_cpu", [&] {
    gather<scalar_t>(feats, nbr, weight, bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_fcmae::dwconv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& feats_,
                                                                   const at::Tensor& nbr_,
                                                                   const c10::optional<at::Tensor>& nbr_t_,
                                                                   const at::Tensor& weight_, bool need_feats,
                                                                   bool need_weight, bool need_bias) {
  check_dwconv_backward_args(grad_out, feats_, nbr_, nbr_t_, weight_);
  const auto feats = feats_.contiguous(), nbr = nbr_.contiguous();
  const auto go = grad_out.to(feats.scalar_type()).contiguous();
  const auto weight = weight_.to(feats.scalar_type()).contiguous();
  at::Tensor nbr_in, weight_in;  // not a structured binding: the dispatch lambda captures them (C++17)
  std::tie(nbr_in, weight_in) = input_grad_table(nbr, nbr_t_, weight);
  const int64_t n = feats.size(0), C = feats.size(1), K = nbr.size(1);
  at::Tensor gf, gw, gb;
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "dwconv_backward_cpu", [&] {
    using T = scalar_t;
    if (need_feats) {
      gf = at::empty_like(feats);
      gather<T>(go, nbr_in, weight_in, nullptr, gf);
    }
    if (need_weight || need_bias) {
      const int64_t nchunk = (n + kChunk - 1) / kChunk;
      auto part = at::zeros({std::max<int64_t>(nchunk, 1), K, C}, feats.options());
      auto partb = at::zeros({std::max<int64_t>(nchunk, 1), C}, feats.options());
      T *pp = part.data_ptr<T>(), *pb = partb.data_ptr<T>();
      const T *gop = go.data_ptr<T>(), *fp = feats.data_ptr<T>();
      const int32_t* np = nbr.data_ptr<int32_t>();
      const std::vector<T> zero(C + 64, T(0));
      const uint32_t bound = row_bound(n);
      at::parallel_for(0, nchunk, 1, [&](int64_t b, int64_t e) {
        for (int64_t ch = b; ch < e; ++ch)
          weight_grad_range(gop, fp, zero.data(), bound, np, pp + ch * K * C, need_bias ? pb + ch * C : nullptr, C, K,
                            ch * kChunk, std::min(n, (ch + 1) * kChunk));
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
