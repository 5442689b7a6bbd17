// Large output buffers backed by transparent huge pages.
//
// A freshly allocated 25 MB gradient costs more to fault in, 4 KiB page by 4 KiB page, than
// the loss kernel takes to fill it (measured: 3-20 ms of first-touch faults against ~1 ms of
// writing). Buffers from here are 2 MiB aligned and marked MADV_HUGEPAGE, so the kernel
// faults them in 2 MiB at a time; numpy owns them through a capsule that frees them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <sys/mman.h>

#include <cstdlib>
#include <new>

#include "core/check.h"

namespace latentspace::bindings {

namespace py = pybind11;

namespace {
constexpr size_t kHugePage = size_t{2} << 20;

template <class T>
py::array_t<T> empty_huge(int64_t rows, int64_t cols) {
  LS_CHECK_VALUE(rows >= 0 && cols >= 0, "shape: expected non-negative sizes");
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * sizeof(T);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = rounded ? std::aligned_alloc(kHugePage, rounded) : std::malloc(1);
  if (data == nullptr) throw std::bad_alloc();
  if (rounded) madvise(data, rounded, MADV_HUGEPAGE);  // a hint: failure only costs speed
  py::capsule owner(data, [](void* p) { std::free(p); });
  return py::array_t<T>({rows, cols}, static_cast<T*>(data), owner);
}
}  // namespace

void bind_buffers(py::module_& m) {
  m.def("empty_huge_float32", &empty_huge<float>, py::arg("rows"), py::arg("cols"),
        "Uninitialised (rows, cols) float32 array on 2 MiB-aligned, MADV_HUGEPAGE memory.");
  m.def("empty_huge_float64", &empty_huge<double>, py::arg("rows"), py::arg("cols"),
        "Uninitialised (rows, cols) float64 array on 2 MiB-aligned, MADV_HUGEPAGE memory.");
}

}  // namespace latentspace::bindings
