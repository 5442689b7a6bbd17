// pybind11 glue for the fused losses: check buffers, drop the GIL, call ops/losses.h.
#include <pybind11/pybind11.h>

#include "bindings/arrays.h"
#include "ops/losses.h"

namespace latentspace::bindings {
namespace {

// Optional output: None -> nullptr, else a checked writable array of `rows` x `cols` (or rows).
template <class T>
T* optional_output(py::object array, const char* name, int ndim, int64_t rows, int64_t cols) {
  if (array.is_none()) return nullptr;
  py::array a = array.cast<py::array>();
  T* data = checked_data<T>(a, name, ndim, true);
  LS_CHECK_VALUE(dim_of(a, 0) == rows && (ndim == 1 || dim_of(a, 1) == cols), name,
                 ": expected shape matching the inputs");
  return data;
}

template <class T>
double reconstruction(py::array recon, py::array target, int kind, double grad_scale,
                      py::object grad, py::object row_losses) {
  const T* r = checked_data<T>(recon, "recon", 2, false);
  const T* t = checked_data<T>(target, "target", 2, false);
  const int64_t rows = dim_of(recon, 0), cols = dim_of(recon, 1);
  LS_CHECK_VALUE(dim_of(target, 0) == rows && dim_of(target, 1) == cols,
                 "recon, target: shapes differ");
  LS_CHECK_VALUE(kind >= 0 && kind <= 2, "kind: expected 0 (mse), 1 (bce) or 2 (bce_logits)");
  T* g = optional_output<T>(grad, "grad", 2, rows, cols);
  double* rl = optional_output<double>(row_losses, "row_losses", 1, rows, 0);
  py::gil_scoped_release release;
  return reconstruction_loss_cpu<T>(r, t, rows, cols, static_cast<ReconstructionKind>(kind),
                                    static_cast<T>(grad_scale), g, rl);
}

template <class T>
double kl(py::array mu, py::array logvar, double grad_scale, py::object grad_mu,
          py::object grad_logvar, py::object row_losses) {
  const T* m = checked_data<T>(mu, "mu", 2, false);
  const T* lv = checked_data<T>(logvar, "logvar", 2, false);
  const int64_t rows = dim_of(mu, 0), cols = dim_of(mu, 1);
  LS_CHECK_VALUE(dim_of(logvar, 0) == rows && dim_of(logvar, 1) == cols, "mu, logvar: shapes differ");
  T* gm = optional_output<T>(grad_mu, "grad_mu", 2, rows, cols);
  T* glv = optional_output<T>(grad_logvar, "grad_logvar", 2, rows, cols);
  double* rl = optional_output<double>(row_losses, "row_losses", 1, rows, 0);
  py::gil_scoped_release release;
  return kl_normal_cpu<T>(m, lv, rows, cols, static_cast<T>(grad_scale), gm, glv, rl);
}

bool is_float64(const py::array& a) { return a.dtype().is(py::dtype::of<double>()); }

// CUDA: torch tensors cross as device pointers (integers) from python/latentspace/losses.py,
// which checks devices, dtypes, shapes and contiguity; the ops (cuda/losses.cu) check sizes
// and buffers before any launch; here only the inputs' pointers and the kind's range.
template <class T>
const T* device_input(uintptr_t address, const char* name) {
  LS_CHECK_VALUE(address != 0, name, ": expected a device pointer, got 0");
  return reinterpret_cast<const T*>(address);
}

template <class T>
T* device_output(uintptr_t address) {
  return reinterpret_cast<T*>(address);  // 0: not wanted
}

template <class T>
void reconstruction_cuda(uintptr_t recon, uintptr_t target, int64_t rows, int64_t cols, int kind,
                         double grad_scale, uintptr_t grad, uintptr_t row_losses, uintptr_t total,
                         uintptr_t out_of_range, uintptr_t workspace, uintptr_t stream) {
  const T* r = device_input<T>(recon, "recon");  // (checked in the order the arguments come)
  const T* t = device_input<T>(target, "target");
  py::gil_scoped_release release;
  reconstruction_loss_cuda<T>(r, t, rows, cols,
                              static_cast<ReconstructionKind>(kind), static_cast<T>(grad_scale),
                              device_output<T>(grad), device_output<double>(row_losses),
                              device_output<double>(total), device_output<uint32_t>(out_of_range),
                              device_output<double>(workspace), stream);
}

template <class T>
void kl_cuda(uintptr_t mu, uintptr_t logvar, int64_t rows, int64_t cols, double grad_scale, uintptr_t grad_mu,
             uintptr_t grad_logvar, uintptr_t row_losses, uintptr_t total, uintptr_t workspace, uintptr_t stream) {
  const T* m = device_input<T>(mu, "mu");
  const T* lv = device_input<T>(logvar, "logvar");
  py::gil_scoped_release release;
  kl_normal_cuda<T>(m, lv, rows, cols,
                    static_cast<T>(grad_scale), device_output<T>(grad_mu), device_output<T>(grad_logvar),
                    device_output<double>(row_losses), device_output<double>(total),
                    device_output<double>(workspace), stream);
}

}  // namespace

void bind_losses(py::module_& m) {
  m.def(
      "reconstruction_loss",
      [](py::array recon, py::array target, int kind, double grad_scale, py::object grad,
         py::object row_losses) {
        return is_float64(recon) ? reconstruction<double>(recon, target, kind, grad_scale, grad, row_losses)
                                 : reconstruction<float>(recon, target, kind, grad_scale, grad, row_losses);
      },
      py::arg("recon"), py::arg("target"), py::arg("kind"), py::arg("grad_scale"),
      py::arg("grad") = py::none(), py::arg("row_losses") = py::none(),
      "Sum of elementwise losses of (rows, cols) float32/float64 arrays; optionally writes "
      "d/d(recon) * grad_scale and per-row sums (float64).");
  m.def(
      "kl_normal",
      [](py::array mu, py::array logvar, double grad_scale, py::object grad_mu,
         py::object grad_logvar, py::object row_losses) {
        return is_float64(mu) ? kl<double>(mu, logvar, grad_scale, grad_mu, grad_logvar, row_losses)
                              : kl<float>(mu, logvar, grad_scale, grad_mu, grad_logvar, row_losses);
      },
      py::arg("mu"), py::arg("logvar"), py::arg("grad_scale"), py::arg("grad_mu") = py::none(),
      py::arg("grad_logvar") = py::none(), py::arg("row_losses") = py::none(),
      "Sum over rows of KL(N(mu, exp(logvar)) || N(0, 1)); optionally gradients * grad_scale "
      "and per-row values (float64).");

  m.def("loss_cuda_workspace_doubles", &loss_cuda_workspace_doubles, py::arg("rows"), py::arg("cols"),
        "float64 elements of workspace reconstruction_loss_cuda / kl_normal_cuda need for (rows, cols) inputs "
        "(0: none).");
  m.def(
      "reconstruction_loss_cuda",
      [](uintptr_t recon, uintptr_t target, int64_t rows, int64_t cols, int kind, double grad_scale,
         uintptr_t grad, uintptr_t row_losses, uintptr_t total, uintptr_t out_of_range, uintptr_t workspace,
         uintptr_t stream, bool float64) {
        LS_CHECK_VALUE(kind >= 0 && kind <= 2, "kind: expected 0 (mse), 1 (bce) or 2 (bce_logits)");
        (float64 ? reconstruction_cuda<double> : reconstruction_cuda<float>)(
            recon, target, rows, cols, kind, grad_scale, grad, row_losses, total, out_of_range, workspace, stream);
      },
      py::arg("recon"), py::arg("target"), py::arg("rows"), py::arg("cols"), py::arg("kind"),
      py::arg("grad_scale"), py::arg("grad"), py::arg("row_losses"), py::arg("total"), py::arg("out_of_range"),
      py::arg("workspace"), py::arg("stream"), py::arg("float64"),
      "reconstruction_loss on the current CUDA device, queued on `stream`: device pointers to C-contiguous "
      "(rows, cols) float32 (float64 if `float64`) inputs; writes row_losses (rows float64), total (one "
      "float64), grad (0: none) and, for kind 1 (bce), sets the zeroed uint32 *out_of_range to 1 when a recon "
      "value lies outside [0, 1]. workspace: loss_cuda_workspace_doubles(rows, cols) float64 (0 when none).");
  m.def(
      "kl_normal_cuda",
      [](uintptr_t mu, uintptr_t logvar, int64_t rows, int64_t cols, double grad_scale, uintptr_t grad_mu,
         uintptr_t grad_logvar, uintptr_t row_losses, uintptr_t total, uintptr_t workspace, uintptr_t stream,
         bool float64) {
        (float64 ? kl_cuda<double> : kl_cuda<float>)(mu, logvar, rows, cols, grad_scale, grad_mu, grad_logvar,
                                                      row_losses, total, workspace, stream);
      },
      py::arg("mu"), py::arg("logvar"), py::arg("rows"), py::arg("cols"), py::arg("grad_scale"),
      py::arg("grad_mu"), py::arg("grad_logvar"), py::arg("row_losses"), py::arg("total"), py::arg("workspace"),
      py::arg("stream"), py::arg("float64"),
      "kl_normal on the current CUDA device, queued on `stream` (device pointers, as reconstruction_loss_cuda).");
  m.def(
      "scale_rows_unless_one_cuda",
      [](uintptr_t grad, int64_t rows, int64_t cols, uintptr_t factors, bool per_row, uintptr_t stream,
         bool float64) {
        py::gil_scoped_release release;
        if (float64) {
          scale_rows_unless_one_cuda<double>(reinterpret_cast<double*>(grad), rows, cols,
                                             reinterpret_cast<const double*>(factors), per_row, stream);
        } else {
          scale_rows_unless_one_cuda<float>(reinterpret_cast<float*>(grad), rows, cols,
                                            reinterpret_cast<const float*>(factors), per_row, stream);
        }
      },
      py::arg("grad"), py::arg("rows"), py::arg("cols"), py::arg("factors"), py::arg("per_row"), py::arg("stream"),
      py::arg("float64"),
      "In place on the current CUDA device, queued on `stream`: grad[row][j] *= factors[row if per_row else 0] "
      "for a C-contiguous (rows, cols) float32 (float64 if `float64`) grad; rows whose factor is exactly 1 "
      "are not touched (nothing is read back).");
}

}  // namespace latentspace::bindings
