// The batched MLP encoder on a CUDA GPU (ops/encode.h, CudaMlpEncoder): the CPU encoder's
// semantics, layer by layer on the caller's stream.
//
// A layer is one launch of linear_layer_kernel: each block computes one tile of rows x outputs
// with the kNN scan's tiles (knn_tiles.cuh: the layer's inputs play the queries, its weights
// the database rows), then adds the bias, applies the activation and stores the tile once.
// float32 runs SimtTile (CUDA-core FMA, exact float32 products as the CPU's kernels; 128 x 128),
// or NarrowSimtTile (encode_narrow_tile.cuh, 128 x 32) for layers of at most 32 outputs, the
// usual last layer, which the wide tile would compute 4 to 128 times over; bf16 runs
// WmmaTile<bf16>, which rounds inputs and weights to bfloat16 while staging them and sums in
// float32 on tensor cores: the CPU's bf16 mode. A layer with a LayerNorm adds one launch of
// row_norm_kernel over its outputs (in place), which also applies the activation when the
// norm comes first. The hidden layers' activations live in a workspace the caller hands down
// (torch's caching allocator); the last layer writes the codes.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/encode_math.cuh"
#include "cuda/encode_narrow_tile.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/encode.h"

namespace latentspace {
namespace {

using cuda::kTileThreads;
using cuda::kWarp;
using cuda::warp_sum;
using cuda::NarrowSimtTile;
using cuda::SimtTile;
using cuda::TileBounds;
using Bf16Tile = cuda::WmmaTile<KnnPrecision::kBf16>;

constexpr int kNormWarpsPerBlock = 8;
constexpr int64_t kMaxNormBlocks = int64_t{1} << 16;  // larger inputs loop (grid stride)
constexpr int64_t kMaxGridY = 65535;                  // the outputs' tiles go in grid.y

// One layer's launch: out = activation(in W^T + bias), in (rows x depth) minus offset.
struct LayerLaunch {
  const float* in;
  const float* offset;   // nullable (the first layer's input_offset)
  uint32_t* nonfinite;   // nullable (the first layer's): set to 1 for a NaN / Inf input
  const float* weights;  // columns x depth
  const float* bias;     // nullable
  float* out;            // rows x columns
  int64_t rows, depth, columns;
  Activation activation;  // applied before the store (kIdentity when a LayerNorm comes first)
  float parameter;
  bool vector_stores;  // columns % 4 == 0 and out 16-byte aligned: 4 outputs per store
};

template <class Tile, bool kAligned>
__global__ void __launch_bounds__(kTileThreads) linear_layer_kernel(LayerLaunch a) {
  __shared__ typename Tile::Shared shared;
  const int64_t r0 = int64_t{blockIdx.x} * Tile::kQueries;
  const int64_t c0 = int64_t{blockIdx.y} * Tile::kVectors;
  const TileBounds bounds{a.in, a.weights, r0, a.rows, c0, a.columns, a.depth, nullptr, a.offset, a.nonfinite};
  float acc[Tile::kRows][Tile::kCols];
  Tile::template compute<KnnStorage::kFloat32, kAligned>(bounds, shared, acc);
  // All three tiles give each thread its columns in runs of 4 consecutive ones (vector_of(4 g
  // + m) = vector_of(4 g) + m), so a run is one 16-byte store where the layout allows.
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    const int64_t r = r0 + Tile::query_of(i);
    if (r >= a.rows) continue;
    float* row = a.out + r * a.columns;
#pragma unroll
    for (int g = 0; g < Tile::kCols / 4; ++g) {
      const int64_t c = c0 + Tile::vector_of(4 * g);
      float v[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const float bias = (a.bias != nullptr && c + m < a.columns) ? a.bias[c + m] : 0.0f;
        v[m] = encode_math::activate(a.activation, acc[i][4 * g + m] + bias, a.parameter);
      }
      if (a.vector_stores && c + 3 < a.columns) {
        *reinterpret_cast<float4*>(row + c) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          if (c + m < a.columns) row[c + m] = v[m];
        }
      }
    }
  }
}

