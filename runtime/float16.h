// The C++ type that holds float16 data (IEEE binary16), for the runtime and
// the tests. Not installed.
#pragma once

namespace hbn {

#if defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
using float16 = __fp16;  // g++ 12 has no _Float16 in C++ on aarch64
#elif defined(__clang__) && __clang_major__ < 15
using float16 = __fp16;  // clang 14 (the sanitizer builds) has no _Float16 on x86-64
#else
using float16 = _Float16;
#endif

}  // namespace hbn
