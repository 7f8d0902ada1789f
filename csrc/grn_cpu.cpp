// Sparse GRN on CPU: per-sample, per-channel L2 norms over the sample's rows (a segmented reduction
// over batch-sorted row indices), then one fused elementwise pass. Deterministic: every sum runs in
// a fixed order whatever the thread count.
// Memory-safe for any batch/perm/offsets, like the CUDA kernels (grn_cuda.cu): offsets are clamped into [0, N]
// and made non-decreasing, a perm entry outside [0, N) makes its sample's norms NaN and a batch entry outside
// [0, B) its output row NaN, instead of reading out of bounds. So they are not validated per call (an O(N) walk
// every forward, issue 16): the public Python op checks a caller's segments (sparse_fcmae/ops/checks.py).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "grn_algebra.h"
#include "sparse_ops.h"

namespace sparse_fcmae {
namespace {

constexpr int64_t kTile = 64;  // channels per work item of the segmented reductions

// One unsigned compare: i in [0, bound).
inline bool in_range(int64_t i, int64_t bound) { return static_cast<uint64_t>(i) < static_cast<uint64_t>(bound); }

// out1[b, c] = sum_rows a*b1 (or a*a when b1 == nullptr); out2[b, c] = sum_rows a (if out2); a and b1 have n rows.
// Sample b's rows are perm[off[b]:off[b+1]], the range clamped into [0, n]; a perm entry outside [0, n) poisons
// the sample's sums with NaN instead of being read (as segment_sums_kernel on CUDA).
template <typename T>
void segment_sums(const T* a, const T* b1, const int64_t* perm, const int64_t* off, int64_t n, int64_t nb, int64_t c,
                  T* out1, T* out2) {
  const int64_t ntile = (c + kTile - 1) / kTile;
  at::parallel_for(0, nb * ntile, 1, [&](int64_t begin, int64_t end) {
    T acc1[kTile], acc2[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / ntile, c0 = (item % ntile) * kTile, w = std::min(kTile, c - c0);
      std::fill(acc1, acc1 + w, T(0));
      std::fill(acc2, acc2 + w, T(0));
      const int64_t beg = std::min(std::max(off[b], int64_t(0)), n), stop = std::min(std::max(off[b + 1], beg), n);
      // the sample's row indices checked in a pass of their own, so the sums' loop is the unchecked one
      bool ok = true;
      for (int64_t r = beg; r < stop; ++r) ok &= in_range(perm[r], n);
      if (ok) {
        for (int64_t r = beg; r < stop; ++r) {
          const int64_t row = perm[r] * c + c0;
          const T* ar = a + row;
          const T* br = b1 ? b1 + row : ar;
#pragma omp simd
          for (int64_t k = 0; k < w; ++k) acc1[k] += ar[k] * br[k];
          if (out2) {
#pragma omp simd
            for (int64_t k = 0; k < w; ++k) acc2[k] += ar[k];
          }
        }
      } else {  // a bad row index: the sample's sums are NaN, nothing read
        std::fill(acc1, acc1 + w, std::numeric_limits<T>::quiet_NaN());
        std::fill(acc2, acc2 + w, std::numeric_limits<T>::quiet_NaN());
      }
      std::copy(acc1, acc1 + w, out1 + b * c + c0);
      if (out2) std::copy(acc2, acc2 + w, out2 + b * c + c0);
    }
  });
}

// out[i, :] = a[i, :] * s[batch[i], :] + (b2 ? b2[i, :] * t[batch[i], :] : u); s and t have nb rows. NaN where
// batch[i] is not a sample (instead of reading outside s and t), as rowwise_kernel on CUDA.
template <typename T>
void rowwise(const T* a, const T* s, const T* b2, const T* t, const T* u, const int64_t* batch, int64_t n, int64_t nb,
             int64_t c, T* out) {
  auto one = [&](int64_t i) {
    const T* ar = a + i * c;
    const T* sr = s + batch[i] * c;
    T* o = out + i * c;
    if (b2) {
      const T* br = b2 + i * c;
      const T* tr = t + batch[i] * c;
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) o[k] = ar[k] * sr[k] + br[k] * tr[k];
    } else {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) o[k] = ar[k] * sr[k] + u[k];
    }
  };
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    // the rows' sample indices checked in a pass of their own, so the rows' loop is the unchecked one
    bool ok = true;
    for (int64_t i = begin; i < end; ++i) ok &= in_range(batch[i], nb);
    if (ok) {
      for (int64_t i = begin; i < end; ++i) one(i);
      return;
    }
    for (int64_t i = begin; i < end; ++i) {
      if (in_range(batch[i], nb))
        one(i);
      else
        std::fill(out + i * c, out + (i + 1) * c, std::numeric_limits<T>::quiet_NaN());
    }
  });
}

}  // namespace
}  // namespace sparse_fcmae

