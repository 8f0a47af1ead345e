// The Megatron indexed dataset: exact bytes against a layout built by hand from Megatron's format,
// round trips, and one clear error per kind of bad file.
#include "io/indexed_dataset.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <numeric>

#include "data_test_util.h"

namespace fastllm {
namespace {

using test::put_le;
using test::read_bytes;
using test::TempDir;
using test::user_error;
using test::write_bytes;

// The .idx Megatron's _IndexWriter writes for one sequence per document.
std::string expected_idx(std::uint8_t code, const std::vector<std::int32_t>& sizes,
                         std::size_t item) {
  std::string out("MMIDIDX\0\0", 9);
  put_le(out, 1, 8);
  put_le(out, code, 1);
  put_le(out, sizes.size(), 8);
  put_le(out, sizes.size() + 1, 8);
  for (std::int32_t s : sizes)
    put_le(out, static_cast<std::uint32_t>(s), 4);
  std::uint64_t pointer = 0;
  for (std::int32_t s : sizes) {
    put_le(out, pointer, 8);
    pointer += s * item;
  }
  for (std::size_t d = 0; d <= sizes.size(); ++d)
    put_le(out, d, 8);
  return out;
}

TEST(IndexedDataset, Uint16BytesMatchMegatronLayout) {
  TempDir dir;
  const std::string prefix = (dir / "tiny").string();
  {
    IndexedDatasetWriter writer(prefix, TokenDtype::kUint16);
    writer.add_document(std::vector<std::int32_t>{1, 2, 65535});
    writer.add_document(std::vector<std::int32_t>{});
    writer.add_document(std::vector<std::int32_t>{258, 7});
    writer.finalize();
  }
  EXPECT_EQ(read_bytes(prefix + ".idx"), expected_idx(8, {3, 0, 2}, 2));
  std::string bin;
  for (std::uint32_t t : {1u, 2u, 65535u, 258u, 7u})
    put_le(bin, t, 2);
  EXPECT_EQ(read_bytes(prefix + ".bin"), bin);
  EXPECT_FALSE(std::filesystem::exists(prefix + ".bin.tmp"));
  EXPECT_FALSE(std::filesystem::exists(prefix + ".idx.tmp"));
}

TEST(IndexedDataset, Int32BytesMatchMegatronLayout) {
  TempDir dir;
  const std::string prefix = (dir / "wide").string();
  {
    IndexedDatasetWriter writer(prefix, TokenDtype::kInt32);
    writer.add_document(std::vector<std::int32_t>{70000, 0});
    writer.add_document(std::vector<std::int32_t>{131071});
    writer.finalize();
  }
  EXPECT_EQ(read_bytes(prefix + ".idx"), expected_idx(4, {2, 1}, 4));
  std::string bin;
  for (std::uint32_t t : {70000u, 0u, 131071u})
    put_le(bin, t, 4);
  EXPECT_EQ(read_bytes(prefix + ".bin"), bin);
}

TEST(IndexedDataset, DtypeFollowsVocabularySize) {
  EXPECT_EQ(dtype_for_vocab(32000), TokenDtype::kUint16);
  EXPECT_EQ(dtype_for_vocab(65536), TokenDtype::kUint16);
  EXPECT_EQ(dtype_for_vocab(65537), TokenDtype::kInt32);
  EXPECT_EQ(dtype_for_vocab(131072), TokenDtype::kInt32);
  EXPECT_EQ(static_cast<int>(TokenDtype::kUint16), 8);
  EXPECT_EQ(static_cast<int>(TokenDtype::kInt32), 4);
}

TEST(IndexedDataset, RoundTripKeepsDocumentBoundaries) {
  TempDir dir;
  const std::string prefix = (dir / "docs").string();
  std::vector<std::vector<std::int32_t>> docs;
  for (int d = 0; d < 20; ++d) {
    std::vector<std::int32_t> doc(static_cast<std::size_t>(d * 7 % 11));
    std::iota(doc.begin(), doc.end(), d * 100);
    docs.push_back(doc);
  }
  {
    IndexedDatasetWriter writer(prefix, TokenDtype::kUint16);
    for (const auto& doc : docs)
      writer.add_document(doc);
    EXPECT_EQ(writer.num_documents(), 20);
    writer.finalize();
  }
  const IndexedDataset ds(prefix);
  EXPECT_EQ(ds.dtype(), TokenDtype::kUint16);
  ASSERT_EQ(ds.num_documents(), 20);
  ASSERT_EQ(ds.num_sequences(), 20);
  std::vector<std::int32_t> stream;
  for (int d = 0; d < 20; ++d) {
    EXPECT_EQ(ds.document(d), docs[static_cast<std::size_t>(d)]) << "document " << d;
    EXPECT_EQ(ds.sequence(d), docs[static_cast<std::size_t>(d)]);
    EXPECT_EQ(ds.document_index(d), d);
    stream.insert(stream.end(), docs[static_cast<std::size_t>(d)].begin(),
                  docs[static_cast<std::size_t>(d)].end());
  }
  EXPECT_EQ(ds.document_index(20), 20);
  ASSERT_EQ(ds.num_tokens(), static_cast<std::int64_t>(stream.size()));
  std::vector<std::int32_t> middle(9);
  ds.read_tokens(5, middle);
  EXPECT_EQ(middle, std::vector<std::int32_t>(stream.begin() + 5, stream.begin() + 14));
  EXPECT_EQ(ds.max_token(), *std::max_element(stream.begin(), stream.end()));
  EXPECT_THROW(ds.read_tokens(ds.num_tokens() - 3, middle), std::out_of_range);
}

TEST(IndexedDataset, ReadsMegatronDocumentsOfSeveralSequences) {
  // As preprocess_data.py --split-sentences writes it: document 0 = sentences {5,6} + {7},
  // document 1 = sentence {8,9,10}; int64 tokens (code 5).
  TempDir dir;
  const std::string prefix = (dir / "sentences").string();
  std::string idx("MMIDIDX\0\0", 9);
  put_le(idx, 1, 8);
  put_le(idx, 5, 1);
  put_le(idx, 3, 8);
  put_le(idx, 3, 8);
  for (int s : {2, 1, 3})
    put_le(idx, static_cast<std::uint64_t>(s), 4);
  for (int p : {0, 16, 24})
    put_le(idx, static_cast<std::uint64_t>(p), 8);
  for (int d : {0, 2, 3})
    put_le(idx, static_cast<std::uint64_t>(d), 8);
  std::string bin;
  for (int t : {5, 6, 7, 8, 9, 10})
    put_le(bin, static_cast<std::uint64_t>(t), 8);
  write_bytes(prefix + ".idx", idx);
  write_bytes(prefix + ".bin", bin);

  const IndexedDataset ds(prefix);
  EXPECT_EQ(ds.dtype(), TokenDtype::kInt64);
  EXPECT_EQ(ds.num_sequences(), 3);
  EXPECT_EQ(ds.num_documents(), 2);
  EXPECT_EQ(ds.document(0), (std::vector<std::int32_t>{5, 6, 7}));
  EXPECT_EQ(ds.document(1), (std::vector<std::int32_t>{8, 9, 10}));
  EXPECT_EQ(ds.sequence(1), (std::vector<std::int32_t>{7}));
  EXPECT_EQ(ds.sequence_start(2), 3);
}

TEST(IndexedDataset, AppendEqualsWritingEveryDocument) {
  TempDir dir;
  const std::vector<std::vector<std::int32_t>> a = {{1, 2}, {3}}, b = {{}, {4, 5, 6}};
  auto write = [&](const std::string& name, std::vector<std::vector<std::int32_t>> docs) {
    IndexedDatasetWriter writer((dir / name).string(), TokenDtype::kUint16);
    for (const auto& doc : docs)
      writer.add_document(doc);
    writer.finalize();
  };
  write("a", a);
  write("b", b);
  write("all", {a[0], a[1], b[0], b[1]});
  {
    IndexedDatasetWriter writer((dir / "merged").string(), TokenDtype::kUint16);
    writer.append(IndexedDataset((dir / "a").string()));
    writer.append(IndexedDataset((dir / "b").string()));
    writer.finalize();
  }
  EXPECT_EQ(read_bytes(dir / "merged.idx"), read_bytes(dir / "all.idx"));
  EXPECT_EQ(read_bytes(dir / "merged.bin"), read_bytes(dir / "all.bin"));

  IndexedDatasetWriter wide((dir / "wide").string(), TokenDtype::kInt32);
  test::expect_contains(user_error([&] { wide.append(IndexedDataset((dir / "a").string())); }),
                        {"uint16", "int32"});
}

TEST(IndexedDataset, UnfinishedWriterLeavesNoFiles) {
  TempDir dir;
  {
    IndexedDatasetWriter writer((dir / "gone").string(), TokenDtype::kUint16);
    writer.add_document(std::vector<std::int32_t>{1, 2, 3});
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(IndexedDataset, WriterRejectsTokenOutsideDtype) {
  TempDir dir;
  IndexedDatasetWriter writer((dir / "small").string(), TokenDtype::kUint16);
  test::expect_contains(user_error([&] {
                          writer.add_document(std::vector<std::int32_t>{5, 65536});
                        }),
                        {"small", "65536", "uint16", "0 to 65535"});
  test::expect_contains(user_error([&] {
                          IndexedDatasetWriter((dir / "nodir" / "x").string(), TokenDtype::kUint16);
                        }),
                        {"nodir"});
}

// A valid two-document uint16 dataset to break in the tests below.
class BadDataset : public ::testing::Test {
 protected:
  void SetUp() override {
    prefix_ = (dir_ / "ds").string();
    IndexedDatasetWriter writer(prefix_, TokenDtype::kUint16);
    writer.add_document(std::vector<std::int32_t>{10, 11, 12});
    writer.add_document(std::vector<std::int32_t>{13, 14, 999});
    writer.finalize();
    idx_ = read_bytes(prefix_ + ".idx");
    bin_ = read_bytes(prefix_ + ".bin");
  }
  std::string open_error() {
    return user_error([&] { IndexedDataset ds(prefix_); });
  }

  TempDir dir_;
  std::string prefix_, idx_, bin_;
};

TEST_F(BadDataset, MissingIdx) {
  std::filesystem::remove(prefix_ + ".idx");
  test::expect_contains(open_error(), {prefix_ + ".idx", "not found"});
}

TEST_F(BadDataset, MissingBin) {
  std::filesystem::remove(prefix_ + ".bin");
  test::expect_contains(open_error(), {prefix_ + ".bin", "not found"});
}

TEST_F(BadDataset, IdxShorterThanHeader) {
  write_bytes(prefix_ + ".idx", idx_.substr(0, 20));
  test::expect_contains(open_error(), {prefix_ + ".idx", "truncated", "20 bytes", "34"});
}

TEST_F(BadDataset, IdxArraysCut) {
  write_bytes(prefix_ + ".idx", idx_.substr(0, idx_.size() - 8));
  // 34 + 2 * 12 + 3 * 8 = 82 bytes expected.
  test::expect_contains(open_error(), {prefix_ + ".idx", "74", "82", "truncated"});
}

TEST_F(BadDataset, BadMagic) {
  std::string idx = idx_;
  idx.replace(0, 4, "TNTI");
  write_bytes(prefix_ + ".idx", idx);
  test::expect_contains(open_error(), {prefix_ + ".idx", "TNTIIDX", "MMIDIDX", "magic"});
}

TEST_F(BadDataset, BadVersion) {
  std::string idx = idx_;
  idx[9] = 2;
  write_bytes(prefix_ + ".idx", idx);
  test::expect_contains(open_error(), {prefix_ + ".idx", "version 2", "1 expected"});
}

TEST_F(BadDataset, UnknownDtypeCode) {
  std::string idx = idx_;
  idx[17] = 9;
  write_bytes(prefix_ + ".idx", idx);
  test::expect_contains(open_error(), {prefix_ + ".idx", "dtype code 9", "1 to 8"});
}

TEST_F(BadDataset, FloatDtypeCode) {
  std::string idx = idx_;
  idx[17] = 7;
  write_bytes(prefix_ + ".idx", idx);
  test::expect_contains(open_error(), {prefix_ + ".idx", "dtype code 7", "float32", "integer"});
}

TEST_F(BadDataset, BinShorterThanSizes) {
  write_bytes(prefix_ + ".bin", bin_.substr(0, bin_.size() - 2));
  test::expect_contains(open_error(),
                        {prefix_ + ".bin", "10 bytes", "6 uint16 tokens", "12 bytes"});
}

TEST_F(BadDataset, BinLongerThanSizes) {
  write_bytes(prefix_ + ".bin", bin_ + std::string(4, '\0'));
  test::expect_contains(open_error(), {prefix_ + ".bin", "16 bytes", "12 bytes"});
}

TEST_F(BadDataset, PointerDisagreesWithSizes) {
  std::string idx = idx_;
  // Second pointer: header 34 + sizes 8 + first pointer 8.
  idx[34 + 8 + 8] = 4;
  write_bytes(prefix_ + ".idx", idx);
  test::expect_contains(open_error(), {prefix_ + ".idx", "sequence 1", "byte 4", "6 expected"});
}

TEST_F(BadDataset, DocumentIndicesNotEndingAtSequenceCount) {
  std::string idx = idx_;
  idx[idx.size() - 8] = 5;
  write_bytes(prefix_ + ".idx", idx);
  test::expect_contains(open_error(), {prefix_ + ".idx", "0 to 5", "sequence count 2"});
}

TEST_F(BadDataset, TokenBeyondVocabulary) {
  const IndexedDataset ds(prefix_);
  EXPECT_EQ(ds.max_token(), 999);
  EXPECT_NO_THROW(ds.check_vocabulary(1000));
  test::expect_contains(user_error([&] { ds.check_vocabulary(500); }),
                        {prefix_ + ".bin", "document 1", "token id 999", "0 to 499", "500"});
}

}  // namespace
}  // namespace fastllm
