// H5File on one rank (MPI_COMM_SELF). Files are checked back both through H5File and through the
// raw HDF5 C API, which does not share H5File's code.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <mpi.h>

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "hdf5/h5_corrupt.h"
#include "hdf5/h5_test_util.h"
#include "io/checksum.h"
#include "io/error.h"
#include "io/hdf5_file.h"

namespace fastllm {
namespace {

using test::extract;
using test::make_values;
using test::same_bits;
using test::TempDir;
using Shape = std::vector<std::int64_t>;

class MpiEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) MPI_Init(nullptr, nullptr);
  }
  void TearDown() override { MPI_Finalize(); }
};
const auto* const kMpi =
    ::testing::AddGlobalTestEnvironment(std::make_unique<MpiEnvironment>().release());

template <class Fn>
void expect_error_naming(Fn&& fn, bool user_error, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one naming " << parts.front();
  } catch (const UserError& error) {
    EXPECT_TRUE(user_error) << "UserError where a runtime_error was expected: " << error.what();
    for (const std::string& part : parts)
      EXPECT_NE(std::string(error.what()).find(part), std::string::npos) << error.what();
  } catch (const std::runtime_error& error) {
    EXPECT_FALSE(user_error) << "runtime_error where a UserError was expected: " << error.what();
    for (const std::string& part : parts)
      EXPECT_NE(std::string(error.what()).find(part), std::string::npos) << error.what();
  }
}

// The raw HDF5 API's view of a file, for checks independent of H5File.
class RawFile {
 public:
  explicit RawFile(const std::string& path) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    id_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  }
  ~RawFile() {
    if (id_ >= 0) H5Fclose(id_);
  }
  RawFile(const RawFile&) = delete;
  RawFile& operator=(const RawFile&) = delete;
  hid_t id() const { return id_; }

  // Whole dataset read with the given memory type.
  template <class T>
  std::vector<T> read(const std::string& name, hid_t memory_type, std::size_t n) const {
    std::vector<T> out(n);
    const hid_t dataset = H5Dopen2(id_, name.c_str(), H5P_DEFAULT);
    EXPECT_GE(dataset, 0) << name;
    EXPECT_GE(H5Dread(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()), 0);
    H5Dclose(dataset);
    return out;
  }

  bool type_equals(const std::string& name, hid_t expected) const {
    const hid_t dataset = H5Dopen2(id_, name.c_str(), H5P_DEFAULT);
    const hid_t type = H5Dget_type(dataset);
    const bool equal = H5Tequal(type, expected) > 0;
    H5Tclose(type);
    H5Dclose(dataset);
    return equal;
  }

  // A scalar fixed- or variable-length string attribute.
  std::string string_attribute(const std::string& object, const std::string& key) const {
    const hid_t attribute =
        H5Aopen_by_name(id_, object.c_str(), key.c_str(), H5P_DEFAULT, H5P_DEFAULT);
    if (attribute < 0) return "<missing>";
    const hid_t type = H5Aget_type(attribute);
    std::string value;
    if (H5Tis_variable_str(type) > 0) {
      char* text = nullptr;
      H5Aread(attribute, type, &text);
      value = text;
      H5free_memory(text);
    } else {
      value.assign(H5Tget_size(type), '\0');
      H5Aread(attribute, type, value.data());
      value.resize(value.find_last_not_of('\0') + 1);
    }
    H5Tclose(type);
    H5Aclose(attribute);
    return value;
  }

 private:
  hid_t id_ = -1;
};

struct Datasets {
  Shape f32_shape{5, 7};
  Shape f64_shape{3, 4, 2};
  Shape i64_shape{6};
  Shape i32_shape{4, 5};
  Shape bf16_shape{8, 3};
  std::vector<float> f32 = make_values<float>(35, test::f32_value);
  std::vector<double> f64 = make_values<double>(24, test::f64_value);
  std::vector<std::int64_t> i64 = make_values<std::int64_t>(6, test::i64_value);
  std::vector<std::int32_t> i32 = make_values<std::int32_t>(20, test::i32_value);
  std::vector<std::uint16_t> bf16 = make_values<std::uint16_t>(24, test::bf16_value);
};

