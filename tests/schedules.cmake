# The checked-in schedules (autoschedules/<source>/<class>/) against today's
# algorithms, whatever HBN_SCHEDULE is: the generator applies each one, and
# its stage lookups (generators/checked_in_schedule.h) fail when the schedule
# no longer matches. One test per schedule file, labelled `schedules`.
set(schedules_dir "${CMAKE_CURRENT_BINARY_DIR}/schedules")
list(GET HBN_HALIDE_TARGETS 0 cpu_target)
set(output_args -e stmt -o "${schedules_dir}")
file(MAKE_DIRECTORY "${schedules_dir}")
get_property(pipelines GLOBAL PROPERTY HBN_PIPELINES)
set(mismatch "")
foreach (line IN LISTS pipelines)
    separate_arguments(params UNIX_COMMAND "${line}")
    list(POP_FRONT params library generator)
    # The CPU library under each source, and (Li2018) its GPU libraries.
    set(schedules "")
    foreach (source IN ITEMS adams2019 li2018 mullapudi2016 tuned)
        list(APPEND schedules "${source}|${HBN_SCHEDULE_CLASS}|${library}|${cpu_target}")
    endforeach ()
    if (library MATCHES "_parallel$")
        foreach (backend IN LISTS HBN_GPU_BACKENDS)
            string(TOUPPER "HBN_${backend}_TARGET" target_var)
            set(gpu_target ${${target_var}})
            string(REGEX REPLACE "_parallel$" "_${backend}" gpu_library "${library}")
            list(APPEND schedules "li2018|${backend}|${gpu_library}|${gpu_target}")
        endforeach ()
    endif ()
    foreach (schedule IN LISTS schedules)
        string(REPLACE "|" ";" schedule "${schedule}")
        list(GET schedule 0 source)
        list(GET schedule 1 class)
        list(GET schedule 2 scheduled_library)
        list(GET schedule 3 target)
        set(key ${source}/${class}/${scheduled_library})
        if (NOT EXISTS "${PROJECT_SOURCE_DIR}/autoschedules/${key}.schedule.h")
            continue()
        endif ()
        add_test(NAME schedules.${source}.${scheduled_library}
                 COMMAND hbn_generators -g ${generator} -f ${source}_${scheduled_library}
                         ${output_args} target=${target} ${params} schedule=${key})
        set_tests_properties(schedules.${source}.${scheduled_library} PROPERTIES LABELS schedules)
        if (NOT mismatch AND generator STREQUAL "batch_norm_inference")
            set(mismatch ${key} target=${target} ${params})
        endif ()
    endforeach ()
endforeach ()

# The check fires: an inference schedule applied to the training algorithm
# (another stage list, as after a change to the algorithm) must stop the
# generator, naming the file.
if (mismatch)
    list(POP_FRONT mismatch key)
    add_test(NAME schedules.MismatchedScheduleFails
             COMMAND hbn_generators -g batch_norm_training -f mismatch ${output_args}
                     ${mismatch} schedule=${key})
    set_tests_properties(schedules.MismatchedScheduleFails PROPERTIES
                         LABELS schedules
                         PASS_REGULAR_EXPRESSION "${key}\\.schedule\\.h does not match its algorithm")
endif ()
