#include "bindings/interrupt.h"

#include <pthread.h>
#include <pythread.h>

namespace latentspace::bindings {
namespace {

unsigned long g_main_thread = 0;

// Runs on the calling thread while its native call has released the GIL: takes the GIL back
// for as long as Python's signal handlers take.
bool python_exception_pending() {
  const PyGILState_STATE state = PyGILState_Ensure();
  const bool raised = PyErr_CheckSignals() != 0;
  PyGILState_Release(state);
  return raised;
}

InterruptPoll poll_for_this_thread() {
  return PyThread_get_thread_ident() == g_main_thread ? &python_exception_pending : nullptr;
}

// A child forked from another thread continues on that thread, which Python makes its main
// thread (PyOS_AfterFork_Child).
void remember_the_forking_thread() { g_main_thread = PyThread_get_thread_ident(); }

}  // namespace

void init_interrupts() {
  g_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  pthread_atfork(nullptr, nullptr, &remember_the_forking_thread);
}

PythonInterrupts::PythonInterrupts() : scope_(poll_for_this_thread()) {}

void restore_interrupt_error() {
  if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
}

}  // namespace latentspace::bindings
