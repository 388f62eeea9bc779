#include "x86_variant.h"

#include "HalideRuntime.h"

#include <cstdio>
#include <cstdlib>
#include <initializer_list>

namespace hbn_test {
namespace {

VariantRecord record;
uint64_t refused_features[2] = {0, 0};  // bits a forced level may not use

bool has_any(int count, const uint64_t *features, const uint64_t *mask) {
    for (int i = 0; i < count && i < 2; i++) {
        if (features[i] & mask[i]) {
            return true;
        }
    }
    return false;
}

int can_use_forced_features(int count, const uint64_t *features) {
    record.queries++;
    if (has_any(count, features, refused_features)) {
        record.rejections++;
        return 0;
    }
    return halide_default_can_use_target_features(count, features);
}

void refuse(std::initializer_list<halide_target_feature_t> features) {
    for (auto f : features) {
        refused_features[f / 64] |= uint64_t{1} << (f % 64);
    }
}

}  // namespace

bool force_x86_variant_from_environment() {
    const char *name = std::getenv("HBN_TEST_X86_VARIANT");
    if (name == nullptr || *name == '\0') {
        return true;
    }
    record.forced = name;
#if !defined(__x86_64__) && !defined(_M_X64)
    // Other architectures (aarch64) build one variant: nothing to force.
    std::fprintf(stderr, "HBN_TEST_X86_VARIANT=%s: this build is not for x86-64\n", name);
    return false;
#endif
    const auto avx512 = {halide_target_feature_avx512, halide_target_feature_avx512_skylake,
                         halide_target_feature_avx512_cannonlake,
                         halide_target_feature_avx512_sapphirerapids, halide_target_feature_avx512_knl};
    if (record.forced == "avx2") {
        refuse(avx512);
    } else if (record.forced == "sse41") {
        refuse(avx512);
        refuse({halide_target_feature_avx, halide_target_feature_avx2, halide_target_feature_fma,
                halide_target_feature_f16c});
    } else if (record.forced != "avx512") {
        return false;
    }
    halide_set_custom_can_use_target_features(can_use_forced_features);
    return true;
}

const VariantRecord &x86_variant_record() {
    return record;
}

}  // namespace hbn_test
