// Ctrl-C for long native calls: a cooperative stop that kernels check between units of work.
//
// Python's SIGINT handler only sets a flag that the interpreter acts on while it holds the
// GIL; a native search that runs for minutes with the GIL released would ignore Ctrl-C until
// it ends (faiss's InterruptCallback answers the same problem). So the bindings install a
// poll on the calling thread for the duration of one call (InterruptPollScope); a kernel
// makes one Interruption before its parallel regions and asks `requested()` between units of
// work, from any thread. Only the calling thread runs the poll (OpenMP makes it thread 0 of
// every team it starts), at most once per kPollInterval; the other threads read the flag it
// sets. After its regions the kernel calls throw_if_requested(), and the bindings turn the
// Interrupted it throws into the Python exception the poll left pending (KeyboardInterrupt).
//
// Backend-free: the poll is a plain function pointer, so ops/ and cpu/ never see Python.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <thread>

namespace latentspace {

// Returns true when the native call should stop (e.g. a KeyboardInterrupt is now pending).
using InterruptPoll = bool (*)();

// Thrown by a kernel that stopped on request; its results are incomplete.
struct Interrupted : std::exception {
  const char* what() const noexcept override { return "latentspace: native call interrupted"; }
};

// While it lives, native calls made on this thread poll `poll` (nullptr: never stop).
class InterruptPollScope {
 public:
  explicit InterruptPollScope(InterruptPoll poll);
  ~InterruptPollScope();
  InterruptPollScope(const InterruptPollScope&) = delete;
  InterruptPollScope& operator=(const InterruptPollScope&) = delete;

 private:
  InterruptPoll previous_;
};

// One native call's stop state. Make it on the calling thread, outside any parallel region.
class Interruption {
 public:
  // How often the calling thread polls: Ctrl-C answers within about this long (plus one unit
  // of work). A poll takes the GIL: uncontended that costs a microsecond, but a busy Python
  // thread may hold it for its switch interval (5 ms), during which thread 0 does no work.
  static constexpr std::chrono::milliseconds kPollInterval{100};

  Interruption();

  // Any thread: should the work stop? On the calling thread this polls when kPollInterval has
  // passed since the last poll; elsewhere it only reads the flag.
  bool requested();
  // Any thread: was a stop requested? Never polls, so threads that read it after a barrier
  // all see the same answer (an OpenMP worksharing loop must be entered by all or none).
  bool stopped() const { return stop_.load(std::memory_order_relaxed); }
  // Calling thread, after the parallel regions: throws Interrupted if a stop was requested.
  void throw_if_requested() const {
    if (stopped()) throw Interrupted();
  }

 private:
  InterruptPoll poll_;
  std::thread::id calling_thread_;
  int64_t next_poll_ns_;  // on coarse_now_ns()'s clock
  std::atomic<bool> stop_{false};
};

}  // namespace latentspace
