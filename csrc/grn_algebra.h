// Per-sample GRN algebra, shared by the CPU and CUDA kernels (host and device), so the CPU tests
// exercise the same formulas the GPU runs. Conventions as sparse_grn_reference:
//   g[c] = ||x[rows of b, c]||_2,  d = mean_c g + eps,  n = g / d,  y = x * (1 + gamma * n) + beta.
// The reductions over rows and channels stay with the callers (their order is what makes them
// deterministic); these are the elementwise steps between them. A is the accumulation type.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define GRN_HD __host__ __device__ __forceinline__
#else
#define GRN_HD inline
#endif

namespace sparse_fcmae {
namespace grn {

// g from the sum of squares (sqrt(0) = 0: an empty sample or all-zero channel has g = 0).
template <typename A>
GRN_HD A norm(A sumsq) {
  using std::sqrt;
  return sqrt(sumsq);
}

// d = mean_c g + eps, from sum_c g (C > 0).
template <typename A>
GRN_HD A denom(A sum_g, int64_t C, double eps) {
  return sum_g / A(C) + A(eps);
}

// Factor of x in y (forward) and of grad_out in grad_x (backward): 1 + gamma * n.
template <typename A>
GRN_HD A coef(A gamma, A g, A d) {
  return A(1) + gamma * (g / d);
}

// Backward, with sgx = sum_rows grad_out * x and s = gamma * sgx = dL/dn:
//   dL/dg_j = s_j / d - (sum_k s_k g_k) / (C d^2).
// dot_term(k) is the k-th summand of sum_k s_k g_k; corr the second term from that sum.
template <typename A>
GRN_HD A dot_term(A gamma, A sgx, A g) {
  return gamma * sgx * g;
}
template <typename A>
GRN_HD A corr(A dot, A d, int64_t C) {
  return dot / (A(C) * d * d);
}

// Factor of x in grad_x through g: dL/dg * dg/dx = dL/dg * x / g. A channel with g = 0 is all zeros
// and gets no gradient through g (as the reference), not 0/0.
template <typename A>
GRN_HD A amul(A gamma, A sgx, A g, A d, A corr) {
  return g > A(0) ? (gamma * sgx / d - corr) / g : A(0);
}

// Sample b's summand of grad_gamma[c]: n * sgx.
template <typename A>
GRN_HD A ggamma_term(A g, A d, A sgx) {
  return g / d * sgx;
}

}  // namespace grn
}  // namespace sparse_fcmae
