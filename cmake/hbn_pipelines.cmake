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

# Schedule source: the generators' manual schedules, or one of Halide 14's
# autoschedulers (the generators then stop after their estimates). The
# autoschedulers are plugins that the generator loads (-p), so they must be
# the ones of the Halide it links.
set(HBN_SCHEDULE manual CACHE STRING
    "Schedule source of every pipeline: manual, adams2019, li2018 or mullapudi2016")
set(_hbn_schedules manual adams2019 li2018 mullapudi2016)
set_property(CACHE HBN_SCHEDULE PROPERTY STRINGS ${_hbn_schedules})
if (NOT HBN_SCHEDULE IN_LIST _hbn_schedules)
    message(FATAL_ERROR "HBN_SCHEDULE is '${HBN_SCHEDULE}'; it takes one of: manual (the "
                        "generators' schedules), adams2019, li2018, mullapudi2016 (Halide 14's "
                        "autoschedulers).")
endif ()
# The autoschedulers' machine model, machine_params=<cores>,<LLC bytes>,<balance>:
# the build machine's core count, and a last-level cache size. The default,
# 32 MiB, is where reads slow down on the 2-core VM hbn is tuned on (one
# thread reads ~25 GB/s up to 32 MiB, ~9 GB/s from 64 MiB), which reports a
# 480 MB L3 that no access pattern sees.
set(HBN_SCHEDULE_LLC_BYTES 33554432 CACHE STRING
    "Last-level cache size (bytes) in the autoschedulers' machine_params")
if (NOT HBN_SCHEDULE_LLC_BYTES MATCHES "^[1-9][0-9]*$")
    message(FATAL_ERROR "HBN_SCHEDULE_LLC_BYTES is '${HBN_SCHEDULE_LLC_BYTES}'; it takes a "
                        "positive number of bytes, e.g. 33554432 (32 MiB).")
endif ()

# A native build writes where its Halide's autoscheduler plugins are, next to
# its exported generators, so that a cross build that runs those generators
# (scripts/test_arm.sh) loads the plugins of the same Halide.
set(_hbn_autoscheduler_names Adams2019 Li2018 Mullapudi2016)
set(_hbn_autoschedulers_file hbn-halide_autoschedulers.cmake)
if (NOT CMAKE_CROSSCOMPILING)
    set(_hbn_text "# Generated by cmake/hbn_pipelines.cmake: the autoscheduler plugins of the Halide\n")
    string(APPEND _hbn_text "# that hbn_generators links, for cross builds that run it.\n")
    foreach (_hbn_name IN LISTS _hbn_autoscheduler_names)
        if (TARGET Halide::${_hbn_name})
            string(APPEND _hbn_text
                   "if (NOT TARGET hbn::halide_autoschedulers::${_hbn_name})\n"
                   "    add_library(hbn::halide_autoschedulers::${_hbn_name} MODULE IMPORTED)\n"
                   "    set_target_properties(hbn::halide_autoschedulers::${_hbn_name} PROPERTIES\n"
                   "                          IMPORTED_LOCATION \"$<TARGET_FILE:Halide::${_hbn_name}>\")\n"
                   "endif ()\n")
        endif ()
    endforeach ()
    file(GENERATE OUTPUT "${PROJECT_BINARY_DIR}/cmake/${_hbn_autoschedulers_file}"
         CONTENT "${_hbn_text}")
endif ()

# HBN_SCHEDULE_CORES: the parallelism the autoschedulers assume, the cores of
# the machine that builds (for a cross build, not the target's).
if (NOT HBN_SCHEDULE STREQUAL "manual")
    cmake_host_system_information(RESULT HBN_SCHEDULE_CORES QUERY NUMBER_OF_PHYSICAL_CORES)
    if (NOT HBN_SCHEDULE_CORES GREATER 0)
        cmake_host_system_information(RESULT HBN_SCHEDULE_CORES QUERY NUMBER_OF_LOGICAL_CORES)
    endif ()
    message(STATUS "hbn schedule: ${HBN_SCHEDULE} (machine_params=${HBN_SCHEDULE_CORES},"
                   "${HBN_SCHEDULE_LLC_BYTES},40)")
    # Halide 14's autoschedulers split outputs with ShiftInwards at factors
    # taken from the estimates: shapes smaller than a factor fail with a
    # bounds error, and in-place calls (output == input) recompute the
    # shifted tail from already-normalized values. scripts/test_schedules.sh
    # shows it; the fix is checked-in schedules with GuardWithIf tails.
    message(WARNING "HBN_SCHEDULE=${HBN_SCHEDULE} is experimental: the autoscheduled kernels "
                    "reject tensors smaller than their split factors and give wrong results "
                    "in place (output aliasing input). Use manual for real work.")
