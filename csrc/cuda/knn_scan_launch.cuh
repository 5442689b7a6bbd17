// How the CUDA kNN launches its scan (knn.cu, step 2): the run-time choices (storage,
// precision, row or tile scan, aligned loads, tensor-core tile, the default or the opt-in
// family) become the template parameters of scan_kernel / row_scan_kernel.
//
// Each metric's instantiations, default and opt-in family, are compiled in a translation
// unit of their own (knn_scan_l2.cu, knn_scan_l2_opt_ins.cu, ...: explicit
// instantiations of launch_scan_for, declared extern at the bottom): the scan kernels are most
// of the CUDA build, and separate files compile in parallel (one file took 128 s of a GPU
// run's build, 2026-11-26).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/knn_deep_tile.cuh"
#include "cuda/knn_mma_tile.cuh"
#include "cuda/knn_pipelined_tile.cuh"
#include "cuda/knn_resident_tile.cuh"
#include "cuda/knn_rows.cuh"
#include "cuda/knn_scan.cuh"
#include "cuda/knn_tiles.cuh"
#include "ops/knn.h"

namespace latentspace::cuda {

// Whether 4 consecutive elements can load at once everywhere (knn_tiles.cuh's kAligned): the
// dimension a multiple of 4, the bases aligned to 4 elements.
inline bool quads_aligned(const ScanArgs& args, KnnStorage storage) {
  const uintptr_t element = storage == KnnStorage::kFloat32 ? 4 : 2;
  auto aligned = [](const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  return args.dim % 4 == 0 && aligned(args.queries, 16) && aligned(args.database, 4 * element) &&
         (args.weights == nullptr || aligned(args.weights, 16));
}

// Whether the row scan loads its norms ahead (knn_rows.cuh, kEarlyNorms; opt-in until a GPU
// run verifies it): LATENTSPACE_CUDA_EARLY_NORMS=1 (unset, empty or 0: no). Read at every search.
inline bool use_early_norms() { return environment_switch("LATENTSPACE_CUDA_EARLY_NORMS", "1", "0", false); }

// Whether a query's splits share their thresholds (knn_scan.cuh, SharedThresholds):
// LATENTSPACE_CUDA_SHARED_THRESHOLDS. Unset or "auto": where a query's database is cut into
// more than one split and the tile scan runs (knn.cu, share_thresholds). GPU run 8 (H200),
// with the float compare of the opt-in family: 1.05-1.38x over 10 cells at Q = 10,000 and
// 5,000 (k = 10 to 1024, fp32 / tf32 / bf16, geometric mean 1.13x), 1.11x at Q = 1000,
// k = 1024, but 0.97x at Q = 1000, k = 4096 (7 splits) and 16,384 (1 split), and 0.92x in
// the row scan of one query (which auto leaves out). Those large k now take the large-k plan,
// where run 9 timed the defaults (shared) at 44.4 ms against run 8's 45.1 ms without (k = 4096).
// "1": everywhere (tests), "0": nowhere. knn.cu reads it at
// every search and then sets ScanArgs::best_kth, which the launch follows.
inline Setting shared_thresholds_setting() { return environment_setting("LATENTSPACE_CUDA_SHARED_THRESHOLDS"); }

// Whether the tile scan cuts its lists back by warps (knn_scan.cuh, warp_cut_back_lists; opt-in
// until a GPU run verifies it): LATENTSPACE_CUDA_WARP_CUT_BACKS=1 (unset, empty or 0: no).
// knn.cu reads it at every search and then sets ScanArgs::warp_cut_backs.
inline bool use_warp_cut_backs() { return environment_switch("LATENTSPACE_CUDA_WARP_CUT_BACKS", "1", "0", false); }

// Whether the search takes the opt-in family's kernels for their own sake: their tile scan
// compares each score with its query's threshold as a float before forming its key
// (knn_scan.cuh, offer_scores_first; opt-in until a GPU run verifies it), which the family's
// other settings get too: LATENTSPACE_CUDA_FLOAT_THRESHOLDS=1 (unset, empty or 0: no). knn.cu
// reads it at every search and then sets ScanArgs::float_thresholds.
inline bool use_float_thresholds() {
  return environment_switch("LATENTSPACE_CUDA_FLOAT_THRESHOLDS", "1", "0", false);
}

template <Metric kMetric, KnnStorage kStorage, bool kAligned, bool kEarlyNorms, bool kOptIns,
          int kQueries = kRowQueries, int kRows = kRowsInFlight, int kSteps = 2>
void launch_row_scan_kernel(const ScanArgs& args, cudaStream_t stream) {
  const dim3 grid(1, static_cast<unsigned>(args.splits));
  const size_t query_bytes = static_cast<size_t>(args.num_queries * args.dim) * sizeof(float);
  if (kMetric != Metric::kInnerProduct && args.database_norms == nullptr) {
    row_scan_kernel<kMetric, kStorage, kAligned, true, kEarlyNorms, kOptIns, kQueries, kRows, kSteps>
        <<<grid, kScanThreads, query_bytes, stream>>>(args);
  } else {
    row_scan_kernel<kMetric, kStorage, kAligned, false, kEarlyNorms, kOptIns, kQueries, kRows, kSteps>
        <<<grid, kScanThreads, query_bytes, stream>>>(args);
  }
  check_launch("row_scan_kernel");
}

template <Metric kMetric, KnnStorage kStorage, bool kAligned, bool kOptIns>
void launch_row_scan(const ScanArgs& args, cudaStream_t stream) {
  if constexpr (kAligned) {
    if (args.num_queries == 1) {
      switch (single_query_rows()) {
        case 8: launch_row_scan_kernel<kMetric, kStorage, true, true, kOptIns, 1, 8, 1>(args, stream); return;
        case 16: launch_row_scan_kernel<kMetric, kStorage, true, true, kOptIns, 1, 16, 1>(args, stream); return;
        default: break;  // the row scan
      }
    }
  }
  if (use_early_norms()) {
    launch_row_scan_kernel<kMetric, kStorage, kAligned, true, kOptIns>(args, stream);
  } else {
    launch_row_scan_kernel<kMetric, kStorage, kAligned, false, kOptIns>(args, stream);
  }
}

// The tile of the calling thread's last native search call's tile scan ("simt", "wmma", "mma",
// "deep", "pipelined", "resident"; "none" where that call took none, knn_cuda resets it): for the tests
// (_native._cuda_last_scan), so that a search that falls back from an opt-in tile cannot pass
// them unseen.
inline const char*& last_scan_launched() {
  thread_local const char* name = "none";
  return name;
}

template <class Tile>
constexpr const char* tile_name() {
  if constexpr (std::is_same_v<Tile, SimtTile>) {
    return "simt";
  } else if constexpr (StagingIsDynamic<Tile>::value) {
    return "deep";
  } else if constexpr (std::is_same_v<Tile, WmmaTile<KnnPrecision::kTf32>> ||
                       std::is_same_v<Tile, WmmaTile<KnnPrecision::kBf16>> ||
                       std::is_same_v<Tile, WmmaTile<KnnPrecision::kFp16>>) {
    return "wmma";
  } else {
    return "mma";
  }
}

// Past 48 KiB a kernel must be allowed its dynamic shared memory, and the largest shared-memory
// carveout lets two such blocks share a multiprocessor (per device: set at every launch,
// host-side attribute writes).
template <class Kernel>
void allow_dynamic_shared_memory(Kernel kernel, size_t dynamic_bytes) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_bytes)),
             "cudaFuncSetAttribute(scan_kernel, dynamic shared memory)");
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared),
             "cudaFuncSetAttribute(scan_kernel, carveout)");
}

