// Synchronized batch norm over MPI: every process normalizes its own slice of
// one batch with the statistics of the whole batch, and all of them update
// their running statistics alike.
//   mpirun -np 2 ./hbn_sync_batch_norm   (as root: mpirun --allow-run-as-root)
// The batch is 8 images of 3 channels of 2x2 values, split across however
// many processes run, so that every run prints the same statistics.
#include <hbn/mpi.h>

#include <cstdio>
#include <vector>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, processes = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &processes);

    // This process's images: [first, last) of the batch's 8.
    const int64_t batch = 8, channels = 3, pixels = 4;
    const int64_t first = batch * rank / processes, last = batch * (rank + 1) / processes;
    std::vector<float> x((last - first) * channels * pixels), y(x.size());
    for (int64_t n = first; n < last; n++) {
        for (int64_t c = 0; c < channels; c++) {
            for (int64_t p = 0; p < pixels; p++) {
                x[((n - first) * channels + c) * pixels + p] = float(c) + 0.5f * float(n) + 0.25f * float(p);
            }
        }
    }
    std::vector<float> running_mean(channels, 0.0f), running_var(channels, 1.0f);
    std::vector<float> weight(channels, 1.0f), bias(channels, 0.0f);

    const auto tensor = [](std::vector<float> &v, std::vector<int64_t> shape) {
        return hbn::Tensor{v.data(), hbn::DType::Float32, std::move(shape)};
    };
    hbn::BatchNormOptions options;
    options.training = true;
    options.all_reduce = hbn::mpi_all_reduce(MPI_COMM_WORLD);
    int status = 0;
    try {
        hbn::batch_norm(tensor(x, {last - first, channels, 2, 2}), tensor(running_mean, {channels}),
                        tensor(running_var, {channels}), tensor(weight, {channels}), tensor(bias, {channels}),
                        tensor(y, {last - first, channels, 2, 2}), options);
    } catch (const hbn::Error &e) {
        std::fprintf(stderr, "process %d: %s\n", rank, e.what());
        status = 1;
    }
    if (status == 0 && rank == 0) {
        std::printf("%d processes; running_mean:", processes);
        for (float m : running_mean) {
            std::printf(" %.6f", m);
        }
        std::printf("; running_var:");
        for (float v : running_var) {
            std::printf(" %.6f", v);
        }
        std::printf("\n");
    }
    MPI_Finalize();
    return status;
}
