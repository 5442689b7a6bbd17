#include "core/threads.h"

#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <limits>

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

// The count OpenMP starts a program with: OMP_NUM_THREADS's first value (a list names one
// count per nesting level) if it is a positive integer, else the processors this process may
// run on. Read from those, not from omp_get_max_threads(): torch shares our libgomp, so a
// torch.set_num_threads(1) made before our first use would otherwise become our default too.
int openmp_default_thread_count() {
  if (const char* value = std::getenv("OMP_NUM_THREADS")) {
    const char* text = value;
    while (std::isspace(static_cast<unsigned char>(*text))) ++text;
    char* end = nullptr;
    const long first = std::strtol(text, &end, 10);
    while (end != text && std::isspace(static_cast<unsigned char>(*end))) ++end;
    const bool whole = end != text && (*end == '\0' || *end == ',');
    if (whole && first >= 1 && first <= std::numeric_limits<int>::max()) return static_cast<int>(first);
  }
  return std::max(1, omp_get_num_procs());
}
}  // namespace

int num_threads() {
  (void)g_fork_handler;
  const int count = g_count.load(std::memory_order_relaxed);
  if (count > 0) return count;
  const int initial = openmp_default_thread_count();
  int unset = 0;
  g_count.compare_exchange_strong(unset, initial, std::memory_order_relaxed);
  return g_count.load(std::memory_order_relaxed);
}

void set_num_threads(int n) {
  LS_CHECK_VALUE(n >= 1, "n: the thread count must be >= 1, got ", n);
  g_count.store(n, std::memory_order_relaxed);
}

}  // namespace latentspace