template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage, bool kAligned, bool kOptIns, class Tile>
void launch_tile_scan(const ScanArgs& args, cudaStream_t stream) {
  last_scan_launched() = tile_name<Tile>();
  const dim3 grid(static_cast<unsigned>(ceil_div(args.num_queries, Tile::kQueries)), static_cast<unsigned>(args.splits));
  const auto kernel = scan_kernel<kMetric, kPrecision, kStorage, kAligned, Tile, kOptIns>;
  size_t dynamic_bytes = 0;
  if constexpr (StagingIsDynamic<Tile>::value) {
    dynamic_bytes = sizeof(typename Tile::Shared);
    allow_dynamic_shared_memory(kernel, dynamic_bytes);
  }
  kernel<<<grid, kScanThreads, dynamic_bytes, stream>>>(args);
  check_launch("scan_kernel");
}

// The opt-in family's scan on the pipelined deep tile (knn_pipelined_tile.cuh), or on the
// resident-queries tile (knn_resident_tile.cuh).
template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage, class Tile>
void launch_pipelined_scan(const ScanArgs& args, cudaStream_t stream) {
  last_scan_launched() = Tile::kName;
  const dim3 grid(static_cast<unsigned>(ceil_div(args.num_queries, Tile::kQueries)), static_cast<unsigned>(args.splits));
  const auto kernel = pipelined_scan_kernel<kMetric, kPrecision, kStorage, Tile>;
  allow_dynamic_shared_memory(kernel, sizeof(typename Tile::Shared));
  kernel<<<grid, kScanThreads, sizeof(typename Tile::Shared), stream>>>(args);
  check_launch("pipelined_scan_kernel");
}

