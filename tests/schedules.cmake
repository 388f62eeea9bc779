# The checked-in schedules (autoschedules/<source>/<class>/) against today's
# algorithms, whatever HBN_SCHEDULE is: the generator applies each one, and
# its stage lookups (generators/checked_in_schedule.h) fail when the schedule
# no longer matches. One test per schedule file, labelled `schedules`.
set(schedules_dir "${CMAKE_CURRENT_BINARY_DIR}/schedules")
list(GET HBN_HALIDE_TARGETS 0 target)
set(target_args -e stmt -o "${schedules_dir}" target=${target})
file(MAKE_DIRECTORY "${schedules_dir}")
get_property(pipelines GLOBAL PROPERTY HBN_PIPELINES)
set(mismatch "")
foreach (line IN LISTS pipelines)
    separate_arguments(params UNIX_COMMAND "${line}")
    list(POP_FRONT params library generator)
    foreach (source IN ITEMS adams2019 li2018 mullapudi2016 tuned)
        set(key ${source}/${HBN_SCHEDULE_CLASS}/${library})
        if (NOT EXISTS "${PROJECT_SOURCE_DIR}/autoschedules/${key}.schedule.h")
            continue()
        endif ()
        add_test(NAME schedules.${source}.${library}
                 COMMAND hbn_generators -g ${generator} -f ${source}_${library} ${target_args}
                         ${params} schedule=${key})
        set_tests_properties(schedules.${source}.${library} PROPERTIES LABELS schedules)
        if (NOT mismatch AND generator STREQUAL "batch_norm_inference")
            set(mismatch ${key} ${params})
        endif ()
    endforeach ()
endforeach ()

# The check fires: an inference schedule applied to the training algorithm
# (another stage list, as after a change to the algorithm) must stop the
# generator, naming the file.
if (mismatch)
    list(POP_FRONT mismatch key)
    add_test(NAME schedules.MismatchedScheduleFails
             COMMAND hbn_generators -g batch_norm_training -f mismatch ${target_args}
                     ${mismatch} schedule=${key})
    set_tests_properties(schedules.MismatchedScheduleFails PROPERTIES
                         LABELS schedules
                         PASS_REGULAR_EXPRESSION "${key}\\.schedule\\.h does not match its algorithm")
endif ()