// torch.nn.LayerNorm's eval forward over each row of `width` values, one warp per row, then the
// activation: the CPU's arithmetic (cpu/encode_row_norm.h): mean and variance in double, two
// passes over the row (read from L2: the layer just wrote it), each output formed in double and
// rounded once. in may be out.
__global__ void row_norm_kernel(const float* in, float* out, int64_t rows, int64_t width, double eps,
                                const float* __restrict__ scale, const float* __restrict__ shift,
                                Activation activation, float parameter) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t{gridDim.x} * kNormWarpsPerBlock;
  for (int64_t r = int64_t{blockIdx.x} * kNormWarpsPerBlock + threadIdx.x / kWarp; r < rows; r += warps) {
    const float* h = in + r * width;
    double sum = 0.0;
    for (int64_t c = lane; c < width; c += kWarp) sum += h[c];
    const double mean = warp_sum(sum) / static_cast<double>(width);
    double squares = 0.0;
    for (int64_t c = lane; c < width; c += kWarp) {
      const double d = h[c] - mean;
      squares += d * d;
    }
    const double inverse_std = 1.0 / sqrt(warp_sum(squares) / static_cast<double>(width) + eps);
    // Every lane has read all it needs of its own elements: writing in place races with nothing
    // (lane l reads and writes only elements c = l mod 32).
    float* y = out + r * width;
    for (int64_t c = lane; c < width; c += kWarp) {
      double v = (h[c] - mean) * inverse_std;
      if (scale != nullptr) v *= scale[c];
      if (shift != nullptr) v += shift[c];
      y[c] = encode_math::activate(activation, static_cast<float>(v), parameter);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class Tile>
void launch_layer_with(const LayerLaunch& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(a.rows, Tile::kQueries)),
                  static_cast<unsigned>(cuda::ceil_div(a.columns, Tile::kVectors)));
  // Quads of 4 inputs load at once when every row starts 16-byte aligned.
  const bool aligned = a.depth % 4 == 0 && aligned16(a.in) && aligned16(a.weights) &&
                       (a.offset == nullptr || aligned16(a.offset));
  if (aligned) {
    linear_layer_kernel<Tile, true><<<grid, kTileThreads, 0, stream>>>(a);
  } else {
    linear_layer_kernel<Tile, false><<<grid, kTileThreads, 0, stream>>>(a);
  }
  cuda::check_launch("linear_layer_kernel");
}

void launch_row_norm(const float* in, float* out, int64_t rows, int64_t width, const RowNorm& norm,
                     Activation activation, float parameter, cudaStream_t stream) {
  const int64_t blocks = std::min(cuda::ceil_div(rows, kNormWarpsPerBlock), kMaxNormBlocks);
  row_norm_kernel<<<static_cast<unsigned>(blocks), kNormWarpsPerBlock * kWarp, 0, stream>>>(
      in, out, rows, width, norm.eps, norm.scale, norm.shift, activation, parameter);
  cuda::check_launch("row_norm_kernel");
}

void check_eps(double eps, const std::string& name) {
  // As the CPU encoder (cpu/encode_row_norm.cpp): eps = 0 would make a constant row 0 / 0.
  LS_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, name, ": expected eps > 0 (finite), got ", eps);
}

// The widest tile's outputs per block: a layer's outputs must fit grid.y (the narrow tile
// takes only layers that fit one block).
int64_t tile_columns(EncodePrecision precision) {
  return precision == EncodePrecision::kBfloat16 ? Bf16Tile::kVectors : SimtTile::kVectors;
}

}  // namespace

struct CudaMlpEncoder::Impl {
  std::vector<LayerWeights> layers;
  const float* input_offset = nullptr;
  bool has_input_norm = false;
  RowNorm input_norm;
  EncodePrecision precision = EncodePrecision::kFloat32;
  int64_t widest_hidden = 0;  // the widest output of all layers but the last

  // The workspace's pieces for `rows` rows (nullptr base: just their sizes).
  struct Pieces {
    float* normed_input = nullptr;
    float* hidden[2] = {nullptr, nullptr};
    size_t bytes = 0;
  };
  Pieces carve(float* base, int64_t rows) const {
    cuda::WorkspaceCarver carver(base);
    Pieces p;
    const auto count = [&](int64_t width) { return static_cast<size_t>(rows) * static_cast<size_t>(width); };
    if (has_input_norm) p.normed_input = carver.take<float>(count(layers.front().depth));
    if (layers.size() > 1) p.hidden[0] = carver.take<float>(count(widest_hidden));
    if (layers.size() > 2) p.hidden[1] = carver.take<float>(count(widest_hidden));
    p.bytes = carver.used();
    return p;
  }
};

