#include "hbn/mpi.h"

#include <algorithm>
#include <climits>
#include <string>

namespace hbn {

AllReduce mpi_all_reduce(MPI_Comm comm) {
    return [comm](double *values, std::size_t count) {
        // MPI counts are int: a longer vector goes in pieces.
        for (std::size_t done = 0; done < count;) {
            const auto piece = static_cast<int>(std::min<std::size_t>(count - done, INT_MAX));
            const int status = MPI_Allreduce(MPI_IN_PLACE, values + done, piece, MPI_DOUBLE, MPI_SUM, comm);
            if (status != MPI_SUCCESS) {
                char message[MPI_MAX_ERROR_STRING];
                int length = 0;
                MPI_Error_string(status, message, &length);
                throw Error(ErrorKind::RuntimeError,
                            "hbn::mpi_all_reduce: MPI_Allreduce failed: " + std::string(message, length));
            }
            done += piece;
        }
    };
}

}  // namespace hbn
