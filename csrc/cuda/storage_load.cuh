// Loads of rows stored as float32, float16 or bfloat16 (KnnStorage), widened to float32: the
// kNN scan's tiles (knn_tiles.cuh), its row scans (knn_rows.cuh) and the row check
// (norms.cu) read every storage type through these.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/knn.h"

namespace latentspace::cuda {

// One database element widened to float32, for each storage type.
template <KnnStorage kStorage>
__device__ inline float load_element(const void* base, int64_t i) {
  if constexpr (kStorage == KnnStorage::kFloat16) {
    return __half2float(static_cast<const __half*>(base)[i]);
  } else if constexpr (kStorage == KnnStorage::kBfloat16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  } else {
    return static_cast<const float*>(base)[i];
  }
}

// Elements [at, at + 4) widened to float32 with one 16-byte (float32) or 8-byte (half) load;
// at must be a multiple of 4 and the base aligned accordingly.
template <KnnStorage kStorage>
__device__ inline float4 load_four(const void* base, int64_t at) {
  if constexpr (kStorage == KnnStorage::kFloat32) {
    return *reinterpret_cast<const float4*>(static_cast<const float*>(base) + at);
  } else if constexpr (kStorage == KnnStorage::kFloat16) {
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __half*>(base) + at);
    const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
    const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(base) + at);
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
  }
}

}  // namespace latentspace::cuda
