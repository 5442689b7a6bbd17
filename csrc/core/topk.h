// Bounded per-query selection of the k best (smallest-key) candidates.
//
// Every metric is reduced to a key where smaller is better (l2: |x|^2 - 2<q,x>;
// ip and cosine: the negated similarity), so one selection serves all of them.
// Order is by (key, id): equal keys go to the lower id, which is how "ties go to the
// lower index" holds across threads and tiles.
//
// This file is compiled for the baseline CPU only. The SIMD kernels reach it through
// plain data (TopKHeaps) and the out-of-line topk_offer(), so no inline function compiled
// with AVX-512 flags can be picked by the linker for a CPU without it.
#pragma once

#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace latentspace {

// Id of an empty heap slot: sorts after every real id; reported to users as -1.
constexpr int64_t kEmptySlotId = std::numeric_limits<int64_t>::max();

// `rows` max-heaps of capacity k, worst candidate on top. Plain data, owned elsewhere.
struct TopKHeaps {
  int64_t k = 0;
  float* thresholds = nullptr;  // [rows]: key of each heap's top (+inf until the heap is full)
  float* keys = nullptr;        // [rows * k]
  int64_t* ids = nullptr;       // [rows * k]
};

// Storage for TopKHeaps; reset() fills every slot with (+inf, kEmptySlotId).
class TopKStorage {
 public:
  void reset(int64_t rows, int64_t k);
  TopKHeaps view();

 private:
  int64_t k_ = 0;
  std::vector<float> thresholds_;
  std::vector<float> keys_;
  std::vector<int64_t> ids_;
};

// Offers candidates to heap `row`: for every set bit j of `mask`, (keys[j], first_id + j).
// Rarely called: the SIMD kernels only call it when some key beats the row's threshold.
void topk_offer(const TopKHeaps& heaps, int64_t row, const float* keys, uint32_t mask,
                int64_t first_id);

using KeyId = std::pair<float, int64_t>;

// Merges row `row` of `parts` heaps into the best `k_out` (key, id) pairs, ascending.
// Slots that stay empty get key +inf and id kEmptySlotId. `scratch` holds at least
// num_parts * k entries (passed in so that no allocation happens inside OpenMP regions).
void topk_merge_row(const TopKHeaps* parts, int num_parts, int64_t row, int64_t k_out,
                    KeyId* scratch, float* out_keys, int64_t* out_ids);

}  // namespace latentspace
