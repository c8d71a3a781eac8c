// Schemas of the dynalay_C internal ops.  The public ops live in the `dynalay`
// namespace (dynalay/ops/*.py, torch.library.custom_op) and call these for the `cpp`
// and `cuda` backends.  Kernels register per dispatch key: CPU in csrc/cpu/, CUDA in
// csrc/cuda/ (a separate extension, built only against a CUDA torch).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A dummy module so that `import dynalay._C` loads this library (and runs the static
// registrations below) through the normal Python import machinery.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dynalay_C, m) {
  m.def(
      "fp_solve(Tensor c, Tensor W, Tensor? d, Tensor? actions, Tensor? z0, bool adjoint, float tol, "
      "int max_iter, str solver, float damping, int anderson_m, float anderson_lam, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dynamic_step(Tensor h, Tensor actions, Tensor U, Tensor W, Tensor b, float tol, int max_iter, str solver, "
      "float damping, int anderson_m, float anderson_lam, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "implicit_backward(Tensor z, Tensor g, Tensor W, Tensor? actions, Tensor? h, Tensor? U, bool want_x, "
      "bool want_W, bool want_U, bool want_b, float tol, int max_iter, str solver, float damping, int anderson_m, "
      "float anderson_lam, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("first_non_finite(Tensor[] ts) -> int");
  m.def("grouped_linear(Tensor x, Tensor U, Tensor? b, Tensor actions, bool transpose) -> Tensor");
  m.def("grouped_wgrad(Tensor u, Tensor x, Tensor? actions, int num_layers) -> Tensor");
  // the agent's greedy decision for every row (csrc/cpu/model_cpu.cpp): actions, conf, pred;
  // conf_mode: the confidence feature, 0 = max probability, 1 = its clipped log-odds / 3
  m.def(
      "agent_decide(Tensor logits, Tensor? proj, Tensor hist, Tensor prev_pred, Tensor[] agent, int t, "
      "float nop_bias, int conf_mode=0) -> (Tensor, Tensor, Tensor)");
  // DynaLay.run's inference loop in one call (csrc/cpu/model_cpu.cpp), from the input x: logits,
  // flops, layers, iters, actions, step_iters, rows_per_step
  m.def(
      "run_model(Tensor x, Tensor enc_w, Tensor enc_b, Tensor U, Tensor W, Tensor b, float tol, int max_iter, "
      "str solver, float damping, int anderson_m, float anderson_lam, float eps, Tensor ln_w, Tensor ln_b, "
      "float ln_eps, Tensor head_w, Tensor head_b, Tensor[] agent, float nop_bias, float lam_feature, "
      "Tensor? forced, float? exit_threshold, int max_steps, float[] costs, int conf_mode=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