// Writes every dataset of `d` in several hyperslabs each, in an order unlike the file's.
void write_datasets(H5File& file, const Datasets& d) {
  file.define_dataset("/w/f32", H5DType::F32, d.f32_shape);
  file.define_dataset("w//f64/", H5DType::F64, d.f64_shape);
  file.define_dataset("/w/deep/i64", H5DType::I64, d.i64_shape);
  file.define_dataset("/w/i32", H5DType::I32, d.i32_shape);
  file.define_dataset("/bf16", H5DType::BF16, d.bf16_shape);
  // f32: a column block, the rest of the columns, and nothing (a rank without data).
  auto write_f32 = [&](Shape offset, Shape count) {
    const auto part = extract(d.f32, d.f32_shape, offset, count);
    file.write_slab("/w/f32", H5DType::F32, offset, count, part.data());
  };
  write_f32({0, 4}, {5, 3});
  write_f32({0, 0}, {5, 4});
  file.write_slab("/w/f32", H5DType::F32, {0, 0}, {0, 7}, nullptr);
  for (std::int64_t i = 2; i >= 0; --i) {
    const auto part = extract(d.f64, d.f64_shape, {i, 0, 0}, {1, 4, 2});
    file.write_slab("/w/f64", H5DType::F64, {i, 0, 0}, {1, 4, 2}, part.data());
  }
  file.write_slab("/w/deep/i64", H5DType::I64, {3}, {3}, d.i64.data() + 3);
  file.write_slab("/w/deep/i64", H5DType::I64, {0}, {3}, d.i64.data());
  file.write_slab("/w/i32", H5DType::I32, {0, 0}, {4, 5}, d.i32.data());
  file.write_slab("/bf16", H5DType::BF16, {4, 0}, {4, 3}, d.bf16.data() + 12);
  file.write_slab("/bf16", H5DType::BF16, {0, 0}, {4, 3}, d.bf16.data());
}

TEST(H5File, EveryDtypeRoundTripsBitExact) {
  TempDir dir("h5");
  const std::string path = dir.file("ckpt.h5");
  const Datasets d;
  {
    H5File file = H5File::create(path, MPI_COMM_SELF);
    write_datasets(file, d);
    file.commit();
  }
  H5File file = H5File::open_read(path, MPI_COMM_SELF);
  EXPECT_FALSE(file.writable());

  std::vector<float> f32(35);
  file.read_slab("/w/f32", H5DType::F32, {0, 0}, d.f32_shape, f32.data());
  EXPECT_TRUE(same_bits(f32, d.f32));
  std::vector<double> f64(24);
  file.read_slab("/w/f64", H5DType::F64, {0, 0, 0}, d.f64_shape, f64.data());
  EXPECT_TRUE(same_bits(f64, d.f64));
  std::vector<std::int64_t> i64(6);
  file.read_slab("w/deep/i64", H5DType::I64, {0}, {6}, i64.data());
  EXPECT_EQ(i64, d.i64);
  std::vector<std::int32_t> i32(20);
  file.read_slab("/w/i32", H5DType::I32, {0, 0}, d.i32_shape, i32.data());
  EXPECT_EQ(i32, d.i32);
  std::vector<std::uint16_t> bf16(24);
  file.read_slab("/bf16", H5DType::BF16, {0, 0}, d.bf16_shape, bf16.data());
  EXPECT_EQ(bf16, d.bf16);

  // Slabs crossing the ones written.
  std::vector<float> block(2 * 3);
  file.read_slab("/w/f32", H5DType::F32, {2, 3}, {2, 3}, block.data());
  EXPECT_TRUE(same_bits(block, extract(d.f32, d.f32_shape, {2, 3}, {2, 3})));
  std::vector<double> corner(2 * 2 * 1);
  file.read_slab("/w/f64", H5DType::F64, {1, 2, 1}, {2, 2, 1}, corner.data());
  EXPECT_TRUE(same_bits(corner, extract(d.f64, d.f64_shape, {1, 2, 1}, {2, 2, 1})));

  const std::uint64_t expected_bytes = 35 * 4 + 24 * 8 + 6 * 8 + 20 * 4 + 24 * 2 + 6 * 4 + 4 * 8;
  EXPECT_EQ(file.bytes_read(), expected_bytes);
  std::vector<float> nothing;
  file.read_slab("/w/f32", H5DType::F32, {5, 0}, {0, 7}, nothing.data());
  EXPECT_EQ(file.bytes_read(), expected_bytes);

  EXPECT_EQ(file.dataset_dtype("/w/f32"), H5DType::F32);
  EXPECT_EQ(file.dataset_dtype("/w/f64"), H5DType::F64);
  EXPECT_EQ(file.dataset_dtype("/w/deep/i64"), H5DType::I64);
  EXPECT_EQ(file.dataset_dtype("/w/i32"), H5DType::I32);
  EXPECT_EQ(file.dataset_dtype("/bf16"), H5DType::BF16);
  EXPECT_EQ(file.dataset_shape("/w/f64"), d.f64_shape);
  EXPECT_EQ(file.dataset_shape("/bf16"), d.bf16_shape);
  EXPECT_TRUE(file.has("/w/i32"));
  EXPECT_FALSE(file.has("/w"));
  EXPECT_FALSE(file.has("/w/nothing"));
  EXPECT_FALSE(file.has("/w/i32/below"));
  EXPECT_EQ(file.list_datasets("/"),
            (std::vector<std::string>{"/bf16", "/w/deep/i64", "/w/f32", "/w/f64", "/w/i32"}));
  EXPECT_EQ(file.list_datasets("/w/deep/"), (std::vector<std::string>{"/w/deep/i64"}));
}

