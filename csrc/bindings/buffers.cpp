// Large output buffers backed by transparent huge pages.
//
// A freshly allocated 25 MB gradient costs more to fault in, 4 KiB page by 4 KiB page, than
// the loss kernel takes to fill it (measured: 3-20 ms of first-touch faults against ~1 ms of
// writing). Buffers from here are 2 MiB aligned and marked MADV_HUGEPAGE, so the kernel
// faults them in 2 MiB at a time; numpy owns them through a capsule. A training loop asks
// for the same size every step, and glibc would unmap and remap such a block each time
// (faulting it in again), so freed buffers go to a small cache (kCachedBuffers blocks, at
// most kCacheBytes in all) from which the next request of that size is served.
//
// Long-lived buffers (FlatIndex's vectors) ask for cached=false: they are freed straight
// away, since a cache would keep an index's old, outgrown buffers alive. What they gain is
// mostly the alignment: numpy's own large arrays start 16 bytes past a page (and numpy
// already asks for huge pages for them), so every 64-byte load of a row spans two cache
// lines; a single-query search over such a buffer reads ~5% slower than over an aligned one
// (docs/benchmarks.md, "Q = 1 and buffer alignment").
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "core/check.h"

namespace latentspace::bindings {

namespace py = pybind11;

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kCachedBuffers = 4;
constexpr size_t kCacheBytes = size_t{512} << 20;

// A block and its size, remembered so the capsule can hand it back to the cache.
struct Block {
  void* data;
  size_t bytes;
};

class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].bytes == bytes) {
        void* data = free_[i].data;
        cached_bytes_ -= bytes;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        return data;
      }
    }
    return nullptr;
  }
  void give_back(Block block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kCachedBuffers && cached_bytes_ + block.bytes <= kCacheBytes) {
        free_.push_back(block);
        cached_bytes_ += block.bytes;
        return;
      }
    }
    std::free(block.data);
  }

 private:
  std::mutex mutex_;
  std::vector<Block> free_;
  size_t cached_bytes_ = 0;
};

BlockCache& cache() {
  static BlockCache* instance = new BlockCache();  // never destroyed: capsules may outlive exit
  return *instance;
}

template <class T>
py::array_t<T> empty_huge(int64_t rows, int64_t cols, bool cached) {
  LS_CHECK_VALUE(rows >= 0 && cols >= 0, "shape: expected non-negative sizes");
  // More bytes than an int64 counts (the product would wrap, and the rounding up below too):
  // no allocator could give them, so say so as an allocator would.
  if (cols > 0 && rows > static_cast<int64_t>((PTRDIFF_MAX - kHugePage) / sizeof(T)) / cols) throw std::bad_alloc();
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * sizeof(T);
  const size_t rounded = std::max(kHugePage, (bytes + kHugePage - 1) / kHugePage * kHugePage);
  void* data = cached ? cache().take(rounded) : nullptr;
  if (data == nullptr) {
    data = std::aligned_alloc(kHugePage, rounded);
    if (data == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(data, rounded, MADV_HUGEPAGE);  // a hint: failure only costs speed
#endif
  }
  if (!cached) {
    py::capsule owner(data, [](void* p) { std::free(p); });
    return py::array_t<T>({rows, cols}, static_cast<T*>(data), owner);
  }
  Block* block = new Block{data, rounded};
  py::capsule owner(block, [](void* p) {
    Block* b = static_cast<Block*>(p);
    cache().give_back(*b);
    delete b;
  });
  return py::array_t<T>({rows, cols}, static_cast<T*>(data), owner);
}
}  // namespace

void bind_buffers(py::module_& m) {
  m.def("empty_huge_float32", &empty_huge<float>, py::arg("rows"), py::arg("cols"), py::arg("cached") = true,
        "Uninitialised (rows, cols) float32 array on 2 MiB-aligned, MADV_HUGEPAGE memory "
        "(cached=False: freed at once, never kept for reuse).");
  m.def("empty_huge_float64", &empty_huge<double>, py::arg("rows"), py::arg("cols"), py::arg("cached") = true,
        "Uninitialised (rows, cols) float64 array on 2 MiB-aligned, MADV_HUGEPAGE memory "
        "(cached=False: freed at once, never kept for reuse).");
}

}  // namespace latentspace::bindings
