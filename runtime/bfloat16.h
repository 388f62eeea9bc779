// The C++ type that holds bfloat16 data (the upper half of an IEEE binary32),
// for the runtime and the tests. g++ 12 and clang 14 cannot convert their
// __bf16, so the conversions work on the bits. Not installed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace hbn {

class bfloat16 {
public:
    bfloat16() = default;

    // The nearest bfloat16, ties to even, as a direct rounding would give:
    // the double is first rounded to float32 toward zero with any inexactness
    // kept in its last bit (round to odd), which the second rounding, 16 bits
    // higher, cannot mistake for a tie.
    explicit bfloat16(double value) {
        float single = static_cast<float>(value);
        if (std::isfinite(single) && static_cast<double>(single) != value) {
            if (std::abs(static_cast<double>(single)) > std::abs(value)) {
                single = std::nextafter(single, 0.0f);
            }
            std::uint32_t bits = bits_of(single);
            bits |= 1;
            std::memcpy(&single, &bits, sizeof single);
        }
        const std::uint32_t bits = bits_of(single);
        if ((bits & 0x7fffffffu) > 0x7f800000u) {
            bits_ = static_cast<std::uint16_t>((bits >> 16) | 0x40);  // NaN, quieted
        } else {
            bits_ = static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
        }
    }
    explicit bfloat16(float value) : bfloat16(static_cast<double>(value)) {}

    explicit operator float() const {
        const std::uint32_t bits = static_cast<std::uint32_t>(bits_) << 16;
        float value;
        std::memcpy(&value, &bits, sizeof value);
        return value;
    }
    explicit operator double() const { return static_cast<float>(*this); }

private:
    static std::uint32_t bits_of(float value) {
        std::uint32_t bits;
        std::memcpy(&bits, &value, sizeof bits);
        return bits;
    }

    std::uint16_t bits_ = 0;
};

}  // namespace hbn
