# Installs a relocatable CMake package: find_package(hbn CONFIG) then link hbn::hbn.
include(CMakePackageConfigHelpers)

install(TARGETS hbn EXPORT hbnTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY runtime/include/hbn DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(hbn_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/hbn)
install(EXPORT hbnTargets NAMESPACE hbn:: DESTINATION ${hbn_cmake_dir})
# The mpi component in a file of its own, which hbnConfig.cmake includes
# only when asked for it: a consumer of hbn::hbn alone needs no MPI.
if (TARGET hbn_mpi)
    install(TARGETS hbn_mpi EXPORT hbnMpiTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
    install(EXPORT hbnMpiTargets NAMESPACE hbn:: DESTINATION ${hbn_cmake_dir})
endif ()
configure_package_config_file(cmake/hbnConfig.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/hbnConfig.cmake
                              INSTALL_DESTINATION ${hbn_cmake_dir})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/hbnConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/hbnConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/hbnConfigVersion.cmake
        DESTINATION ${hbn_cmake_dir})
