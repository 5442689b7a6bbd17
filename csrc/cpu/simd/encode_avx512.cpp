// The batched MLP encoder's float32 layer kernel for the avx512 instruction set (see encode_impl.h):
// a 12 x 2-vector register tile.
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd/encode_kernels.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_avx512.h"

constexpr int kTileRows = 12;
constexpr int kPanelVecs = 2;
constexpr int kBlockTiles = 8;  // 96-row blocks

#include "cpu/simd/encode_float32_dot.h"
using Dot = Float32Dot;
#include "cpu/simd/encode_impl.h"

}  // namespace

const EncodeKernels& encode_kernels_avx512() { return make_kernels("avx512"); }

}  // namespace latentspace::cpu