// Whether DeepMmaTile can take a search (knn_deep_tile.cuh): its 16-byte cp.async chunks need
// the dimension a multiple of a chunk (4 float32, 8 halves) and 16-byte aligned bases; it
// does not scale the queries by weights while staging them (weighted l2 takes MmaTile); and
// it steps between its rows in 32-bit offsets (64 rows of a dimension under 2^24).
inline bool deep_tile_applies(const ScanArgs& args, KnnStorage storage) {
  const int64_t chunk = storage == KnnStorage::kFloat32 ? 4 : 8;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return args.weights == nullptr && args.dim % chunk == 0 && args.dim < (int64_t{1} << 24) && aligned(args.queries) &&
         aligned(args.database);
}

// Whether a block of `kernel` with `dynamic_bytes` of dynamic shared memory fits what the
// current device lets one block take: DeepMmaTile's 104 KiB in tf32 passes the 99 KiB of
// sm_86 / sm_89 cards (RTX 30 / 40, A10, L4, L40), which run the sm_80 build.
template <class Kernel>
bool fits_shared_memory(Kernel kernel, size_t dynamic_bytes) {
  int device = 0, most = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(shared memory per block)");
  cudaFuncAttributes attributes{};
  check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes(scan_kernel)");
  return attributes.sharedSizeBytes + dynamic_bytes <= static_cast<size_t>(most);
}

// Whether the pipelined deep tile can take a search that the deep tile can (deep_tile_applies,
// and the opt-in family: knn_pipelined_tile.cuh): not with cut-backs by warps, whose histograms
// would overwrite the copies in flight between tiles, and not for a dimension of 0 (no step to
// wait in).
inline bool pipelined_tile_applies(const ScanArgs& args) { return !args.warp_cut_backs && args.dim > 0; }

// Whether the resident-queries tile can take a search that the pipelined tile can
// (knn_resident_tile.cuh; bf16 / fp16, the launch's constexpr check): the block's queries fit
// its 128 resident dimensions.
inline bool resident_tile_applies(const ScanArgs& args) { return args.dim <= 128; }

// Whether the scan kernel of the pipelined tile, or another Tile of its kernel, fits the
// current device (fits_shared_memory).
template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage, class Tile = PipelinedDeepTile<kPrecision>>
bool pipelined_tile_fits() {
  return fits_shared_memory(pipelined_scan_kernel<kMetric, kPrecision, kStorage, Tile>, sizeof(typename Tile::Shared));
}

// Whether DeepMmaTile's scan kernel fits the current device (fits_shared_memory).
template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage, bool kOptIns>
bool deep_tile_fits() {
  using Tile = DeepMmaTile<kPrecision>;
  return fits_shared_memory(scan_kernel<kMetric, kPrecision, kStorage, true, Tile, kOptIns>,
                            sizeof(typename Tile::Shared));
}

// The tensor-core tile for tf32 / bf16 / fp16, LATENTSPACE_CUDA_TENSOR_TILE, read at every
// search: unset, empty or "deep": DeepMmaTile (knn_deep_tile.cuh), the default since GPU run 12
// (every test passed, memcheck clean; 1.06-1.75x MmaTile in all 8 cells timed, H200,
// docs/benchmarks.md) where it applies (deep_tile_applies: aligned rows, no weights;
// deep_tile_fits: the device's shared memory), MmaTile elsewhere; "mma": MmaTile
// (knn_mma_tile.cuh) everywhere, the default until run 12 and 1.6-1.8x faster than WmmaTile on
// an H100 (run 6); "wmma": WmmaTile (knn_tiles.cuh), kept as a fallback and a reference for the
// tests; "pipelined": the pipelined deep tile (knn_pipelined_tile.cuh; opt-in until a GPU run
// verifies and times it) where the opt-in family runs and it applies (pipelined_tile_applies),
// "deep" elsewhere; "resident": the resident-queries tile (knn_resident_tile.cuh; opt-in
// likewise) where that applies (bf16 / fp16, dimension at most 128), "pipelined" elsewhere; any
// other value throws ValueError.
enum class TensorTile { kMma, kWmma, kDeep, kPipelined, kResident };

