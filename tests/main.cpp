// GoogleTest main that first forces the x86 kernel variant (see
// x86_variant.h), and skips a suite run on a GPU backend that is not usable.
#include "x86_variant.h"

#include <gtest/gtest.h>
#include <hbn/batch_norm.h>

#include <cstdio>
#include <cstdlib>

// ctest runs the suites on a GPU backend by setting HBN_DEVICE, which makes
// Device::Auto run there. Where that backend is not usable (no driver, no
// device), the suite exits with 77, which ctest reports as skipped, after
// printing why.
constexpr int skipped_exit_code = 77;

int main(int argc, char **argv) {
    ::testing::InitGoogleTest(&argc, argv);
    if (!hbn_test::force_x86_variant_from_environment()) {
        std::fprintf(stderr, "HBN_TEST_X86_VARIANT must be avx512, avx2 or sse41\n");
        return 2;
    }
    if (std::getenv("HBN_DEVICE") != nullptr && !::testing::GTEST_FLAG(list_tests)) {
        try {
            const hbn::Device device = hbn::auto_device();
            const hbn::BackendStatus status = hbn::backend_status(device);
            if (!status.usable) {
                std::printf("SKIPPED: HBN_DEVICE=%s, but %s is not usable here: %s\n",
                            std::getenv("HBN_DEVICE"), hbn::device_name(device), status.detail.c_str());
                return skipped_exit_code;
            }
        } catch (const hbn::Error &) {
            // A bad HBN_DEVICE: the backend tests expect exactly that error.
        }
    }
    return RUN_ALL_TESTS();
}