TEST(H5File, RawHdf5SeesTheStoredTypesAndBf16Marker) {
  TempDir dir("h5");
  const std::string path = dir.file("raw.h5");
  const Datasets d;
  {
    H5File file = H5File::create(path, MPI_COMM_SELF);
    write_datasets(file, d);
    file.commit();
  }
  RawFile raw(path);
  ASSERT_GE(raw.id(), 0);
  EXPECT_TRUE(raw.type_equals("/w/f32", H5T_IEEE_F32LE));
  EXPECT_TRUE(raw.type_equals("/w/f64", H5T_IEEE_F64LE));
  EXPECT_TRUE(raw.type_equals("/w/deep/i64", H5T_STD_I64LE));
  EXPECT_TRUE(raw.type_equals("/w/i32", H5T_STD_I32LE));
  EXPECT_TRUE(raw.type_equals("/bf16", H5T_STD_U16LE));
  EXPECT_EQ(raw.string_attribute("/bf16", "dtype"), "bfloat16");
  EXPECT_EQ(raw.string_attribute("/w/f32", "dtype"), "<missing>");
  EXPECT_EQ(raw.read<std::uint16_t>("/bf16", H5T_NATIVE_UINT16, 24), d.bf16);
  EXPECT_TRUE(same_bits(raw.read<float>("/w/f32", H5T_NATIVE_FLOAT, 35), d.f32));
  EXPECT_EQ(raw.read<std::int64_t>("/w/deep/i64", H5T_NATIVE_INT64, 6), d.i64);
}

std::string long_json(std::size_t bytes) {
  std::string json = "{\"layers\": [";
  for (int i = 0; json.size() < bytes; ++i) {
    json += (i ? ", " : "") + std::string("{\"index\": ") + std::to_string(i) +
            ", \"name\": \"model.layers." + std::to_string(i) + ".mlp\", \"ok\": true}";
  }
  return json + "], \"unicode\": \"\xc3\xa9\xe2\x82\xac\"}";
}