inline TensorTile tensor_tile_setting() {
  const char* value = std::getenv("LATENTSPACE_CUDA_TENSOR_TILE");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "deep") == 0) return TensorTile::kDeep;
  if (std::strcmp(value, "wmma") == 0) return TensorTile::kWmma;
  if (std::strcmp(value, "pipelined") == 0) return TensorTile::kPipelined;
  if (std::strcmp(value, "resident") == 0) return TensorTile::kResident;
  LS_CHECK_VALUE(std::strcmp(value, "mma") == 0, "LATENTSPACE_CUDA_TENSOR_TILE: expected 'mma', 'wmma', 'deep', ",
                 "'pipelined' or 'resident', got '", std::string(value), "'");
  return TensorTile::kMma;
}

inline const char* tensor_tile_name(TensorTile tile) {
  switch (tile) {
    case TensorTile::kMma: return "mma";
    case TensorTile::kWmma: return "wmma";
    case TensorTile::kDeep: return "deep";
    case TensorTile::kPipelined: return "pipelined";
    case TensorTile::kResident: return "resident";
  }
  return "deep";
}

// The pipelined kernel's launch where the setting asks for one of its tiles ("pipelined" or
// "resident") and that applies: the resident-queries tile for bf16 / fp16 up to 128 dimensions
// with "resident", else the pipelined deep tile. Returns false where neither is launched (the
// caller takes the deep tile). Call only where the deep tile applies, in the opt-in family.
template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage>
bool launch_pipelined_where_it_applies(TensorTile tile, const ScanArgs& args, cudaStream_t stream) {
  if ((tile != TensorTile::kPipelined && tile != TensorTile::kResident) || !pipelined_tile_applies(args)) return false;
  if constexpr (kPrecision == KnnPrecision::kBf16 || kPrecision == KnnPrecision::kFp16) {
    using Resident = ResidentQueriesTile<kPrecision>;
    if (tile == TensorTile::kResident && resident_tile_applies(args) &&
        pipelined_tile_fits<kMetric, kPrecision, kStorage, Resident>()) {
      launch_pipelined_scan<kMetric, kPrecision, kStorage, Resident>(args, stream);
      return true;
    }
  }
  if (!pipelined_tile_fits<kMetric, kPrecision, kStorage>()) return false;
  launch_pipelined_scan<kMetric, kPrecision, kStorage, PipelinedDeepTile<kPrecision>>(args, stream);
  return true;
}

template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage, bool kAligned, bool kOptIns>
void launch_tile_scan(const ScanArgs& args, cudaStream_t stream) {
  if constexpr (kPrecision != KnnPrecision::kFloat32) {
    const TensorTile tile = tensor_tile_setting();
    if constexpr (kAligned) {
      const bool deep = tile == TensorTile::kDeep || tile == TensorTile::kPipelined || tile == TensorTile::kResident;
      if (deep && deep_tile_applies(args, kStorage)) {
        if constexpr (kOptIns) {
          if (launch_pipelined_where_it_applies<kMetric, kPrecision, kStorage>(tile, args, stream)) return;
        }
        if (deep_tile_fits<kMetric, kPrecision, kStorage, kOptIns>()) {
          launch_tile_scan<kMetric, kPrecision, kStorage, kAligned, kOptIns, DeepMmaTile<kPrecision>>(args, stream);
          return;
        }
      }
    }
    if (tile != TensorTile::kWmma) {
      launch_tile_scan<kMetric, kPrecision, kStorage, kAligned, kOptIns, MmaTile<kPrecision>>(args, stream);
      return;
    }
  }
  launch_tile_scan<kMetric, kPrecision, kStorage, kAligned, kOptIns, typename TileFor<kPrecision>::type>(args, stream);
}

