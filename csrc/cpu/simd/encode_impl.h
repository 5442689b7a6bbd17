// The batched MLP encoder's layer kernel, written once over the vector primitives of vec_*.h
// (see encode_kernels.h for the blocking). Include inside the anonymous namespace of an ISA
// translation unit, after vec_*.h, having defined:
//   kTileRows, kPanelVecs     the register tile: kTileRows x (kPanelVecs * kLanes) floats
//   kBlockTiles               tiles per block of rows a thread carries through all layers
//   struct Dot                how packed 32-bit units multiply (see Float32Dot below):
//     using Unit; kDepthPerUnit; Vec broadcast(const Unit*); Vec load(const Unit*);
//     Vec accumulate(Vec acc, Vec a, Vec b); bool pack_row(src, offset, count, round, dst);
//     Unit pack_weight(const float* w_column_row, int64_t k, int64_t depth, bool round).
//   (Float32Dot in encode_float32_dot.h for the float32 kernels, Bf16PairDot in
//   encode_avx512_bf16.cpp.)
// No #pragma once, on purpose.

#include "cpu/simd/vec_math.h"

constexpr int kPanelColumns = kPanelVecs * kLanes;
// Depth units per packed block: a tile's rows (kTileRows x 1 KiB) and a weight panel's block
// (kPanelColumns KiB) stay in L1/L2 while the register tile accumulates over them.
constexpr int kDepthBlockUnits = 256;

using Unit = Dot::Unit;
constexpr int64_t kDepthPerBlock = int64_t{kDepthBlockUnits} * Dot::kDepthPerUnit;

inline int64_t depth_units(int64_t depth) { return (depth + Dot::kDepthPerUnit - 1) / Dot::kDepthPerUnit; }

void pack_weights(const float* w, int64_t columns, int64_t depth, bool round, void* dst) {
  Unit* out = static_cast<Unit*>(dst);
  const int64_t units = depth_units(depth);
  const int64_t panels = (columns + kPanelColumns - 1) / kPanelColumns;
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t u = 0; u < units; ++u) {
      for (int c = 0; c < kPanelColumns; ++c) {
        const int64_t column = p * kPanelColumns + c;
        *out++ = column < columns ? Dot::pack_weight(w + column * depth, u * Dot::kDepthPerUnit, depth, round)
                                  : Unit{};
      }
    }
  }
}

// One register tile: c[i][j] (+)= sum_u a[i][u] . b[u][j] for the tile's rows and the panel's
// columns, plus the bias on the last depth block; stores rows < rows_valid, columns < cols_valid.
// Every loop over i and v has constant bounds and is unrolled, so acc lives in registers.
inline void tile_product(const Unit* a, const Unit* b, int64_t units, bool first, const float* bias,
                         float* c, int64_t ldc, int rows_valid, int cols_valid) {
  Vec acc[kTileRows][kPanelVecs];
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) {
      const int count = cols_valid - v * kLanes;
      acc[i][v] = first || i >= rows_valid || count <= 0 ? vec_zero()
                                                          : vec_load_partial(c + i * ldc + v * kLanes, count);
    }
  }
  for (int64_t u = 0; u < units; ++u) {
    Vec bv[kPanelVecs];
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) bv[v] = Dot::load(b + u * kPanelColumns + v * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < kTileRows; ++i) {
      const Vec av = Dot::broadcast(a + i * kDepthBlockUnits + u);
#pragma GCC unroll 8
      for (int v = 0; v < kPanelVecs; ++v) acc[i][v] = Dot::accumulate(acc[i][v], av, bv[v]);
    }
  }
  if (bias) {
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) {
      const Vec bias_v = vec_load(bias + v * kLanes);  // padded: always kPanelColumns values
#pragma GCC unroll 16
      for (int i = 0; i < kTileRows; ++i) acc[i][v] = vec_add(acc[i][v], bias_v);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) {
    if (i >= rows_valid) break;
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) {
      const int count = cols_valid - v * kLanes;
      if (count > 0) vec_store_partial(c + i * ldc + v * kLanes, acc[i][v], count);
    }
  }
}

