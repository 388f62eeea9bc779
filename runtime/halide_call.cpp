#include "halide_call.h"

#include "HalideRuntime.h"

#include <array>
#include <atomic>
#include <functional>
#include <thread>

namespace hbn {

Error::Error(ErrorKind kind, std::string message) : kind_(kind), message_(std::move(message)) {}

namespace internal {
namespace {

// hbn's live call contexts. The handler compares a user_context with these
// addresses and reads through it only when it is one: the program's own
// contexts may be anything. A call takes a free slot with one
// compare-and-swap and frees it with one store.
constexpr size_t context_slots = 256;
std::array<std::atomic<const CallContext *>, context_slots> live_contexts{};

bool is_live(const void *user_context) {
    for (const auto &slot : live_contexts) {
        if (slot.load(std::memory_order_acquire) == user_context) {
            return true;
        }
    }
    return false;
}

halide_error_handler_t program_handler = nullptr;  // the one installed before hbn's

void route_halide_error(void *user_context, const char *message) {
    if (user_context != nullptr && is_live(user_context)) {
        static_cast<CallContext *>(user_context)->append(message);
    } else {
        program_handler(user_context, message);
    }
}

}  // namespace

CallContext::CallContext() {
    // Start where this thread's calls usually find a free slot (hashed once
    // per thread); with every slot taken (256 calls at once), wait for one.
    thread_local const size_t first_slot = std::hash<std::thread::id>{}(std::this_thread::get_id()) % context_slots;
    size_t slot = first_slot;
    for (size_t tries = 1;; tries++, slot = (slot + 1) % context_slots) {
        const CallContext *expected = nullptr;
        if (live_contexts[slot].compare_exchange_strong(expected, this, std::memory_order_acq_rel)) {
            slot_ = slot;
            return;
        }
        if (tries % context_slots == 0) {
            std::this_thread::yield();
        }
    }
}

CallContext::~CallContext() {
    live_contexts[slot_].store(nullptr, std::memory_order_release);
}

void CallContext::append(const char *message) {
    std::lock_guard<std::mutex> lock(mutex_);
    halide_message_ += message;
}

std::string CallContext::message() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return halide_message_;
}

void fail(ErrorKind kind, const std::string &message) {
    throw Error(kind, "hbn::batch_norm: " + message);
}

void install_error_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        const halide_error_handler_t previous = halide_set_error_handler(route_halide_error);
        program_handler = previous != nullptr ? previous : halide_default_error;
    });
}

void check_status(int status, const CallContext &context, const char *what) {
    if (status != 0) {
        std::string message = context.message();
        while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) {
            message.pop_back();
        }
        throw Error(ErrorKind::RuntimeError,
                    std::string(what) + " failed (Halide error " + std::to_string(status) + "): " + message);
    }
}

}  // namespace internal
}  // namespace hbn
