// GoogleTest main that first forces the x86 kernel variant (see x86_variant.h).
#include "x86_variant.h"

#include <gtest/gtest.h>

#include <cstdio>

int main(int argc, char **argv) {
    ::testing::InitGoogleTest(&argc, argv);
    if (!hbn_test::force_x86_variant_from_environment()) {
        std::fprintf(stderr, "HBN_TEST_X86_VARIANT must be avx512, avx2 or sse41\n");
        return 2;
    }
    return RUN_ALL_TESTS();
}
