#include "core/interrupt.h"

#include <time.h>

namespace latentspace {
namespace {
// The poll the bindings installed for the call this thread is making (one per thread: any
// number of Python threads may run native calls at once).
thread_local InterruptPoll t_poll = nullptr;

// Nanoseconds on a monotonic clock. The coarse clock (a few ms of resolution, ample for a
// 100 ms interval) reads in a few nanoseconds: the calling thread asks once per unit of work,
// and a unit can be as small as a microsecond (a packed panel of a few queries).
int64_t coarse_now_ns() {
#ifdef CLOCK_MONOTONIC_COARSE
  timespec now;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
#else
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
#endif
}

constexpr int64_t kPollIntervalNs = std::chrono::nanoseconds(Interruption::kPollInterval).count();
}  // namespace

InterruptPollScope::InterruptPollScope(InterruptPoll poll) : previous_(t_poll) { t_poll = poll; }

InterruptPollScope::~InterruptPollScope() { t_poll = previous_; }

Interruption::Interruption()
    : poll_(t_poll),
      calling_thread_(std::this_thread::get_id()),
      next_poll_ns_(coarse_now_ns() + kPollIntervalNs) {}

bool Interruption::requested() {
  if (stopped()) return true;
  if (poll_ == nullptr || std::this_thread::get_id() != calling_thread_) return false;
  const int64_t now = coarse_now_ns();
  if (now < next_poll_ns_) return false;
  next_poll_ns_ = now + kPollIntervalNs;
  if (!poll_()) return false;
  stop_.store(true, std::memory_order_relaxed);
  return true;
}

}  // namespace latentspace
