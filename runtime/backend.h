// Which backend a call runs on (backend.cpp).
#pragma once

#include "hbn/batch_norm.h"

namespace hbn::internal {

// The backend a call with these options and data memory runs on: a device's
// memory decides Auto, otherwise auto_device(). Throws ValueError when the
// memory and options.device disagree, RuntimeError when the backend is not
// usable.
Device backend_for_call(Device requested, Memory data_memory);

}  // namespace hbn::internal
