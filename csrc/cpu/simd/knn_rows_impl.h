// Row path shared by the AVX2 and scalar kernels: one to a few queries scanned against
// database rows where they lie, without packing. (The AVX-512 table reuses the AVX2 row path;
// knn_avx512.cpp says why.)
//
// Include this inside an anonymous namespace of the ISA translation unit, after its vector
// primitives (vec_*.h) and its kRowPathCapacity, like knn_tile_impl.h.
// No #pragma once: each ISA translation unit includes it exactly once, in its own namespace.

constexpr int kRowBlock = kLanes;  // rows per step: their keys fill one vector

// One row against up to kRowPathCapacity queries in a single pass: the row's squared norm and
// its inner products, as per-lane partial sums (lane j sums the components d = j mod kLanes,
// in order of d). Row by row, front to back, so memory is read in address order, which the
// hardware prefetchers follow. kWeighted: also sum_d w_d x_d^2 (weighted_l2's norm) into
// *weighted_norm; the plain norm decides whether the row is usable (a zero weight hides no NaN)
// and the weighted one must be usable too (large weights can overflow it), as on the packed path.
template <int kQueries, bool kWeighted>
inline void row_dots(const float* row, const float* queries, int64_t dim, const float* weights, Vec* norm,
                     Vec* weighted_norm, Vec* dots) {
  Vec n = vec_zero(), nw = vec_zero();
  Vec p[kQueries];
#pragma GCC unroll 16
  for (int r = 0; r < kQueries; ++r) p[r] = vec_zero();
  int64_t c = 0;
#pragma GCC unroll 8
  for (; c + kLanes <= dim; c += kLanes) {
    const Vec a = vec_load(row + c);
    n = vec_fmadd(a, a, n);
    if constexpr (kWeighted) nw = vec_fmadd(vec_mul(a, vec_load(weights + c)), a, nw);
#pragma GCC unroll 16
    for (int r = 0; r < kQueries; ++r) p[r] = vec_fmadd(a, vec_load(queries + r * dim + c), p[r]);
  }
  if (c < dim) {
    const Vec a = vec_load_partial(row + c, dim - c);
    n = vec_fmadd(a, a, n);
    if constexpr (kWeighted) nw = vec_fmadd(vec_mul(a, vec_load_partial(weights + c, dim - c)), a, nw);
#pragma GCC unroll 16
    for (int r = 0; r < kQueries; ++r) {
      p[r] = vec_fmadd(a, vec_load_partial(queries + r * dim + c, dim - c), p[r]);
    }
  }
  *norm = n;
  if constexpr (kWeighted) *weighted_norm = nw;
#pragma GCC unroll 16
  for (int r = 0; r < kQueries; ++r) dots[r * kRowBlock] = p[r];
}

// Lanes whose squared norm is not usable: NaN, or above kMaxSquaredNorm (the vector form of
// ops/norms.h's usable_squared_norm).
inline uint32_t unusable_lanes(Vec squared_norms) {
  return vec_nan_mask(squared_norms) | vec_less_mask(vec_set1(kMaxSquaredNorm), squared_norms);
}

template <int kQueries, bool kWeighted>
int64_t scan_rows_for(const float* queries, const float* database, int64_t begin, int64_t end,
                      int64_t dim, Metric metric, const float* weights, const TopKHeaps& heaps) {
  Vec norm_parts[kRowBlock], weighted_parts[kRowBlock], dot_parts[kQueries * kRowBlock];
  alignas(64) float keys[kRowBlock];
  for (int64_t first = begin; first < end; first += kRowBlock) {
    const int64_t count = end - first < kRowBlock ? end - first : kRowBlock;
    const float* rows = database + first * dim;
    for (int64_t i = 0; i < count; ++i) {
      row_dots<kQueries, kWeighted>(rows + i * dim, queries, dim, weights, &norm_parts[i], &weighted_parts[i],
                                    &dot_parts[i]);
    }
    for (int64_t i = count; i < kRowBlock; ++i) {
      norm_parts[i] = weighted_parts[i] = vec_zero();
      for (int r = 0; r < kQueries; ++r) dot_parts[r * kRowBlock + i] = vec_zero();
    }
    const uint32_t valid = count >= 32 ? 0xFFFFFFFFu : ((uint32_t{1} << count) - 1u);
    const Vec norms = reduce_lanes(norm_parts);
    uint32_t unusable = unusable_lanes(norms) & valid;
    Vec l2_offsets = norms;  // |x|^2, or weighted_l2's |x|_w^2, which must be usable too
    if constexpr (kWeighted) {
      l2_offsets = reduce_lanes(weighted_parts);
      unusable |= unusable_lanes(l2_offsets) & valid;
    }
    if (unusable) return first + __builtin_ctz(unusable);
    // Same transform as the packed path's set_key_transform (cpu/knn.cpp), one vector of rows
    // at a time: key = scale * <q, x> + offset. Padding lanes give keys the `valid` mask drops.
    Vec scale_v = vec_zero(), offset_v = vec_zero();
    switch (metric) {
      case Metric::kL2:
        scale_v = vec_set1(-2.0f);
        offset_v = l2_offsets;
        break;
      case Metric::kInnerProduct:
        scale_v = vec_set1(-1.0f);
        break;
      case Metric::kCosine:
        scale_v = vec_select(vec_less_mask(vec_zero(), norms), vec_div(vec_set1(-1.0f), vec_sqrt(norms)),
                             vec_zero());
        break;
    }
    for (int r = 0; r < kQueries; ++r) {
      const Vec key = vec_fmadd(reduce_lanes(dot_parts + r * kRowBlock), scale_v, offset_v);
      const uint32_t candidates = vec_less_mask(key, vec_set1(heaps.thresholds[r])) & valid;
      if (candidates) {
        vec_store(keys, key);
        topk_offer(heaps, r, keys, candidates, first);
      }
    }
  }
  return -1;
}

template <int kQueries>
inline int64_t scan_rows_dispatch(const float* queries, int64_t num_queries,
                                  const float* database, int64_t begin, int64_t end, int64_t dim,
                                  Metric metric, const float* weights, const TopKHeaps& heaps) {
  if constexpr (kQueries > 1) {
    if (num_queries < kQueries) {
      return scan_rows_dispatch<kQueries - 1>(queries, num_queries, database, begin, end, dim,
                                              metric, weights, heaps);
    }
  }
  return weights ? scan_rows_for<kQueries, true>(queries, database, begin, end, dim, metric, weights, heaps)
                 : scan_rows_for<kQueries, false>(queries, database, begin, end, dim, metric, weights, heaps);
}

int64_t scan_rows(const float* queries, int64_t num_queries, const float* database,
                  int64_t begin, int64_t end, int64_t dim, Metric metric, const float* weights,
                  const TopKHeaps& heaps) {
  return scan_rows_dispatch<kRowPathCapacity>(queries, num_queries, database, begin, end, dim,
                                            metric, weights, heaps);
}
