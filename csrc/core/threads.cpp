#include "core/threads.h"

#include <omp.h>

#include <atomic>

#include "core/check.h"

namespace latentspace {
namespace {
std::atomic<int>& storage() {
  static std::atomic<int> count{omp_get_max_threads() > 0 ? omp_get_max_threads() : 1};
  return count;
}
}  // namespace

int num_threads() { return storage().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  LS_CHECK_VALUE(n >= 1, "n: the thread count must be >= 1, got ", n);
  storage().store(n, std::memory_order_relaxed);
}

}  // namespace latentspace