inline Vec activate(Activation activation, Vec x, Vec parameter) {
  switch (activation) {
    case Activation::kIdentity: return x;
    // Operand order: vec_max / vec_min return their second operand when one is NaN, so a NaN
    // (an inf - inf inside the model) comes out NaN, as torch's, and the codes check sees it.
    case Activation::kRelu: return vec_max(vec_zero(), x);
    case Activation::kLeakyRelu: return vec_select(vec_less_mask(x, vec_zero()), vec_mul(x, parameter), x);
    case Activation::kGelu: return vec_mul(x, vec_normal_cdf(x));
    case Activation::kGeluTanh: {
      // (1 + tanh(y)) / 2 = sigmoid(2 y): the same value without the cancellation for x << 0.
      const Vec cube = vec_mul(vec_mul(x, x), x);
      const Vec y = vec_mul(vec_set1(0.7978845608028654f), vec_fmadd(cube, vec_set1(0.044715f), x));
      return vec_mul(x, vec_sigmoid(vec_add(y, y)));
    }
    case Activation::kTanh: return vec_tanh(x);
    case Activation::kSigmoid: return vec_sigmoid(x);
    case Activation::kSilu: return vec_mul(x, vec_sigmoid(x));
    case Activation::kElu: {
      const Vec negative = vec_mul(parameter, vec_expm1_nonpositive(vec_min(vec_zero(), x)));
      return vec_select(vec_less_mask(vec_zero(), x), x, negative);
    }
  }
  return x;
}

// Applies the activation in place to rows x columns values (row stride ld).
void activate_rows(Activation activation, float parameter, float* out, int64_t ld, int64_t rows, int64_t columns) {
  if (activation == Activation::kIdentity) return;
  const Vec p = vec_set1(parameter);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = out + r * ld;
    for (int64_t j = 0; j < columns; j += kLanes) {
      const int64_t count = columns - j < kLanes ? columns - j : kLanes;
      vec_store_partial(row + j, activate(activation, vec_load_partial(row + j, count), p), count);
    }
  }
}

// The lowest of `rows` rows (of `depth` values, minus offset) holding NaN or Inf; -1 if none.
int64_t first_non_finite_row(const float* in, int64_t ld_in, int64_t rows, int64_t depth, const float* offset) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < depth; ++k) {
      const float x = offset ? in[r * ld_in + k] - offset[k] : in[r * ld_in + k];
      if (x - x != 0.0f) return r;
    }
  }
  return -1;
}

int64_t run_layer(const PackedLayer& layer, const float* in, int64_t ld_in, int64_t rows, const float* offset,
                  bool check_finite, bool round, void* pack_scratch, float* out, int64_t ld_out) {
  Unit* pack = static_cast<Unit*>(pack_scratch);
  const Unit* panels = static_cast<const Unit*>(layer.panels);
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t panel_count = (layer.columns + kPanelColumns - 1) / kPanelColumns;
  const int64_t panel_units = depth_units(layer.depth) * kPanelColumns;
  for (int64_t k0 = 0; k0 < layer.depth; k0 += kDepthPerBlock) {
    const int64_t depth = layer.depth - k0 < kDepthPerBlock ? layer.depth - k0 : kDepthPerBlock;
    const int64_t units = depth_units(depth);
    bool finite = true;
    for (int64_t r = 0; r < tiles * kTileRows; ++r) {
      Unit* dst = pack + r * kDepthBlockUnits;
      if (r < rows) {
        finite &= Dot::pack_row(in + r * ld_in + k0, offset ? offset + k0 : nullptr, depth, round, dst);
        // bf16 pairs: an odd depth leaves the last unit half filled; pack_row zeroes the rest.
      } else {
        for (int64_t u = 0; u < units; ++u) dst[u] = Unit{};
      }
    }
    if (check_finite && !finite) return first_non_finite_row(in, ld_in, rows, layer.depth, offset);
    const bool first = k0 == 0, last = k0 + depth >= layer.depth;
    for (int64_t p = 0; p < panel_count; ++p) {
      const Unit* b = panels + p * panel_units + (k0 / Dot::kDepthPerUnit) * kPanelColumns;
      const int64_t cols = layer.columns - p * kPanelColumns;
      const int cols_valid = cols < kPanelColumns ? static_cast<int>(cols) : kPanelColumns;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t rows_left = rows - t * kTileRows;
        tile_product(pack + t * kTileRows * kDepthBlockUnits, b, units, first,
                     last ? layer.bias + p * kPanelColumns : nullptr, out + t * kTileRows * ld_out + p * kPanelColumns,
                     ld_out, rows_left < kTileRows ? static_cast<int>(rows_left) : kTileRows, cols_valid);
      }
    }
  }
  activate_rows(layer.activation, layer.parameter, out, ld_out, rows, layer.columns);
  return -1;
}

const EncodeKernels& make_kernels(const char* name) {
  static const EncodeKernels kernels{
      EncodeGeometry{kTileRows, kPanelColumns, Dot::kDepthPerUnit, kDepthBlockUnits, kTileRows * kBlockTiles},
      name, &pack_weights, &run_layer, &activate_rows};
  return kernels;
}
