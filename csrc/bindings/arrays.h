// Buffer checks for the bindings: the last line of defence behind python/latentspace/_arrays.py,
// which validates and converts everything first. Arrays arrive here as numpy arrays (torch
// CPU tensors are passed as zero-copy numpy views of the same memory).
#pragma once

#include <pybind11/numpy.h>

#include <cstdint>
#include <string>

#include "core/check.h"

namespace latentspace::bindings {

namespace py = pybind11;

// Checks dtype T, rank, C-contiguity (and writability for outputs); returns the data pointer.
// The dtype is compared by value (numpy's equivalence, which counts byte order), not by
// identity: an array that came through pickle carries an equal float32 dtype that is another
// object, and was refused as "expected dtype float32, got float32".
// Alignment: numpy allows C-contiguous arrays whose address is not a multiple of sizeof(T) (a
// view at an odd byte offset of a buffer), and reading a T through such a pointer is undefined
// behaviour (UBSan: misaligned load in pack_query_panel and the scalar pack_rows; vectorised
// loops may also assume it). An input is replaced by an aligned copy: `array` then holds the
// copy, so the caller must keep `array` alive for as long as it uses the pointer. An output,
// which a copy could not write back to, is refused.
template <class T>
T* checked_data(py::array& array, const char* name, int ndim, bool writable) {
  LS_CHECK_TYPE(py::isinstance<py::array_t<T>>(array), name, ": expected dtype ",
                std::string(py::str(py::dtype::of<T>())), ", got ", std::string(py::str(array.dtype())));
  LS_CHECK_VALUE(array.ndim() == ndim, name, ": expected a ", ndim, "-d array, got ", array.ndim(), "-d");
  LS_CHECK_VALUE(array.flags() & py::array::c_style, name, ": expected a C-contiguous array");
  const bool aligned = reinterpret_cast<uintptr_t>(array.data()) % alignof(T) == 0;
  if (writable) {
    LS_CHECK_VALUE(array.writeable(), name, ": expected a writable array");
    LS_CHECK_VALUE(aligned, name, ": expected an aligned array (its address a multiple of ", alignof(T),
                   " bytes); pass a freshly allocated one");
    return static_cast<T*>(array.mutable_data());
  }
  if (!aligned) array = array.attr("copy")().cast<py::array>();  // a new allocation: aligned, C-contiguous
  return const_cast<T*>(static_cast<const T*>(array.data()));
}

inline int64_t dim_of(const py::array& array, int axis) { return static_cast<int64_t>(array.shape(axis)); }

}  // namespace latentspace::bindings
