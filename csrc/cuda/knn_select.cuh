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

// ---- one warp, one list (opt-in: LATENTSPACE_CUDA_WARP_CUT_BACKS, knn_scan.cuh) ----------
// The same radix select and compaction as above, by the 32 lanes of one warp over one list, so
// that the 8 warps of a block cut back 8 queries' lists at once with no block-wide barrier.

constexpr int kWarpHistogramBins = 256;  // one 8-bit digit; a warp's histogram is 1 KiB

// The rank-th smallest key (1-based) of keys[0, count), rank <= count; every lane of the warp
// calls it and gets the same key. histogram: the warp's own 256 counters in shared memory,
// 16-byte aligned.
__device__ inline uint64_t warp_select(const uint64_t* keys, int count, int rank, unsigned* histogram) {
  constexpr unsigned kAll = 0xFFFFFFFFu;
  const int lane = threadIdx.x % 32;
  uint64_t prefix = 0, mask = 0;
  int remaining = rank;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int bin = lane; bin < kWarpHistogramBins; bin += 32) histogram[bin] = 0;
    __syncwarp();
    for (int i = lane; i < count; i += 32) {
      const uint64_t key = keys[i];
      const unsigned digit = (key & mask) == prefix ? static_cast<unsigned>(key >> shift) & 0xFFu : 0x100u;
      const unsigned same = __match_any_sync(__activemask(), digit);  // (lanes past count left the loop)
      if (digit != 0x100u && lane == __ffs(same) - 1) atomicAdd(&histogram[digit], static_cast<unsigned>(__popc(same)));
    }
    __syncwarp();
    // Lane l owns bins 8 l .. 8 l + 7: a scan over the lanes' sums finds the lane, then the bin,
    // whose range holds the remaining rank (exactly one lane's range holds it). Read as two
    // 16-byte loads: word by word, 8 lanes would hit each bank at once.
    const uint4* mine = reinterpret_cast<const uint4*>(histogram + 8 * lane);  // (1 KiB aligned)
    const uint4 low = mine[0], high = mine[1];
    const unsigned bins[8] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
    unsigned sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) sum += bins[j];
    unsigned through = sum;  // inclusive prefix sum over the lanes
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const unsigned before = __shfl_up_sync(kAll, through, offset);
      if (lane >= offset) through += before;
    }
    unsigned below = through - sum;
    const bool holds = below < static_cast<unsigned>(remaining) && static_cast<unsigned>(remaining) <= through;
    int digit = 0, next_remaining = 0, matching = 0;
    if (holds) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (matching == 0 && static_cast<unsigned>(remaining) <= below + bins[j]) {
          digit = 8 * lane + j, next_remaining = remaining - static_cast<int>(below), matching = static_cast<int>(bins[j]);
        }
        below += bins[j];
      }
    }
    const int owner = __ffs(__ballot_sync(kAll, holds)) - 1;
    digit = __shfl_sync(kAll, digit, owner);
    remaining = __shfl_sync(kAll, next_remaining, owner);
    matching = __shfl_sync(kAll, matching, owner);
    prefix |= uint64_t(digit) << shift;
    mask |= uint64_t{0xFF} << shift;
    __syncwarp();  // every lane has read the histogram before the next pass clears it
    if (matching == 1 && shift > 0) {
      // One key has these leading digits: it is the answer (as in block_select).
      uint64_t found = 0;
      bool mine = false;
      for (int i = lane; i < count; i += 32) {
        const uint64_t key = keys[i];
        if ((key & mask) == prefix) found = key, mine = true;
      }
      return __shfl_sync(kAll, found, __ffs(__ballot_sync(kAll, mine)) - 1);
    }
  }
  return prefix;
}

// Moves the keys <= limit of keys[0, count) to its front, in order, in place; returns how many.
// Every lane of the warp calls it. In place is safe: a chunk of 32 is read (and voted on)
// before any of it is written, and a key moves only towards the front.
__device__ inline int warp_compact(uint64_t* keys, int count, uint64_t limit) {
  const int lane = threadIdx.x % 32;
  int written = 0;
  for (int start = 0; start < count; start += 32) {
    const int i = start + lane;
    const uint64_t key = i < count ? keys[i] : kEmptyKey;
    const bool keep = i < count && key <= limit;
    const unsigned kept = __ballot_sync(0xFFFFFFFFu, keep);
    if (keep) keys[written + __popc(kept & ((1u << lane) - 1u))] = key;
    written += __popc(kept);
  }
  __syncwarp();  // the moved keys are visible to the whole warp
  return written;
}

}  // namespace latentspace::cuda
