// The schemas of the moe_fusion library, defined once. Kernels register per
// dispatch key in their own files; fake (meta) implementations live in Python
// (ops/_fake.py), which set_python_module points torch to.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(moe_fusion, m) {
  m.set_python_module("ops._fake");
  m.def(
      "moe_fused_gate(Tensor logits, Tensor? bias, int num_expert_group, int topk_group, int topk, "
      "str scoring_func, int group_score_topk, float masked_score, bool renormalize, float renormalize_eps, "
      "float routed_scaling_factor, int num_fused_shared_experts, bool apply_routed_scaling_factor_on_output, "
      "bool weights_from_masked_scores, ScalarType? compute_dtype, ScalarType? weights_dtype, "
      "ScalarType? ids_dtype) -> (Tensor weights, Tensor ids)");
  m.def(
      "moe_fused_gate.out(Tensor logits, Tensor? bias, int num_expert_group, int topk_group, int topk, "
      "str scoring_func, int group_score_topk, float masked_score, bool renormalize, float renormalize_eps, "
      "float routed_scaling_factor, int num_fused_shared_experts, bool apply_routed_scaling_factor_on_output, "
      "bool weights_from_masked_scores, ScalarType? compute_dtype, ScalarType? weights_dtype, "
      "ScalarType? ids_dtype, *, Tensor(a!) weights_out, Tensor(b!) ids_out) -> ()");
  // moe_fused_gate's backward without weights_from_masked_scores (ops/gate_autograd.py): the logits'
  // gradient given the weights' gradient and the ids; `scale` is the routed scaling factor applied to
  // the weights (1 when the model applies it to the output).
  m.def(
      "moe_fused_gate_backward(Tensor grad_weights, Tensor logits, Tensor ids, int topk, str scoring_func, "
      "bool renormalize, float renormalize_eps, float scale) -> Tensor");
  m.def(
      "fused_experts(Tensor hidden, Tensor topk_weights, Tensor topk_ids, Tensor w_gate, Tensor? w_up, "
      "Tensor w_down, Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down, "
      "Tensor? shared_token_weight) -> Tensor");
  // fused_experts under autograd (ops/experts_autograd.py): also returns each (token, slot) pair's
  // gate and up projections, projections [T*K, 2I] (row t*K + j), which the backward reads.
  m.def(
      "fused_experts_train(Tensor hidden, Tensor topk_weights, Tensor topk_ids, Tensor w_gate, Tensor? w_up, "
      "Tensor w_down, Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down, "
      "Tensor? shared_token_weight) -> (Tensor out, Tensor projections)");
  // fused_experts' backward (implemented in Python, ops/experts_autograd.py): the gradients of the
  // differentiable inputs (all but topk_ids) that `needs_grad` flags, in schema order.
  m.def(
      "fused_experts_backward(Tensor grad_out, Tensor projections, Tensor hidden, Tensor topk_weights, "
      "Tensor topk_ids, Tensor w_gate, Tensor? w_up, Tensor w_down, Tensor? shared_gate, Tensor? shared_up, "
      "Tensor? shared_down, Tensor? shared_token_weight, bool[] needs_grad) -> Tensor[]");
}

// `import ops._C` loads the library above; the module itself exports nothing.
static struct PyModuleDef moe_fusion_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&moe_fusion_module); }
