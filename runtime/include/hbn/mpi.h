// hbn::mpi: synchronized batch norm over MPI. Link hbn::mpi (find_package(hbn
// CONFIG REQUIRED COMPONENTS mpi)); the core hbn::hbn needs no MPI.
#pragma once

#include <hbn/batch_norm.h>
#include <mpi.h>

namespace hbn {

// An AllReduce over `comm`: MPI_Allreduce in place, MPI_SUM of MPI_DOUBLE.
// Every process of `comm` shares the batch. A failing MPI_Allreduce raises
// RuntimeError with MPI's message (under the default MPI_ERRORS_ARE_FATAL,
// MPI aborts first). The communicator is used, not duplicated: keep it
// alive, and do not run other collectives on it concurrently with hbn calls.
AllReduce mpi_all_reduce(MPI_Comm comm);

}  // namespace hbn
