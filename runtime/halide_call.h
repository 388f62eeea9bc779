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
// into one (a parallel kernel's tasks). A live context is registered, so
// that the error handler recognises hbn's own calls.
class CallContext {
public:
    CallContext();
    ~CallContext();
    CallContext(const CallContext &) = delete;
    CallContext &operator=(const CallContext &) = delete;

    void append(const char *message);
    std::string message() const;

private:
    mutable std::mutex mutex_;
    std::string halide_message_;
    size_t slot_;
};

// Installs, once per process (call before the first Halide call), an error
// handler that routes the errors of hbn's calls into their CallContext and
// passes every other error (of a pipeline of the program's own that shares
// hbn's runtime) to the handler installed before it: Halide's default, or
// the program's own if it set one before its first hbn call.
void install_error_handler();

// Throws Error(RuntimeError) naming `what` and Halide's message when
// `status` is not zero.
void check_status(int status, const CallContext &context, const char *what);

}  // namespace hbn::internal
