// latentspace._native: the one extension module. Each bind_* lives beside its op.
#include <pybind11/pybind11.h>

#include "bindings/interrupt.h"
#include "core/check.h"

namespace py = pybind11;

namespace latentspace::bindings {
void bind_info(py::module_& m);
void bind_knn(py::module_& m);
void bind_losses(py::module_& m);
void bind_buffers(py::module_& m);
void bind_encode(py::module_& m);
}  // namespace latentspace::bindings

PYBIND11_MODULE(_native, m) {
  m.doc() = "latentspace native kernels (CPU: OpenMP + runtime-dispatched SIMD; CUDA when built with it)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const latentspace::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const latentspace::Interrupted&) {
      latentspace::bindings::restore_interrupt_error();  // a signal handler's exception: Ctrl-C
    }
  });
  // latentspace::ValueError derives from std::invalid_argument, which pybind11 maps to ValueError.
  latentspace::bindings::init_interrupts();
  latentspace::bindings::bind_info(m);
  latentspace::bindings::bind_knn(m);
  latentspace::bindings::bind_losses(m);
  latentspace::bindings::bind_buffers(m);
  latentspace::bindings::bind_encode(m);
}
