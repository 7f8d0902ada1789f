// Python bindings of sparse_fcmae._C: one entry point per op, dispatched on the input's device.
#include <torch/extension.h>

#include "cpu_simd.h"
#include "sparse_ops.h"

namespace sparse_fcmae {
namespace {

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, "sparse_fcmae._C.", op, ": this build has no CUDA kernels (rebuild with CUDA / FORCE_CUDA=1)");
}

std::tuple<at::Tensor, at::Tensor> grn_forward(const at::Tensor& x, const at::Tensor& batch, const at::Tensor& perm,
                                               const at::Tensor& offsets, const at::Tensor& gamma,
                                               const at::Tensor& beta, double eps) {
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return grn_forward_cuda(x, batch, perm, offsets, gamma, beta, eps);
#else
    no_cuda("grn_forward");
#endif
  }
  return grn_forward_cpu(x, batch, perm, offsets, gamma, beta, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grn_backward(const at::Tensor& go, const at::Tensor& x,
                                                            const at::Tensor& batch, const at::Tensor& perm,
                                                            const at::Tensor& offsets, const at::Tensor& gamma,
                                                            const at::Tensor& g, double eps) {
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return grn_backward_cuda(go, x, batch, perm, offsets, gamma, g, eps);
#else
    no_cuda("grn_backward");
#endif
  }
  return grn_backward_cpu(go, x, batch, perm, offsets, gamma, g, eps);
}

at::Tensor dwconv_forward(const at::Tensor& feats, const at::Tensor& nbr, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  if (feats.is_cuda()) {
#ifdef WITH_CUDA
    return dwconv_forward_cuda(feats, nbr, weight, bias);
#else
    no_cuda("dwconv_forward");
#endif
  }
  return dwconv_forward_cpu(feats, nbr, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_backward(const at::Tensor& go, const at::Tensor& feats,
                                                               const at::Tensor& nbr,
                                                               const c10::optional<at::Tensor>& nbr_t,
                                                               const at::Tensor& weight, bool need_feats,
                                                               bool need_weight, bool need_bias) {
  if (feats.is_cuda()) {
#ifdef WITH_CUDA
    return dwconv_backward_cuda(go, feats, nbr, nbr_t, weight, need_feats, need_weight, need_bias);
#else
    no_cuda("dwconv_backward");
#endif
  }
  return dwconv_backward_cpu(go, feats, nbr, nbr_t, weight, need_feats, need_weight, need_bias);
}

}  // namespace
}  // namespace sparse_fcmae

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace sparse_fcmae;
  m.doc() = "sparse-fcmae kernels: sparse GRN and depthwise submanifold convolution (CPU/CUDA)";
  m.def("grn_forward", &grn_forward, "GRN forward -> (y, g)");
  m.def("grn_backward", &grn_backward, "GRN backward -> (grad_x, grad_gamma, grad_beta)");
  m.def("dwconv_forward", &dwconv_forward, "depthwise conv forward");
  m.def("dwconv_backward", &dwconv_backward,
        "depthwise conv backward -> (grad_feats, grad_weight, grad_bias); nbr_t None: the table is symmetric");
  m.def("cpu_isa", [] { return std::string(sparse_fcmae::simd::use_avx512() ? "avx512"
                                                  : sparse_fcmae::simd::use_avx2() ? "avx2+fma"
                                                                                    : "baseline"); },
        "which copy of the CPU kernels runs on this machine");
  m.def(
      "set_cpu_isa_cap",
      [](int cap) {
        const int old = sparse_fcmae::simd::isa_cap();
        sparse_fcmae::simd::isa_cap() = cap;
        return old;
      },
      "limit the CPU kernels to the baseline (0), AVX2/FMA (1) or AVX-512 (2) copy; returns the old cap (tests)");
  m.def(
      "set_cuda_dw_variant",
      [](int variant) {
        TORCH_CHECK(variant >= 1 && variant <= 3, "set_cuda_dw_variant: 1, 2 or 3, got ", variant);
        const int old = sparse_fcmae::cuda_dw_variant();
        sparse_fcmae::cuda_dw_variant() = variant;
        return old;
      },
      "pick the CUDA depthwise kernels: 2 (vectorised, default), 1 (the first scalar ones) or 3 (2 with 4 rows a "
      "gather thread always); returns the old one");
  m.def(
      "set_cuda_grn_variant",
      [](int variant) {
        TORCH_CHECK(variant == 1 || variant == 2, "set_cuda_grn_variant: 1 or 2, got ", variant);
        const int old = sparse_fcmae::cuda_grn_variant();
        sparse_fcmae::cuda_grn_variant() = variant;
        return old;
      },
      "pick the CUDA GRN kernels: 2 (each sample's algebra fused into its segment sums, default) or 1 (separate "
      "finalize kernels); returns the old one");
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
