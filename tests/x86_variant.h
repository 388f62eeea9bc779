// Forcing the x86 variant of the multi-target kernels. Each generated wrapper
// asks halide_can_use_target_features once per process and caches the
// answer, so a test process runs under one variant, named by the environment
// variable HBN_TEST_X86_VARIANT (avx512, avx2 or sse41; unset: the CPU's best).
// Builds for other architectures (aarch64) have one variant and accept the
// variable only unset.
#pragma once

#include <atomic>
#include <string>

namespace hbn_test {

struct VariantRecord {
    std::string forced;   // empty when none is forced
    // Atomic: the wrappers of kernels called from several threads at once
    // ask concurrently.
    std::atomic<int> queries{0};     // variants offered by the generated wrappers
    std::atomic<int> rejections{0};  // of which the forced level refused
};

// Installs the hook (call before the first batch_norm); returns false for an
// unknown variant name.
bool force_x86_variant_from_environment();
const VariantRecord &x86_variant_record();

}  // namespace hbn_test
