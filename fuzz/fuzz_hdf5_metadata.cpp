// An HDF5 checkpoint's metadata as resume, export and `inspect` read it: the file opened read-only,
// its datasets listed with their shapes and dtypes, and the root attributes fastllm writes.
// Dataset contents are not read.
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "fuzz/fuzz_support.h"
#include "io/error.h"
#include "io/hdf5_file.h"

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  MPI_Init(argc, argv);
  // MPI_Finalize at exit, so that Open MPI's buffers are not reported as leaks.
  std::atexit([] { MPI_Finalize(); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = fastllm::fuzz::scratch() / "input.h5";
  fastllm::fuzz::write_file(path, data, size);
  try {
    const auto file = fastllm::H5File::open_read(path.string(), MPI_COMM_SELF);
    for (const std::string& name : file.list_datasets("/")) {
      (void)file.dataset_shape(name);
      (void)file.dataset_dtype(name);
    }
    for (const char* key : {"architecture", "config"}) {
      if (file.has_attr("/", key)) (void)file.attr_string("/", key);
    }
    for (const char* key :
         {"format_version", "iteration", "consumed_samples", "seed", "optimizer_steps"}) {
      if (file.has_attr("/", key)) (void)file.attr_int("/", key);
    }
    if (file.has_attr("/", "format_version")) (void)file.attr_double("/", "format_version");
  } catch (const fastllm::UserError&) {
  }
  return 0;
}
