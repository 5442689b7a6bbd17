// Errors that cross into Python with a type and a message that says the fix.
//
// Native code never asserts or aborts on bad input: it throws one of these, and the
// bindings turn them into Python's ValueError / TypeError (see bindings/module.cpp).
// Never throw from inside an OpenMP region: record the problem and throw after it.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace latentspace {

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
// Messages are built with plain string appends, not iostreams: a stream's number formatting
// goes through the C++ locale machinery, which crashed inside this module on one of the GPU
// machines (the process's torch and its C++ runtime set up first); to_string / snprintf need
// none of it.
inline void append_one(std::string& out, const std::string& text) { out += text; }
inline void append_one(std::string& out, const char* text) { out += text ? text : "(null)"; }
inline void append_one(std::string& out, char c) { out += c; }
inline void append_one(std::string& out, bool value) { out += value ? "true" : "false"; }
template <class T>
void append_one(std::string& out, const T& value) {
  if constexpr (std::is_enum_v<T>) {
    out += std::to_string(static_cast<long long>(value));
  } else if constexpr (std::is_integral_v<T>) {
    out += std::to_string(value);
  } else if constexpr (std::is_floating_point_v<T>) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%.6g", static_cast<double>(value));
    out += buffer;
  } else {
    static_assert(std::is_convertible_v<const T&, std::string_view>, "concat: unsupported message piece");
    out += std::string_view(value);
  }
}
}  // namespace detail

// Builds a message from pieces (text, numbers): concat("k must be >= 1, got ", k).
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::string out;
  (detail::append_one(out, parts), ...);
  return out;
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
