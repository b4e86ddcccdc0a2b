// Argument errors of the moe_fusion ops, formatted without iostreams.
//
// TORCH_CHECK formats several arguments through std::ostringstream inline in the
// extension. Where the extension ends up with its own copy of libstdc++ (a
// toolchain that links it statically; seen with torch 2.11 on the GPU image),
// that stream code reads the process's locale facets with the wrong layout and
// crashes. One pre-formatted std::string goes through TORCH_CHECK untouched.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace moe_fusion {

inline std::string to_text(const char* text) { return text; }
inline std::string to_text(const std::string& text) { return text; }
inline std::string to_text(bool value) { return value ? "true" : "false"; }
inline std::string to_text(c10::ScalarType dtype) { return c10::toString(dtype); }
inline std::string to_text(const c10::Device& device) { return device.str(); }

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
std::string to_text(T value) {
  return std::to_string(value);
}

template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
std::string to_text(T value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", static_cast<double>(value));
  return buffer;
}

inline std::string to_text(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string text;
  ((text += to_text(args)), ...);
  return text;
}

}  // namespace moe_fusion

// A ValueError naming the argument and the rule it broke.
#define MOE_FUSION_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, ::moe_fusion::message(__VA_ARGS__))
