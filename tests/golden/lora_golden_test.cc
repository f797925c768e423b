// LoRA adapters against PEFT: for every fixture model and each of its PEFT adapters
// (tests/golden/fixtures/<model>/adapters/, made by tools/make_lora_fixtures.py), logits within
// 1e-4 relative of PEFT's and 32-token greedy continuations identical, with fp32 and with bf16
// weights (base and adapter, against PEFT run on bf16-rounded matrices); PEFT's mixed batch
// (adapter_names with "__base__" rows) row for row. Then the batch properties: a row's logits
// are bit-identical alone and in any mixed batch, in prefill and in decode; rows without an
// adapter are bit-identical to the base model; and dropping other adapters mid-generation never
// changes a request's tokens.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/mmap_file.h"
#include "gtest/gtest.h"
#include "model/adapter_store.h"
#include "server/adapters/registry.h"
#include "tests/golden/golden_harness.h"

namespace ls {
namespace {

using golden::Argmax;
using golden::FixtureNames;
using golden::FixturesDir;
using golden::Harness;
using golden::kGreedySteps;
using golden::kRelTolerance;
using golden::RelativeError;

constexpr int32_t kMaxRank = 64;

std::vector<std::string> AdapterNames(const std::string& model_dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(model_dir + "/adapters", ec)) {
    if (e.is_directory()) names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::unique_ptr<LoraAdapter> LoadAdapter(const std::string& dir, const Harness& h, DType dtype) {
  auto config = MappedFile::Open(dir + "/adapter_config.json");
  EXPECT_TRUE(config.ok()) << config.status();
  auto tensors = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  EXPECT_TRUE(tensors.ok()) << tensors.status();
  if (!config.ok() || !tensors.ok()) return nullptr;
  LoraLoadOptions options;
  options.dtype = dtype;
  options.max_lora_rank = kMaxRank;
  options.base_weights = &h.weights();
  options.name = dir;
  const absl::string_view json(reinterpret_cast<const char*>((*config)->data()), (*config)->size());
  auto adapter = LoadLoraAdapter(json, **tensors, h.config(), options);
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  return adapter.ok() ? std::move(*adapter) : nullptr;
}

struct Expected {
  std::vector<int32_t> ids, greedy;
  std::vector<float> logits;  // [len, vocab]
};

// `name` is a tensor prefix ("<adapter>.prompt0" or "mixed.row3"); greedy may be absent.
bool ReadCase(const SafetensorsFile& file, const std::string& name, const std::string& suffix,
              Expected* out) {
  const SafetensorsEntry* ids = file.Find(name + ".ids");
  const SafetensorsEntry* logits = file.Find(name + ".logits_" + suffix);
  if (ids == nullptr || logits == nullptr) return false;
  out->ids.resize(static_cast<size_t>(ids->numel()));
  SafetensorsFile::CopyTo(*ids, out->ids.data());
  auto values = file.ReadAsFloat32(*logits);
  EXPECT_TRUE(values.ok()) << values.status();
  out->logits = std::move(*values);
  out->greedy.clear();
  if (const SafetensorsEntry* greedy = file.Find(name + ".greedy_" + suffix)) {
    out->greedy.resize(static_cast<size_t>(greedy->numel()));
    SafetensorsFile::CopyTo(*greedy, out->greedy.data());
  }
  return true;
}

struct Param {
  std::string fixture;
  DType dtype;
};

class LoraGoldenTest : public testing::TestWithParam<Param> {};

TEST_P(LoraGoldenTest, MatchesPeft) {
  const std::string dir = FixturesDir() + "/" + GetParam().fixture;
  const bool f32 = GetParam().dtype == DType::kF32;
  const std::string suffix = f32 ? "f32" : "bf16";
  Harness h(dir, GetParam().dtype, kMaxRank);
  const int vocab = h.vocab();
  auto expected = SafetensorsFile::Open(dir + "/expected_lora.safetensors");
  ASSERT_TRUE(expected.ok()) << expected.status();

  const std::vector<std::string> names = AdapterNames(dir);
  ASSERT_GE(names.size(), 4u) << dir;
  std::map<std::string, std::unique_ptr<LoraAdapter>> adapters;
  for (const std::string& name : names) {
    adapters[name] = LoadAdapter(dir + "/adapters/" + name, h, GetParam().dtype);
    ASSERT_NE(adapters[name], nullptr) << name;
  }

  // Each adapter, each prompt alone: prefill logits at every position, then greedy decode.
  // The prefill logits and decode steps are kept for the batch properties below.
  struct Solo {
    const LoraGroupTable* table;
    std::vector<int32_t> ids;
    std::vector<std::vector<float>> prefill, decode;
  };
  std::vector<Solo> solos;
  for (const std::string& name : names) {
    for (int p = 0;; ++p) {
      Expected e;
      if (!ReadCase(**expected, name + ".prompt" + std::to_string(p), suffix, &e)) {
        ASSERT_GE(p, 1) << "no prompts for " << name;
        break;
      }
      const LoraGroupTable* table = &adapters[name]->groups();
      const int len = static_cast<int>(e.ids.size());
      const int seq = h.NewSequence(len + kGreedySteps);
      std::vector<Harness::Row> rows;
      for (int t = 0; t < len; ++t) rows.push_back({seq, e.ids[t], t, true, table});
      auto logits = h.Run(rows);
      for (int t = 0; t < len; ++t) {
        EXPECT_LE(RelativeError(logits[t], e.logits.data() + static_cast<size_t>(t) * vocab, vocab),
                  kRelTolerance)
            << name << " prompt " << p << " position " << t;
      }
      std::vector<std::vector<float>> steps;
      std::vector<int32_t> generated;
      int32_t next = Argmax(logits.back());
      for (int s = 0; s < kGreedySteps; ++s) {
        generated.push_back(next);
        auto step = h.Run({{seq, next, len + s, true, table}});
        steps.push_back(step[0]);
        next = Argmax(step[0]);
      }
      EXPECT_EQ(generated, e.greedy) << name << " prompt " << p << ": greedy continuation";
      solos.push_back({table, e.ids, std::move(logits), std::move(steps)});
    }
  }

  // PEFT's mixed batch (fp32 only): every row in one batch, each with its adapter or none.
  if (f32) {
    std::vector<Harness::Row> rows;
    std::vector<Expected> cases;
    const std::vector<std::string> row_adapters = {
        "attn_r4",       "__base__",         "all_linear_r16_patterns",
        "embed_head_r8", "rslora_r64_regex", "layers1_excl_r8",
        "__base__",      "attn_r4"};
    for (int r = 0;; ++r) {
      Expected e;
      if (!ReadCase(**expected, "mixed.row" + std::to_string(r), "f32", &e)) break;
      ASSERT_LT(static_cast<size_t>(r), row_adapters.size());
      const std::string& name = row_adapters[static_cast<size_t>(r)];
      const LoraGroupTable* table = name == "__base__" ? nullptr : &adapters.at(name)->groups();
      const int seq = h.NewSequence(static_cast<int>(e.ids.size()));
      for (size_t t = 0; t < e.ids.size(); ++t) {
        rows.push_back({seq, e.ids[t], static_cast<int32_t>(t), true, table});
      }
      cases.push_back(std::move(e));
    }
    ASSERT_GE(cases.size(), 4u) << "no mixed batch in " << dir;
    auto logits = h.Run(rows);
    size_t k = 0;
    for (size_t r = 0; r < cases.size(); ++r) {
      for (size_t t = 0; t < cases[r].ids.size(); ++t, ++k) {
        EXPECT_LE(RelativeError(logits[k], cases[r].logits.data() + t * vocab, vocab),
                  kRelTolerance)
            << "mixed batch row " << r << " (" << row_adapters[r] << ") position " << t;
      }
    }
  }

  // Every solo run again, all in one prefill batch mixed with base rows, then decoding together
  // while base rows come and go and other adapters are dropped: bit-identical to alone.
  {
    std::vector<Harness::Row> rows;
    std::vector<int> seqs;
    const int base_seq = h.NewSequence(64);
    for (const Solo& s : solos) {
      const int seq = h.NewSequence(static_cast<int>(s.ids.size()) + kGreedySteps);
      seqs.push_back(seq);
      for (size_t t = 0; t < s.ids.size(); ++t) {
        rows.push_back({seq, s.ids[t], static_cast<int32_t>(t), true, s.table});
      }
      rows.push_back({base_seq, 5, static_cast<int32_t>(seqs.size() - 1), false, nullptr});
    }
    auto logits = h.Run(rows);
    size_t k = 0;
    for (size_t i = 0; i < solos.size(); ++i) {
      for (size_t t = 0; t < solos[i].ids.size(); ++t, ++k) {
        ASSERT_EQ(logits[k], solos[i].prefill[t]) << "mixed prefill, solo " << i << " pos " << t;
      }
    }
    for (int s = 0; s < kGreedySteps; ++s) {
      std::vector<Harness::Row> step;
      std::vector<size_t> active;
      for (size_t i = 0; i < solos.size(); ++i) {
        // The first adapter's requests stop after 8 steps, and the adapter itself is dropped:
        // the others must not notice.
        if (s >= 8 && solos[i].table == solos.front().table) continue;
        const int32_t token =
            s == 0 ? Argmax(solos[i].prefill.back()) : Argmax(solos[i].decode[s - 1]);
        step.push_back(
            {seqs[i], token, static_cast<int32_t>(solos[i].ids.size()) + s, true, solos[i].table});
        active.push_back(i);
      }
      auto out = h.Run(step);
      for (size_t j = 0; j < active.size(); ++j) {
        ASSERT_EQ(out[j], solos[active[j]].decode[s])
            << "mixed decode, solo " << active[j] << " step " << s;
      }
      if (s == 7) adapters.at(names.front()).reset();
    }
  }
}

// Rows without an adapter give exactly the base model's logits, whatever adapters share the
// batch, and a model that never sees an adapter is unchanged by LoRA support.
TEST_P(LoraGoldenTest, BaseRowsAreTheBaseModel) {
  const std::string dir = FixturesDir() + "/" + GetParam().fixture;
  Harness plain(dir, GetParam().dtype);  // no LoRA support at all
  Harness with_lora(dir, GetParam().dtype, kMaxRank);
  const std::vector<std::string> names = AdapterNames(dir);
  std::vector<std::unique_ptr<LoraAdapter>> adapters;
  for (const std::string& name : names) {
    adapters.push_back(LoadAdapter(dir + "/adapters/" + name, with_lora, GetParam().dtype));
    ASSERT_NE(adapters.back(), nullptr);
  }
  const std::vector<int32_t> prompt = {3, 17, 29, 4, 11, 8, 2};
  const int base_plain = plain.NewSequence(16);
  std::vector<Harness::Row> plain_rows, mixed_rows;
  const int base_mixed = with_lora.NewSequence(16);
  for (size_t t = 0; t < prompt.size(); ++t) {
    plain_rows.push_back({base_plain, prompt[t], static_cast<int32_t>(t), true});
  }
  // Interleave: adapter rows before, between and after the base sequence's rows.
  for (size_t a = 0; a < adapters.size(); ++a) {
    const int seq = with_lora.NewSequence(16);
    for (size_t t = 0; t < 3; ++t) {
      mixed_rows.push_back({seq, prompt[t], static_cast<int32_t>(t), true, &adapters[a]->groups()});
    }
    if (a == 1) {
      for (size_t t = 0; t < prompt.size(); ++t) {
        mixed_rows.push_back({base_mixed, prompt[t], static_cast<int32_t>(t), true});
      }
    }
  }
  auto expected = plain.Run(plain_rows);
  auto got = with_lora.Run(mixed_rows);
  size_t k = 0;
  for (size_t i = 0; i < mixed_rows.size(); ++i) {
    if (mixed_rows[i].adapter != nullptr) continue;
    ASSERT_EQ(got[i], expected[k]) << "base row at position " << k;
    ++k;
  }
  EXPECT_EQ(k, prompt.size());
}

// The path the server takes: adapters loaded by the registry and placed in its paged pool
// (copies of the packed bytes at another address, GroupsAt) give exactly the logits of the
// loader's own host copies, whatever mix of them shares a batch.
TEST_P(LoraGoldenTest, RegistryResidentAdaptersMatchHostCopies) {
  const std::string dir = FixturesDir() + "/" + GetParam().fixture;
  Harness h(dir, GetParam().dtype, kMaxRank);
  const std::vector<std::string> names = AdapterNames(dir);
  char root_template[] = "/tmp/ls_lora_golden_XXXXXX";
  ASSERT_NE(mkdtemp(root_template), nullptr);
  const std::string root = root_template;
  for (const std::string& name : names) {
    std::filesystem::create_directories(root + "/" + name);
    for (const char* file : {"adapter_config.json", "adapter_model.safetensors"}) {
      std::filesystem::copy_file(dir + "/adapters/" + name + "/" + file,
                                 root + "/" + name + "/" + file);
    }
  }
  auto store = AdapterStore::Open(root);
  ASSERT_TRUE(store.ok()) << store.status();
  AdapterRegistryOptions options;
  options.dtype = GetParam().dtype;
  options.max_lora_rank = kMaxRank;
  options.pool_bytes = size_t{16} << 20;
  options.page_bytes = size_t{64} << 10;
  auto registry = AdapterRegistry::Create(std::move(*store), h.config(), &h.weights(), options);
  ASSERT_TRUE(registry.ok()) << registry.status();
  {
    std::vector<AdapterRef> refs;
    std::vector<std::unique_ptr<LoraAdapter>> host;
    for (const std::string& name : names) {
      auto ref = (*registry)->Acquire(name);
      ASSERT_TRUE(ref.ok()) << ref.status();
      ASSERT_TRUE((*registry)->WaitResident(*ref, absl::Now() + absl::Seconds(60)).ok());
      ASSERT_NE(ref->groups(), nullptr);
      refs.push_back(std::move(*ref));
      host.push_back(LoadAdapter(dir + "/adapters/" + name, h, GetParam().dtype));
      ASSERT_NE(host.back(), nullptr);
      ASSERT_NE(&host.back()->groups(), refs.back().groups());  // really another copy
    }
    const std::vector<int32_t> prompt = {7, 3, 19, 2, 11};
    std::vector<Harness::Row> pooled, hosted;
    for (size_t a = 0; a < names.size(); ++a) {
      const int s1 = h.NewSequence(8), s2 = h.NewSequence(8);
      for (size_t t = 0; t < prompt.size(); ++t) {
        const int32_t pos = static_cast<int32_t>(t);
        pooled.push_back({s1, prompt[t], pos, true, refs[a].groups()});
        hosted.push_back({s2, prompt[t], pos, true, &host[a]->groups()});
      }
    }
    auto a = h.Run(pooled);
    auto b = h.Run(hosted);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << "row " << i;
  }
  registry->reset();
  std::filesystem::remove_all(root);
}

std::vector<Param> AllParams() {
  std::vector<Param> params;
  for (const std::string& name : FixtureNames()) {
    if (!std::filesystem::exists(FixturesDir() + "/" + name + "/expected_lora.safetensors")) {
      continue;
    }
    params.push_back({name, DType::kF32});
    params.push_back({name, DType::kBF16});
  }
  return params;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LoraGoldenTest, testing::ValuesIn(AllParams()),
                         [](const testing::TestParamInfo<Param>& info) {
                           return info.param.fixture + "_" +
                                  (info.param.dtype == DType::kF32 ? "f32" : "bf16");
                         });

TEST(LoraGoldenFixtures, Present) {
  EXPECT_GE(AllParams().size(), 8u) << "no LoRA fixtures under " << FixturesDir();
}

}  // namespace
}  // namespace ls
