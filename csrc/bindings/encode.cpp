// pybind11 glue for the batched MLP encoder: check buffers, drop the GIL, call ops/encode.h.
// python/latentspace/encoding.py exports a model's layers into this object and streams rows.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "bindings/arrays.h"
#include "bindings/interrupt.h"
#include "ops/encode.h"

namespace latentspace::bindings {
namespace {

EncodePrecision parse_precision(const std::string& name) {
  if (name == "fp32") return EncodePrecision::kFloat32;
  if (name == "bf16") return EncodePrecision::kBfloat16;
  throw ValueError(concat("precision: expected 'fp32' or 'bf16', got '", name, "'"));
}

NormPlace parse_place(const std::string& name, const std::string& argument) {
  if (name == "before_activation") return NormPlace::kBeforeActivation;
  if (name == "after_activation") return NormPlace::kAfterActivation;
  throw ValueError(concat(argument, ": expected the place 'before_activation' or 'after_activation', got '", name, "'"));
}

// A LayerNorm's (eps, weight, bias) from Python, weight and bias float32 arrays of `width`
// values or None. The arrays are kept in `alive` until the encoder has copied them.
RowNorm parse_norm(const py::tuple& terms, size_t first, int64_t width, const std::string& name,
                   std::vector<py::array>& alive) {
  RowNorm norm;
  const py::object eps = terms[first];
  LS_CHECK_TYPE(py::isinstance<py::float_>(eps) || py::isinstance<py::int_>(eps), name,
                ": expected eps as a float, got ", std::string(py::str(py::type::of(eps).attr("__name__"))));
  norm.eps = eps.cast<double>();
  const float** targets[2] = {&norm.scale, &norm.shift};
  const char* labels[2] = {"weight", "bias"};
  for (size_t i = 0; i < 2; ++i) {
    const py::object value = terms[first + 1 + i];
    if (value.is_none()) continue;
    const std::string label = concat(name, " ", labels[i]);
    alive.push_back(value.cast<py::array>());
    *targets[i] = checked_data<float>(alive.back(), label.c_str(), 1, false);
    LS_CHECK_VALUE(dim_of(alive.back(), 0) == width, label, ": expected ", width, " values (the features it "
                   "normalises), got ", dim_of(alive.back(), 0));
  }
  return norm;
}

py::tuple norm_tuple(const py::object& value, size_t size, const std::string& name, const char* layout) {
  LS_CHECK_TYPE(py::isinstance<py::tuple>(value) && py::len(value) == size, name, ": expected a tuple ", layout);
  return value.cast<py::tuple>();
}

// The norms argument as one entry per layer (None for none); empty for norms=None.
std::vector<py::object> per_layer_norms(const py::object& norms, size_t count) {
  if (norms.is_none()) return {};
  LS_CHECK_TYPE(py::isinstance<py::list>(norms) || py::isinstance<py::tuple>(norms),
                "norms: expected a list with one entry per layer (None for none)");
  std::vector<py::object> norm_list = norms.cast<std::vector<py::object>>();
  LS_CHECK_VALUE(norm_list.size() == count, "norms: expected one entry per layer (None for none), got ",
                 norm_list.size(), " for ", count, " layers");
  return norm_list;
}

std::unique_ptr<CpuMlpEncoder> make_encoder(std::vector<py::array> weights, std::vector<py::object> biases,
                                            std::vector<std::string> activations,
                                            std::vector<double> activation_params, py::object input_offset,
                                            const std::string& precision, py::object norms, py::object input_norm) {
  const size_t count = weights.size();
  LS_CHECK_VALUE(biases.size() == count && activations.size() == count && activation_params.size() == count,
                 "weights, biases, activations, activation_params: expected one entry per layer, got ", count,
                 ", ", biases.size(), ", ", activations.size(), ", ", activation_params.size());
  const std::vector<py::object> norm_list = per_layer_norms(norms, count);
  // Biases and norm parameters converted here (or their aligned copies, see checked_data), until
  // the encoder copied them.
  std::vector<py::array> alive;
  std::vector<LayerWeights> layers(count);
  for (size_t l = 0; l < count; ++l) {
    const std::string name = concat("weights[", l, "]");
    layers[l].weights = checked_data<float>(weights[l], name.c_str(), 2, false);
    layers[l].columns = dim_of(weights[l], 0);
    layers[l].depth = dim_of(weights[l], 1);
    if (!biases[l].is_none()) {
      const std::string bias_name = concat("biases[", l, "]");
      py::array& bias = alive.emplace_back(biases[l].cast<py::array>());
      layers[l].bias = checked_data<float>(bias, bias_name.c_str(), 1, false);
      LS_CHECK_VALUE(dim_of(bias, 0) == layers[l].columns, bias_name, ": expected ", layers[l].columns,
                     " values (the layer's outputs), got ", dim_of(bias, 0));
    }
    layers[l].activation = parse_activation(activations[l], concat("activations[", l, "]"));
    layers[l].parameter = static_cast<float>(activation_params[l]);
    if (!norm_list.empty() && !norm_list[l].is_none()) {
      const std::string norm_name = concat("norms[", l, "]");
      const py::tuple terms = norm_tuple(norm_list[l], 4, norm_name, "(place, eps, weight, bias)");
      layers[l].norm = parse_norm(terms, 1, layers[l].columns, norm_name, alive);
      LS_CHECK_TYPE(py::isinstance<py::str>(terms[0]), norm_name, ": expected the place as a str");
      layers[l].norm.place = parse_place(terms[0].cast<std::string>(), norm_name);
    }
  }
  const float* offset = nullptr;
  py::array offset_array;
  if (!input_offset.is_none()) {
    offset_array = input_offset.cast<py::array>();
    offset = checked_data<float>(offset_array, "input_offset", 1, false);
    LS_CHECK_VALUE(count == 0 || dim_of(offset_array, 0) == layers[0].depth, "input_offset: expected ",
                   layers[0].depth, " values (the input dimension), got ", dim_of(offset_array, 0));
  }
  RowNorm leading;
  if (!input_norm.is_none() && count > 0) {  // no layers: the constructor says so
    const py::tuple terms = norm_tuple(input_norm, 3, "input_norm", "(eps, weight, bias)");
    leading = parse_norm(terms, 0, layers[0].depth, "input_norm", alive);
  }
  // The constructor copies and packs everything it needs: the arrays may go after it returns.
  return std::make_unique<CpuMlpEncoder>(layers, offset, parse_precision(precision),
                                         input_norm.is_none() ? nullptr : &leading);
}

void encode(const CpuMlpEncoder& encoder, py::array x, py::array out) {
  const float* in = checked_data<float>(x, "x", 2, false);
  float* result = checked_data<float>(out, "out", 2, true);
  LS_CHECK_VALUE(dim_of(x, 1) == encoder.input_dim(), "x: expected ", encoder.input_dim(),
                 " features per row, got ", dim_of(x, 1));
  LS_CHECK_VALUE(dim_of(out, 0) == dim_of(x, 0) && dim_of(out, 1) == encoder.output_dim(), "out: expected shape (",
                 dim_of(x, 0), ", ", encoder.output_dim(), "), got (", dim_of(out, 0), ", ", dim_of(out, 1), ")");
  PythonInterrupts interrupts;  // Ctrl-C stops a long chunk
  py::gil_scoped_release release;
  encoder.encode(in, dim_of(x, 0), result);
}

// ---- the CUDA encoder: device addresses (ints) from python/latentspace/_cuda_encoder.py ----

// A device address (an int, a tensor's data_ptr()) or None; anything else is refused naming `name`.
const float* device_floats(const py::object& address, const std::string& name) {
  if (address.is_none()) return nullptr;
  LS_CHECK_TYPE(py::isinstance<py::int_>(address), name, ": expected a device address (int) or None, got ",
                std::string(py::str(py::type::of(address).attr("__name__"))));
  return reinterpret_cast<const float*>(address.cast<uintptr_t>());
}

// A LayerNorm as (eps, weight address, bias address), the addresses 0 or None for none.
RowNorm parse_device_norm(const py::tuple& terms, size_t first, const std::string& name) {
  RowNorm norm;
  LS_CHECK_TYPE(py::isinstance<py::float_>(terms[first]) || py::isinstance<py::int_>(terms[first]), name,
                ": expected eps as a float");
  norm.eps = terms[first].cast<double>();
  norm.scale = device_floats(terms[first + 1], concat(name, " weight"));
  norm.shift = device_floats(terms[first + 2], concat(name, " bias"));
  return norm;
}

std::unique_ptr<CudaMlpEncoder> make_cuda_encoder(std::vector<uintptr_t> weights,
                                                  std::vector<std::pair<int64_t, int64_t>> shapes,
                                                  std::vector<py::object> biases, std::vector<std::string> activations,
                                                  std::vector<double> activation_params, py::object input_offset,
                                                  const std::string& precision, py::object norms,
                                                  py::object input_norm) {
  const size_t count = weights.size();
  LS_CHECK_VALUE(shapes.size() == count && biases.size() == count && activations.size() == count &&
                     activation_params.size() == count,
                 "weights, shapes, biases, activations, activation_params: expected one entry per layer, got ", count,
                 ", ", shapes.size(), ", ", biases.size(), ", ", activations.size(), ", ", activation_params.size());
  const std::vector<py::object> norm_list = per_layer_norms(norms, count);
  std::vector<LayerWeights> layers(count);
  for (size_t l = 0; l < count; ++l) {
    layers[l].weights = reinterpret_cast<const float*>(weights[l]);
    layers[l].columns = shapes[l].first;
    layers[l].depth = shapes[l].second;
    layers[l].bias = device_floats(biases[l], concat("biases[", l, "]"));
    layers[l].activation = parse_activation(activations[l], concat("activations[", l, "]"));
    layers[l].parameter = static_cast<float>(activation_params[l]);
    if (!norm_list.empty() && !norm_list[l].is_none()) {
      const std::string norm_name = concat("norms[", l, "]");
      const py::tuple terms = norm_tuple(norm_list[l], 4, norm_name, "(place, eps, weight address, bias address)");
      layers[l].norm = parse_device_norm(terms, 1, norm_name);
      LS_CHECK_TYPE(py::isinstance<py::str>(terms[0]), norm_name, ": expected the place as a str");
      layers[l].norm.place = parse_place(terms[0].cast<std::string>(), norm_name);
    }
  }
  RowNorm leading;
  if (!input_norm.is_none()) {
    leading = parse_device_norm(norm_tuple(input_norm, 3, "input_norm", "(eps, weight address, bias address)"), 0,
                                "input_norm");
  }
  return std::make_unique<CudaMlpEncoder>(layers, device_floats(input_offset, "input_offset"), parse_precision(precision),
                                          input_norm.is_none() ? nullptr : &leading);
}

// The properties both encoders have (the same names and meanings in Python).
template <class Encoder>
void bind_encoder_properties(py::class_<Encoder>& cls) {
  cls.def_property_readonly("input_dim", &Encoder::input_dim)
      .def_property_readonly("output_dim", &Encoder::output_dim)
      .def_property_readonly("num_layers", &Encoder::num_layers)
      .def_property_readonly("precision",
                             [](const Encoder& e) { return e.precision() == EncodePrecision::kBfloat16 ? "bf16" : "fp32"; })
      .def_property_readonly("kernel", &Encoder::kernel_name);
}

}  // namespace

void bind_encode(py::module_& m) {
  py::class_<CpuMlpEncoder> cpu(m, "MlpEncoder",
                                 "An MLP encoder exported to native code: weights packed once, rows encoded "
                                 "block by block through every layer (OpenMP + SIMD).");
  bind_encoder_properties(cpu);
  cpu.def(py::init(&make_encoder), py::arg("weights"), py::arg("biases"), py::arg("activations"),
           py::arg("activation_params"), py::arg("input_offset") = py::none(), py::arg("precision") = "fp32",
           py::arg("norms") = py::none(), py::arg("input_norm") = py::none(),
           "norms: None, or per layer None or (place, eps, weight, bias), a LayerNorm over the layer's "
           "outputs, place 'before_activation' or 'after_activation', weight and bias float32 (out,) or "
           "None. input_norm: None or (eps, weight, bias), a LayerNorm over each input row, first.")
      .def("encode", &encode, py::arg("x"), py::arg("out"),
           "out[r] = encoder(x[r]); x (n, input_dim), out (n, output_dim), float32 C-contiguous. "
           "Raises ValueError naming the lowest row holding NaN or Inf.");

  py::class_<CudaMlpEncoder> cuda(m, "CudaMlpEncoder",
                                  "The MLP encoder on the current CUDA device (cuda/encode.cu). Every address is "
                                  "device memory (a torch tensor's data_ptr()) that the caller keeps alive and "
                                  "unchanged while the encoder exists; nothing is copied.");
  bind_encoder_properties(cuda);
  cuda.def(py::init(&make_cuda_encoder), py::arg("weights"), py::arg("shapes"), py::arg("biases"),
           py::arg("activations"), py::arg("activation_params"), py::arg("input_offset") = py::none(),
           py::arg("precision") = "fp32", py::arg("norms") = py::none(), py::arg("input_norm") = py::none(),
           "weights: per layer the address of its float32 (out, in) matrix, C-contiguous; shapes: per layer "
           "(out, in); biases: addresses or None. norms: None, or per layer None or (place, eps, weight address, "
           "bias address); input_norm: None or (eps, weight address, bias address); addresses None for none.")
      .def("workspace_floats", &CudaMlpEncoder::workspace_floats, py::arg("rows"),
           "float32 elements of device workspace encode() needs for `rows` rows (0: none).")
      .def(
          "encode",
          [](const CudaMlpEncoder& e, uintptr_t x, int64_t rows, uintptr_t out, uintptr_t workspace,
             uintptr_t nonfinite, uintptr_t stream) {
            // Only launches: the GIL is kept (nothing here waits for the GPU).
            e.encode(reinterpret_cast<const float*>(x), rows, reinterpret_cast<float*>(out),
                     reinterpret_cast<float*>(workspace), reinterpret_cast<uint32_t*>(nonfinite), stream);
          },
          py::arg("x"), py::arg("rows"), py::arg("out"), py::arg("workspace"), py::arg("nonfinite"),
          py::arg("stream"),
          "Queues out[r] = encoder(x[r]) for r < rows on `stream` (a cudaStream_t as an int) of the current "
          "device; x (rows, input_dim) and out (rows, output_dim) float32 C-contiguous device memory, workspace "
          "workspace_floats(rows) floats (0 when that is 0), nonfinite the address of a zeroed int32 the first "
          "layer sets to 1 for an input (minus input_offset) holding NaN or Inf (0: no check).");
}

}  // namespace latentspace::bindings
