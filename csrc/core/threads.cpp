#include "core/threads.h"

#include <omp.h>
#include <pthread.h>

#include <atomic>

#include "core/check.h"

namespace latentspace {
namespace {
// 0 until first use, then the count. Constant-initialised, so the fork handler below can
// write it whenever it runs.
std::atomic<int> g_count{0};

// GNU OpenMP cannot start a team in a child forked after its parent ran one (the parent's
// thread pool, which the child inherits the bookkeeping of, has no threads there): the
// child's first parallel region would wait forever. That is multiprocessing's default start
// method on Linux, so a forked child starts with one thread (as torch's DataLoader workers do).
void start_forked_child_with_one_thread() { g_count.store(1, std::memory_order_relaxed); }

// Registered when the module is loaded.
const int g_fork_handler = pthread_atfork(nullptr, nullptr, &start_forked_child_with_one_thread);
}  // namespace

int num_threads() {
  (void)g_fork_handler;
  const int count = g_count.load(std::memory_order_relaxed);
  if (count > 0) return count;
  // OpenMP's default (so OMP_NUM_THREADS counts), unless a set_num_threads came first.
  const int initial = omp_get_max_threads() > 0 ? omp_get_max_threads() : 1;
  int unset = 0;
  g_count.compare_exchange_strong(unset, initial, std::memory_order_relaxed);
  return g_count.load(std::memory_order_relaxed);
}

void set_num_threads(int n) {
  LS_CHECK_VALUE(n >= 1, "n: the thread count must be >= 1, got ", n);
  g_count.store(n, std::memory_order_relaxed);
}

}  // namespace latentspace
