// hbn::batch_norm's errors, and calling into the Halide runtime without
// letting it abort: its errors reach one process-wide handler, and the
// user_context of each call says whose error it is.
#pragma once

#include "hbn/batch_norm.h"

#include <mutex>
#include <string>

namespace hbn::internal {

// Throws Error(kind) with hbn::batch_norm's prefix.
[[noreturn]] void fail(ErrorKind kind, const std::string &message);

// The user_context of every call into Halide. Several threads may report
// into one (the chunks of a streamed call).
struct CallContext {
    std::mutex mutex;
    std::string halide_message;
};

// Routes Halide's errors into the failing call's CallContext (once per
// process; call before the first Halide call).
void install_error_handler();

// Throws Error(RuntimeError) naming `what` and Halide's message when
// `status` is not zero.
void check_status(int status, const CallContext &context, const std::string &what);

}  // namespace hbn::internal
