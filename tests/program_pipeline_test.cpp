// A program that links Halide pipelines of its own against hbn's runtime
// keeps its own error handling: hbn's process-wide handler takes only the
// errors of hbn's calls, and passes every other one to the handler installed
// before hbn's (the program's, or Halide's default, which aborts).
#include "test_util.h"

#include "HalideBuffer.h"
#include "HalideRuntime.h"
#include "program_scale.h"

#include <string>
#include <utility>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::Layout;

// What the program keeps behind its user_context: nothing like hbn's.
struct ProgramContext {
    uint64_t canary = 0x0123456789abcdef;
};

std::vector<std::pair<void *, std::string>> program_errors;

void program_error_handler(void *user_context, const char *message) {
    program_errors.emplace_back(user_context, message);
}

// The program's pipeline asked for more output than its input covers: a
// bounds error, reported with the given user_context.
int run_out_of_bounds(void *user_context) {
    Halide::Runtime::Buffer<float> input(4), output(8);
    input.fill(1.0f);
    return program_scale(user_context, input, output);
}

void *failing_malloc(void *, size_t) {
    return nullptr;
}

TEST(ProgramPipeline, ErrorsReachTheProgramsOwnHandler) {
    HBN_SKIP_UNLESS_ON_CPU("the failing hbn call fails through halide_malloc");
    halide_set_error_handler(program_error_handler);  // before the first hbn call

    BatchNormCase ok({2, 3, 4, 5}, Layout::NCHW, DType::Float32, DType::Float32, true);
    const ReferenceResult expected = ok.reference();
    ok.run();
    expect_close(ok.output.values(), expected.output, output_tolerance(DType::Float32), "output");

    // hbn's own failure comes back as hbn::Error, not through the program.
    BatchNormCase failing({16, 40, 32, 32}, Layout::NHWC, DType::Float32, DType::Float32, true);
    const halide_malloc_t previous = halide_set_custom_malloc(failing_malloc);
    EXPECT_THROW(failing.run(), hbn::Error);
    halide_set_custom_malloc(previous);
    EXPECT_TRUE(program_errors.empty()) << "hbn's error reached the program: " << program_errors[0].second;

    ProgramContext context;
    EXPECT_NE(run_out_of_bounds(&context), 0);
    EXPECT_NE(run_out_of_bounds(nullptr), 0);
    ASSERT_EQ(program_errors.size(), 2u);
    EXPECT_EQ(program_errors[0].first, &context);
    EXPECT_NE(program_errors[0].second.find("input"), std::string::npos) << program_errors[0].second;
    EXPECT_EQ(program_errors[1].first, nullptr);
    EXPECT_EQ(context.canary, 0x0123456789abcdefu) << "hbn wrote into the program's context";
}

// Without a handler of the program's, its pipeline's errors get Halide's
// default behaviour after hbn's first call as before it: the process ends.
TEST(ProgramPipelineDeathTest, DefaultHandlerStillAborts) {
    BatchNormCase ok({2, 3, 4, 5}, Layout::NCHW, DType::Float32, DType::Float32, false);
    ok.run();
    ProgramContext context;
    EXPECT_DEATH(run_out_of_bounds(&context), "");
}

}  // namespace
}  // namespace hbn_test