// Qualified definitions: a signature that drifts from sparse_ops.h is a compile error.
std::tuple<at::Tensor, at::Tensor> sparse_fcmae::grn_forward_cpu(const at::Tensor& x_, const at::Tensor& batch_, const at::Tensor& perm_,
                                                   const at::Tensor& offsets_, const at::Tensor& gamma_,
                                                   const at::Tensor& beta_, double eps) {
  check_grn_forward_args(x_, batch_, perm_, offsets_, gamma_, beta_);
  const auto x = x_.contiguous();
  const auto batch = batch_.contiguous(), perm = perm_.contiguous(), offsets = offsets_.contiguous();
  const auto gamma = gamma_.reshape({-1}).to(x.scalar_type()).contiguous();
  const auto beta = beta_.reshape({-1}).to(x.scalar_type()).contiguous();
  const int64_t n = x.size(0), c = x.size(1), nb = offsets.size(0) - 1;
  auto y = at::empty_like(x);
  auto g = at::zeros({nb, c}, x.options());
  if (c == 0) return {y, g};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grn_forward_cpu", [&] {
    using T = scalar_t;
    T* gp = g.data_ptr<T>();
    segment_sums<T>(x.data_ptr<T>(), nullptr, perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), n, nb, c, gp,
                    nullptr);
    auto coef = at::empty({nb, c}, x.options());
    T* cp = coef.data_ptr<T>();
    const T* gam = gamma.data_ptr<T>();
    for (int64_t b = 0; b < nb; ++b) {
      T gsum = 0;
      for (int64_t k = 0; k < c; ++k) {
        gp[b * c + k] = grn::norm(gp[b * c + k]);
        gsum += gp[b * c + k];
      }
      const T d = grn::denom(gsum, c, eps);
      for (int64_t k = 0; k < c; ++k) cp[b * c + k] = grn::coef(gam[k], gp[b * c + k], d);
    }
    rowwise<T>(x.data_ptr<T>(), cp, nullptr, nullptr, beta.data_ptr<T>(), batch.data_ptr<int64_t>(), n, nb, c,
               y.data_ptr<T>());
  });
  return {y, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_fcmae::grn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_,
                                                                const at::Tensor& batch_, const at::Tensor& perm_,
                                                                const at::Tensor& offsets_, const at::Tensor& gamma_,
                                                                const at::Tensor& g_, double eps) {
  check_grn_backward_args(grad_out, x_, batch_, perm_, offsets_, gamma_, g_);
  const auto x = x_.contiguous(), go = grad_out.to(x.scalar_type()).contiguous();
  const auto batch = batch_.contiguous(), perm = perm_.contiguous(), offsets = offsets_.contiguous();
  const auto gamma = gamma_.reshape({-1}).to(x.scalar_type()).contiguous();
  const auto g = g_.to(x.scalar_type()).contiguous();
  const int64_t n = x.size(0), c = x.size(1), nb = offsets.size(0) - 1;
  auto gx = at::empty_like(x);
  auto ggamma = at::zeros({c}, x.options());
  auto gbeta = at::zeros({c}, x.options());
  if (c == 0) return {gx, ggamma, gbeta};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grn_backward_cpu", [&] {
    using T = scalar_t;
    auto sgx = at::empty({nb, c}, x.options()), sgo = at::empty({nb, c}, x.options());
    segment_sums<T>(go.data_ptr<T>(), x.data_ptr<T>(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), n, nb,
                    c, sgx.data_ptr<T>(), sgo.data_ptr<T>());
    auto coef = at::empty({nb, c}, x.options()), amul = at::empty({nb, c}, x.options());
    const T *gp = g.data_ptr<T>(), *gam = gamma.data_ptr<T>(), *sx = sgx.data_ptr<T>(), *so = sgo.data_ptr<T>();
    T *cp = coef.data_ptr<T>(), *ap = amul.data_ptr<T>(), *ggp = ggamma.data_ptr<T>(), *gbp = gbeta.data_ptr<T>();
    for (int64_t b = 0; b < nb; ++b) {
      const T* gb = gp + b * c;
      T gsum = 0;
      for (int64_t k = 0; k < c; ++k) gsum += gb[k];
      const T d = grn::denom(gsum, c, eps);
      // s_k = dL/dn_k = gamma_k * sum_rows(go * x); dL/dg_j = s_j / d - (sum_k s_k g_k) / (C d^2)
      T dot = 0;
      for (int64_t k = 0; k < c; ++k) dot += grn::dot_term(gam[k], sx[b * c + k], gb[k]);
      const T corr = grn::corr(dot, d, c);
      for (int64_t k = 0; k < c; ++k) {
        cp[b * c + k] = grn::coef(gam[k], gb[k], d);
        ap[b * c + k] = grn::amul(gam[k], sx[b * c + k], gb[k], d, corr);
        ggp[k] += grn::ggamma_term(gb[k], d, sx[b * c + k]);
        gbp[k] += so[b * c + k];
      }
    }
    rowwise<T>(go.data_ptr<T>(), cp, x.data_ptr<T>(), ap, nullptr, batch.data_ptr<int64_t>(), n, nb, c,
               gx.data_ptr<T>());
  });
  return {gx, ggamma, gbeta};
}
