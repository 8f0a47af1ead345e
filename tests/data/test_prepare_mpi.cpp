// prepare_dataset under 3 MPI ranks (run by mpiexec -np 3): the dataset is byte-identical to the
// one a single rank writes, whatever the split of files and lines over ranks, and an error in one
// rank's share reaches every rank.
#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>

#include "data/prepare.h"
#include "data_test_util.h"
#include "prepare_support.h"

namespace fastllm {
namespace {

using test::options_for;
using test::read_bytes;
using test::write_bytes;

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// A folder every rank sees, made and removed by rank 0.
class SharedDir {
 public:
  SharedDir() {
    std::string path;
    if (world_rank() == 0) {
      dir_ = std::make_unique<test::TempDir>();
      path = dir_->path().string();
    }
    int length = static_cast<int>(path.size());
    MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
    path.resize(static_cast<std::size_t>(length));
    MPI_Bcast(path.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
    path_ = path;
  }
  ~SharedDir() { MPI_Barrier(MPI_COMM_WORLD); }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::unique_ptr<test::TempDir> dir_;
  std::filesystem::path path_;
};

// Rank 0 alone (on MPI_COMM_SELF) and then all ranks write the dataset; the bytes must agree.
void expect_same_as_one_rank(const SharedDir& dir, const PrepareOptions& base) {
  PrepareOptions one = base;
  one.output_prefix = (dir / "one").string();
  PrepareStats single;
  if (world_rank() == 0) single = prepare_dataset(one, MPI_COMM_SELF);
  MPI_Barrier(MPI_COMM_WORLD);

  PrepareOptions many = base;
  many.output_prefix = (dir / "many").string();
  const PrepareStats stats = prepare_dataset(many, MPI_COMM_WORLD);
  if (world_rank() == 0) {
    EXPECT_EQ(read_bytes(dir / "many.bin"), read_bytes(dir / "one.bin"));
    EXPECT_EQ(read_bytes(dir / "many.idx"), read_bytes(dir / "one.idx"));
    EXPECT_GT(read_bytes(dir / "one.idx").size(), 34u);
    EXPECT_EQ(stats.documents, single.documents);
    EXPECT_EQ(stats.tokens, single.tokens);
    EXPECT_EQ(stats.skipped, single.skipped);
    for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
      EXPECT_EQ(entry.path().filename().string().find(".part-"), std::string::npos)
          << "partial dataset left behind: " << entry.path();
    }
  }
  // Every rank gets the same totals.
  long long mine[2] = {stats.documents, stats.tokens};
  long long lowest[2] = {0, 0};
  MPI_Allreduce(mine, lowest, 2, MPI_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
  EXPECT_EQ(lowest[0], stats.documents);
  EXPECT_EQ(lowest[1], stats.tokens);
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(PrepareMpi, SplitLinesOfOneFileAcrossRanks) {
  SharedDir dir;
  auto o = options_for({FASTLLM_TEST_CORPUS}, "");
  o.split_lines = true;
  expect_same_as_one_rank(dir, o);
}

TEST(PrepareMpi, MixedTextAndJsonlFiles) {
  SharedDir dir;
  if (world_rank() == 0) {
    std::string jsonl;
    for (int i = 0; i < 200; ++i) {
      jsonl += "{\"text\": \"Record " + std::to_string(i) + " of the ledger, " +
               std::string(static_cast<std::size_t>(i % 13), 'x') + " written down.\"}\n";
      if (i % 17 == 0) jsonl += "\n";
    }
    write_bytes(dir / "ledger.jsonl", jsonl);
    write_bytes(dir / "a.txt", "A whole file that is one document.\nWith two lines.");
    write_bytes(dir / "b.txt", "");
    write_bytes(dir / "c.txt", "Another short document.");
  }
  MPI_Barrier(MPI_COMM_WORLD);
  expect_same_as_one_rank(dir,
                          options_for({(dir / "a.txt").string(), (dir / "ledger.jsonl").string(),
                                       (dir / "b.txt").string(), (dir / "c.txt").string()},
                                      ""));
}

TEST(PrepareMpi, MoreRanksThanDocuments) {
  SharedDir dir;
  if (world_rank() == 0) write_bytes(dir / "tiny.txt", "Only one short file.");
  MPI_Barrier(MPI_COMM_WORLD);
  expect_same_as_one_rank(dir, options_for({(dir / "tiny.txt").string()}, ""));
}

TEST(PrepareMpi, EveryRankReportsAnErrorInTheLastShare) {
  SharedDir dir;
  if (world_rank() == 0) {
    std::string jsonl;
    for (int i = 0; i < 300; ++i)
      jsonl += "{\"text\": \"line number " + std::to_string(i) + "\"}\n";
    jsonl += "{\"text\": oops}\n";
    write_bytes(dir / "bad.jsonl", jsonl);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string message = test::user_error([&] {
    prepare_dataset(options_for({(dir / "bad.jsonl").string()}, (dir / "out").string()),
                    MPI_COMM_WORLD);
  });
  test::expect_contains(message, {(dir / "bad.jsonl").string(), "line 301", "not valid JSON"});
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) {
    std::vector<std::string> left;
    for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
      left.push_back(entry.path().filename().string());
    }
    EXPECT_EQ(left, std::vector<std::string>{"bad.jsonl"});
  }
}

}  // namespace
}  // namespace fastllm

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  // The run fails when any rank's tests fail.
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