TEST(H5File, AttributesRoundTripIncludingLongJson) {
  TempDir dir("h5");
  const std::string path = dir.file("attrs.h5");
  const std::string json = long_json(100 * 1024);
  const std::string huge = long_json(3 * 1024 * 1024);
  ASSERT_GT(json.size(), 100u * 1024);
  {
    H5File file = H5File::create(path, MPI_COMM_SELF);
    file.define_dataset("/model/layers/q", H5DType::F32, {2, 4, 4});
    const std::vector<float> zeros(32, 0.0f);
    file.write_slab("/model/layers/q", H5DType::F32, {0, 0, 0}, {2, 4, 4}, zeros.data());
    file.set_attr_string("/", "config", "replaced below");
    file.set_attr_string("/", "config", json);
    file.set_attr_string("", "huge", huge);
    file.set_attr_string("/", "empty", "");
    file.set_attr_int("/", "step", 123456789012345);
    file.set_attr_int("/", "min", std::numeric_limits<std::int64_t>::min());
    file.set_attr_double("/", "lr", 0.1);
    file.set_attr_double("/", "tiny", -4.9e-324);
    file.set_attr_int("/model", "layers", 2);
    file.set_attr_string("/model/layers/q", "layout", "[L, out, H]");
    file.set_attr_double("model/layers/q/", "scale", -1e300);
    file.commit();
  }
  H5File file = H5File::open_read(path, MPI_COMM_SELF);
  // Compared as booleans: a failure must not print megabytes.
  EXPECT_TRUE(file.attr_string("/", "config") == json);
  EXPECT_TRUE(file.attr_string("/", "huge") == huge);
  EXPECT_EQ(file.attr_string("/", "empty"), "");
  EXPECT_EQ(file.attr_int("/", "step"), 123456789012345);
  EXPECT_EQ(file.attr_int("", "min"), std::numeric_limits<std::int64_t>::min());
  EXPECT_EQ(file.attr_double("/", "lr"), 0.1);
  EXPECT_EQ(file.attr_double("/", "tiny"), -4.9e-324);
  EXPECT_EQ(file.attr_int("/model", "layers"), 2);
  EXPECT_EQ(file.attr_string("/model/layers/q", "layout"), "[L, out, H]");
  EXPECT_EQ(file.attr_double("/model/layers/q", "scale"), -1e300);
  EXPECT_TRUE(file.has_attr("/", "config"));
  EXPECT_FALSE(file.has_attr("/", "nope"));
  EXPECT_FALSE(file.has_attr("/missing", "config"));
  EXPECT_TRUE(RawFile(path).string_attribute("/", "config") == json);

  expect_error_naming([&] { file.attr_string("/", "nope"); }, true, {"'nope'", path});
  expect_error_naming([&] { file.attr_int("/", "config"); }, true, {"'config'", "integer"});
  expect_error_naming([&] { file.attr_double("/", "step"); }, true, {"'step'", "floating"});
  expect_error_naming([&] { file.attr_string("/", "step"); }, true, {"'step'", "string"});
  expect_error_naming([&] { file.attr_int("/model/k", "layers"); }, true, {"'/model/k'", path});
}

