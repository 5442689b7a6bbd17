// Per-instruction-set pieces of the batched MLP encoder, behind a table of function pointers
// (the scheme of knn_kernels.h; implementations in encode_{scalar,avx2,avx512,avx512_bf16}.cpp,
// shared code in encode_impl.h).
//
// The layer product is a small GEMM done BLIS-style: the weights are packed once into panels
// of `panel_columns` outputs; the rows of a block are packed per depth block into tiles of
// `tile_rows` rows; a register tile of tile_rows x panel_columns accumulates over the depth,
// and the last depth block adds the bias and applies the activation before its one store.
// Packed data is made of 32-bit units: one float32, or a pair of bfloat16 (consecutive depth
// indices) for the AVX512_BF16 dot-product kernel.
#pragma once

#include <cstdint>

#include "core/cpu_features.h"
#include "ops/encode.h"

namespace latentspace::cpu {

struct EncodeGeometry {
  int tile_rows;          // rows of the register tile
  int panel_columns;      // columns of the register tile (= of a weight panel)
  int depth_per_unit;     // 1 (float32 units) or 2 (bfloat16 pairs)
  int depth_block_units;  // units of depth per packed block (the inner loop's length)
  int block_rows;         // rows a thread carries through all layers at once (multiple of tile_rows)
};

// A packed layer, as the kernels read it.
struct PackedLayer {
  const void* panels;   // panel-major: panel p holds depth_units x panel_columns units
  const float* bias;    // columns_padded values (zeros when the layer has no bias)
  int64_t depth;        // inputs
  int64_t columns;      // outputs
  Activation activation;
  float parameter;
};

struct EncodeKernels {
  EncodeGeometry geometry;
  const char* name;
  // Packs w (columns x depth, row-major) into panels at dst (units, zero-padded), rounding to
  // bfloat16 when round_to_bf16 (kernels with 32-bit float units only; bf16-pair kernels
  // always round).
  void (*pack_weights)(const float* w, int64_t columns, int64_t depth, bool round_to_bf16, void* dst);
  // One layer for `rows` (<= block_rows) rows: out[r][c] = act(sum_k in'[r][k] w[c][k] + bias[c])
  // with in' = in - offset (offset nullable, depth values). `pack` is scratch of
  // block_rows x depth_block_units units. With check_finite, returns the lowest row whose input
  // holds NaN or Inf (and stops), else -1. round_to_bf16 as for pack_weights.
  int64_t (*run_layer)(const PackedLayer& layer, const float* in, int64_t ld_in, int64_t rows,
                       const float* offset, bool check_finite, bool round_to_bf16, void* pack,
                       float* out, int64_t ld_out);
  // The activation run_layer applies, alone, in place on rows x columns values (row stride ld):
  // for a layer whose LayerNorm comes before its activation, which runs its product with the
  // identity and this after the norm (the same code, so both orders compute the same values).
  void (*activate_rows)(Activation activation, float parameter, float* out, int64_t ld, int64_t rows,
                        int64_t columns);
};

const EncodeKernels& encode_kernels_scalar();
const EncodeKernels& encode_kernels_avx2();
const EncodeKernels& encode_kernels_avx512();
const EncodeKernels& encode_kernels_avx512_bf16();
// The table for a SIMD level and precision; bf16 gets the dot-product kernel only where the
// CPU has AVX512_BF16 and the level is avx512.
const EncodeKernels& encode_kernels(SimdLevel level, EncodePrecision precision);

// Round to nearest even bfloat16, returned as the float it represents (NaN stays NaN).
float round_to_bfloat16(float x);

}  // namespace latentspace::cpu
