// Declarations shared by the CPU and CUDA implementations of the sparse ops (see bindings.cpp).
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

namespace sparse_fcmae {

// ---- GRN on batch-sorted segments: rows perm[offsets[b]:offsets[b+1]] belong to sample b. ----
// Returns (y (N,C) like x, g (B,C) per-sample channel norms in the accumulation type).
std::tuple<at::Tensor, at::Tensor> grn_forward_cpu(const at::Tensor& x, const at::Tensor& batch, const at::Tensor& perm,
                                                   const at::Tensor& offsets, const at::Tensor& gamma,
                                                   const at::Tensor& beta, double eps);
// Returns (grad_x (N,C), grad_gamma (C), grad_beta (C)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                const at::Tensor& batch, const at::Tensor& perm,
                                                                const at::Tensor& offsets, const at::Tensor& gamma,
                                                                const at::Tensor& g, double eps);

// ---- Depthwise conv over a neighbour table nbr (N,K) int32, -1 = absent; weight (K,C). ----
at::Tensor dwconv_forward_cpu(const at::Tensor& feats, const at::Tensor& nbr, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias);
// Returns (grad_feats, grad_weight, grad_bias); nbr_t is the transposed table (nbr_t[j,k] = i iff nbr[i,k] = j),
// or none for a symmetric table (see input_grad_table).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& feats,
                                                                   const at::Tensor& nbr,
                                                                   const c10::optional<at::Tensor>& nbr_t,
                                                                   const at::Tensor& weight, bool need_feats,
                                                                   bool need_weight, bool need_bias);

// Which CUDA depthwise kernels run: 2 (default) the vectorised gather and the register-tiled weight gradient,
// 1 the first, scalar kernels (kept to measure the two side by side, and as a fallback). Process-wide.
inline int& cuda_dw_variant() {
  static int variant = 2;
  return variant;
}

// Which CUDA GRN kernels run: 2 (default) each sample's algebra in the last of its segment-sum blocks (2
// launches forward, 2 backward) and the vectorised elementwise pass, 1 the earlier kernels (separate finalize
// and sum kernels, 3 and 4 launches, scalar elementwise pass). Process-wide.
inline int& cuda_grn_variant() {
  static int variant = 2;
  return variant;
}

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> grn_forward_cuda(const at::Tensor& x, const at::Tensor& batch, const at::Tensor& perm,
                                                    const at::Tensor& offsets, const at::Tensor& gamma,
                                                    const at::Tensor& beta, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                 const at::Tensor& batch, const at::Tensor& perm,
                                                                 const at::Tensor& offsets, const at::Tensor& gamma,
                                                                 const at::Tensor& g, double eps);
at::Tensor dwconv_forward_cuda(const at::Tensor& feats, const at::Tensor& nbr, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_backward_cuda(const at::Tensor& grad_out, const at::Tensor& feats,
                                                                    const at::Tensor& nbr,
                                                                    const c10::optional<at::Tensor>& nbr_t,
                                                                    const at::Tensor& weight, bool need_feats,
                                                                    bool need_weight, bool need_bias);
#endif

// Shared argument checks (device-agnostic).
// Every tensor on x's device: a CPU index with CUDA features (or the reverse) would be read through
// the wrong kind of pointer, so it is one clear error here instead.
// Every tensor on the first one's device (index included): the backend is picked from that one alone.
inline void check_devices(const char* op, const char* first, const at::Tensor& x,
                          std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors)
    TORCH_CHECK(t->device() == x.device(), op, ": every tensor must be on ", first, "'s device (", x.device(),
                "), but ", name, " is on ", t->device());
}

inline void check_grn_devices(const at::Tensor& x,
                              std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  check_devices("grn", "x", x, tensors);
}

inline void check_grn_args(const at::Tensor& x, const at::Tensor& batch, const at::Tensor& perm,
                           const at::Tensor& offsets, const at::Tensor& gamma) {
  check_grn_devices(x, {{"batch", &batch}, {"perm", &perm}, {"offsets", &offsets}, {"gamma", &gamma}});
  TORCH_CHECK(x.dim() == 2, "grn: x must be (N, C), got ", x.sizes());
  TORCH_CHECK(batch.dim() == 1 && batch.size(0) == x.size(0) && batch.scalar_type() == at::kLong,
              "grn: batch must be int64 (N,)");
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == x.size(0) && perm.scalar_type() == at::kLong,
              "grn: perm must be int64 (N,)");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong,
              "grn: offsets must be int64 (B+1,)");
  TORCH_CHECK(gamma.numel() == x.size(1), "grn: gamma must have C = ", x.size(1), " elements, got ", gamma.numel());
}

