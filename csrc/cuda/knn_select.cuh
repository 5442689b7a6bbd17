// Top-k selection pieces of the CUDA kNN: candidate keys, and a thread block's radix select and
// in-place compaction over candidate lists in device memory.
//
// A candidate is one 64-bit key: the high 32 bits are the score mapped to an unsigned integer
// with the same order ("smaller is better": the squared distance, or minus the similarity), the
// low 32 bits the database index. Keys are unique and their order is exactly the result order
// (score, then lower index first), so selecting the k smallest keys gives faiss's result with
// ties to the lower index, and no comparison ever looks at a float.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

namespace latentspace::cuda {

constexpr uint64_t kEmptyKey = ~uint64_t{0};  // sorts last; decodes to index -1

__host__ __device__ inline uint32_t order_preserving_bits(float value) {
  value += 0.0f;  // -0 -> +0: equal scores must differ only by index
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__host__ __device__ inline float from_order_preserving_bits(uint32_t ordered) {
  const uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7FFFFFFFu) : ~ordered;
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

__host__ __device__ inline uint64_t make_key(float score, uint32_t index) {
  return (uint64_t{order_preserving_bits(score)} << 32) | index;
}

// Every block that selects has exactly this many threads: one per 8-bit digit.
constexpr int kSelectThreads = 256;

struct SelectShared {
  unsigned int histogram[256];
  uint64_t prefix;
  int remaining;
  int matching;  // keys that share the prefix found so far
  typename cub::BlockScan<int, kSelectThreads>::TempStorage scan;
};

// Candidate lists of one query: `segments` lists, segment s at keys + s * stride, lengths[s]
// keys long, each at most max_length (one list in the scan kernel, one per database split in
// the merge kernel). The block walks the flattened (segment, position) space, so many short
// lists (a single query against hundreds of splits) keep every thread busy.
struct CandidateLists {
  uint64_t* keys;
  const int* lengths;
  int segments;
  int64_t stride;
  int max_length;
  // Below 2^32: the lists of one query hold at most about the database's rows (< 2^31).
  __device__ uint32_t slots() const { return static_cast<uint32_t>(segments) * static_cast<uint32_t>(max_length); }
  // The key in slot i (segment i / max_length, position i % max_length), or kEmptyKey when
  // that position is past its segment's length.
  __device__ uint64_t key_at(uint32_t i) const {
    if (segments == 1) return static_cast<int>(i) < lengths[0] ? keys[i] : kEmptyKey;
    const uint32_t s = i / static_cast<uint32_t>(max_length), position = i - s * static_cast<uint32_t>(max_length);
    return static_cast<int>(position) < lengths[s] ? keys[s * stride + position] : kEmptyKey;
  }
};

// The rank-th smallest key (1-based) of the lists, rank <= total length; all threads of the
// block call it and get the same key. Eight passes of 8-bit digits from the top: each pass
// counts, among the keys that share the digits found so far, how many have each next digit;
// once a single key has the digits found, one more pass fetches it.
__device__ inline uint64_t block_select(const CandidateLists& lists, int rank, SelectShared& shared) {
  uint64_t prefix = 0, mask = 0;
  int remaining = rank;
  for (int shift = 56; shift >= 0; shift -= 8) {
    shared.histogram[threadIdx.x] = 0;
    __syncthreads();
    const uint32_t slots = lists.slots();
    for (uint32_t i = threadIdx.x; i < slots; i += blockDim.x) {
      const uint64_t key = lists.key_at(i);  // an empty slot never matches: rank <= total length
      // Keys close in value share their leading digits: one atomic per digit per warp (the
      // lowest lane of each group of equal digits adds the group's size), not one per key.
      const unsigned digit = key != kEmptyKey && (key & mask) == prefix ? static_cast<unsigned>(key >> shift) & 0xFFu
                                                                         : 0x100u;
      const unsigned same = __match_any_sync(__activemask(), digit);
      if (digit != 0x100u && (threadIdx.x % 32) == static_cast<unsigned>(__ffs(same) - 1)) {
        atomicAdd(&shared.histogram[digit], static_cast<unsigned>(__popc(same)));
      }
    }
    __syncthreads();
    // Thread t owns digit t: the prefix sum over the bins finds the one digit whose range holds
    // the remaining rank (exactly one thread sees below < remaining <= below + count).
    const int count = static_cast<int>(shared.histogram[threadIdx.x]);
    int below;
    cub::BlockScan<int, kSelectThreads>(shared.scan).ExclusiveSum(count, below);
    if (below < remaining && remaining <= below + count) {
      shared.prefix = prefix | (uint64_t(threadIdx.x) << shift);
      shared.remaining = remaining - below;
      shared.matching = count;
    }
    __syncthreads();
    prefix = shared.prefix;
    remaining = shared.remaining;
    mask |= uint64_t{0xFF} << shift;
    const bool unique = shared.matching == 1;
    __syncthreads();  // everyone has read shared.prefix before the next pass may write it
    if (unique && shift > 0) {
      // One key has these leading digits (distinct scores usually part within 3 digits): it
      // is the answer, and one pass finds it instead of the remaining digit passes.
      for (uint32_t i = threadIdx.x; i < lists.slots(); i += blockDim.x) {
        const uint64_t key = lists.key_at(i);
        if (key != kEmptyKey && (key & mask) == prefix) shared.prefix = key;  // the only writer
      }
      __syncthreads();
      prefix = shared.prefix;
      __syncthreads();  // read before anyone's next select may write it
      return prefix;
    }
  }
  return prefix;
}

// Moves the keys <= limit of the lists to out[0..), in slot order; returns how many. out may
// be the first list's own storage (in place) when each list's stride is at least max_length
// (always so for a single list): slot i lies at or after keys + i, a key is written at or
// before its slot, and a chunk is read completely before any of it is written.
__device__ inline int block_compact(const CandidateLists& lists, uint64_t limit, uint64_t* out,
                                    SelectShared& shared) {
  using Scan = cub::BlockScan<int, kSelectThreads>;
  int written = 0;
  const uint32_t slots = lists.slots();
  for (uint32_t start = 0; start < slots; start += kSelectThreads) {
    const uint32_t i = start + threadIdx.x;
    const uint64_t key = i < slots ? lists.key_at(i) : kEmptyKey;
    const int keep = key != kEmptyKey && key <= limit ? 1 : 0;
    int offset, total;
    Scan(shared.scan).ExclusiveSum(keep, offset, total);
    __syncthreads();  // the chunk is read (and the scan storage free) before writes
    if (keep) out[written + offset] = key;
    written += total;
    __syncthreads();
  }
  return written;
}

// The k best keys of the lists to out[0..kept), in slot order, unsorted; returns kept =
// min(k, keys there). All threads of the block call it. out may be the first list's own
// storage (in place, as block_compact allows: each list's stride is at least max_length).
__device__ inline int select_best_keys(const CandidateLists& lists, int k, uint64_t* out, SelectShared& shared) {
  int mine = 0, before = 0, total = 0;
  for (int s = threadIdx.x; s < lists.segments; s += blockDim.x) mine += lists.lengths[s];
  cub::BlockScan<int, kSelectThreads>(shared.scan).ExclusiveSum(mine, before, total);
  __syncthreads();  // the scan storage is reused by the select
  const uint64_t limit = total <= k ? kEmptyKey : block_select(lists, k, shared);
  return block_compact(lists, limit, out, shared);
}

}  // namespace latentspace::cuda
