// H5File shared by the ranks of MPI_COMM_WORLD (run under mpiexec -np 3): every rank writes its own
// hyperslabs, then reads slabs other ranks wrote. Each test's collectives are reached by every
// rank whatever the expectations find, so a failure never hangs the run.
#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "hdf5/h5_test_util.h"
#include "io/error.h"
#include "io/hdf5_file.h"

namespace fastllm {
namespace {

using test::extract;
using test::make_values;
using test::same_bits;
using test::TempDir;
using Shape = std::vector<std::int64_t>;

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// A directory made by rank 0 and shared by all ranks.
std::unique_ptr<TempDir> shared_dir() {
  std::string path;
  std::unique_ptr<TempDir> dir;
  if (world_rank() == 0) {
    dir = std::make_unique<TempDir>("h5mpi");
    path = dir->path().string();
  }
  int length = static_cast<int>(path.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  path.resize(static_cast<std::size_t>(length));
  MPI_Bcast(path.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  if (!dir) dir = std::make_unique<TempDir>(path, false);
  return dir;
}

// Writes /w [6, 10] f32 by row blocks, /b [4, 9] bf16 by column blocks, /one [5] i64 from rank 1
// alone, and /r{r} [2, 3] i32 per rank, all with every rank taking part in each write_slab.
void write_checkpoint(const std::string& path, std::size_t funnel_bytes) {
  const int rank = world_rank();
  const int size = world_size();
  H5File file = H5File::create(path, MPI_COMM_WORLD, funnel_bytes);
  const Shape w_shape{2 * size, 10};
  const Shape b_shape{4, 3 * size};
  file.define_dataset("/w", H5DType::F32, w_shape);
  file.define_dataset("/b", H5DType::BF16, b_shape);
  file.define_dataset("/one", H5DType::I64, {5});
  for (int r = 0; r < size; ++r) {
    file.define_dataset("/per_rank/r" + std::to_string(r), H5DType::I32, {2, 3});
  }
  file.set_attr_string("/", "config", "{\"ranks\": " + std::to_string(size) + "}");
  file.set_attr_int("/one", "writer", 1);

  const auto w = make_values<float>(test::numel(w_shape), test::f32_value);
  const Shape w_offset{2 * rank, 0};
  const Shape w_count{2, 10};
  const auto w_part = extract(w, w_shape, w_offset, w_count);
  file.write_slab("/w", H5DType::F32, w_offset, w_count, w_part.data());

  const auto b = make_values<std::uint16_t>(test::numel(b_shape), test::bf16_value);
  const Shape b_offset{0, 3 * rank};
  const Shape b_count{4, 3};
  const auto b_part = extract(b, b_shape, b_offset, b_count);
  file.write_slab("/b", H5DType::BF16, b_offset, b_count, b_part.data());

  const auto one = make_values<std::int64_t>(5, test::i64_value);
  file.write_slab("/one", H5DType::I64, {0}, {rank == 1 ? 5 : 0}, rank == 1 ? one.data() : nullptr);

  for (int r = 0; r < size; ++r) {
    const auto values =
        make_values<std::int32_t>(6, [&](std::int64_t i) { return test::i32_value(i + 100 * r); });
    const bool mine = r == rank;
    file.write_slab("/per_rank/r" + std::to_string(r), H5DType::I32, {0, 0}, {mine ? 2 : 0, 3},
                    mine ? values.data() : nullptr);
  }
  file.commit();
}

// Every rank reads slabs written by another rank, and a dataset no other rank reads.
void check_checkpoint(const std::string& path) {
  const int rank = world_rank();
  const int size = world_size();
  H5File file = H5File::open_read(path, MPI_COMM_WORLD);
  const Shape w_shape{2 * size, 10};
  const Shape b_shape{4, 3 * size};
  const auto w = make_values<float>(test::numel(w_shape), test::f32_value);
  const auto b = make_values<std::uint16_t>(test::numel(b_shape), test::bf16_value);

  // Rows of the next rank, and a block across every rank's rows.
  const int next = (rank + 1) % size;
  std::vector<float> rows(2 * 10);
  file.read_slab("/w", H5DType::F32, {2 * next, 0}, {2, 10}, rows.data());
  EXPECT_TRUE(same_bits(rows, extract(w, w_shape, {2 * next, 0}, {2, 10}))) << "rank " << rank;
  std::vector<float> block(static_cast<std::size_t>(2 * size - 1) * 2);
  file.read_slab("/w", H5DType::F32, {1, rank}, {2 * size - 1, 2}, block.data());
  EXPECT_TRUE(same_bits(block, extract(w, w_shape, {1, rank}, {2 * size - 1, 2})));
  std::uint64_t expected = (rows.size() + block.size()) * sizeof(float);
  EXPECT_EQ(file.bytes_read(), expected);

  // Rows of the bf16 dataset cut across every rank's columns.
  std::vector<std::uint16_t> across(static_cast<std::size_t>(3 * size));
  file.read_slab("/b", H5DType::BF16, {rank % 4, 0}, {1, 3 * size}, across.data());
  EXPECT_EQ(across, extract(b, b_shape, {rank % 4, 0}, {1, 3 * size}));
  expected += across.size() * sizeof(std::uint16_t);
  EXPECT_EQ(file.bytes_read(), expected);

  // Independent reads: only this rank reads its dataset.
  std::vector<std::int32_t> mine(6);
  const std::string mine_name = "/per_rank/r" + std::to_string(next);
  file.read_slab(mine_name, H5DType::I32, {0, 0}, {2, 3}, mine.data());
  EXPECT_EQ(mine, make_values<std::int32_t>(
                      6, [&](std::int64_t i) { return test::i32_value(i + 100 * next); }));
  expected += mine.size() * sizeof(std::int32_t);
  if (rank == size - 1) {
    std::vector<std::int64_t> one(5);
    file.read_slab("/one", H5DType::I64, {0}, {5}, one.data());
    EXPECT_EQ(one, make_values<std::int64_t>(5, test::i64_value));
    expected += one.size() * sizeof(std::int64_t);
    EXPECT_EQ(file.attr_int("/one", "writer"), 1);
  }
  EXPECT_EQ(file.bytes_read(), expected) << "rank " << rank;

  // A collective read: every rank takes part, the last one with an empty selection.
  const int previous = (rank + size - 1) % size;
  const bool reads = rank != size - 1;
  std::vector<float> collective(2 * 10);
  file.read_slab_collective("/w", H5DType::F32, {reads ? 2 * previous : 0, 0}, {reads ? 2 : 0, 10},
                            collective.data());
  if (reads) {
    EXPECT_TRUE(same_bits(collective, extract(w, w_shape, {2 * previous, 0}, {2, 10})));
    expected += collective.size() * sizeof(float);
  }
  EXPECT_EQ(file.bytes_read(), expected) << "rank " << rank;
  EXPECT_EQ(file.attr_string("/", "config"), "{\"ranks\": " + std::to_string(size) + "}");
  EXPECT_EQ(file.dataset_dtype("/b"), H5DType::BF16);
  EXPECT_EQ(file.list_datasets("/per_rank").size(), static_cast<std::size_t>(size));
}

TEST(H5FileMpi, RanksWriteDisjointSlabsAndReadOthers) {
  const auto dir = shared_dir();
  const std::string path = dir->file("ckpt.h5");
  write_checkpoint(path, H5File::kDefaultFunnelBufferBytes);
  EXPECT_TRUE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  check_checkpoint(path);
  MPI_Barrier(MPI_COMM_WORLD);
}

// A funnel buffer smaller than any slab makes the serial build write in rounds during write_slab.
TEST(H5FileMpi, TinyFunnelBufferWritesTheSameFile) {
  const auto dir = shared_dir();
  const std::string path = dir->file("rounds.h5");
  write_checkpoint(path, 8);
  check_checkpoint(path);
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(H5FileMpi, OneRanksErrorIsThrownOnEveryRank) {
  const auto dir = shared_dir();
  const std::string path = dir->file("errors.h5");
  const int rank = world_rank();
  {
    H5File file = H5File::create(path, MPI_COMM_WORLD);
    file.define_dataset("/x", H5DType::F32, {3, 4});
    const std::vector<float> values(4, 2.0f);
    // Rank 2 (the last on fewer ranks) writes outside the dataset; every rank must throw.
    const int bad = world_size() - 1;
    try {
      file.write_slab("/x", H5DType::F32, {rank == bad ? 3 : rank, 0}, {1, 4}, values.data());
      ADD_FAILURE() << "rank " << rank << " did not throw";
    } catch (const std::runtime_error& error) {
      EXPECT_NE(std::string(error.what()).find("'/x'"), std::string::npos) << error.what();
      if (bad != 0) {
        EXPECT_NE(std::string(error.what()).find("rank " + std::to_string(bad)), std::string::npos);
      }
    }
    // Different arguments to a collective call are caught, not written.
    EXPECT_THROW(file.define_dataset("/y", H5DType::F32, {rank == 0 ? 2 : 3}), std::runtime_error);
    EXPECT_THROW(file.set_attr_int("/", "step", rank), std::runtime_error);
    // The file still works after the errors.
    file.write_slab("/x", H5DType::F32, {rank, 0}, {1, 4}, values.data());
  }
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  if (rank == 0) std::filesystem::create_directory(dir->file("not_a_file.h5"));
  MPI_Barrier(MPI_COMM_WORLD);
  try {
    H5File::open_read(dir->file("not_a_file.h5"), MPI_COMM_WORLD);
    ADD_FAILURE() << "rank " << rank << " opened a directory";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find("not_a_file.h5"), std::string::npos);
  }
  if (rank == 0) {
    std::ofstream(dir->file("garbage.h5")) << "no HDF5 here";
  }
  MPI_Barrier(MPI_COMM_WORLD);
  try {
    H5File::open_read(dir->file("garbage.h5"), MPI_COMM_WORLD);
    ADD_FAILURE() << "rank " << rank << " opened garbage";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find("garbage.h5"), std::string::npos);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// On ranks other than 0: only failed assertions, tagged with the rank.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::cerr << "[rank " << rank_ << "] " << (result.file_name() ? result.file_name() : "?") << ":"
              << result.line_number() << ": " << result.summary() << std::endl;
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace fastllm

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (fastllm::world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    std::unique_ptr<::testing::TestEventListener> quiet(
        listeners.Release(listeners.default_result_printer()));
    listeners.Append(std::make_unique<fastllm::FailurePrinter>(fastllm::world_rank()).release());
  }
  int failed = RUN_ALL_TESTS();
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return failed;
}
