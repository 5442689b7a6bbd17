// Errors that cross into Python with a type and a message that says the fix.
//
// Native code never asserts or aborts on bad input: it throws one of these, and the
// bindings turn them into Python's ValueError / TypeError (see bindings/module.cpp).
// Never throw from inside an OpenMP region: record the problem and throw after it.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace latentspace {

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <class T, class... Rest>
void append(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append(os, rest...);
}
}  // namespace detail

// Builds a message from any streamable pieces: concat("k must be >= 1, got ", k).
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  detail::append(os, parts...);
  return os.str();
}

}  // namespace latentspace

#define LS_CHECK_VALUE(cond, ...)                                              \
  do {                                                                         \
    if (!(cond)) throw ::latentspace::ValueError(::latentspace::concat(__VA_ARGS__)); \
  } while (0)

#define LS_CHECK_TYPE(cond, ...)                                               \
  do {                                                                         \
    if (!(cond)) throw ::latentspace::TypeError(::latentspace::concat(__VA_ARGS__)); \
  } while (0)
