// The batched MLP encoder's float32 layer kernel in portable C++ (see encode_impl.h): a 4 x 8
// register tile that the compiler may vectorize with the baseline instruction set.

#include <cstdint>

#include "cpu/simd/encode_kernels.h"

namespace latentspace::cpu {
namespace {

#include "cpu/simd/vec_scalar.h"

constexpr int kTileRows = 4;
constexpr int kPanelVecs = 8;
constexpr int kBlockTiles = 24;  // 96-row blocks

#include "cpu/simd/encode_float32_dot.h"
using Dot = Float32Dot;
#include "cpu/simd/encode_impl.h"

}  // namespace

const EncodeKernels& encode_kernels_scalar() { return make_kernels("scalar"); }

}  // namespace latentspace::cpu
