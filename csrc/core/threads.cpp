#include "core/threads.h"

#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

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

// OMP_NUM_THREADS's first count, or 0 unless the whole value is a list of positive integers
// (one per nesting level, commas between, spaces allowed): libgomp ignores a value with any
// bad item ("4,abc" included) and we do the same.
int omp_num_threads_setting() {
  const char* text = std::getenv("OMP_NUM_THREADS");
  if (text == nullptr) return 0;
  long first = 0;
  for (int item = 0;; ++item) {
    while (std::isspace(static_cast<unsigned char>(*text))) ++text;
    if (*text == '+') ++text;  // as libgomp's strtoul; a sign of "-" makes the value bad
    if (!std::isdigit(static_cast<unsigned char>(*text))) return 0;
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    if (value < 1 || value > std::numeric_limits<int>::max()) return 0;
    if (item == 0) first = value;
    text = end;
    while (std::isspace(static_cast<unsigned char>(*text))) ++text;
    if (*text == '\0') return static_cast<int>(first);
    if (*text++ != ',') return 0;
  }
}

// The processors the process may run on: the main thread's affinity (its thread id is the
// pid), not the calling thread's, which omp_get_num_procs() reads (a pool thread pinned to
// one CPU that made the first call would set the whole process to one thread). Where
// OMP_PLACES or GOMP_CPU_AFFINITY bind OpenMP's threads, OpenMP's own count is kept.
int process_processor_count() {
  if (std::getenv("OMP_PLACES") != nullptr || std::getenv("GOMP_CPU_AFFINITY") != nullptr) {
    return std::max(1, omp_get_num_procs());
  }
  const int configured = std::max(1, static_cast<int>(sysconf(_SC_NPROCESSORS_CONF)));
  cpu_set_t* set = CPU_ALLOC(configured);
  const size_t size = CPU_ALLOC_SIZE(configured);
  int count = 0;
  if (set != nullptr && sched_getaffinity(getpid(), size, set) == 0) count = CPU_COUNT_S(size, set);
  if (set != nullptr) CPU_FREE(set);
  return count > 0 ? count : std::max(1, omp_get_num_procs());
}

// The count OpenMP starts a program with: OMP_NUM_THREADS, else the processors the process
// may run on. Read from those, not from omp_get_max_threads(): torch shares our libgomp, so a
// torch.set_num_threads(1) made before our first use would otherwise become our default too.
int openmp_default_thread_count() {
  const int setting = omp_num_threads_setting();
  return setting > 0 ? setting : process_processor_count();
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
