// The Python module sparseinfer._C. It has no Python functions of its own: importing it loads this
// shared library, whose static initialisers register the ops with the torch dispatcher
// (torch_bindings.cpp for the schemas, cpu/ and cuda/ for the kernels). Plain CPython, no pybind11,
// so this translation unit compiles in a second instead of the ~45 s a torch header costs.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "sparseinfer compiled kernels (ops live in torch.ops.sparseinfer)", -1, nullptr};
  return PyModule_Create(&module_def);
}