inline void check_grn_forward_args(const at::Tensor& x, const at::Tensor& batch, const at::Tensor& perm,
                                   const at::Tensor& offsets, const at::Tensor& gamma, const at::Tensor& beta) {
  check_grn_args(x, batch, perm, offsets, gamma);
  check_grn_devices(x, {{"beta", &beta}});
  TORCH_CHECK(beta.numel() == x.size(1), "grn: beta must have C = ", x.size(1), " elements, got ", beta.numel());
}

// g is the forward's (B, C) norms: the backward kernels index it by sample and channel.
inline void check_grn_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& batch,
                                    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& gamma,
                                    const at::Tensor& g) {
  check_grn_args(x, batch, perm, offsets, gamma);
  check_grn_devices(x, {{"grad_out", &grad_out}, {"g", &g}});
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grn: grad_out must match x");
  TORCH_CHECK(g.dim() == 2 && g.size(0) == offsets.size(0) - 1 && g.size(1) == x.size(1),
              "grn: g must be (B, C) = (", offsets.size(0) - 1, ", ", x.size(1), "), got ", g.sizes());
}

inline void check_dwconv_args(const at::Tensor& feats, const at::Tensor& nbr, const at::Tensor& weight) {
  check_devices("dwconv", "feats", feats, {{"the neighbour table", &nbr}, {"weight", &weight}});
  TORCH_CHECK(feats.dim() == 2, "dwconv: feats must be (N, C), got ", feats.sizes());
  TORCH_CHECK(nbr.dim() == 2 && nbr.size(0) == feats.size(0) && nbr.scalar_type() == at::kInt,
              "dwconv: neighbour table must be int32 (N, K)");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == nbr.size(1) && weight.size(1) == feats.size(1),
              "dwconv: weight must be (K, C) = (", nbr.size(1), ", ", feats.size(1), "), got ", weight.sizes());
}

// The backward's extra inputs: the transposed table (if given) and the output gradient, on feats' device and shaped.
inline void check_dwconv_backward_args(const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& nbr,
                                       const c10::optional<at::Tensor>& nbr_t, const at::Tensor& weight) {
  check_dwconv_args(feats, nbr, weight);
  check_devices("dwconv", "feats", feats, {{"grad_out", &grad_out}});
  if (nbr_t.has_value() && nbr_t->defined()) {
    check_devices("dwconv", "feats", feats, {{"the transposed table", &*nbr_t}});
    TORCH_CHECK(nbr_t->sizes() == nbr.sizes() && nbr_t->scalar_type() == at::kInt,
                "dwconv: transposed table must be int32 like the table");
  }
  TORCH_CHECK(grad_out.sizes() == feats.sizes(), "dwconv: grad_out must match feats");
}

// The input gradient's table and weight. With a transposed table: it and the weight. Without one the table
// must be symmetric (the same sites in and out, a centred odd kernel, as neighbor_table builds them): offset
// K-1-k is offset k reversed, so the input gradient is the forward gather over the same table with the taps
// reversed, and no second (N, K) table is kept (issue 16 item 3).
inline std::pair<at::Tensor, at::Tensor> input_grad_table(const at::Tensor& nbr, const c10::optional<at::Tensor>& nbr_t,
                                                          const at::Tensor& weight) {
  if (nbr_t.has_value() && nbr_t->defined()) return {nbr_t->contiguous(), weight};
  TORCH_CHECK(nbr.size(1) % 2 == 1, "dwconv: without a transposed table the kernel must be centred (an odd number "
              "of taps), got ", nbr.size(1), " taps");
  return {nbr, weight.flip(0).contiguous()};
}

inline void check_dwconv_bias(const at::Tensor& feats, const at::Tensor& bias) {
  check_devices("dwconv", "feats", feats, {{"bias", &bias}});
  TORCH_CHECK(bias.numel() == feats.size(1), "dwconv: bias must have C = ", feats.size(1), " elements, got ",
              bias.numel());
}

}  // namespace sparse_fcmae
