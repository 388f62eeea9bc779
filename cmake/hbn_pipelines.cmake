# Turns each (pipeline, data type, layout) into one multi-target Halide library
# and folds its objects into the hbn library, so an installed libhbn.a carries
# every kernel and exactly one Halide runtime.

include(GNUInstallDirs)

# x86 variants, best first: the generated wrapper picks the first one the CPU
# supports, once per process. The last one is the baseline.
set(HBN_X86_TARGETS
    "x86-64-linux-sse41-avx-f16c-fma-avx2-avx512-avx512_skylake"
    "x86-64-linux-sse41-avx-f16c-fma-avx2"
    "x86-64-linux-sse41"
    CACHE STRING "Halide targets of the x86 multi-target libraries, best first")

# user_context: errors reach the handler with the failing call's context.
# large_buffers: tensors over 2 GiB are legal input.
set(HBN_HALIDE_FEATURES user_context large_buffers)

# Adds the objects of a Halide library (or runtime) target to `consumer`.
function(_hbn_absorb_objects consumer halide_target)
    get_target_property(objects ${halide_target} SOURCES)
    list(TRANSFORM objects PREPEND "${CMAKE_CURRENT_BINARY_DIR}/")
    target_sources(${consumer} PRIVATE ${objects})
    add_dependencies(${consumer} ${halide_target})
endfunction()

# hbn_add_pipeline(<consumer> <pipeline> <data_type> <layout>)
#   builds hbn_batch_norm_<pipeline>_<data_type>_<layout> from the
#   batch_norm_<pipeline> generator and links it into <consumer>.
function(hbn_add_pipeline consumer pipeline data_type layout)
    set(name hbn_batch_norm_${pipeline}_${data_type}_${layout})
    get_property(runtime GLOBAL PROPERTY HBN_HALIDE_RUNTIME)
    if (runtime)
        set(use_runtime USE_RUNTIME ${runtime})
    else ()
        set(use_runtime "")
    endif ()
    add_halide_library(${name} FROM hbn_generators
                       GENERATOR batch_norm_${pipeline}
                       TARGETS ${HBN_X86_TARGETS}
                       FEATURES ${HBN_HALIDE_FEATURES}
                       PARAMS data_type=${data_type} layout=${layout}
                       ${use_runtime})
    if (NOT runtime)
        # The first library creates the runtime that all others share.
        set_property(GLOBAL PROPERTY HBN_HALIDE_RUNTIME ${name}.runtime)
        _hbn_absorb_objects(${consumer} ${name}.runtime)
    endif ()
    _hbn_absorb_objects(${consumer} ${name})
    target_include_directories(${consumer} PRIVATE ${CMAKE_CURRENT_BINARY_DIR})
endfunction()
