// Buffer checks for the bindings: the last line of defence behind python/latentspace/_arrays.py,
// which validates and converts everything first. Arrays arrive here as numpy arrays (torch
// CPU tensors are passed as zero-copy numpy views of the same memory).
#pragma once

#include <pybind11/numpy.h>

#include <cstdint>

#include "core/check.h"

namespace latentspace::bindings {

namespace py = pybind11;

// Checks dtype T, rank, C-contiguity (and writability for outputs); returns the data pointer.
// The dtype is compared by value (numpy's equivalence, which counts byte order), not by
// identity: an array that came through pickle carries an equal float32 dtype that is another
// object, and was refused as "expected dtype float32, got float32".
template <class T>
T* checked_data(py::array& array, const char* name, int ndim, bool writable) {
  LS_CHECK_TYPE(py::isinstance<py::array_t<T>>(array), name, ": expected dtype ",
                std::string(py::str(py::dtype::of<T>())), ", got ", std::string(py::str(array.dtype())));
  LS_CHECK_VALUE(array.ndim() == ndim, name, ": expected a ", ndim, "-d array, got ", array.ndim(), "-d");
  LS_CHECK_VALUE(array.flags() & py::array::c_style, name, ": expected a C-contiguous array");
  if (writable) {
    LS_CHECK_VALUE(array.writeable(), name, ": expected a writable array");
    return static_cast<T*>(array.mutable_data());
  }
  return const_cast<T*>(static_cast<const T*>(array.data()));
}

inline int64_t dim_of(const py::array& array, int axis) { return static_cast<int64_t>(array.shape(axis)); }

}  // namespace latentspace::bindings
