# Turns each (pipeline, data type, layout) into one Halide library (multi-target
# on x86-64, single-target on aarch64) and folds its objects into the hbn
# library, so an installed libhbn.a carries every kernel and exactly one Halide
# runtime.

include(GNUInstallDirs)

# x86 variants, best first: the generated wrapper picks the first one the CPU
# supports, once per process. The last one is the baseline.
set(HBN_X86_TARGETS
    "x86-64-linux-sse41-avx-f16c-fma-avx2-avx512-avx512_skylake"
    "x86-64-linux-sse41-avx-f16c-fma-avx2"
    "x86-64-linux-sse41"
    CACHE STRING "Halide targets of the x86 multi-target libraries, best first")

# aarch64: one target. Halide 14's runtime detects no ARM features, so a
# multi-target ARM library would always run its first variant.
set(HBN_ARM_TARGETS "arm-64-linux"
    CACHE STRING "Halide target of the aarch64 libraries (exactly one)")

# user_context: errors reach the handler with the failing call's context.
# large_buffers: tensors over 2 GiB are legal input.
set(HBN_HALIDE_FEATURES user_context large_buffers)

# HBN_ARCH (x86_64 or aarch64) and HBN_HALIDE_TARGETS, the targets for the
# processor being built for, checked here so that a wrong one fails at
# configure time rather than at link time.
string(TOLOWER "${CMAKE_SYSTEM_PROCESSOR}" _hbn_processor)
if (_hbn_processor MATCHES "^(x86_64|amd64)$")
    set(HBN_ARCH x86_64)
    set(_hbn_targets_var HBN_X86_TARGETS)
    set(_hbn_triple x86-64-linux)
elseif (_hbn_processor MATCHES "^(aarch64|arm64)$")
    set(HBN_ARCH aarch64)
    set(_hbn_targets_var HBN_ARM_TARGETS)
    set(_hbn_triple arm-64-linux)
else ()
    message(FATAL_ERROR "hbn builds for x86_64 or aarch64 Linux, not for "
                        "CMAKE_SYSTEM_PROCESSOR '${CMAKE_SYSTEM_PROCESSOR}'.")
