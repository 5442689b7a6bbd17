#include "core/topk.h"

#include <algorithm>

namespace latentspace {
namespace {

inline bool worse(float a_key, int64_t a_id, float b_key, int64_t b_id) {
  return a_key > b_key || (a_key == b_key && a_id > b_id);
}

// Replaces the top (worst) entry of one heap and restores the heap order.
void replace_top(float* keys, int64_t* ids, int64_t k, float key, int64_t id) {
  int64_t i = 0;
  while (true) {
    int64_t child = 2 * i + 1;
    if (child >= k) break;
    if (child + 1 < k && worse(keys[child + 1], ids[child + 1], keys[child], ids[child])) ++child;
    if (!worse(keys[child], ids[child], key, id)) break;
    keys[i] = keys[child];
    ids[i] = ids[child];
    i = child;
  }
  keys[i] = key;
  ids[i] = id;
}

}  // namespace

void TopKStorage::reset(int64_t rows, int64_t k) {
  k_ = k;
  thresholds_.assign(static_cast<size_t>(rows), std::numeric_limits<float>::infinity());
  keys_.assign(static_cast<size_t>(rows * k), std::numeric_limits<float>::infinity());
  ids_.assign(static_cast<size_t>(rows * k), kEmptySlotId);
}

TopKHeaps TopKStorage::view() {
  TopKHeaps heaps;
  heaps.k = k_;
  heaps.thresholds = thresholds_.data();
  heaps.keys = keys_.data();
  heaps.ids = ids_.data();
  return heaps;
}

void topk_offer(const TopKHeaps& heaps, int64_t row, const float* keys, uint32_t mask,
                int64_t first_id) {
  float* heap_keys = heaps.keys + row * heaps.k;
  int64_t* heap_ids = heaps.ids + row * heaps.k;
  while (mask) {
    const int j = __builtin_ctz(mask);
    mask &= mask - 1;
    const int64_t id = first_id + j;
    if (worse(heap_keys[0], heap_ids[0], keys[j], id)) {
      replace_top(heap_keys, heap_ids, heaps.k, keys[j], id);
    }
  }
  heaps.thresholds[row] = heap_keys[0];
}

void topk_merge_row(const TopKHeaps* parts, int num_parts, int64_t row, int64_t k_out,
                    KeyId* scratch, float* out_keys, int64_t* out_ids) {
  int64_t count = 0;
  for (int p = 0; p < num_parts; ++p) {
    const float* keys = parts[p].keys + row * parts[p].k;
    const int64_t* ids = parts[p].ids + row * parts[p].k;
    for (int64_t j = 0; j < parts[p].k; ++j) {
      if (ids[j] != kEmptySlotId) scratch[count++] = KeyId(keys[j], ids[j]);
    }
  }
  const int64_t kept = std::min<int64_t>(k_out, count);
  std::partial_sort(scratch, scratch + kept, scratch + count);
  for (int64_t j = 0; j < kept; ++j) {
    out_keys[j] = scratch[j].first;
    out_ids[j] = scratch[j].second;
  }
  for (int64_t j = kept; j < k_out; ++j) {
    out_keys[j] = std::numeric_limits<float>::infinity();
    out_ids[j] = kEmptySlotId;
  }
}

}  // namespace latentspace
