// Dispatch over the three floating dtypes the ops accept, instantiating only those.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include "error_message.h"
#include <c10/util/Half.h>

namespace moe_fusion {

// Calls f(T{}) with T = float, c10::BFloat16 or c10::Half for `dtype`.
template <typename F>
void dispatch_float_dtype(c10::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      f(float{});
      break;
    case c10::ScalarType::BFloat16:
      f(c10::BFloat16{});
      break;
    case c10::ScalarType::Half:
      f(c10::Half{});
      break;
    default:
      MOE_FUSION_CHECK(false, what, " must be float32, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace moe_fusion
