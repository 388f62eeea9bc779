// A pipeline of "the program's own" for program_pipeline_test: built with
// no_runtime, it shares hbn's Halide runtime, as the README tells programs
// that link Halide pipelines of their own to do.
#include "Halide.h"

namespace {

class ProgramScale : public Halide::Generator<ProgramScale> {
public:
    Input<Buffer<float, 1>> input{"input"};
    Output<Buffer<float, 1>> output{"output"};

    void generate() {
        Var x{"x"};
        output(x) = input(x) * 2;
        input.set_estimates({{0, 64}});
        output.set_estimates({{0, 64}});
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(ProgramScale, program_scale)
