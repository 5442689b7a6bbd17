// pybind11 glue for build and runtime information: SIMD level, threads, CUDA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core/build_config.h"
#include "core/cpu_features.h"
#include "core/threads.h"
#include "ops/device.h"

namespace latentspace::bindings {

namespace py = pybind11;

void bind_info(py::module_& m) {
  m.attr("__version__") = LATENTSPACE_VERSION;
  m.def("hardware_simd_level", [] { return std::string(simd_level_name(hardware_simd_level())); });
  m.def("simd_level", [] { return std::string(simd_level_name(active_simd_level())); });
  m.def(
      "set_simd_level",
      [](const std::string& level) { set_simd_level(parse_simd_level(level, "level")); },
      py::arg("level"));
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_architectures", &cuda_architectures);
  m.def("cuda_unavailable_reason", [] {
    py::gil_scoped_release release;
    return cuda_unavailable_reason();
  });
  m.def("cuda_devices", [] {
    std::vector<CudaDeviceInfo> devices;
    {
      py::gil_scoped_release release;
      devices = cuda_devices();
    }
    py::list out;
    for (const CudaDeviceInfo& d : devices) {
      py::dict entry;
      entry["index"] = d.index;
      entry["name"] = d.name;
      entry["compute_capability"] = py::make_tuple(d.compute_capability_major, d.compute_capability_minor);
      entry["total_memory_bytes"] = d.total_memory_bytes;
      entry["multiprocessors"] = d.multiprocessors;
      out.append(entry);
    }
    return out;
  });
}

}  // namespace latentspace::bindings
