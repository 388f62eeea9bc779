# Installs hbn, moves the install elsewhere (it must be relocatable), then
# builds and runs the README's consumer project, pasted verbatim from the
# README blocks that follow "<!-- consumer: FILE -->" markers.
# With HBN_MPI, the same for the SyncBN consumer ("<!-- consumer-mpi: FILE -->",
# whose main.cpp is examples/sync_batch_norm.cpp), run under mpirun.
# With HBN_PYTHON, the README's Python blocks (tests/python/test_readme.py)
# against the installed Python package.
#   cmake -DHBN_BUILD_DIR=... -DREADME=... -DWORK_DIR=... -DHBN_MPI=ON|OFF
#         -DHBN_PYTHON=ON|OFF [-DHBN_PYTHON_INSTALL_DIR=... -DPython3_EXECUTABLE=...]
#         -P consumer_test.cmake
cmake_minimum_required(VERSION 3.22)

foreach (var HBN_BUILD_DIR README WORK_DIR HBN_MPI HBN_PYTHON)
    if (NOT DEFINED ${var})
        message(FATAL_ERROR "${var} is not set")
    endif ()
endforeach ()

function(run)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE out)
    if (NOT status EQUAL 0)
        message(FATAL_ERROR "failed: ${ARGN}\n${out}")
    endif ()
    set(run_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
run(${CMAKE_COMMAND} --install "${HBN_BUILD_DIR}" --prefix "${WORK_DIR}/staging")
file(RENAME "${WORK_DIR}/staging" "${WORK_DIR}/prefix")

# The README's blocks that follow "<!-- MARKER: FILE -->", written into
# `dir` as a user would paste them; `out_var` lists their names. (Walked with
# string(FIND) rather than regex lists: the C++ code holds semicolons.)
function(write_readme_blocks marker dir out_var)
    file(READ "${README}" readme)
    set(sources "")
    set(marker "<!-- ${marker}: ")
    string(FIND "${readme}" "${marker}" at)
    while (NOT at EQUAL -1)
        string(LENGTH "${marker}" marker_length)
        math(EXPR at "${at} + ${marker_length}")
        string(SUBSTRING "${readme}" ${at} -1 readme)
        string(FIND "${readme}" " -->" name_end)
        string(SUBSTRING "${readme}" 0 ${name_end} name)
        string(FIND "${readme}" "```" fence)             # opening fence
        string(SUBSTRING "${readme}" ${fence} -1 readme)
        string(FIND "${readme}" "\n" line_end)
        math(EXPR line_end "${line_end} + 1")
        string(SUBSTRING "${readme}" ${line_end} -1 readme)
        string(FIND "${readme}" "```" fence)             # closing fence
        string(SUBSTRING "${readme}" 0 ${fence} body)
        file(WRITE "${dir}/${name}" "${body}")
        list(APPEND sources ${name})
        string(FIND "${readme}" "${marker}" at)
    endwhile ()
    if (NOT "CMakeLists.txt" IN_LIST sources OR NOT "main.cpp" IN_LIST sources)
        message(FATAL_ERROR "README lacks the ${marker}CMakeLists.txt and main.cpp blocks (found: ${sources})")
    endif ()
    set(${out_var} "${sources}" PARENT_SCOPE)
endfunction()

write_readme_blocks(consumer "${WORK_DIR}/consumer" sources)
run(${CMAKE_COMMAND} -S "${WORK_DIR}/consumer" -B "${WORK_DIR}/consumer-build" -G Ninja
    -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix")
run(${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
# The README example prints the documented inference output, on the CPU and
# on each GPU backend built into the package (those usable here: OpenCL on
# PoCL), which HBN_DEVICE selects.
foreach (device IN ITEMS cpu ${HBN_GPU_BACKENDS})
    if (device STREQUAL "cuda")
        continue()  # no GPU here; tests/ptxas_check.py covers its kernels
    endif ()
    run(${CMAKE_COMMAND} -E env HBN_DEVICE=${device} "${WORK_DIR}/consumer-build/app")
    message(STATUS "consumer printed (HBN_DEVICE=${device}):\n${run_output}")
    # Compared in upper case: the app prints the device's name ("OpenCL").
    string(TOUPPER "${run_output}" output_upper)
    foreach (expected "2.16212" "1.23601" "14.8106" "10.1801" "ran on ${device}")
        string(TOUPPER "${expected}" expected_upper)
        string(FIND "${output_upper}" "${expected_upper}" at)
        if (at EQUAL -1)
            message(FATAL_ERROR "consumer output (HBN_DEVICE=${device}) lacks ${expected}:\n${run_output}")
        endif ()
    endforeach ()
endforeach ()

if (HBN_MPI)
    write_readme_blocks(consumer-mpi "${WORK_DIR}/consumer-mpi" mpi_sources)
    get_filename_component(source_dir "${README}" DIRECTORY)
    file(READ "${source_dir}/examples/sync_batch_norm.cpp" example)
    file(READ "${WORK_DIR}/consumer-mpi/main.cpp" pasted)
    if (NOT example STREQUAL pasted)
        message(FATAL_ERROR "README's consumer-mpi main.cpp differs from examples/sync_batch_norm.cpp")
    endif ()
    run(${CMAKE_COMMAND} -S "${WORK_DIR}/consumer-mpi" -B "${WORK_DIR}/consumer-mpi-build" -G Ninja
        -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix")
    run(${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-mpi-build")
    set(mpirun_flags --oversubscribe)
    execute_process(COMMAND id -u OUTPUT_VARIABLE uid OUTPUT_STRIP_TRAILING_WHITESPACE)
    if (uid STREQUAL "0")
        list(APPEND mpirun_flags --allow-run-as-root)
    endif ()
    run(mpirun ${mpirun_flags} -np 2 "${WORK_DIR}/consumer-mpi-build/app")
    message(STATUS "SyncBN consumer printed:\n${run_output}")
    string(FIND "${run_output}" "2 processes; running_mean: 0.212500 0.312500 0.412500; running_var: 1.043548" at)
    if (at EQUAL -1)
        message(FATAL_ERROR "SyncBN consumer output lacks the documented statistics:\n${run_output}")
    endif ()
endif ()

if (HBN_PYTHON)
    set(site "${WORK_DIR}/prefix/${HBN_PYTHON_INSTALL_DIR}")
    run(${CMAKE_COMMAND} -E env PYTHONPATH=${site} ${Python3_EXECUTABLE} -c "import hbn\nprint(hbn.__file__)")
    string(FIND "${run_output}" "${site}/hbn/" at)
    if (NOT at EQUAL 0)
        message(FATAL_ERROR "import hbn did not load the installed package from ${site}:\n${run_output}")
    endif ()
    get_filename_component(source_dir "${README}" DIRECTORY)
    run(${CMAKE_COMMAND} -E env PYTHONPATH=${site} HBN_DEVICE=cpu
        ${Python3_EXECUTABLE} -m pytest -q -p no:cacheprovider "${source_dir}/tests/python/test_readme.py")
    message(STATUS "README's Python blocks against the install:\n${run_output}")
endif ()
