// The one TORCH_LIBRARY(mkfast, ...) block: every schema of torch.ops.mkfast.*
// is declared here; kernels register per dispatch key in their own files.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing mkfast._C only has to load this library so the registrations below
// run; ops are reached through torch.ops.mkfast, not through module attributes.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

namespace mkfast {

bool built_with_cuda() {
#ifdef MKFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(mkfast, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  // Exact greedy top-k with redundancy filtering (see mkfast/ops/topk_dedup.py).
  m.def(
      "topk_dedup_native(Tensor queries, Tensor memory, int k, float threshold, "
      "Tensor? exclude) -> (Tensor, Tensor)");
}

}  // namespace mkfast
