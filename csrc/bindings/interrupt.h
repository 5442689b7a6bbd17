// Ctrl-C for native calls made from Python (core/interrupt.h has the kernels' side).
#pragma once

#include <pybind11/pybind11.h>

#include "core/interrupt.h"

namespace latentspace::bindings {

namespace py = pybind11;

// Called once when the module loads: remembers Python's main thread, the only one whose
// polls can see a signal (CPython runs signal handlers there alone).
void init_interrupts();

// Installs, for one native call, a poll that runs Python's pending signal handlers: a
// KeyboardInterrupt (or any exception a handler raises) stops the call, and the exception
// reaches the caller. Off the main thread it installs none, so those calls never take the GIL.
class PythonInterrupts {
 public:
  PythonInterrupts();

 private:
  InterruptPollScope scope_;
};

// The exception translator's part: leaves the pending Python exception in place (setting
// KeyboardInterrupt should there be none).
void restore_interrupt_error();

}  // namespace latentspace::bindings
