#include "halide_call.h"

#include "HalideRuntime.h"

namespace hbn::internal {
namespace {

void halide_error_to_context(void *user_context, const char *message) {
    if (user_context != nullptr) {
        auto *context = static_cast<CallContext *>(user_context);
        std::lock_guard<std::mutex> lock(context->mutex);
        context->halide_message += message;
    }
}

}  // namespace

void fail(ErrorKind kind, const std::string &message) {
    throw Error(kind, "hbn::batch_norm: " + message);
}

void install_error_handler() {
    static std::once_flag once;
    std::call_once(once, [] { halide_set_error_handler(halide_error_to_context); });
}

void check_status(int status, const CallContext &context, const std::string &what) {
    if (status != 0) {
        std::string message = context.halide_message;
        while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) {
            message.pop_back();
        }
        throw Error(ErrorKind::RuntimeError,
                    what + " failed (Halide error " + std::to_string(status) + "): " + message);
    }
}

}  // namespace hbn::internal
