// Tile code shared by every instruction set: database packing, the register-blocked
// inner-product kernel with its key epilogue, and query packing. The row path for one to a
// few queries is in knn_rows_impl.h.
//
// Include this inside an anonymous namespace of the ISA translation unit, after its vector
// primitives (vec_scalar.h / vec_avx2.h / vec_avx512.h: Vec, kLanes, vec_load, vec_fmadd,
// vec_less_mask, vec_load_partial, reduce_lanes, transpose_block, prefetch_ahead, ...) and
// its kPanelWidth and kMaxPanelRows.
// Everything here then has internal linkage, so nothing compiled with one ISA's flags can be
// shared with, or substituted for, another's by the linker.
// No #pragma once: each ISA translation unit includes it exactly once, in its own namespace.

constexpr int kVecsPerRow = kPanelWidth / kLanes;
static_assert(kPanelWidth % kLanes == 0, "panel width must be a multiple of the vector width");
static_assert(kPanelWidth <= 32, "candidate masks are 32-bit");

// ---------------------------------------------------------------------------------------
// Packing database panels: kLanes x kLanes blocks transposed in registers.
// ---------------------------------------------------------------------------------------

// 64-byte lines in one kLanes x kLanes block: the prefetches issued per column step.
constexpr int kPrefetchLinesPerStep = kLanes * kLanes / 16;

// Packs kLanes rows (the first `count` real, the rest zero) into kLanes columns of a panel
// whose rows are kPanelWidth floats apart; returns their squared norms (summed over d in
// order). kFull (count == kLanes) drops the per-row branches from the hot loop and
// prefetches the rows `prefetch_distance` ahead in address order, kPrefetchLinesPerStep
// lines per column step, which covers them by the last step (the loads themselves go
// column block by column block, which the hardware prefetchers follow poorly).
template <bool kFull>
inline Vec pack_block_rows(const float* x, int64_t count, int64_t dim, float* panel,
                           uintptr_t prefetch_distance) {
  Vec norms = vec_zero();
  for (int64_t c = 0; c < dim; c += kLanes) {
    const int64_t cols = dim - c < kLanes ? dim - c : kLanes;
    Vec r[kLanes];
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) {
      if (kFull) {
        if (i < kPrefetchLinesPerStep) {
          prefetch_ahead(x + (c / kLanes * kPrefetchLinesPerStep + i) * 16, prefetch_distance);
        }
        r[i] = vec_load_partial(x + i * dim + c, cols);
      } else {
        r[i] = i < count ? vec_load_partial(x + i * dim + c, cols) : vec_zero();
      }
    }
    transpose_block(r);
    if (cols == kLanes) {
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) {
        vec_store(panel + (c + j) * kPanelWidth, r[j]);
        norms = vec_fmadd(r[j], r[j], norms);
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        vec_store(panel + (c + j) * kPanelWidth, r[j]);
        norms = vec_fmadd(r[j], r[j], norms);
      }
    }
  }
  return norms;
}

void pack_rows(const float* x, int64_t rows, int64_t dim, float* panel, float* sq_norms) {
  const uintptr_t prefetch_distance = prefetch_distance_bytes(dim, kPanelWidth);
  for (int64_t first = 0; first < kPanelWidth; first += kLanes) {
    const int64_t count = rows - first < 0 ? 0 : (rows - first > kLanes ? kLanes : rows - first);
    const Vec norms =
        count == kLanes
            ? pack_block_rows<true>(x + first * dim, count, dim, panel + first, prefetch_distance)
            : pack_block_rows<false>(x + first * dim, count, dim, panel + first, 0);
    alignas(64) float lane_norms[kLanes];
    vec_store(lane_norms, norms);
    for (int64_t i = 0; i < count; ++i) sq_norms[first + i] = lane_norms[i];
  }
}

// ---------------------------------------------------------------------------------------
// Packed path: register-blocked inner products of query panels x database panels.
// ---------------------------------------------------------------------------------------

// rows x panel_width inner products of one query panel and one database panel, kept in
// registers over the whole dimension, then turned into keys and offered to the heaps.
template <int kRows>
inline void scan_query_panel(const float* query_panel, int64_t dim, const DatabasePanel& db,
                             const TopKHeaps& heaps, int64_t first_heap_row) {
  Vec acc[kRows][kVecsPerRow];
#pragma GCC unroll 32
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 8
    for (int w = 0; w < kVecsPerRow; ++w) acc[i][w] = vec_zero();

  const float* x = db.packed;
  const float* q = query_panel;
  for (int64_t d = 0; d < dim; ++d, x += kPanelWidth, q += kRows) {
    Vec xv[kVecsPerRow];
#pragma GCC unroll 8
    for (int w = 0; w < kVecsPerRow; ++w) xv[w] = vec_load(x + w * kLanes);
#pragma GCC unroll 32
    for (int i = 0; i < kRows; ++i) {
      const Vec qv = vec_broadcast(q + i);
#pragma GCC unroll 8
      for (int w = 0; w < kVecsPerRow; ++w) acc[i][w] = vec_fmadd(qv, xv[w], acc[i][w]);
    }
  }

  Vec scale[kVecsPerRow], offset[kVecsPerRow];
#pragma GCC unroll 8
  for (int w = 0; w < kVecsPerRow; ++w) {
    scale[w] = vec_load(db.key_scale + w * kLanes);
    offset[w] = vec_load(db.key_offset + w * kLanes);
  }
  const uint32_t valid_mask =
      db.valid >= 32 ? 0xFFFFFFFFu : ((uint32_t{1} << db.valid) - 1u);

#pragma GCC unroll 32
  for (int i = 0; i < kRows; ++i) {
    const int64_t row = first_heap_row + i;
    const Vec threshold = vec_set1(heaps.thresholds[row]);
    Vec key[kVecsPerRow];
    uint32_t candidates = 0;
#pragma GCC unroll 8
    for (int w = 0; w < kVecsPerRow; ++w) {
      key[w] = vec_fmadd(acc[i][w], scale[w], offset[w]);
      candidates |= vec_less_mask(key[w], threshold) << (w * kLanes);
    }
    candidates &= valid_mask;
    if (candidates) {  // rare once the heaps have filled up
      alignas(64) float keys[kPanelWidth];
#pragma GCC unroll 8
      for (int w = 0; w < kVecsPerRow; ++w) vec_store(keys + w * kLanes, key[w]);
      topk_offer(heaps, row, keys, candidates, db.first_id);
    }
  }
}

// Picks the kernel instantiated for exactly `rows` query rows (1..kMaxPanelRows).
template <int kRows>
inline void scan_query_panel_dispatch(int64_t rows, const float* query_panel, int64_t dim,
                                      const DatabasePanel& db, const TopKHeaps& heaps,
                                      int64_t first_heap_row) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      scan_query_panel<kRows>(query_panel, dim, db, heaps, first_heap_row);
    } else {
      scan_query_panel_dispatch<kRows - 1>(rows, query_panel, dim, db, heaps, first_heap_row);
    }
  }
}

void scan(const QueryPanels& queries, const DatabasePanel& db, const TopKHeaps& heaps) {
  for (int64_t p = 0; p < queries.num_panels; ++p) {
    const int64_t first_row = panel_first_row(queries, p);
    scan_query_panel_dispatch<kMaxPanelRows>(panel_rows(queries, p),
                                             queries.packed + first_row * queries.dim,
                                             queries.dim, db, heaps, first_row);
  }
}

void pack_query_panel(const float* q, int64_t rows, int64_t dim, float* panel) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < dim; ++d) panel[d * rows + i] = q[i * dim + d];
}