// Files written by other tools (h5py writes variable-length strings; a bare uint16 dataset is not
// bf16) are read as what they are.
TEST(H5File, ReadsForeignFiles) {
  TempDir dir("h5");
  const std::string path = dir.file("foreign.h5");
  {
    const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t dims[1] = {3};
    const hid_t space = H5Screate_simple(1, dims, nullptr);
    const hid_t dataset =
        H5Dcreate2(file, "u16", H5T_STD_U16BE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    const std::uint16_t values[3] = {1, 2, 3};
    H5Dwrite(dataset, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, values);
    const hid_t doubles =
        H5Dcreate2(file, "f64be", H5T_IEEE_F64BE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    const double reals[3] = {0.5, -2.25, 1e-310};
    H5Dwrite(doubles, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, reals);
    const hid_t string = H5Tcopy(H5T_C_S1);
    H5Tset_size(string, H5T_VARIABLE);
    const hid_t scalar = H5Screate(H5S_SCALAR);
    const hid_t attribute = H5Acreate2(file, "note", string, scalar, H5P_DEFAULT, H5P_DEFAULT);
    const char* text = "written by h5py";
    H5Awrite(attribute, string, &text);
    H5Aclose(attribute);
    H5Sclose(scalar);
    H5Tclose(string);
    H5Dclose(doubles);
    H5Dclose(dataset);
    H5Sclose(space);
    H5Fclose(file);
  }
  H5File file = H5File::open_read(path, MPI_COMM_SELF);
  EXPECT_EQ(file.attr_string("/", "note"), "written by h5py");
  EXPECT_EQ(file.dataset_dtype("/f64be"), H5DType::F64);
  std::vector<double> reals(3);
  file.read_slab("/f64be", H5DType::F64, {0}, {3}, reals.data());
  EXPECT_EQ(reals, (std::vector<double>{0.5, -2.25, 1e-310}));
  expect_error_naming([&] { file.dataset_dtype("/u16"); }, true, {"'/u16'", "bfloat16", path});
}

TEST(H5File, BrokenFilesAreUserErrorsNamingTheFile) {
  TempDir dir("h5");
  const std::string good = dir.file("good.h5");
  {
    H5File file = H5File::create(good, MPI_COMM_SELF);
    file.define_dataset("/x", H5DType::F32, {64, 64});
    const std::vector<float> values(64 * 64, 1.5f);
    file.write_slab("/x", H5DType::F32, {0, 0}, {64, 64}, values.data());
    file.commit();
  }
  std::string bytes;
  {
    std::ifstream in(good, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  ASSERT_GT(bytes.size(), 64u * 64 * 4);
  const std::string truncated = dir.file("truncated.h5");
  std::ofstream(truncated, std::ios::binary).write(bytes.data(), bytes.size() / 2);
  expect_error_naming([&] { H5File::open_read(truncated, MPI_COMM_SELF); }, true, {truncated});

  const std::string garbage = dir.file("garbage.h5");
  std::ofstream(garbage, std::ios::binary) << "this is not an HDF5 file\n";
  expect_error_naming([&] { H5File::open_read(garbage, MPI_COMM_SELF); }, true, {garbage});
  expect_error_naming([&] { H5File::open_read(dir.file("absent.h5"), MPI_COMM_SELF); }, true,
                      {dir.file("absent.h5"), "does not exist"});
  expect_error_naming([&] { H5File::open_read(dir.path().string(), MPI_COMM_SELF); }, true,
                      {dir.path().string()});

  H5File file = H5File::open_read(good, MPI_COMM_SELF);
  std::vector<float> out(64 * 64);
  expect_error_naming(
      [&] {
        file.read_slab("/y", H5DType::F32, {0, 0}, {1, 1}, out.data());
      },
      true, {"'/y'", good});
  expect_error_naming([&] { file.read_slab("/x/z", H5DType::F32, {0}, {1}, out.data()); }, true,
                      {"'/x/z'", good});
  expect_error_naming([&] { file.dataset_shape("/y"); }, true, {"'/y'", good});
  expect_error_naming(
      [&] {
        file.read_slab("/x", H5DType::BF16, {0, 0}, {1, 1}, out.data());
      },
      true, {"'/x'", "float32", "expected bfloat16"});
  expect_error_naming(
      [&] {
        file.read_slab("/x", H5DType::F32, {60, 0}, {8, 64}, out.data());
      },
      true, {"'/x'", "[60, 0]", "[8, 64]", "[64, 64]"});
  expect_error_naming([&] { file.read_slab("/x", H5DType::F32, {0}, {64}, out.data()); }, true,
                      {"'/x'", "[64, 64]"});
  expect_error_naming([&] { file.list_datasets("/nowhere"); }, true, {"'/nowhere'"});
  EXPECT_EQ(file.bytes_read(), 0u);
}

TEST(H5File, UncommittedFilesNeverReachTheFinalPath) {
  TempDir dir("h5");
  const std::string path = dir.file("atomic.h5");
  {
    H5File file = H5File::create(path, MPI_COMM_SELF);
    EXPECT_TRUE(file.writable());
    EXPECT_EQ(file.path(), path);
    file.define_dataset("/x", H5DType::I32, {4});
    const std::vector<std::int32_t> values{1, 2, 3, 4};
    file.write_slab("/x", H5DType::I32, {0}, {4}, values.data());
    file.set_attr_int("/", "version", 1);
    file.flush();
    EXPECT_TRUE(std::filesystem::exists(path + ".tmp"));
    EXPECT_FALSE(std::filesystem::exists(path));
  }
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  {
    H5File file = H5File::create(path, MPI_COMM_SELF);
    file.set_attr_int("/", "version", 1);
    file.commit();
    EXPECT_THROW(file.set_attr_int("/", "version", 3), std::runtime_error);
  }
  {
    H5File file = H5File::create(path, MPI_COMM_SELF);
    file.set_attr_int("/", "version", 2);
    file.flush();
    // The committed file stays whole while its successor is being written.
    EXPECT_EQ(H5File::open_read(path, MPI_COMM_SELF).attr_int("/", "version"), 1);
  }
  EXPECT_EQ(H5File::open_read(path, MPI_COMM_SELF).attr_int("/", "version"), 1);
  {
    H5File file = H5File::create(path, MPI_COMM_SELF);
    file.set_attr_int("/", "version", 2);
    file.commit();
  }
  EXPECT_EQ(H5File::open_read(path, MPI_COMM_SELF).attr_int("/", "version"), 2);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  expect_error_naming([&] { H5File::create(dir.file("no/such/dir/x.h5"), MPI_COMM_SELF); }, true,
                      {dir.file("no/such/dir/x.h5.tmp")});
}

TEST(H5File, MisuseIsARuntimeErrorNamingTheCall) {
  TempDir dir("h5");
  const std::string path = dir.file("misuse.h5");
  H5File file = H5File::create(path, MPI_COMM_SELF);
  file.define_dataset("/a/b", H5DType::F32, {2, 3});
  const std::vector<float> values(6, 1.0f);
  expect_error_naming(
      [&] {
        file.write_slab("/c", H5DType::F32, {0, 0}, {2, 3}, values.data());
      },
      false, {"'/c'", "define_dataset"});
  expect_error_naming(
      [&] {
        file.write_slab("/a/b", H5DType::BF16, {0, 0}, {2, 3}, values.data());
      },
      false, {"'/a/b'", "bfloat16", "float32"});
  expect_error_naming(
      [&] {
        file.write_slab("/a/b", H5DType::F32, {1, 0}, {2, 3}, values.data());
      },
      false, {"'/a/b'", "[1, 0]", "[2, 3]"});
  expect_error_naming(
      [&] {
        file.define_dataset("/a/b", H5DType::F32, {2, 3});
      },
      false, {"'/a/b'"});
  expect_error_naming([&] { file.define_dataset("/a", H5DType::F32, {2}); }, false, {"'/a'"});
  expect_error_naming([&] { file.define_dataset("/a/b/c", H5DType::F32, {2}); }, false,
                      {"'/a/b/c'"});
  expect_error_naming([&] { file.define_dataset("/e", H5DType::F32, {}); }, false, {"'/e'"});
  expect_error_naming(
      [&] {
        file.define_dataset("/e", H5DType::F32, {3, 0});
      },
      false, {"'/e'", "[3, 0]"});
  expect_error_naming([&] { file.set_attr_int("/nothing", "k", 1); }, false, {"'/nothing'"});
  expect_error_naming([&] { file.set_attr_string("/a/b", "dtype", "float32"); }, false,
                      {"'dtype'", "'/a/b'"});
  std::vector<float> out(6);
  expect_error_naming(
      [&] {
        file.read_slab("/a/b", H5DType::F32, {0, 0}, {2, 3}, out.data());
      },
      false, {"read_slab", path});
  EXPECT_EQ(file.dataset_shape("/a/b"), (Shape{2, 3}));
  EXPECT_EQ(file.dataset_dtype("a/b"), H5DType::F32);
  EXPECT_TRUE(file.has("/a/b"));
  EXPECT_FALSE(file.has("/a"));
  EXPECT_EQ(file.list_datasets("/a"), (std::vector<std::string>{"/a/b"}));
  file.set_attr_string("/a", "note", "groups made by define_dataset take attributes");

  H5File moved = std::move(file);
  EXPECT_THROW(file.flush(), std::runtime_error);
  moved.write_slab("/a/b", H5DType::F32, {0, 0}, {2, 3}, values.data());
  moved.commit();
  H5File reader = H5File::open_read(path, MPI_COMM_SELF);
  expect_error_naming([&] { reader.define_dataset("/z", H5DType::F32, {1}); }, false,
                      {"define_dataset", "reading"});
  EXPECT_EQ(reader.attr_string("/a", "note"), "groups made by define_dataset take attributes");
}

// The checksum terms of all-zero data are the outputs of SplitMix64 seeded with 0, whose published
// first values (Vigna's splitmix64.c) are these.
TEST(H5File, ChecksumsOfZerosAreTheSplitMix64Sequence) {
  const std::uint64_t published[] = {0xE220A8397B1DCDAFull, 0x6E789E6AA1B965F4ull,
                                     0x06C45D188009454Full, 0xF88BB8A8724C81ECull};
  for (std::uint64_t n = 1; n <= 4; ++n)
    EXPECT_EQ(splitmix64_mix(n * kChecksumGolden), published[n - 1]) << n;

  TempDir dir("h5");
  const std::string path = dir.file("zeros.h5");
  {
    // 2 x 80 floats: rows of 80 >= 64 elements, so one chunk a row.
    H5File file = H5File::create(path, MPI_COMM_SELF);
    file.define_dataset("/z", H5DType::F32, {2, 80});
    const std::vector<float> zeros(160, 0.0f);
    file.write_slab("/z", H5DType::F32, {1, 0}, {1, 80}, zeros.data());
    file.write_slab("/z", H5DType::F32, {0, 0}, {1, 80}, zeros.data());
    file.commit();
  }
  // The same sums from the published generator's recurrence, written out independently.
  std::uint64_t expected[2] = {0, 0}, state = 0;
  for (int i = 0; i < 160; ++i) {
    state += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    expected[i / 80] += z ^ (z >> 31);
  }
  RawFile raw(path);
  const auto stored = raw.read<std::uint64_t>("/.checksums/z", H5T_NATIVE_UINT64, 2);
  EXPECT_EQ(stored[0], expected[0]);
  EXPECT_EQ(stored[1], expected[1]);
  H5File file = H5File::open_read(path, MPI_COMM_SELF);
  EXPECT_TRUE(file.has_checksums("/z"));
  EXPECT_EQ(file.list_datasets("/"), (std::vector<std::string>{"/z"}));
}

// One changed byte is found by every read of the chunk holding it, whatever slab the read asks
// for (a slab cutting the chunk reads and checks all of it), and the message names the dataset,
// the slab and the file; reads of other chunks still succeed.
TEST(H5File, AChangedByteIsFoundOnEveryReadOfItsChunk) {
  TempDir dir("h5");
  const std::string path = dir.file("flip.h5");
  const Shape shape{6, 100};
  const auto values = make_values<float>(600, test::f32_value);
  {
    H5File file = H5File::create(path, MPI_COMM_SELF);
    file.define_dataset("/w", H5DType::F32, shape);
    file.write_slab("/w", H5DType::F32, {0, 0}, {3, 100}, values.data());
    file.write_slab("/w", H5DType::F32, {3, 0}, {3, 100}, values.data() + 300);
    file.commit();
  }
  {
    H5File file = H5File::open_read(path, MPI_COMM_SELF);
    std::vector<float> all(600);
    file.read_slab("/w", H5DType::F32, {0, 0}, shape, all.data());
    EXPECT_TRUE(same_bits(all, values));
  }
  // Element [4, 17]: row 4, the fifth chunk.
  test::flip_stored_byte(path, "/w", (4 * 100 + 17) * 4 + 1);
  H5File file = H5File::open_read(path, MPI_COMM_SELF);
  std::vector<float> out(600);
  expect_error_naming(
      [&] {
        file.read_slab("/w", H5DType::F32, {0, 0}, shape, out.data());
      },
      true, {"checksum mismatch", "'/w'", path, "[0, 0]", "[400, 500)"});
  expect_error_naming(
      [&] {
        file.read_slab("/w", H5DType::F32, {4, 0}, {1, 100}, out.data());
      },
      true, {"checksum mismatch", "'/w'", path, "[4, 0]"});
  // Columns 50..59 of rows 3..4: the changed element is outside the slab, inside its chunks.
  expect_error_naming(
      [&] {
        file.read_slab("/w", H5DType::F32, {3, 50}, {2, 10}, out.data());
      },
      true, {"checksum mismatch", "'/w'", "[3, 50]"});
  std::vector<float> block(2 * 10);
  file.read_slab("/w", H5DType::F32, {2, 50}, {2, 10}, block.data());
  EXPECT_TRUE(same_bits(block, extract(values, shape, {2, 50}, {2, 10})));
  std::vector<float> rows(2 * 100);
  file.read_slab_collective("/w", H5DType::F32, {0, 0}, {2, 100}, rows.data());
  EXPECT_TRUE(same_bits(rows, extract(values, shape, {0, 0}, {2, 100})));
}

TEST(H5File, ReserveNamesTheFolderAndTheBytes) {
  TempDir dir("h5");
  const std::string path = dir.file("big.h5");
  H5File file = H5File::create(path, MPI_COMM_SELF);
  const std::uint64_t exabyte = std::uint64_t{1} << 60;
  expect_error_naming([&] { file.reserve(exabyte); }, true,
                      {"not enough space", dir.path().string(), std::to_string(exabyte)});
}

TEST(H5File, DTypeNamesAndSizes) {
  EXPECT_EQ(h5_dtype_size(H5DType::F32), sizeof(float));
  EXPECT_EQ(h5_dtype_size(H5DType::F64), sizeof(double));
  EXPECT_EQ(h5_dtype_size(H5DType::I64), sizeof(std::int64_t));
  EXPECT_EQ(h5_dtype_size(H5DType::I32), sizeof(std::int32_t));
  EXPECT_EQ(h5_dtype_size(H5DType::BF16), 2u);
  EXPECT_STREQ(h5_dtype_name(H5DType::BF16), "bfloat16");
}

}  // namespace
}  // namespace fastllm
