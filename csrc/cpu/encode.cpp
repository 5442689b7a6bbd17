// The batched MLP encoder on the CPU: weights packed once for the SIMD kernel in use; encode()
// hands blocks of rows to OpenMP threads, and each thread carries its block through every
// layer in two small ping-pong buffers (L2-sized), so no full-size intermediate is allocated.
// A layer's LayerNorm runs on the block right after the layer's kernel wrote it
// (encode_row_norm.h).
#include "ops/encode.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/cpu_features.h"
#include "core/interrupt.h"
#include "core/threads.h"
#include "cpu/encode_row_norm.h"
#include "cpu/simd/encode_kernels.h"

namespace latentspace {
namespace {

// Below this many multiply-adds per thread, waking another thread costs more than it saves.
constexpr double kMinFlopsPerThread = 4e6;
constexpr size_t kAlignment = 64;  // cache line: weight panels start aligned, so do their rows

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<void, AlignedFree>;

AlignedBuffer aligned_buffer(size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  void* p = std::aligned_alloc(kAlignment, rounded);
  if (!p) throw std::bad_alloc();
  return AlignedBuffer(p);
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

void check_finite(const float* values, int64_t count, const std::string& name) {
  for (int64_t i = 0; i < count; ++i) {
    LS_CHECK_VALUE(std::isfinite(values[i]), name, " contains NaN or Inf (at flat index ", i,
                   "); the encoder needs finite weights");
  }
}

}  // namespace

Activation parse_activation(const std::string& name, const std::string& argument) {
  static const char* const kNames[] = {"identity", "relu", "leaky_relu", "gelu", "gelu_tanh",
                                       "tanh",     "sigmoid", "silu",     "elu"};
  for (int i = 0; i < static_cast<int>(std::size(kNames)); ++i) {
    if (name == kNames[i]) return static_cast<Activation>(i);
  }
  throw ValueError(concat(argument, ": unknown activation '", name, "'; expected one of identity, relu, "
                          "leaky_relu, gelu, gelu_tanh, tanh, sigmoid, silu, elu"));
}

void check_layer_chain(const std::vector<LayerWeights>& layers) {
  LS_CHECK_VALUE(!layers.empty(), "weights: expected at least one layer");
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerWeights& layer = layers[l];
    const std::string name = concat("weights[", l, "]");
    LS_CHECK_VALUE(layer.weights != nullptr, name, ": expected the layer's weights, got none");
    LS_CHECK_VALUE(layer.depth >= 1 && layer.columns >= 1, name, ": expected a non-empty (out, in) matrix, got (",
                   layer.columns, ", ", layer.depth, ")");
    if (l > 0) {
      LS_CHECK_VALUE(layer.depth == layers[l - 1].columns, name, ": expected ", layers[l - 1].columns,
                     " inputs (the previous layer's outputs), got ", layer.depth);
    }
    LS_CHECK_VALUE(std::isfinite(layer.parameter), "activation_params[", l, "]: expected a finite number");
    const NormPlace place = layer.norm.place;
    LS_CHECK_VALUE(place == NormPlace::kNone || place == NormPlace::kBeforeActivation ||
                       place == NormPlace::kAfterActivation,
                   "norms[", l, "]: unknown place ", static_cast<int>(place));
  }
}

// What runs on a layer's block after its kernel: the LayerNorm, then, when the norm comes
// before the activation, the activation (the kernel ran that layer with the identity).
struct NormStep {
  cpu::RowNormStage norm;  // place kNone: nothing
  Activation activation = Activation::kIdentity;
  float parameter = 0.0f;
};

struct CpuMlpEncoder::Impl {
  const cpu::EncodeKernels* kernels = nullptr;
  EncodePrecision precision = EncodePrecision::kFloat32;
  bool round_to_bf16 = false;  // bf16 emulated on float32 kernels
  std::vector<cpu::PackedLayer> layers;
  std::vector<NormStep> norms;      // one per layer
  std::optional<cpu::RowNormStage> input_norm;
  std::vector<AlignedBuffer> panels;
  std::vector<AlignedBuffer> biases;
  std::vector<float> input_offset;  // empty: none
  int64_t hidden_ld = 0;            // row stride of the ping-pong buffers
  double flops_per_row = 0;
};

CpuMlpEncoder::CpuMlpEncoder(const std::vector<LayerWeights>& layers, const float* input_offset,
                             EncodePrecision precision, const RowNorm* input_norm)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.precision = precision;
  m.kernels = &cpu::encode_kernels(active_simd_level(), precision);
  const cpu::EncodeGeometry& g = m.kernels->geometry;
  m.round_to_bf16 = precision == EncodePrecision::kBfloat16 && g.depth_per_unit == 1;
  check_layer_chain(layers);
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerWeights& layer = layers[l];
    const std::string name = concat("weights[", l, "]");
    check_finite(layer.weights, layer.depth * layer.columns, name);
    const int64_t units = (layer.depth + g.depth_per_unit - 1) / g.depth_per_unit;
    const int64_t padded_columns = round_up(layer.columns, g.panel_columns);
    m.panels.push_back(aligned_buffer(static_cast<size_t>(units * padded_columns) * 4));
    m.kernels->pack_weights(layer.weights, layer.columns, layer.depth, m.round_to_bf16, m.panels.back().get());
    m.biases.push_back(aligned_buffer(static_cast<size_t>(padded_columns) * sizeof(float)));
    float* bias = static_cast<float*>(m.biases.back().get());
    std::fill(bias, bias + padded_columns, 0.0f);
    if (layer.bias) {
      check_finite(layer.bias, layer.columns, concat("biases[", l, "]"));
      std::copy(layer.bias, layer.bias + layer.columns, bias);
    }
    NormStep step;
    const NormPlace place = layer.norm.place;
    if (place != NormPlace::kNone) step.norm = cpu::copy_row_norm(layer.norm, layer.columns, concat("norms[", l, "]"));
    const bool norm_first = place == NormPlace::kBeforeActivation;
    if (norm_first) {
      step.activation = layer.activation;
      step.parameter = layer.parameter;
    }
    m.norms.push_back(std::move(step));
    m.layers.push_back(cpu::PackedLayer{m.panels.back().get(), bias, layer.depth, layer.columns,
                                        norm_first ? Activation::kIdentity : layer.activation, layer.parameter});
    if (l + 1 < layers.size()) m.hidden_ld = std::max(m.hidden_ld, round_up(layer.columns, 16));
    m.flops_per_row += 2.0 * static_cast<double>(layer.depth) * static_cast<double>(layer.columns);
  }
  if (input_offset) {
    check_finite(input_offset, layers[0].depth, "input_offset");
    m.input_offset.assign(input_offset, input_offset + layers[0].depth);
  }
  if (input_norm) m.input_norm = cpu::copy_row_norm(*input_norm, layers[0].depth, "input_norm");
}