template <Metric kMetric, KnnPrecision kPrecision, KnnStorage kStorage, bool kOptIns>
void launch_scan(const ScanArgs& args, cudaStream_t stream) {
  const bool aligned = quads_aligned(args, kStorage);
  if (use_row_scan(args.num_queries, args.dim)) {  // a handful of queries (precision moot: float32)
    if (aligned) {
      launch_row_scan<kMetric, kStorage, true, kOptIns>(args, stream);
    } else {
      launch_row_scan<kMetric, kStorage, false, kOptIns>(args, stream);
    }
  } else if (aligned) {
    launch_tile_scan<kMetric, kPrecision, kStorage, true, kOptIns>(args, stream);
  } else {
    launch_tile_scan<kMetric, kPrecision, kStorage, false, kOptIns>(args, stream);
  }
}

// Run-time choices become template parameters: precision here, storage below, metric and
// the kernel family in launch_scan_of.
template <Metric kMetric, KnnStorage kStorage, bool kOptIns>
void launch_scan_for(KnnPrecision precision, const ScanArgs& args, cudaStream_t stream) {
  switch (precision) {
    case KnnPrecision::kFloat32: launch_scan<kMetric, KnnPrecision::kFloat32, kStorage, kOptIns>(args, stream); break;
    case KnnPrecision::kTf32: launch_scan<kMetric, KnnPrecision::kTf32, kStorage, kOptIns>(args, stream); break;
    case KnnPrecision::kBf16: launch_scan<kMetric, KnnPrecision::kBf16, kStorage, kOptIns>(args, stream); break;
    case KnnPrecision::kFp16: launch_scan<kMetric, KnnPrecision::kFp16, kStorage, kOptIns>(args, stream); break;
  }
}

template <Metric kMetric, bool kOptIns>
void launch_scan_for(KnnStorage storage, KnnPrecision precision, const ScanArgs& args, cudaStream_t stream) {
  switch (storage) {
    case KnnStorage::kFloat32: launch_scan_for<kMetric, KnnStorage::kFloat32, kOptIns>(precision, args, stream); break;
    case KnnStorage::kFloat16: launch_scan_for<kMetric, KnnStorage::kFloat16, kOptIns>(precision, args, stream); break;
    case KnnStorage::kBfloat16: launch_scan_for<kMetric, KnnStorage::kBfloat16, kOptIns>(precision, args, stream); break;
  }
}

// Each (metric, family) pair is instantiated in a file of its own (see the top of this
// header): knn_scan_l2.cu, knn_scan_l2_opt_ins.cu, and so on.
#define LATENTSPACE_SCAN_INSTANCE(kMetric, kOptIns) \
  template void launch_scan_for<kMetric, kOptIns>(KnnStorage, KnnPrecision, const ScanArgs&, cudaStream_t)
extern LATENTSPACE_SCAN_INSTANCE(Metric::kL2, false);
extern LATENTSPACE_SCAN_INSTANCE(Metric::kL2, true);
extern LATENTSPACE_SCAN_INSTANCE(Metric::kInnerProduct, false);
extern LATENTSPACE_SCAN_INSTANCE(Metric::kInnerProduct, true);
extern LATENTSPACE_SCAN_INSTANCE(Metric::kCosine, false);
extern LATENTSPACE_SCAN_INSTANCE(Metric::kCosine, true);

// The scan of a search: the opt-in family's kernels (knn_scan.cuh, kOptIns) when the caller
// asked for one of its opt-ins (args.best_kth set: shared thresholds; args.warp_cut_backs;
// args.float_thresholds).
inline void launch_scan_of(Metric metric, KnnStorage storage, KnnPrecision precision, const ScanArgs& args,
                           cudaStream_t stream) {
  const bool opt_ins = args.best_kth != nullptr || args.warp_cut_backs || args.float_thresholds;
  switch (metric) {
    case Metric::kL2:
      opt_ins ? launch_scan_for<Metric::kL2, true>(storage, precision, args, stream)
              : launch_scan_for<Metric::kL2, false>(storage, precision, args, stream);
      break;
    case Metric::kInnerProduct:
      opt_ins ? launch_scan_for<Metric::kInnerProduct, true>(storage, precision, args, stream)
              : launch_scan_for<Metric::kInnerProduct, false>(storage, precision, args, stream);
      break;
    case Metric::kCosine:
      opt_ins ? launch_scan_for<Metric::kCosine, true>(storage, precision, args, stream)
              : launch_scan_for<Metric::kCosine, false>(storage, precision, args, stream);
      break;
  }
}

}  // namespace latentspace::cuda