CudaMlpEncoder::CudaMlpEncoder(const std::vector<LayerWeights>& layers, const float* input_offset,
                               EncodePrecision precision, const RowNorm* input_norm)
    : impl_(std::make_unique<Impl>()) {
  check_layer_chain(layers);
  Impl& m = *impl_;
  LS_CHECK_VALUE(precision == EncodePrecision::kFloat32 || precision == EncodePrecision::kBfloat16,
                 "precision: unknown value ", static_cast<int>(precision));
  m.precision = precision;
  const int64_t most_columns = kMaxGridY * tile_columns(precision);
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerWeights& layer = layers[l];
    LS_CHECK_VALUE(layer.columns <= most_columns, "weights[", l, "]: ", layer.columns, " outputs; the CUDA encoder "
                   "takes at most ", most_columns, " per layer");
    if (layer.norm.place != NormPlace::kNone) check_eps(layer.norm.eps, concat("norms[", l, "]"));
    if (l + 1 < layers.size()) m.widest_hidden = std::max(m.widest_hidden, layer.columns);
  }
  m.layers = layers;
  m.input_offset = input_offset;
  if (input_norm != nullptr) {
    check_eps(input_norm->eps, "input_norm");
    m.has_input_norm = true;
    m.input_norm = *input_norm;
  }
}

CudaMlpEncoder::~CudaMlpEncoder() = default;

int64_t CudaMlpEncoder::input_dim() const { return impl_->layers.front().depth; }
int64_t CudaMlpEncoder::output_dim() const { return impl_->layers.back().columns; }
int64_t CudaMlpEncoder::num_layers() const { return static_cast<int64_t>(impl_->layers.size()); }
EncodePrecision CudaMlpEncoder::precision() const { return impl_->precision; }
const char* CudaMlpEncoder::kernel_name() const {
  return impl_->precision == EncodePrecision::kBfloat16 ? "cuda_wmma_bf16" : "cuda_simt";
}

int64_t CudaMlpEncoder::workspace_floats(int64_t rows) const {
  LS_CHECK_VALUE(rows >= 0, "rows: expected a count >= 0, got ", rows);
  return static_cast<int64_t>(impl_->carve(nullptr, rows).bytes / sizeof(float));
}

void CudaMlpEncoder::encode(const float* x, int64_t rows, float* out, float* workspace, uint32_t* nonfinite,
                            uintptr_t stream_handle) const {
  LS_CHECK_VALUE(rows >= 0, "rows: expected a count >= 0, got ", rows);
  if (rows == 0) return;
  const Impl& m = *impl_;
  LS_CHECK_VALUE(x != nullptr && out != nullptr, "x, out: expected device pointers");
  const Impl::Pieces pieces = m.carve(workspace, rows);
  LS_CHECK_VALUE(pieces.bytes == 0 || workspace != nullptr, "workspace: expected ", pieces.bytes / sizeof(float),
                 " float32 elements of device memory (workspace_floats(", rows, ")), got none");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);

  const float* in = x;
  if (m.has_input_norm) {
    launch_row_norm(x, pieces.normed_input, rows, input_dim(), m.input_norm, Activation::kIdentity, 0.0f, stream);
    in = pieces.normed_input;
  }
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const LayerWeights& layer = m.layers[l];
    const bool last = l + 1 == m.layers.size();
    float* target = last ? out : pieces.hidden[l % 2];
    const bool norm_first = layer.norm.place == NormPlace::kBeforeActivation;
    LayerLaunch a{};
    a.in = in;
    a.offset = l == 0 ? m.input_offset : nullptr;
    a.nonfinite = l == 0 ? nonfinite : nullptr;
    a.weights = layer.weights;
    a.bias = layer.bias;
    a.out = target;
    a.rows = rows;
    a.depth = layer.depth;
    a.columns = layer.columns;
    a.activation = norm_first ? Activation::kIdentity : layer.activation;
    a.parameter = layer.parameter;
    a.vector_stores = layer.columns % 4 == 0 && aligned16(target);
    if (m.precision == EncodePrecision::kBfloat16) {
      launch_layer_with<Bf16Tile>(a, stream);
    } else if (layer.columns <= NarrowSimtTile::kVectors) {
      launch_layer_with<NarrowSimtTile>(a, stream);
    } else {
      launch_layer_with<SimtTile>(a, stream);
    }
    if (layer.norm.place != NormPlace::kNone) {
      launch_row_norm(target, target, rows, layer.columns, layer.norm,
                      norm_first ? layer.activation : Activation::kIdentity, layer.parameter, stream);
    }
    in = target;
  }
}

}  // namespace latentspace