CpuMlpEncoder::~CpuMlpEncoder() = default;

int64_t CpuMlpEncoder::input_dim() const { return impl_->layers.front().depth; }
int64_t CpuMlpEncoder::output_dim() const { return impl_->layers.back().columns; }
int64_t CpuMlpEncoder::num_layers() const { return static_cast<int64_t>(impl_->layers.size()); }
EncodePrecision CpuMlpEncoder::precision() const { return impl_->precision; }
const char* CpuMlpEncoder::kernel_name() const { return impl_->kernels->name; }

void CpuMlpEncoder::encode(const float* x, int64_t rows, float* out) const {
  if (rows <= 0) return;
  const Impl& m = *impl_;
  const cpu::EncodeGeometry& g = m.kernels->geometry;
  const int64_t blocks = (rows + g.block_rows - 1) / g.block_rows;
  const double flops = m.flops_per_row * static_cast<double>(rows);
  const int threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({num_threads(), blocks, static_cast<int64_t>(flops / kMinFlopsPerThread)})));
  // All scratch is allocated here, outside the parallel region (no throwing inside it): per
  // thread, the packed depth block, two ping-pong activation buffers and, for a leading
  // LayerNorm, the block's normalised input rows.
  const size_t pack_bytes = static_cast<size_t>(g.block_rows) * g.depth_block_units * 4;
  const size_t hidden_floats = static_cast<size_t>(g.block_rows * std::max<int64_t>(m.hidden_ld, 1));
  const int64_t in_dim = input_dim(), out_dim = output_dim();
  const int64_t normed_ld = m.input_norm ? round_up(in_dim, 16) : 0;
  const size_t normed_floats = static_cast<size_t>(g.block_rows * normed_ld);
  const size_t per_thread =
      round_up(static_cast<int64_t>(pack_bytes + (2 * hidden_floats + normed_floats) * sizeof(float)), kAlignment);
  AlignedBuffer scratch = aligned_buffer(per_thread * threads);
  const float* offset = m.input_offset.empty() ? nullptr : m.input_offset.data();
  const size_t layer_count = m.layers.size();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  Interruption interruption;  // Ctrl-C: the remaining blocks are skipped