endif ()
if (NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
    message(FATAL_ERROR "hbn builds for Linux, not for CMAKE_SYSTEM_NAME '${CMAKE_SYSTEM_NAME}'.")
endif ()
set(HBN_HALIDE_TARGETS ${${_hbn_targets_var}})
if (NOT HBN_HALIDE_TARGETS)
    message(FATAL_ERROR "${_hbn_targets_var} is empty: name a ${_hbn_triple}[-feature...] target.")
endif ()
foreach (_hbn_target IN LISTS HBN_HALIDE_TARGETS)
    if (NOT _hbn_target MATCHES "^${_hbn_triple}(-|$)")
        message(FATAL_ERROR "${_hbn_targets_var} holds '${_hbn_target}', but building for "
                            "${CMAKE_SYSTEM_PROCESSOR} takes Halide targets of the form "
                            "${_hbn_triple}[-feature...].")
    endif ()
endforeach ()
list(LENGTH HBN_HALIDE_TARGETS _hbn_target_count)
if (_hbn_targets_var STREQUAL "HBN_ARM_TARGETS" AND _hbn_target_count GREATER 1)
    message(FATAL_ERROR "HBN_ARM_TARGETS holds ${_hbn_target_count} targets; it takes exactly one: "
                        "Halide 14 cannot tell at run time which ARM features a CPU has.")
endif ()
# add_halide_library emits objects (which the function below folds into hbn)
# only for targets of the CMake target's triple.
if (DEFINED Halide_CMAKE_TARGET AND NOT Halide_CMAKE_TARGET STREQUAL _hbn_triple)
    message(FATAL_ERROR "Halide_CMAKE_TARGET is '${Halide_CMAKE_TARGET}', expected '${_hbn_triple}' "
                        "for CMAKE_SYSTEM_PROCESSOR '${CMAKE_SYSTEM_PROCESSOR}'.")
endif ()
message(STATUS "hbn Halide targets (${_hbn_targets_var}): ${HBN_HALIDE_TARGETS}")

# Backends: the CPU always (it is the fallback of Device::Auto), and GPU
# backends on request, each built for one Halide target of the same triple:
# the host code of a GPU library is the CPU's. The GPU kernels keep the CPU's
# double-precision statistics, hence cl_doubles. All libraries share the one
# Halide runtime, which Halide builds with the union of their GPU features.
if (HBN_ARCH STREQUAL "x86_64")
    set(_hbn_default_backends cpu opencl cuda)
else ()
    set(_hbn_default_backends cpu)
endif ()
set(HBN_BACKENDS "${_hbn_default_backends}" CACHE STRING
    "Backends built into hbn: cpu, plus any of opencl and cuda")
set(HBN_OPENCL_TARGET "${_hbn_triple}-opencl-cl_doubles" CACHE STRING
    "Halide target of the OpenCL libraries")
set(HBN_CUDA_TARGET "${_hbn_triple}-cuda-cuda_capability_80" CACHE STRING
    "Halide target of the CUDA libraries")
set(_hbn_backends cpu opencl cuda)
set_property(CACHE HBN_BACKENDS PROPERTY STRINGS ${_hbn_backends})
foreach (_hbn_backend IN LISTS HBN_BACKENDS)
    if (NOT _hbn_backend IN_LIST _hbn_backends)
        message(FATAL_ERROR "HBN_BACKENDS holds '${_hbn_backend}'; it takes a list of: cpu, "
                            "opencl, cuda (e.g. -DHBN_BACKENDS=\"cpu;opencl\").")
    endif ()
endforeach ()
if (NOT "cpu" IN_LIST HBN_BACKENDS)
    message(FATAL_ERROR "HBN_BACKENDS is '${HBN_BACKENDS}', which lacks cpu: the CPU backend is "
                        "always built, as Device::Auto's fallback.")
endif ()
# Which GPU backends, and their targets, checked: exactly one GPU API, the
# build's triple, and (OpenCL) cl_doubles.
set(HBN_GPU_BACKENDS ${HBN_BACKENDS})
list(REMOVE_ITEM HBN_GPU_BACKENDS cpu)
list(REMOVE_DUPLICATES HBN_GPU_BACKENDS)
foreach (_hbn_backend IN LISTS HBN_GPU_BACKENDS)
    string(TOUPPER "HBN_${_hbn_backend}_TARGET" _hbn_var)
    set(_hbn_target "${${_hbn_var}}")
    set(_hbn_required ${_hbn_backend})
    if (_hbn_backend STREQUAL "opencl")
        list(APPEND _hbn_required cl_doubles)
    endif ()
    string(REPLACE "-" ";" _hbn_features "${_hbn_target}")
    string(JOIN "-" _hbn_example ${_hbn_triple} ${_hbn_required})
    foreach (_hbn_feature IN LISTS _hbn_required)
        if (NOT _hbn_feature IN_LIST _hbn_features)
            message(FATAL_ERROR "${_hbn_var} is '${_hbn_target}', which lacks the feature "
                                "'${_hbn_feature}': use e.g. ${_hbn_example}.")
        endif ()
    endforeach ()
    set(_hbn_other_apis cuda opencl metal d3d12compute openglcompute)
    list(REMOVE_ITEM _hbn_other_apis ${_hbn_backend})
    foreach (_hbn_other IN LISTS _hbn_other_apis)
        if (_hbn_other IN_LIST _hbn_features)
            message(FATAL_ERROR "${_hbn_var} is '${_hbn_target}', which also names the GPU API "
                                "'${_hbn_other}': a backend's target names one.")
        endif ()
    endforeach ()
    if (NOT _hbn_target MATCHES "^${_hbn_triple}-")
        message(FATAL_ERROR "${_hbn_var} is '${_hbn_target}', but building for "
                            "${CMAKE_SYSTEM_PROCESSOR} takes ${_hbn_triple}-${_hbn_backend}[-feature...].")
    endif ()
endforeach ()
message(STATUS "hbn backends: ${HBN_BACKENDS}")

# Schedule source: the generators' manual schedules, or the checked-in
# schedules of autoschedules/<source>/<target class>/<library>.schedule.h,
# which the generators apply without loading a plugin: those captured from
# Halide 14's autoschedulers (scripts/capture_schedules.sh) or from a tuning
# run (scripts/autotune.sh; `tuned` falls back to the manual schedule for the
# libraries that have no tuned one).
set(HBN_SCHEDULE manual CACHE STRING
    "Schedule source of every pipeline: manual, adams2019, li2018, mullapudi2016 or tuned")
set(_hbn_schedules manual adams2019 li2018 mullapudi2016 tuned)
set_property(CACHE HBN_SCHEDULE PROPERTY STRINGS ${_hbn_schedules})
if (NOT HBN_SCHEDULE IN_LIST _hbn_schedules)
    message(FATAL_ERROR "HBN_SCHEDULE is '${HBN_SCHEDULE}'; it takes one of: manual (the "
                        "generators' schedules), adams2019, li2018, mullapudi2016 (Halide 14's "
                        "autoschedulers, checked in), tuned (scripts/autotune.sh).")
endif ()
# The target class names the directory of checked-in schedules: one schedule
# serves every variant of a multi-target library.
string(REGEX REPLACE "-linux$" "" HBN_SCHEDULE_CLASS "${_hbn_triple}")
message(STATUS "hbn schedule: ${HBN_SCHEDULE} (target class ${HBN_SCHEDULE_CLASS})")

# Sets `out_var` to the generator's `schedule` parameter for library `name`:
# the key <source>/<class>/<name> of its checked-in schedule, or empty for the
# manual schedule.
function(_hbn_checked_in_schedule name class out_var)
    set(${out_var} "" PARENT_SCOPE)
    if (HBN_SCHEDULE STREQUAL "manual")
        return()
    endif ()
    set(key ${HBN_SCHEDULE}/${class}/${name})
    if (EXISTS "${PROJECT_SOURCE_DIR}/autoschedules/${key}.schedule.h")
        set(${out_var} ${key} PARENT_SCOPE)
    elseif (HBN_SCHEDULE STREQUAL "tuned" OR NOT class STREQUAL HBN_SCHEDULE_CLASS)
        # Tuning runs cover some libraries, and Li2018's GPU schedules all
        # but those needing 64-bit OpenCL atomics (scripts/capture_schedules.sh).
        message(STATUS "hbn schedule: ${name} has no ${HBN_SCHEDULE} schedule, it keeps the manual one")
    else ()
        message(FATAL_ERROR "HBN_SCHEDULE=${HBN_SCHEDULE}: autoschedules/${key}.schedule.h does "
                            "not exist; capture it with scripts/capture_schedules.sh.")
    endif ()
endfunction()

# hbn_write_schedule_files(<generator target>) writes, in the build directory,
# - hbn_checked_in_schedules.h, which the generators include (see
#   generators/checked_in_schedule.h): every checked-in schedule, and the map
#   hbn_schedules::checked_in from its key to its apply function;
# - hbn_pipelines.txt, one line per library: its name, generator and
#   generator parameters, for scripts/capture_schedules.sh, scripts/autotune.sh
#   and the schedule tests.
# HBN_SCHEDULE_FILES=OFF leaves the schedules out of the generators, as
# scripts/capture_schedules.sh does, so that files it is about to replace
# cannot stop it.
option(HBN_SCHEDULE_FILES "Build the checked-in schedules into the generators" ON)
function(hbn_write_schedule_files generator)
    set(files "")
    if (HBN_SCHEDULE_FILES)
        file(GLOB files CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/autoschedules/*/*/*.schedule.h")
    endif ()
    set(includes "")
    set(entries "")
    foreach (file IN LISTS files)
        file(RELATIVE_PATH key "${PROJECT_SOURCE_DIR}/autoschedules" "${file}")
        string(REGEX REPLACE "\\.schedule\\.h$" "" key "${key}")
        string(REPLACE "/" "_" function "apply_schedule_${key}")
        string(REPLACE "-" "_" function "${function}")
        string(APPEND includes "#include \"${file}\"\n")
        string(APPEND entries "    {\"${key}\", ${function}},\n")
    endforeach ()
    string(CONCAT text
           "// Generated by cmake/hbn_pipelines.cmake: the checked-in schedules.\n#pragma once\n\n"
           "#include <map>\n#include <string>\n\n${includes}\nnamespace hbn_schedules {\n"
           "inline const std::map<std::string, ApplySchedule> checked_in = {\n${entries}};\n}\n")
    file(CONFIGURE OUTPUT "${PROJECT_BINARY_DIR}/schedules/hbn_checked_in_schedules.h"
         CONTENT "${text}")
    # Imported generators (another build's) have nothing to compile.
    if (TARGET ${generator})
        target_include_directories(${generator} PRIVATE "${PROJECT_BINARY_DIR}/schedules")
    endif ()
    get_property(pipelines GLOBAL PROPERTY HBN_PIPELINES)
    list(JOIN pipelines "\n" text)
    file(CONFIGURE OUTPUT "${PROJECT_BINARY_DIR}/hbn_pipelines.txt" CONTENT "${text}\n")
endfunction()

# Adds the objects of a Halide library (or runtime) target to `consumer`.
# add_halide_library gives objects when the Halide targets' triple is the CMake
# target's, which the checks above ensure, in cross builds too: the host-built
# generator emits aarch64 objects. (It gives an IMPORTED .a only when the two
# triples differ.)
function(_hbn_absorb_objects consumer halide_target)
    get_target_property(imported ${halide_target} IMPORTED)
    if (imported)
        message(FATAL_ERROR "${halide_target} is an imported static library, not objects: "
                            "its Halide targets' triple differs from Halide_CMAKE_TARGET "
                            "(${Halide_CMAKE_TARGET}).")
    endif ()
    get_target_property(objects ${halide_target} SOURCES)
    list(TRANSFORM objects PREPEND "${CMAKE_CURRENT_BINARY_DIR}/")
    target_sources(${consumer} PRIVATE ${objects})
    add_dependencies(${consumer} ${halide_target})
endfunction()

# hbn_add_pipeline(<consumer> <pipeline> <data_type> <layout> <variant>)
#   builds hbn_batch_norm_<pipeline>_<data_type>_<layout>_<variant> from the
#   batch_norm_<pipeline> generator (variant: parallel or serial on the CPU,
#   or a GPU backend, opencl or cuda), links it into <consumer>, and lists its
#   header in hbn_kernels.h.
function(hbn_add_pipeline consumer pipeline data_type layout variant)
    set(name hbn_batch_norm_${pipeline}_${data_type}_${layout}_${variant})
    get_property(runtime GLOBAL PROPERTY HBN_HALIDE_RUNTIME)
    if (runtime)
        set(use_runtime USE_RUNTIME ${runtime})
    else ()
        set(use_runtime "")
    endif ()
    set(targets ${HBN_HALIDE_TARGETS})
    set(parallel true)
    if (variant STREQUAL "serial")
        set(parallel false)
    elseif (NOT variant STREQUAL "parallel")
        string(TOUPPER "HBN_${variant}_TARGET" target_var)
        set(targets ${${target_var}})
    endif ()
    set(params data_type=${data_type} layout=${layout} parallel=${parallel})
    set(schedule "")
    if (variant MATCHES "^(parallel|serial)$")
        list(JOIN params " " param_text)
        set_property(GLOBAL APPEND PROPERTY HBN_PIPELINES "${name} batch_norm_${pipeline} ${param_text}")
        _hbn_checked_in_schedule(${name} ${HBN_SCHEDULE_CLASS} schedule)
    elseif (HBN_SCHEDULE STREQUAL "li2018")
        # Of the autoschedulers only Li2018 schedules for GPUs (the others'
        # sources keep the manual GPU schedules).
        _hbn_checked_in_schedule(${name} ${variant} schedule)
    endif ()
    if (schedule)
        list(APPEND params schedule=${schedule})
    endif ()
    add_halide_library(${name} FROM hbn_generators
                       GENERATOR batch_norm_${pipeline}
                       TARGETS ${targets}
                       FEATURES ${HBN_HALIDE_FEATURES}
                       PARAMS ${params}
                       ${use_runtime})
    if (NOT runtime)
        # The first library creates the runtime that all others share.
        set_property(GLOBAL PROPERTY HBN_HALIDE_RUNTIME ${name}.runtime)
        _hbn_absorb_objects(${consumer} ${name}.runtime)
    endif ()
    _hbn_absorb_objects(${consumer} ${name})
    if (variant STREQUAL "cuda")
        get_target_property(objects ${name} SOURCES)
        list(TRANSFORM objects PREPEND "${CMAKE_CURRENT_BINARY_DIR}/")
        set_property(GLOBAL APPEND PROPERTY HBN_CUDA_OBJECTS ${objects})
    endif ()
    target_include_directories(${consumer} PRIVATE ${CMAKE_CURRENT_BINARY_DIR})
    set_property(GLOBAL APPEND PROPERTY HBN_KERNEL_HEADERS ${name}.h)
endfunction()

# The data types of the kernels, each <generator data_type>:<hbn::DType
# enumerator>. Every pipeline, layout and variant is built for each, and the
# runtime's kernel tables follow (hbn_kernels.h's HBN_FOR_EACH_DATA_TYPE).
set(HBN_DATA_TYPES float32:Float32 float16:Float16 bfloat16:BFloat16)

# hbn_add_pipelines(<consumer>): every library, in <consumer>.
function(hbn_add_pipelines consumer)
    foreach (pipeline IN ITEMS inference training backward grad_input)
        foreach (data_type IN LISTS HBN_DATA_TYPES)
            string(REGEX REPLACE ":.*" "" data_type "${data_type}")
            foreach (layout IN ITEMS nchw nhwc)
                foreach (variant IN ITEMS parallel serial ${HBN_GPU_BACKENDS})
                    hbn_add_pipeline(${consumer} ${pipeline} ${data_type} ${layout} ${variant})
                endforeach ()
            endforeach ()
        endforeach ()
    endforeach ()
endfunction()

# Writes hbn_kernels.h, which includes every generated header and defines
# HBN_BACKEND_<NAME> for each GPU backend built.
function(hbn_write_kernel_header)
    get_property(headers GLOBAL PROPERTY HBN_KERNEL_HEADERS)
    set(text "// Generated by cmake/hbn_pipelines.cmake: every kernel's header.\n#pragma once\n")
    foreach (backend IN LISTS HBN_GPU_BACKENDS)
        string(TOUPPER "${backend}" backend)
        string(APPEND text "#define HBN_BACKEND_${backend} 1\n")
    endforeach ()
    # The compute capability the CUDA kernels need (Halide's default: 2.0).
    if ("cuda" IN_LIST HBN_GPU_BACKENDS)
        set(capability 20)
        if (HBN_CUDA_TARGET MATCHES "cuda_capability_([0-9]+)")
            set(capability ${CMAKE_MATCH_1})
        endif ()
        string(APPEND text "#define HBN_CUDA_CAPABILITY ${capability}\n")
    endif ()
    # X(<data_type>, <DType enumerator>) for each data type.
    set(data_types "")
    foreach (data_type IN LISTS HBN_DATA_TYPES)
        string(REPLACE ":" ", " data_type "${data_type}")
        string(APPEND data_types " X(${data_type})")
    endforeach ()
    string(APPEND text "#define HBN_FOR_EACH_DATA_TYPE(X)${data_types}\n")
    foreach (header IN LISTS headers)
        string(APPEND text "#include \"${header}\"\n")
    endforeach ()
    file(CONFIGURE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/hbn_kernels.h CONTENT "${text}")
endfunction()
