// The batched MLP encoder's float32 layer kernel for the avx2 instruction set (see encode_impl.h):
// a 6 x 2-vector register tile.
#include <immintrin.h>

#include <cstdint>

#include "cpu/simd/encode_kernels.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_avx2.h"

constexpr int kTileRows = 6;
constexpr int kPanelVecs = 2;
constexpr int kBlockTiles = 16;  // 96-row blocks

#include "cpu/simd/encode_float32_dot.h"
using Dot = Float32Dot;
#include "cpu/simd/encode_impl.h"

}  // namespace

const EncodeKernels& encode_kernels_avx2() { return make_kernels("avx2"); }

}  // namespace latentspace::cpu