#pragma omp parallel num_threads(threads)
  {
    char* mine = static_cast<char*>(scratch.get()) + per_thread * omp_get_thread_num();
    void* pack = mine;
    float* ping_pong[2] = {reinterpret_cast<float*>(mine + pack_bytes),
                           reinterpret_cast<float*>(mine + pack_bytes) + hidden_floats};
    float* normed = reinterpret_cast<float*>(mine + pack_bytes) + 2 * hidden_floats;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t r0 = b * g.block_rows;
      // Blocks past a bad row are skipped; blocks before it still run, so the reported row
      // is the lowest bad one.
      if (r0 > first_bad.load(std::memory_order_relaxed) || interruption.requested()) continue;
      const int64_t block = std::min<int64_t>(g.block_rows, rows - r0);
      const float* in = x + r0 * in_dim;
      int64_t ld_in = in_dim;
      const auto report = [&](int64_t bad) {
        int64_t seen = first_bad.load(std::memory_order_relaxed);
        while (r0 + bad < seen && !first_bad.compare_exchange_weak(seen, r0 + bad)) {
        }
      };
      if (m.input_norm) {
        // The norm reports the rows holding NaN or Inf (the first layer then sees normalised rows).
        const int64_t bad = cpu::normalize_rows(*m.input_norm, in, ld_in, normed, normed_ld, block, in_dim);
        if (bad >= 0) {
          report(bad);
          continue;
        }
        in = normed;
        ld_in = normed_ld;
      }
      for (size_t l = 0; l < layer_count; ++l) {
        const bool last = l + 1 == layer_count;
        float* dst = last ? out + r0 * out_dim : ping_pong[l % 2];
        const int64_t ld_out = last ? out_dim : m.hidden_ld;
        const bool check = l == 0 && !m.input_norm;
        const int64_t bad = m.kernels->run_layer(m.layers[l], in, ld_in, block, l == 0 ? offset : nullptr, check,
                                                 m.round_to_bf16, pack, dst, ld_out);
        if (bad >= 0) {
          report(bad);
          break;
        }
        const NormStep& step = m.norms[l];
        if (step.norm.place != NormPlace::kNone) {
          // Hidden values that overflowed become NaN here, as on torch: no report.
          cpu::normalize_rows(step.norm, dst, ld_out, dst, ld_out, block, m.layers[l].columns);
          m.kernels->activate_rows(step.activation, step.parameter, dst, ld_out, block, m.layers[l].columns);
        }
        in = dst;
        ld_in = ld_out;
      }
    }
  }
  interruption.throw_if_requested();  // the codes are incomplete
  const int64_t bad = first_bad.load();
  LS_CHECK_VALUE(bad == std::numeric_limits<int64_t>::max(), "x: row ", bad,
                 " contains NaN or Inf; clean the data before encoding");
}

}  // namespace latentspace