else ()
    message(STATUS "hbn schedule: manual")
endif ()

# Sets `out_var` to the autoscheduler plugin target of HBN_SCHEDULE for
# add_halide_library (empty for manual schedules). Called once the generators
# are known: a cross build takes the plugins of the host build whose
# generators it runs (hbn-halide_generators_DIR).
function(_hbn_autoscheduler_target out_var)
    set(${out_var} "" PARENT_SCOPE)
    if (HBN_SCHEDULE STREQUAL "manual")
        return()
    endif ()
    list(TRANSFORM _hbn_autoscheduler_names TOLOWER OUTPUT_VARIABLE lower_names)
    list(FIND lower_names "${HBN_SCHEDULE}" index)
    list(GET _hbn_autoscheduler_names ${index} name)
    if (CMAKE_CROSSCOMPILING)
        set(target hbn::halide_autoschedulers::${name})
        set(file "${hbn-halide_generators_DIR}/${_hbn_autoschedulers_file}")
        if (NOT TARGET ${target})
            if (NOT EXISTS "${file}")
                message(FATAL_ERROR "HBN_SCHEDULE=${HBN_SCHEDULE}: a cross build loads the "
                                    "autoscheduler plugins of the host build whose generators it "
                                    "runs, listed in ${file}, which does not exist: configure that "
                                    "host build with this version of hbn.")
            endif ()
            include("${file}")
        endif ()
    else ()
        set(target Halide::${name})
    endif ()
    if (NOT TARGET ${target})
        message(FATAL_ERROR "HBN_SCHEDULE=${HBN_SCHEDULE}: the Halide package has no ${name} "
                            "autoscheduler plugin (no target ${target}).")
    endif ()
    set(${out_var} ${target} PARENT_SCOPE)
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
    set(cores ${HBN_SCHEDULE_CORES})
    if (variant STREQUAL "serial")
        set(parallel false)
        set(cores 1)
    elseif (NOT variant STREQUAL "parallel")
        string(TOUPPER "HBN_${variant}_TARGET" target_var)
        set(targets ${${target_var}})
    endif ()
    # With an autoscheduler, `parallel` (a manual-schedule parameter) is
    # unused: the serial build is autoscheduled for a one-core machine, for
    # which Adams2019 and Mullapudi2016 emit no parallel loops (Li2018 does).
    # The GPU libraries keep their manual schedules: of the three, only
    # Li2018 schedules for GPUs.
    if (variant MATCHES "^(parallel|serial)$")
        _hbn_autoscheduler_target(autoscheduler)
    else ()
        set(autoscheduler "")
    endif ()
    if (autoscheduler)
        set(autoschedule AUTOSCHEDULER ${autoscheduler})
        set(machine_params machine_params=${cores},${HBN_SCHEDULE_LLC_BYTES},40)
    else ()
        set(autoschedule "")
        set(machine_params "")
    endif ()
    add_halide_library(${name} FROM hbn_generators
                       GENERATOR batch_norm_${pipeline}
                       TARGETS ${targets}
                       FEATURES ${HBN_HALIDE_FEATURES}
                       PARAMS data_type=${data_type} layout=${layout} parallel=${parallel}
                              ${machine_params}
                       ${autoschedule}
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
    foreach (header IN LISTS headers)
        string(APPEND text "#include \"${header}\"\n")
    endforeach ()
    file(CONFIGURE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/hbn_kernels.h CONTENT "${text}")
endfunction()
