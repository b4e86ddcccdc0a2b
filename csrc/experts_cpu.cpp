// CPU kernels of moe_fusion::fused_experts and fused_experts_train: the
// (token, slot) pairs are grouped by expert with a stable sort, and each active
// expert runs three ATen matmuls on its gathered rows, reading its weights
// through views of the caller's tensors (no weight is copied or converted).
// Contributions are weighted and index-added into a float32 accumulator, cast
// to hidden's dtype at the end. The training variant also returns each pair's
// gate and up projections, which the backward reads instead of recomputing.
#include "error_message.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace moe_fusion {
namespace {

bool is_float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Kept in step with ops/experts.py:check_experts_args, which raises the same
// errors from the fake implementation at compile time. Returns S, the number of
// shared-expert slots.
int64_t check_experts_args(const at::Tensor& hidden, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                           const at::Tensor& w_gate, const c10::optional<at::Tensor>& w_up,
                           const at::Tensor& w_down, const c10::optional<at::Tensor>& shared_gate, const c10::optional<at::Tensor>& shared_up,
                           const c10::optional<at::Tensor>& shared_down,
                           const c10::optional<at::Tensor>& shared_token_weight) {
  MOE_FUSION_CHECK(hidden.dim() == 2, "fused_experts: hidden must be 2-D [T, H], got shape ", hidden.sizes());
  MOE_FUSION_CHECK(is_float_dtype(hidden.scalar_type()),
                    "fused_experts: hidden must be float32, bfloat16 or float16, got ", hidden.scalar_type());
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const auto dtype = hidden.scalar_type();
  MOE_FUSION_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_ids.size(1) >= 1,
                    "fused_experts: topk_ids must have shape [T, K] with T = ", T, " and K >= 1, got ",
                    topk_ids.sizes());
  MOE_FUSION_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                    "fused_experts: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  MOE_FUSION_CHECK(topk_weights.sizes() == topk_ids.sizes(), "fused_experts: topk_weights must have topk_ids' shape ",
                    topk_ids.sizes(), ", got ", topk_weights.sizes());
  MOE_FUSION_CHECK(topk_weights.scalar_type() == at::kFloat || topk_weights.scalar_type() == dtype,
                    "fused_experts: topk_weights must be float32 or hidden's dtype (", dtype, "), got ",
                    topk_weights.scalar_type());
  if (!w_up.has_value()) {
    MOE_FUSION_CHECK(w_gate.dim() == 3 && w_gate.size(0) >= 1 && w_gate.size(1) >= 2 && w_gate.size(1) % 2 == 0 &&
                          w_gate.size(2) == H,
                      "fused_experts: w_gate must have shape [E, 2I, H] with E, I >= 1 and H = ", H,
                      " when w_up is None (a fused gate_up: gate rows, then up rows), got ", w_gate.sizes());
  } else {
    MOE_FUSION_CHECK(w_gate.dim() == 3 && w_gate.size(0) >= 1 && w_gate.size(1) >= 1 && w_gate.size(2) == H,
                      "fused_experts: w_gate must have shape [E, I, H] with E, I >= 1 and H = ", H, ", got ",
                      w_gate.sizes());
    MOE_FUSION_CHECK(w_up->sizes() == w_gate.sizes(), "fused_experts: w_up must have w_gate's shape ",
                      w_gate.sizes(), ", got ", w_up->sizes());
  }
  const int64_t E = w_gate.size(0), I = w_up.has_value() ? w_gate.size(1) : w_gate.size(1) / 2;
  MOE_FUSION_CHECK(w_down.sizes() == at::IntArrayRef({E, H, I}), "fused_experts: w_down must have shape [E, H, I] = [",
                    E, ", ", H, ", ", I, "], got ", w_down.sizes());

  const int num_shared_given = shared_gate.has_value() + shared_up.has_value() + shared_down.has_value();
  MOE_FUSION_CHECK(num_shared_given == 0 || num_shared_given == 3,
                    "fused_experts: shared_gate, shared_up and shared_down must be given together or not at all");
  int64_t S = 0;
  if (num_shared_given == 3) {
    MOE_FUSION_CHECK(shared_gate->dim() == 2 && shared_gate->size(1) == H && shared_gate->size(0) >= I &&
                          shared_gate->size(0) % I == 0,
                      "fused_experts: shared_gate must have shape [S*I, H] with S >= 1, I = ", I, " and H = ", H,
                      ", got ", shared_gate->sizes());
    S = shared_gate->size(0) / I;
    MOE_FUSION_CHECK(shared_up->sizes() == shared_gate->sizes(), "fused_experts: shared_up must have shared_gate's shape ",
                      shared_gate->sizes(), ", got ", shared_up->sizes());
    MOE_FUSION_CHECK(shared_down->sizes() == at::IntArrayRef({H, S * I}),
                      "fused_experts: shared_down must have shape [H, S*I] = [", H, ", ", S * I, "], got ",
                      shared_down->sizes());
  }
  const std::vector<std::pair<const char*, const at::Tensor*>> weights = {
      {"w_gate", &w_gate},
      {"w_up", w_up ? &*w_up : nullptr},
      {"w_down", &w_down},
      {"shared_gate", shared_gate ? &*shared_gate : nullptr},
      {"shared_up", shared_up ? &*shared_up : nullptr},
      {"shared_down", shared_down ? &*shared_down : nullptr}};
  for (const auto& [name, w] : weights) {
    if (w == nullptr) continue;
    MOE_FUSION_CHECK(w->scalar_type() == dtype, "fused_experts: ", name, " must have hidden's dtype (", dtype,
                      "), got ", w->scalar_type());
  }
  if (shared_token_weight.has_value()) {
    MOE_FUSION_CHECK(S > 0, "fused_experts: shared_token_weight requires shared_gate, shared_up and shared_down");
    MOE_FUSION_CHECK(shared_token_weight->dim() == 1 && shared_token_weight->size(0) == T,
                      "fused_experts: shared_token_weight must have shape [T] = [", T, "], got ",
                      shared_token_weight->sizes());
    MOE_FUSION_CHECK(shared_token_weight->scalar_type() == at::kFloat || shared_token_weight->scalar_type() == dtype,
                      "fused_experts: shared_token_weight must be float32 or hidden's dtype (", dtype, "), got ",
                      shared_token_weight->scalar_type());
  }
  const std::vector<std::pair<const char*, const at::Tensor*>> others = {
      {"topk_weights", &topk_weights},
      {"topk_ids", &topk_ids},
      {"shared_token_weight", shared_token_weight ? &*shared_token_weight : nullptr}};
  for (const auto& list : {others, weights}) {
    for (const auto& [name, t] : list) {
      if (t == nullptr) continue;
      MOE_FUSION_CHECK(t->device() == hidden.device(), "fused_experts: ", name, " must be on hidden's device (",
                        hidden.device(), "), got ", t->device());
    }
  }
  return S;
}

// (out [T, H], projections): with `with_projections`, projections [T*K, 2I] in hidden's dtype holds each pair's
// gate and up projections (row t*K + j); else it is undefined.
std::tuple<at::Tensor, at::Tensor> run_experts(
    const at::Tensor& hidden, const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& w_gate,
    const c10::optional<at::Tensor>& w_up, const at::Tensor& w_down, const c10::optional<at::Tensor>& shared_gate,
    const c10::optional<at::Tensor>& shared_up, const c10::optional<at::Tensor>& shared_down,
    const c10::optional<at::Tensor>& shared_token_weight, bool with_projections) {
  const int64_t S = check_experts_args(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up,
                                       shared_down, shared_token_weight);
  const int64_t T = hidden.size(0), H = hidden.size(1), K = topk_ids.size(1);
  const int64_t E = w_down.size(0), I = w_down.size(2);
  // [E, I, H] gate and up weights: w_gate and w_up, or the halves of a fused gate_up.
  const at::Tensor routed_gate = w_up ? w_gate : w_gate.narrow(1, 0, I);
  const at::Tensor routed_up = w_up ? *w_up : w_gate.narrow(1, I, I);
  const auto dtype = hidden.scalar_type();
  at::Tensor projections = with_projections ? at::empty({T * K, 2 * I}, hidden.options()) : at::Tensor();
  if (T == 0) return {at::empty({0, H}, hidden.options()), projections};

  const at::Tensor ids = topk_ids.reshape({-1}).to(at::kLong);
  const auto [min_id, max_id] = at::aminmax(ids);
  const int64_t lowest = min_id.item<int64_t>(), highest = max_id.item<int64_t>();
  MOE_FUSION_CHECK(lowest >= 0 && highest < E + S, "fused_experts: topk_ids must be in [0, E + S) = [0, ", E + S,
                    "), got values in [", lowest, ", ", highest, "]");

  at::Tensor pair_weights = topk_weights.reshape({-1}).to(at::kFloat);
  if (shared_token_weight.has_value()) {
    const at::Tensor per_pair = shared_token_weight->to(at::kFloat).repeat_interleave(K);
    pair_weights = at::where(ids >= E, pair_weights * per_pair, pair_weights);
  }
  // Pairs in expert order; ties keep pair order, so the accumulation order is fixed.
  const at::Tensor order = at::argsort(ids, /*stable=*/true);
  const at::Tensor counts = at::bincount(ids, /*weights=*/{}, E + S);
  const int64_t* count = counts.data_ptr<int64_t>();

  at::Tensor acc = at::zeros({T, H}, hidden.options().dtype(at::kFloat));
  int64_t begin = 0;
  for (int64_t e = 0; e < E + S; ++e) {
    const int64_t n = count[e];
    if (n == 0) continue;
    const at::Tensor pairs = order.narrow(0, begin, n);
    begin += n;
    const bool shared = e >= E;
    // [I, H], [I, H] and [H, I] views of this expert's weights.
    const at::Tensor gate = shared ? shared_gate->narrow(0, (e - E) * I, I) : routed_gate.select(0, e);
    const at::Tensor up = shared ? shared_up->narrow(0, (e - E) * I, I) : routed_up.select(0, e);
    const at::Tensor down = shared ? shared_down->narrow(1, (e - E) * I, I) : w_down.select(0, e);

    const at::Tensor tokens = at::floor_divide(pairs, K);
    const at::Tensor x = hidden.index_select(0, tokens);
    const at::Tensor gate_rows = at::mm(x, gate.t()), up_rows = at::mm(x, up.t());
    if (with_projections) {
      projections.narrow(1, 0, I).index_copy_(0, pairs, gate_rows);
      projections.narrow(1, I, I).index_copy_(0, pairs, up_rows);
    }
    // SiLU-and-multiply in float32, rounded to hidden's dtype like the CUDA kernel's intermediate.
    const at::Tensor act = (at::silu(gate_rows.to(at::kFloat)) * up_rows).to(dtype);
    const at::Tensor y = at::mm(act, down.t()).to(at::kFloat);
    acc.index_add_(0, tokens, y * pair_weights.index_select(0, pairs).unsqueeze(1));
  }
  return {acc.to(dtype), projections};
}

at::Tensor fused_experts_cpu(const at::Tensor& hidden, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                             const at::Tensor& w_gate, const c10::optional<at::Tensor>& w_up,
                             const at::Tensor& w_down,
                             const c10::optional<at::Tensor>& shared_gate, const c10::optional<at::Tensor>& shared_up,
                             const c10::optional<at::Tensor>& shared_down,
                             const c10::optional<at::Tensor>& shared_token_weight) {
  return std::get<0>(run_experts(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up,
                                 shared_down, shared_token_weight, /*with_projections=*/false));
}

std::tuple<at::Tensor, at::Tensor> fused_experts_train_cpu(
    const at::Tensor& hidden, const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& w_gate,
    const c10::optional<at::Tensor>& w_up, const at::Tensor& w_down, const c10::optional<at::Tensor>& shared_gate,
    const c10::optional<at::Tensor>& shared_up, const c10::optional<at::Tensor>& shared_down,
    const c10::optional<at::Tensor>& shared_token_weight) {
  return run_experts(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                     shared_token_weight, /*with_projections=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_fusion, CPU, m) {
  m.impl("fused_experts", &fused_experts_cpu);
  m.impl("fused_experts_train", &fused_experts_train_cpu);
}

}  // namespace moe_fusion
