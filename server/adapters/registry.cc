#include "server/adapters/registry.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/status.h"

namespace ls {
namespace registry_internal {

// What a finished load knows about its version; immutable, shared with refs and reports.
struct LoadedInfo {
  std::string version;
  size_t packed_bytes = 0;
  std::shared_ptr<const LoraAdapterReport> report;
  absl::Time loaded_at = absl::InfinitePast();
};

enum class Phase : uint8_t { kLoading, kReady, kFailed };

// One adapter id. Created when the registry first meets the id, never destroyed before the
// registry (refs and versions point at it). Fields other than `id` are guarded by
// AdapterRegistry::mu_.
struct Entry {
  explicit Entry(std::string id_in) : id(std::move(id_in)) {}
  const std::string id;
  bool disabled = false;
  absl::Status failed;  // a sticky load error of the last current version
  int64_t pins = 0;
  std::shared_ptr<Version> current;
  // Bumped by Unload and every Reload: a Reload installs its version only if nothing newer
  // happened to the id meanwhile.
  uint64_t epoch = 0;
  absl::Time last_used = absl::InfinitePast();
  // Delete ran: the id is unknown until its directory exists again (FindOrCreateEntry).
  bool deleted = false;
  // Delete is between marking the id deleted and renaming its directory away: the directory is
  // still there, but must not bring the id back (FindOrCreateEntry, Get, List).
  bool deleting = false;
  // Loaded by an operator in this process (Load / Reload); what --load_on_demand=false needs.
  bool admitted = false;
  uint64_t requests_served = 0;
  uint64_t tokens_served = 0;
  std::string last_version;  // of the last successful load that became current
  // The version the id serves as READY (last_version, unless Unload, Delete or a sticky load
  // error came after it): what a load's record compares with (previous_version, unchanged).
  std::string ready_version;
  std::shared_ptr<const AdapterLoadRecord> last_load;
  // Renamed-away directories of a Delete, removed once no version of the id is referenced.
  std::vector<std::string> trash;
};

// One load of an id's files. `key` and `entry` are immutable; every other field is guarded by
// AdapterRegistry::mu_. Owned (shared_ptr) by its entry while current, else by
// AdapterRegistry::others_ until freed; queued tasks hold a share too, so a task never touches
// freed memory (it sees `freed` and does nothing).
struct Version {
  Version(uint64_t key_in, Entry* entry_in) : key(key_in), entry(entry_in) {}
  const uint64_t key;
  Entry* const entry;

  Phase phase = Phase::kLoading;
  absl::Status status;           // kFailed
  bool staged = false;           // loaded by a Reload that has not decided yet
  bool retired = false;          // no longer current
  bool freed = false;            // memory released; no longer in any table
  bool task_queued = false;      // a load or placement task is queued or running
  bool placing = false;          // its bytes are being copied into `run` (lock released)
  bool place_requested = false;  // Load / Reload asked for one placement attempt
  int64_t refs = 0;
  std::shared_ptr<const LoadedInfo> info;  // set when loaded
  std::unique_ptr<LoraAdapter> host;       // the host-cache copy
  PageRun run;                             // pages while placing or resident
  bool resident = false;
  LoraGroupTable table;  // over `run`, while resident
  uint64_t tick = 0;     // LRU clock
  absl::Time last_used = absl::InfinitePast();
  uint64_t wait_seq = 0;  // > 0 while it wants residency and no run fits (FIFO order)
};

}  // namespace registry_internal

using registry_internal::Entry;
using registry_internal::LoadedInfo;
using registry_internal::Phase;
using registry_internal::Version;

namespace {

std::string Quote(absl::string_view id) { return absl::StrCat("\"", id, "\""); }

absl::Status BeingDeletedStatus(absl::string_view id) {
  return absl::NotFoundError(absl::StrCat("adapter ", Quote(id), " is being deleted"));
}

// "7168 bytes (7.0 KiB)": exact, and readable when large.
std::string FormatBytes(size_t bytes) {
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " bytes");
  double value = static_cast<double>(bytes) / 1024.0;
  int unit = 0;
  while (value >= 1024.0 && unit < 3) {
    value /= 1024.0;
    ++unit;
  }
  return absl::StrFormat("%d bytes (%.1f %s)", bytes, value, kUnits[unit]);
}

// "1 page", "3 pages".
std::string Count(int64_t n, absl::string_view noun) {
  return absl::StrCat(n, " ", noun, n == 1 ? "" : "s");
}

std::string ShortVersion(const Version& v) {
  return v.info != nullptr ? v.info->version.substr(0, 12) : std::string("loading");
}

// Errors that describe the files (a later Acquire would fail the same way) stay on the id until
// Load / Reload; others (files replaced during every attempt, transient I/O) let the next
// Acquire try again.
bool IsStickyLoadError(const absl::Status& status) {
  return !absl::IsAborted(status) && !absl::IsUnavailable(status) && !absl::IsInternal(status) &&
         !absl::IsDeadlineExceeded(status);
}

// LORASERVE_FAILPOINTS: `name=value` entries separated by ';'. The only failpoint is
// adapter_load_pause=<path> (docs/adapters.md, "Testing"); returns its path, or "".
std::string LoadPauseFailpoint() {
  const char* env = std::getenv("LORASERVE_FAILPOINTS");
  if (env == nullptr || *env == '\0') return "";
  std::string path;
  for (absl::string_view entry : absl::StrSplit(env, ';', absl::SkipEmpty())) {
    const size_t eq = entry.find('=');
    const absl::string_view name = entry.substr(0, eq);
    if (name == "adapter_load_pause" && eq != absl::string_view::npos && eq + 1 < entry.size()) {
      path = std::string(entry.substr(eq + 1));
    } else {
      LS_LOG(WARNING) << "LORASERVE_FAILPOINTS: ignoring \"" << entry
                      << "\" (expected adapter_load_pause=<path>)";
    }
  }
  if (!path.empty()) {
    LS_LOG(WARNING) << "LORASERVE_FAILPOINTS: adapter_load_pause=" << path
                    << " is set (a testing aid): adapter loads wait while that file exists";
  }
  return path;
}

void LowerThisThreadsPriority(int nice) {
  // Linux applies PRIO_PROCESS with a thread id to that thread alone. Best effort: failure
  // (e.g. a sandbox without the permission) leaves the default priority.
  const pid_t tid = static_cast<pid_t>(::syscall(SYS_gettid));
  (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(tid), nice);
  (void)::pthread_setname_np(::pthread_self(), "ls-adapter-load");
}

}  // namespace

absl::string_view AdapterStateName(AdapterState state) {
  switch (state) {
    case AdapterState::kOnDisk:
      return "on_disk";
    case AdapterState::kLoading:
      return "loading";
    case AdapterState::kHost:
      return "host";
    case AdapterState::kResident:
      return "resident";
    case AdapterState::kDisabled:
      return "disabled";
    case AdapterState::kFailed:
      return "failed";
  }
  return "unknown";
}

absl::Status AdapterRegistryOptions::Validate() const {
  if (page_bytes == 0 || page_bytes % LoraAdapter::kPackAlignment != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter_page_bytes must be a positive multiple of ",
                     LoraAdapter::kPackAlignment, ", got ", page_bytes));
  }
  if (pool_bytes < page_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("adapter_pool_bytes (", pool_bytes,
                                                   ") must hold at least one page of ", page_bytes,
                                                   " bytes"));
  }
  if (wait_timeout < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("adapter_wait_timeout must not be negative");
  }
  if (loader_threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter loader threads must be >= 1, got ", loader_threads));
  }
  if (load_attempts < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter load attempts must be >= 1, got ", load_attempts));
  }
  if (dtype != DType::kBF16 && dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter dtype must be bf16 or f32, got ", DTypeName(dtype)));
  }
  if (max_lora_rank < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_lora_rank must be >= 1, got ", max_lora_rank));
  }
  return absl::OkStatus();
}

// ---- AdapterRef ------------------------------------------------------------------------------

AdapterRef::AdapterRef(AdapterRef&& other) noexcept { *this = std::move(other); }

AdapterRef& AdapterRef::operator=(AdapterRef&& other) noexcept {
  if (this != &other) {
    Reset();
    registry_ = std::exchange(other.registry_, nullptr);
    version_ = std::exchange(other.version_, nullptr);
    key_ = std::exchange(other.key_, 0);
    groups_ = std::exchange(other.groups_, nullptr);
    info_ = std::exchange(other.info_, nullptr);
    wait_start_ = std::exchange(other.wait_start_, absl::InfinitePast());
    count_served_ = std::exchange(other.count_served_, true);
    tokens_ = std::exchange(other.tokens_, 0);
  }
  return *this;
}

void AdapterRef::Reset() {
  if (registry_ != nullptr) registry_->Release(*this);
  registry_ = nullptr;
  version_ = nullptr;
  key_ = 0;
  groups_ = nullptr;
  info_ = nullptr;
  wait_start_ = absl::InfinitePast();
  count_served_ = true;
  tokens_ = 0;
}

const std::string& AdapterRef::id() const {
  static const std::string* const kEmpty = new std::string();
  return version_ != nullptr ? version_->entry->id : *kEmpty;
}

const std::string& AdapterRef::version() const {
  static const std::string* const kEmpty = new std::string();
  return info_ != nullptr ? info_->version : *kEmpty;
}

size_t AdapterRef::packed_bytes() const { return info_ != nullptr ? info_->packed_bytes : 0; }

// ---- Construction ----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<AdapterRegistry>> AdapterRegistry::Create(
    std::unique_ptr<AdapterStore> store, const ModelConfig& base_config,
    const ModelWeights* base_weights, const AdapterRegistryOptions& options,
    std::unique_ptr<AdapterPagePool> pool) {
  if (store == nullptr) return absl::InvalidArgumentError("adapter registry: no store");
  LS_RETURN_IF_ERROR(options.Validate());
  if (pool == nullptr) {
    LS_ASSIGN_OR_RETURN(std::unique_ptr<AdapterPoolMemory> memory,
                        MakeHostPoolMemory(options.pool_bytes));
    LS_ASSIGN_OR_RETURN(pool, AdapterPagePool::Create(std::move(memory), options.page_bytes));
  }
  return std::unique_ptr<AdapterRegistry>(
      new AdapterRegistry(std::move(store), base_config, base_weights, options, std::move(pool)));
}

AdapterRegistry::AdapterRegistry(std::unique_ptr<AdapterStore> store,
                                 const ModelConfig& base_config, const ModelWeights* base_weights,
                                 const AdapterRegistryOptions& options,
                                 std::unique_ptr<AdapterPagePool> pool)
    : store_(std::move(store)),
      base_config_(base_config),
      base_weights_(base_weights),
      options_(options),
      load_pause_file_(LoadPauseFailpoint()),
      pool_(std::move(pool)) {
  loaders_.reserve(static_cast<size_t>(options_.loader_threads));
  for (int i = 0; i < options_.loader_threads; ++i) {
    loaders_.emplace_back([this] { LoaderMain(); });
  }
}

AdapterRegistry::~AdapterRegistry() {
  {
    MutexLock lock(&mu_);
    LS_CHECK(live_refs_ == 0) << "AdapterRegistry destroyed with " << live_refs_
                              << " adapter references alive";
    stop_ = true;
  }
  work_cv_.SignalAll();
  for (std::thread& t : loaders_) t.join();
}

// ---- Tables ----------------------------------------------------------------------------------

Entry* AdapterRegistry::FindEntry(absl::string_view id) const {
  const auto it = entries_.find(id);
  return it != entries_.end() ? it->second.get() : nullptr;
}

absl::StatusOr<Entry*> AdapterRegistry::FindOrCreateEntry(absl::string_view id) {
  {
    MutexLock lock(&mu_);
    Entry* e = FindEntry(id);
    if (e != nullptr && e->deleting) return BeingDeletedStatus(id);
    if (e != nullptr && !e->deleted) return e;
  }
  absl::StatusOr<AdapterPaths> paths = store_->Resolve(id);
  if (!paths.ok()) return paths.status();
  bool disabled = false;
  if (options_.persist_disabled) {
    struct stat st;
    disabled = ::stat(absl::StrCat(paths->dir, "/", kAdapterDisabledFile).c_str(), &st) == 0;
  }
  MutexLock lock(&mu_);
  auto [it, inserted] = entries_.try_emplace(std::string(id));
  if (inserted) {
    it->second = std::make_unique<Entry>(std::string(id));
    it->second->disabled = disabled;
  } else if (it->second->deleting) {
    return BeingDeletedStatus(id);
  } else if (it->second->deleted) {
    // A directory of a deleted id appeared again (an upload): a new adapter under the old name.
    Entry* e = it->second.get();
    e->deleted = false;
    e->disabled = disabled;
    e->failed = absl::OkStatus();
    e->admitted = false;
    e->last_version.clear();
    e->ready_version.clear();
  }
  return it->second.get();
}

std::shared_ptr<Version> AdapterRegistry::NewVersionLocked(Entry* e) {
  auto v = std::make_shared<Version>(next_key_++, e);
  v->tick = ++use_tick_;
  return v;
}

std::shared_ptr<Version> AdapterRegistry::CurrentOrNewLocked(Entry* e) {
  if (e->current == nullptr) {
    e->current = NewVersionLocked(e);
    EnqueueLocked(TaskKind::kLoad, e->current);
  }
  return e->current;
}

void AdapterRegistry::RetireCurrentLocked(Entry* e) {
  std::shared_ptr<Version> v = std::move(e->current);
  e->current = nullptr;
  if (v == nullptr) return;
  Version* raw = v.get();
  raw->retired = true;
  if (raw->refs == 0) ClearWaitingLocked(raw);
  others_.emplace(raw, std::move(v));
  MaybeFreeLocked(raw);
}

void AdapterRegistry::MaybeFreeLocked(Version* v) {
  if (v->freed || v->entry->current.get() == v || v->staged || v->refs > 0 || v->placing) return;
  ClearWaitingLocked(v);
  v->place_requested = false;
  bool freed_pages = false;
  if (v->run.valid()) {
    pool_->Free(v->run);
    v->run = PageRun{};
    v->resident = false;
    v->table = LoraGroupTable();
    freed_pages = true;
  }
  if (v->host != nullptr) DropHostCopyLocked(v);
  v->freed = true;
  changed_.SignalAll();
  // Last: this may destroy *v (tasks may still hold a share).
  others_.erase(v);
  if (freed_pages) CapacityChangedLocked();
}

void AdapterRegistry::DropHostCopyLocked(Version* v) {
  host_bytes_ -= v->host->packed_bytes();
  // Freed on a loader thread: this may run on the engine thread (a ref dropped at the end of a
  // request), and returning megabytes to the system is not free.
  graveyard_.push_back(std::move(v->host));
  if (!free_queued_) {
    free_queued_ = true;
    EnqueueLocked(TaskKind::kFree, nullptr);
  }
}

void AdapterRegistry::EvictFromPoolLocked(Version* v) {
  pool_->Free(v->run);
  v->run = PageRun{};
  v->resident = false;
  v->table = LoraGroupTable();
  ++stats_.pool_evictions;
  ForgetIfNowhereLocked(v);
}

void AdapterRegistry::ForgetIfNowhereLocked(Version* v) {
  if (v->phase != Phase::kReady || v->resident || v->placing || v->host != nullptr) return;
  if (v->entry->current.get() == v) {
    RetireCurrentLocked(v->entry);  // back to kOnDisk: the next Acquire loads the files again
  } else {
    MaybeFreeLocked(v);
  }
}

void AdapterRegistry::SetWaitingLocked(Version* v) {
  if (v->wait_seq != 0) return;
  v->wait_seq = ++wait_seq_;
  ++num_waiting_;
}

void AdapterRegistry::ClearWaitingLocked(Version* v) {
  if (v->wait_seq == 0) return;
  v->wait_seq = 0;
  --num_waiting_;
}

bool AdapterRegistry::PinnedLocked(const Version* v) const {
  return v->entry->pins > 0 && v->entry->current.get() == v;
}

bool AdapterRegistry::WantsResidencyLocked(const Version* v) const {
  return v->refs > 0 || PinnedLocked(v);
}

void AdapterRegistry::TouchLocked(Version* v) {
  v->tick = ++use_tick_;
  v->last_used = absl::Now();
  v->entry->last_used = v->last_used;
}

void AdapterRegistry::EnqueueLocked(TaskKind kind, std::shared_ptr<Version> v) {
  if (v != nullptr) v->task_queued = true;
  tasks_.push_back(Task{kind, std::move(v)});
  work_cv_.Signal();
}

void AdapterRegistry::EnsureProgressLocked(const std::shared_ptr<Version>& v) {
  if (v->freed || v->task_queued || v->placing || v->resident) return;
  if (v->phase == Phase::kLoading) {
    EnqueueLocked(TaskKind::kLoad, v);
  } else if (v->phase == Phase::kReady && (v->wait_seq == 0 || v->place_requested)) {
    // A version already waiting for pages is retried by the place pass when pages free up.
    EnqueueLocked(TaskKind::kPlace, v);
  }
}

void AdapterRegistry::CapacityChangedLocked() {
  if (num_waiting_ > 0 && !place_pass_queued_) {
    place_pass_queued_ = true;
    EnqueueLocked(TaskKind::kPlacePass, nullptr);
  }
}

std::vector<Version*> AdapterRegistry::AllVersionsLocked() const {
  std::vector<Version*> all;
  all.reserve(entries_.size() + others_.size());
  for (const auto& [id, e] : entries_) {
    if (e->current != nullptr) all.push_back(e->current.get());
  }
  for (const auto& [raw, v] : others_) all.push_back(raw);
  return all;
}

std::shared_ptr<Version> AdapterRegistry::SharedLocked(Version* v) const {
  if (v->entry->current.get() == v) return v->entry->current;
  const auto it = others_.find(v);
  return it != others_.end() ? it->second : nullptr;
}

void AdapterRegistry::EnforceHostBudgetLocked() {
  while (host_bytes_ > options_.host_cache_bytes) {
    Version* victim = nullptr;
    for (Version* v : AllVersionsLocked()) {
      if (v->host == nullptr || v->placing || v->staged) continue;
      // A version that is not resident keeps its host copy while anyone needs it: the files
      // may already hold another version.
      if (!v->resident && WantsResidencyLocked(v)) continue;
      if (victim == nullptr || v->tick < victim->tick) victim = v;
    }
    if (victim == nullptr) return;  // over budget with copies that must stay
    DropHostCopyLocked(victim);
    ++stats_.host_evictions;
    ForgetIfNowhereLocked(victim);
  }
}

// ---- References ------------------------------------------------------------------------------

AdapterRef AdapterRegistry::MakeRefLocked(const std::shared_ptr<Version>& v) {
  ++v->refs;
  ++live_refs_;
  TouchLocked(v.get());
  AdapterRef ref;
  ref.registry_ = this;
  ref.version_ = v.get();
  ref.key_ = v->key;
  if (v->resident) {
    ref.groups_ = &v->table;
    ref.info_ = v->info.get();
  }
  return ref;
}

absl::StatusOr<AdapterRef> AdapterRegistry::Acquire(absl::string_view id) {
  if (id.empty()) return AdapterRef();
  LS_ASSIGN_OR_RETURN(Entry * e, FindOrCreateEntry(id));
  MutexLock lock(&mu_);
  if (e->disabled) {
    return absl::NotFoundError(
        absl::StrCat("adapter ", Quote(id), " is unloaded (disabled); LoadAdapter enables it"));
  }
  if (!e->failed.ok()) return e->failed;
  if (!options_.load_on_demand && !e->admitted) {
    return absl::NotFoundError(absl::StrCat("adapter ", Quote(id),
                                            " is not loaded and --load_on_demand is off; "
                                            "LoadAdapter (or --preload_adapters) loads it"));
  }
  std::shared_ptr<Version> v = CurrentOrNewLocked(e);
  AdapterRef ref = MakeRefLocked(v);
  EnsureProgressLocked(v);
  return ref;
}

void AdapterRegistry::Release(AdapterRef& ref) {
  MutexLock lock(&mu_);
  Version* v = ref.version_;
  Entry* e = v->entry;
  LS_CHECK(v->refs > 0) << "adapter reference released twice";
  --v->refs;
  --live_refs_;
  if (ref.count_served_) ++e->requests_served;
  e->tokens_served += ref.tokens_;
  TouchLocked(v);
  if (v->refs > 0) return;
  if (!PinnedLocked(v)) ClearWaitingLocked(v);
  if (e->current.get() == v) {
    if (v->resident && !PinnedLocked(v)) CapacityChangedLocked();  // now evictable
    EnforceHostBudgetLocked();
  } else {
    MaybeFreeLocked(v);  // an unloaded or replaced version: its last user is gone
  }
  if (!e->trash.empty()) MaybeQueueTrashLocked(e);
}

void AdapterRegistry::MaybeQueueTrashLocked(Entry* e) {
  if (e->current != nullptr && e->current->refs > 0) return;
  for (const auto& [raw, v] : others_) {
    if (v->entry == e && v->refs > 0) return;
  }
  for (std::string& dir : e->trash) trash_.push_back(std::move(dir));
  e->trash.clear();
  if (!free_queued_) {
    free_queued_ = true;
    EnqueueLocked(TaskKind::kFree, nullptr);
  }
}

void AdapterRegistry::RemoveTrash(const std::vector<std::string>& dirs) {
  for (const std::string& dir : dirs) {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);  // never follows symlinks
    if (ec)
      LS_LOG(WARNING) << "cannot remove deleted adapter files " << dir << ": " << ec.message();
  }
}

absl::Status AdapterRegistry::TooLargeStatus(const std::string& id, size_t bytes) const {
  return absl::ResourceExhaustedError(absl::StrCat(
      "adapter ", Quote(id), " needs ", FormatBytes(bytes), ", ",
      Count(pool_->PagesFor(bytes), "page"), " of ", pool_->page_bytes(), " bytes, but the ",
      pool_->kind(), " adapter pool holds only ", FormatBytes(pool_->capacity_bytes()), ", ",
      Count(pool_->num_pages(), "page"), "; raise --adapter_pool_bytes"));
}

absl::Status AdapterRegistry::NoRoomStatusLocked(const Version* v, absl::Duration waited) {
  size_t referenced = 0, pinned = 0, other = 0;
  int64_t num_referenced = 0, num_pinned = 0;
  const size_t page = pool_->page_bytes();
  for (const Version* u : AllVersionsLocked()) {
    if (!u->run.valid()) continue;
    const size_t held = static_cast<size_t>(u->run.count) * page;
    if (PinnedLocked(u)) {
      pinned += held;
      ++num_pinned;
    } else if (u->refs > 0 || u->placing) {
      referenced += held;
      ++num_referenced;
    } else {
      other += held;
    }
  }
  const size_t bytes = v->info != nullptr ? v->info->packed_bytes : 0;
  return absl::ResourceExhaustedError(absl::StrCat(
      "adapter ", Quote(v->entry->id), " (version ", ShortVersion(*v), ", ", FormatBytes(bytes),
      ") needs ", Count(pool_->PagesFor(bytes), "contiguous page"), " of the ", pool_->kind(),
      " adapter pool (", FormatBytes(pool_->capacity_bytes()), ", ",
      Count(pool_->num_pages(), "page"), " of ", page, " bytes); after waiting ",
      absl::FormatDuration(absl::Trunc(waited, absl::Milliseconds(1))), " the pool holds ",
      FormatBytes(referenced), " for ", Count(num_referenced, "referenced adapter"), " and ",
      FormatBytes(pinned), " for ", Count(num_pinned, "pinned adapter"), " (", FormatBytes(other),
      other == 0 ? " evictable, " : " evictable but too scattered to make a run, ",
      Count(pool_->free_pages(), "page"), " free, largest free run ",
      Count(pool_->LargestFreeRun(), "page"),
      "); retry later, or unpin adapters or raise --adapter_pool_bytes"));
}

absl::StatusOr<bool> AdapterRegistry::CheckResidentLocked(AdapterRef& ref, absl::Time now,
                                                          absl::Time deadline) {
  Version* v = ref.version_;
  if (v->resident) {
    ref.groups_ = &v->table;
    ref.info_ = v->info.get();
    return true;
  }
  if (v->phase == Phase::kFailed) return v->status;
  if (ref.wait_start_ == absl::InfinitePast()) ref.wait_start_ = now;
  if (std::shared_ptr<Version> shared = SharedLocked(v)) EnsureProgressLocked(shared);
  const absl::Time limit = std::min(deadline, ref.wait_start_ + options_.wait_timeout);
  if (now < limit) return false;
  ++stats_.wait_timeouts;
  if (v->phase == Phase::kReady) return NoRoomStatusLocked(v, now - ref.wait_start_);
  return absl::DeadlineExceededError(absl::StrCat("adapter ", Quote(v->entry->id),
                                                  " was still loading after ",
                                                  absl::FormatDuration(now - ref.wait_start_)));
}

absl::StatusOr<bool> AdapterRegistry::TryMakeResident(AdapterRef& ref, absl::Time deadline) {
  if (ref.resident()) return true;
  MutexLock lock(&mu_);
  return CheckResidentLocked(ref, absl::Now(), deadline);
}

absl::Status AdapterRegistry::WaitResident(AdapterRef& ref, absl::Time deadline) {
  if (ref.resident()) return absl::OkStatus();
  MutexLock lock(&mu_);
  while (true) {
    absl::StatusOr<bool> resident = CheckResidentLocked(ref, absl::Now(), deadline);
    if (!resident.ok()) return resident.status();
    if (*resident) return absl::OkStatus();
    changed_.WaitWithDeadline(&mu_, std::min(deadline, ref.wait_start_ + options_.wait_timeout));
  }
}

// ---- Loading and placement (loader threads) --------------------------------------------------

void AdapterRegistry::LoaderMain() {
  LowerThisThreadsPriority(options_.loader_nice);
  MutexLock lock(&mu_);
  while (true) {
    while (!stop_ && tasks_.empty()) work_cv_.Wait(&mu_);
    if (stop_) return;
    Task task = std::move(tasks_.front());
    tasks_.pop_front();
    switch (task.kind) {
      case TaskKind::kLoad:
        RunLoad(task.version);
        break;
      case TaskKind::kPlace: {
        const std::shared_ptr<Version>& v = task.version;
        if (!v->freed && v->phase == Phase::kReady &&
            (WantsResidencyLocked(v.get()) || v->place_requested)) {
          TryPlaceLocked(v);
        }
        v->task_queued = false;
        v->place_requested = false;
        changed_.SignalAll();
        EnforceHostBudgetLocked();
        break;
      }
      case TaskKind::kPlacePass:
        place_pass_queued_ = false;
        RunPlacePass();
        break;
      case TaskKind::kFree: {
        free_queued_ = false;
        std::vector<std::unique_ptr<LoraAdapter>> garbage = std::move(graveyard_);
        graveyard_.clear();
        std::vector<std::string> trash = std::move(trash_);
        trash_.clear();
        mu_.Unlock();
        garbage.clear();
        RemoveTrash(trash);
        mu_.Lock();
        break;
      }
    }
  }
}

void AdapterRegistry::FailLocked(Version* v, absl::Status status) {
  v->phase = Phase::kFailed;
  v->status = std::move(status);
  v->place_requested = false;
  ++stats_.load_failures;
  changed_.SignalAll();
  Entry* e = v->entry;
  if (e->current.get() == v) {
    if (IsStickyLoadError(v->status)) {
      e->failed = v->status;
      e->ready_version.clear();  // FAILED: no longer serving a version
    }
    RetireCurrentLocked(e);  // refs holding it see the error; a new Acquire sees e->failed
  } else {
    MaybeFreeLocked(v);
  }
}

void AdapterRegistry::RunLoad(const std::shared_ptr<Version>& v) {
  if (v->freed) {
    v->task_queued = false;
    changed_.SignalAll();
    return;
  }
  const std::string id = v->entry->id;
  LoraLoadOptions load_options;
  load_options.dtype = options_.dtype;
  load_options.max_lora_rank = options_.max_lora_rank;
  load_options.base_weights = base_weights_;

  mu_.Unlock();
  const absl::Time start = absl::Now();
  // A paused load counts as a slow read: it is in the latency, as a hung disk would be.
  if (!load_pause_file_.empty()) MaybePauseLoad(id);
  absl::StatusOr<LoadedAdapter> loaded;
  int retries = 0;
  for (int attempt = 1;; ++attempt) {
    loaded = store_->Load(id, base_config_, load_options);
    if (loaded.ok() || !absl::IsAborted(loaded.status()) || attempt >= options_.load_attempts) {
      break;
    }
    ++retries;
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::shared_ptr<LoadedInfo> info;
  if (loaded.ok()) {
    info = std::make_shared<LoadedInfo>();
    info->version = loaded->version.sha256;
    info->packed_bytes = loaded->adapter->packed_bytes();
    info->report = std::make_shared<const LoraAdapterReport>(loaded->adapter->report());
    info->loaded_at = absl::Now();
  }
  mu_.Lock();

  v->task_queued = false;
  stats_.load_retries += static_cast<uint64_t>(retries);
  absl::Status failure = loaded.status();
  if (failure.ok() && pool_->PagesFor(info->packed_bytes) > pool_->num_pages()) {
    failure = TooLargeStatus(id, info->packed_bytes);
  }
  RecordLoadLocked(v->entry, failure, info, seconds);
  if (!failure.ok()) {
    FailLocked(v.get(), std::move(failure));
    return;
  }
  ++stats_.loads;
  stats_.load_seconds_sum += seconds;
  stats_.load_seconds_max = std::max(stats_.load_seconds_max, seconds);
  int bucket = 0;
  while (bucket < AdapterRegistryStats::kNumLatencyBuckets &&
         seconds > AdapterRegistryStats::kLatencyBucketBounds[bucket]) {
    ++bucket;
  }
  ++stats_.load_latency_buckets[bucket];
  if (v->freed) {  // unloaded while loading, and nobody holds it
    changed_.SignalAll();
    return;
  }
  v->info = std::move(info);
  if (v->entry->current.get() == v.get()) {
    v->entry->last_version = v->info->version;
    v->entry->ready_version = v->info->version;
  }
  v->host = std::move(loaded->adapter);
  host_bytes_ += v->host->packed_bytes();
  v->phase = Phase::kReady;
  v->tick = ++use_tick_;
  changed_.SignalAll();
  if (v->retired && v->refs == 0) {
    MaybeFreeLocked(v.get());
    return;
  }
  if (WantsResidencyLocked(v.get()) || v->place_requested) TryPlaceLocked(v);
  v->place_requested = false;
  changed_.SignalAll();
  EnforceHostBudgetLocked();
}

void AdapterRegistry::RecordLoadLocked(Entry* e, const absl::Status& status,
                                       const std::shared_ptr<const LoadedInfo>& info,
                                       double seconds) {
  auto record = std::make_shared<AdapterLoadRecord>();
  record->status = status;
  record->seconds = seconds;
  record->finished_at = absl::Now();
  if (info != nullptr) record->report = info->report;
  if (status.ok()) {
    record->version = info->version;
    if (!e->ready_version.empty() && e->ready_version == info->version) {
      record->unchanged = true;
    } else {
      record->previous_version = e->ready_version;
    }
  }
  e->last_load = std::move(record);
}

void AdapterRegistry::MaybePauseLoad(const std::string& id) {
  struct stat st;
  if (::stat(load_pause_file_.c_str(), &st) != 0) return;
  LS_LOG(WARNING) << "failpoint adapter_load_pause: the load of adapter " << Quote(id)
                  << " waits while " << load_pause_file_ << " exists";
  const absl::Time give_up = absl::Now() + absl::Seconds(300);
  while (::stat(load_pause_file_.c_str(), &st) == 0 && absl::Now() < give_up) {
    {
      MutexLock lock(&mu_);
      if (stop_) return;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
}

bool AdapterRegistry::AllocateForLocked(Version* v) {
  const int64_t pages = pool_->PagesFor(v->info->packed_bytes);
  std::optional<PageRun> run = pool_->Allocate(pages);
  if (!run.has_value()) {
    // Evict least recently used unreferenced, unpinned versions until a run fits, but only if
    // evicting all of them would make one: never evict for nothing.
    std::vector<Version*> candidates;
    for (Version* u : AllVersionsLocked()) {
      if (u != v && u->resident && !u->placing && u->refs == 0 && !PinnedLocked(u)) {
        candidates.push_back(u);
      }
    }
    std::vector<PageRun> runs;
    runs.reserve(candidates.size());
    for (const Version* c : candidates) runs.push_back(c->run);
    if (!pool_->FitsIfFreed(pages, runs)) return false;
    std::sort(candidates.begin(), candidates.end(),
              [](const Version* a, const Version* b) { return a->tick < b->tick; });
    for (Version* c : candidates) {
      EvictFromPoolLocked(c);  // may destroy *c
      run = pool_->Allocate(pages);
      if (run.has_value()) break;
    }
    LS_CHECK(run.has_value()) << "adapter pool: no run after evicting every candidate";
  }
  v->run = *run;
  v->placing = true;
  return true;
}

void AdapterRegistry::CopyAndPublishLocked(const std::shared_ptr<Version>& v) {
  const LoraAdapter* host = v->host.get();  // kept while placing (EnforceHostBudgetLocked)
  const PageRun run = v->run;
  mu_.Unlock();
  const absl::Time start = absl::Now();
  absl::Status copied = pool_->CopyIn(run, host->packed_data(), host->packed_bytes());
  LoraGroupTable table = host->GroupsAt(pool_->Address(run));
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  mu_.Lock();

  v->placing = false;
  v->place_requested = false;
  stats_.place_seconds_sum += seconds;
  if (!copied.ok()) {
    pool_->Free(v->run);
    v->run = PageRun{};
    FailLocked(v.get(), std::move(copied));
    CapacityChangedLocked();
    return;
  }
  v->table = std::move(table);
  v->resident = true;
  ++stats_.placements;
  changed_.SignalAll();
  MaybeFreeLocked(v.get());  // unloaded or replaced during the copy with nobody holding it
}

bool AdapterRegistry::TryPlaceLocked(const std::shared_ptr<Version>& v) {
  if (v->freed || v->phase != Phase::kReady || v->placing) return false;
  if (v->resident) return true;
  if (v->host == nullptr) return false;
  if (!AllocateForLocked(v.get())) {
    if (WantsResidencyLocked(v.get())) SetWaitingLocked(v.get());
    return false;
  }
  ClearWaitingLocked(v.get());
  CopyAndPublishLocked(v);
  return v->resident;
}

void AdapterRegistry::RunPlacePass() {
  // Waiting versions in arrival order; after each placement (the lock was released during its
  // copy) the list is gathered again.
  while (true) {
    std::vector<std::shared_ptr<Version>> waiting;
    for (Version* v : AllVersionsLocked()) {
      if (v->wait_seq != 0) waiting.push_back(SharedLocked(v));
    }
    std::sort(waiting.begin(), waiting.end(),
              [](const std::shared_ptr<Version>& a, const std::shared_ptr<Version>& b) {
                return a->wait_seq < b->wait_seq;
              });
    bool placed = false;
    for (const std::shared_ptr<Version>& v : waiting) {
      if (!WantsResidencyLocked(v.get()) || v->freed || v->resident) {
        ClearWaitingLocked(v.get());
        continue;
      }
      if (v->placing || v->host == nullptr) continue;
      if (AllocateForLocked(v.get())) {
        ClearWaitingLocked(v.get());
        CopyAndPublishLocked(v);
        placed = true;
        break;
      }
    }
    if (!placed) break;
  }
  changed_.SignalAll();
  EnforceHostBudgetLocked();
}

// ---- Operators -------------------------------------------------------------------------------

absl::Status AdapterRegistry::WaitLoadedLocked(const std::shared_ptr<Version>& v,
                                               absl::Time deadline) {
  while (true) {
    if (v->phase == Phase::kFailed) return v->status;
    if (v->phase == Phase::kReady && !v->place_requested && !v->placing) return absl::OkStatus();
    if (v->freed) {
      if (v->phase == Phase::kReady) return absl::OkStatus();
      return absl::AbortedError(
          absl::StrCat("adapter ", Quote(v->entry->id), " was unloaded while loading"));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("adapter ", Quote(v->entry->id), " was still loading at the deadline"));
    }
    changed_.WaitWithDeadline(&mu_, deadline);
  }
}

AdapterInfo AdapterRegistry::InfoLocked(const Entry& e) const {
  AdapterInfo info;
  info.id = e.id;
  info.pins = e.pins;
  info.last_used = e.last_used;
  info.last_loaded_version = e.last_version;
  info.requests_served = e.requests_served;
  info.tokens_served = e.tokens_served;
  info.last_load = e.last_load;
  const Version* cur = e.current.get();
  if (e.disabled) {
    info.state = AdapterState::kDisabled;
  } else if (!e.failed.ok()) {
    info.state = AdapterState::kFailed;
    info.status = e.failed;
  } else if (cur == nullptr) {
    info.state = AdapterState::kOnDisk;
  } else if (cur->resident) {
    info.state = AdapterState::kResident;
  } else if (cur->phase == Phase::kLoading || cur->placing) {
    info.state = AdapterState::kLoading;
  } else {
    info.state = AdapterState::kHost;
  }
  auto describe = [&](const Version& v, bool current) {
    AdapterVersionInfo vi;
    vi.version = v.info != nullptr ? v.info->version : "";
    vi.current = current;
    vi.refs = v.refs;
    vi.in_pool = v.resident;
    vi.in_host = v.host != nullptr;
    vi.packed_bytes = v.info != nullptr ? v.info->packed_bytes : 0;
    info.refs += v.refs;
    info.versions.push_back(std::move(vi));
  };
  if (cur != nullptr) {
    describe(*cur, true);
    if (cur->info != nullptr) {
      info.version = cur->info->version;
      info.packed_bytes = cur->info->packed_bytes;
      info.report = cur->info->report;
      info.loaded_at = cur->info->loaded_at;
    }
    info.in_pool = cur->resident;
    info.in_host = cur->host != nullptr;
    if (cur->resident) info.pool_run = cur->run;
  }
  for (const auto& [raw, v] : others_) {
    if (v->entry == &e && !v->staged) describe(*v, false);
  }
  return info;
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Load(absl::string_view id, absl::Time deadline) {
  LS_RETURN_IF_ERROR(ValidateAdapterId(id));
  LS_ASSIGN_OR_RETURN(Entry * e, FindOrCreateEntry(id));
  bool was_disabled = false;
  {
    MutexLock lock(&mu_);
    was_disabled = e->disabled;
    e->disabled = false;
    e->failed = absl::OkStatus();
  }
  if (was_disabled) SyncDisabledMarker(id);
  MutexLock lock(&mu_);
  std::shared_ptr<Version> v = CurrentOrNewLocked(e);
  if (!v->resident) {
    v->place_requested = true;
    EnsureProgressLocked(v);
  }
  LS_RETURN_IF_ERROR(WaitLoadedLocked(v, deadline));
  e->admitted = true;
  if (v->info != nullptr) {
    e->last_version = v->info->version;
    e->ready_version = v->info->version;
  }
  AdapterInfo info = InfoLocked(*e);
  if (info.report == nullptr && v->info != nullptr) {
    // Loaded, then dropped from the host cache at once (a cache smaller than the adapter).
    info.version = v->info->version;
    info.packed_bytes = v->info->packed_bytes;
    info.report = v->info->report;
    info.loaded_at = v->info->loaded_at;
  }
  return info;
}

absl::Status AdapterRegistry::Unload(absl::string_view id, bool force) {
  LS_RETURN_IF_ERROR(ValidateAdapterId(id));
  LS_ASSIGN_OR_RETURN(Entry * e, FindOrCreateEntry(id));
  {
    MutexLock lock(&mu_);
    if (!force && e->pins > 0) {
      return absl::FailedPreconditionError(absl::StrCat("adapter ", Quote(id), " is pinned (",
                                                        e->pins, e->pins == 1 ? " pin" : " pins",
                                                        "); unpin it first or unload with force"));
    }
    e->disabled = true;
    e->admitted = false;
    e->failed = absl::OkStatus();
    e->ready_version.clear();
    e->pins = 0;
    ++e->epoch;
    RetireCurrentLocked(e);
  }
  SyncDisabledMarker(id);
  return absl::OkStatus();
}

absl::StatusOr<AdapterReloadResult> AdapterRegistry::Reload(absl::string_view id,
                                                            absl::Time deadline) {
  LS_RETURN_IF_ERROR(ValidateAdapterId(id));
  LS_ASSIGN_OR_RETURN(Entry * e, FindOrCreateEntry(id));
  bool was_disabled = false;
  uint64_t epoch = 0;
  std::shared_ptr<Version> staged;
  {
    MutexLock lock(&mu_);
    was_disabled = e->disabled;
    e->disabled = false;
    e->failed = absl::OkStatus();
    epoch = ++e->epoch;
    staged = NewVersionLocked(e);
    staged->staged = true;
    others_.emplace(staged.get(), staged);
    EnqueueLocked(TaskKind::kLoad, staged);
  }
  if (was_disabled) SyncDisabledMarker(id);

  MutexLock lock(&mu_);
  absl::Status loaded = WaitLoadedLocked(staged, deadline);
  if (!loaded.ok()) {
    staged->staged = false;
    MaybeFreeLocked(staged.get());
    return loaded;
  }
  if (e->epoch != epoch) {
    staged->staged = false;
    MaybeFreeLocked(staged.get());
    return absl::AbortedError(
        absl::StrCat("adapter ", Quote(id), ": a later Unload or Reload superseded this Reload"));
  }
  AdapterReloadResult result;
  std::shared_ptr<Version> cur = e->current;
  if (cur != nullptr && cur->info != nullptr) result.previous_version = cur->info->version;
  if (cur != nullptr && cur->phase == Phase::kReady &&
      cur->info->version == staged->info->version) {
    staged->staged = false;
    MaybeFreeLocked(staged.get());
    result.new_version = false;
    e->admitted = true;
  } else {
    RetireCurrentLocked(e);
    staged->staged = false;
    others_.erase(staged.get());
    e->current = staged;
    e->last_version = staged->info->version;
    e->ready_version = staged->info->version;
    e->admitted = true;
    result.new_version = true;
    if (!staged->resident) {
      staged->place_requested = true;
      EnsureProgressLocked(staged);
      LS_RETURN_IF_ERROR(WaitLoadedLocked(staged, deadline));
    }
  }
  result.info = InfoLocked(*e);
  return result;
}

absl::Status AdapterRegistry::Pin(absl::string_view id, absl::Time deadline) {
  LS_ASSIGN_OR_RETURN(AdapterRef ref, Acquire(id));
  if (ref.is_base()) return absl::InvalidArgumentError("cannot pin the base model (empty id)");
  ref.count_served_ = false;  // the operator's hold, not a request
  Entry* e = ref.version_->entry;
  {
    MutexLock lock(&mu_);
    ++e->pins;
  }
  absl::Status resident = WaitResident(ref, deadline);
  if (!resident.ok()) {
    MutexLock lock(&mu_);
    if (e->pins > 0) --e->pins;  // dropping `ref` next stops the wait for pages, if any
    return resident;
  }
  return absl::OkStatus();
}

absl::Status AdapterRegistry::Unpin(absl::string_view id) {
  MutexLock lock(&mu_);
  Entry* e = FindEntry(id);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat("adapter ", Quote(id), " is not loaded"));
  }
  if (e->pins == 0) {
    return absl::FailedPreconditionError(absl::StrCat("adapter ", Quote(id), " is not pinned"));
  }
  if (--e->pins == 0 && e->current != nullptr) {
    Version* v = e->current.get();
    if (v->refs == 0) ClearWaitingLocked(v);
    if (v->resident && v->refs == 0) CapacityChangedLocked();
    EnforceHostBudgetLocked();
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Get(absl::string_view id) const {
  {
    MutexLock lock(&mu_);
    const Entry* e = FindEntry(id);
    if (e != nullptr && e->deleting) return BeingDeletedStatus(id);
    if (e != nullptr && !e->deleted) return InfoLocked(*e);
  }
  LS_ASSIGN_OR_RETURN(const AdapterPaths paths, store_->Resolve(id));
  AdapterInfo info;
  info.id = paths.id;
  struct stat st;
  if (options_.persist_disabled &&
      ::stat(absl::StrCat(paths.dir, "/", kAdapterDisabledFile).c_str(), &st) == 0) {
    info.state = AdapterState::kDisabled;
  }
  return info;
}

absl::StatusOr<std::vector<AdapterInfo>> AdapterRegistry::List() const {
  LS_ASSIGN_OR_RETURN(std::vector<std::string> on_disk, store_->List());
  std::vector<AdapterInfo> infos;
  std::vector<std::string> unknown;
  {
    MutexLock lock(&mu_);
    for (const auto& [id, e] : entries_) {
      if (!e->deleted) infos.push_back(InfoLocked(*e));
    }
    for (std::string& id : on_disk) {
      const Entry* e = FindEntry(id);
      if (e == nullptr || (e->deleted && !e->deleting)) unknown.push_back(std::move(id));
    }
  }
  for (const std::string& id : unknown) {
    absl::StatusOr<AdapterInfo> info = Get(id);
    if (info.ok()) infos.push_back(*std::move(info));  // else removed meanwhile, or unloadable
  }
  std::sort(infos.begin(), infos.end(),
            [](const AdapterInfo& a, const AdapterInfo& b) { return a.id < b.id; });
  return infos;
}

AdapterRegistryStats AdapterRegistry::Stats() const {
  MutexLock lock(&mu_);
  AdapterRegistryStats s = stats_;
  s.pool_capacity_bytes = pool_->capacity_bytes();
  s.pool_page_bytes = pool_->page_bytes();
  s.pool_used_pages_bytes =
      static_cast<size_t>(pool_->num_pages() - pool_->free_pages()) * pool_->page_bytes();
  s.host_cache_capacity_bytes = options_.host_cache_bytes;
  s.host_bytes = host_bytes_;
  s.refs = live_refs_;
  s.waiting_versions = num_waiting_;
  for (const auto& [id, e] : entries_) {
    if (e->pins > 0) ++s.pinned_ids;
  }
  for (const Version* v : AllVersionsLocked()) {
    ++s.live_versions;
    if (v->phase == Phase::kLoading) ++s.loading_versions;
    if (v->host != nullptr) ++s.host_versions;
    if (!v->resident) continue;
    ++s.resident_versions;
    s.pool_bytes += v->info->packed_bytes;
    const size_t held = static_cast<size_t>(v->run.count) * pool_->page_bytes();
    if (PinnedLocked(v)) {
      s.pool_pinned_bytes += held;
    } else if (v->refs > 0) {
      s.pool_referenced_bytes += held;
    }
  }
  return s;
}

absl::StatusOr<AdapterDeleteResult> AdapterRegistry::Delete(absl::string_view id, bool force,
                                                            absl::Time deadline) {
  LS_RETURN_IF_ERROR(ValidateAdapterId(id));
  LS_ASSIGN_OR_RETURN(Entry * e, FindOrCreateEntry(id));
  AdapterDeleteResult result;
  {
    MutexLock lock(&mu_);
    if (!force && !e->disabled && e->failed.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("adapter ", Quote(id),
                       " is enabled; unload it first (UnloadAdapter) or delete with force"));
    }
    e->disabled = true;
    e->admitted = false;
    e->failed = absl::OkStatus();
    e->ready_version.clear();
    e->pins = 0;
    ++e->epoch;
    RetireCurrentLocked(e);
    e->deleted = true;
    e->deleting = true;  // until the directory is renamed away, below
    result.info = InfoLocked(*e);
    // Loads still reading the files (for requests admitted before this call) finish first, so
    // those requests are served; they are bounded by the caller's deadline.
    while (true) {
      std::shared_ptr<Version> loading;
      for (const auto& [raw, v] : others_) {
        if (v->entry == e && v->phase == Phase::kLoading && !v->freed) loading = v;
      }
      if (loading == nullptr || absl::Now() >= deadline) break;
      (void)WaitLoadedLocked(loading, deadline);
    }
  }
  // Out of the id's name at once (Get, List and uploads of the id see it gone); the bytes go
  // after the last reference.
  auto done_deleting = [this, e] {
    MutexLock lock(&mu_);
    e->deleting = false;
  };
  const std::string path = absl::StrCat(store_->root(), "/", id);
  std::error_code ec;
  const auto status = std::filesystem::symlink_status(path, ec);
  if (ec || !std::filesystem::exists(status)) {
    done_deleting();
    return absl::NotFoundError(
        absl::StrCat("adapter ", Quote(id), " not found: no directory ", path));
  }
  if (std::filesystem::is_directory(status)) {
    for (auto it = std::filesystem::recursive_directory_iterator(path, ec);
         !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
      std::error_code size_ec;
      if (it->is_regular_file(size_ec) && !it->is_symlink(size_ec)) {
        const uintmax_t size = it->file_size(size_ec);
        if (!size_ec) result.freed_disk_bytes += size;
      }
    }
  }
  std::random_device random;
  const std::string trash =
      absl::StrCat(store_->root(), "/.deleted-", id, "-", absl::Hex(random(), absl::kZeroPad8));
  if (::rename(path.c_str(), trash.c_str()) != 0) {
    const int err = errno;
    done_deleting();
    return absl::InternalError(absl::StrCat("adapter ", Quote(id), ": cannot move ", path, " to ",
                                            trash, ": ", std::strerror(err)));
  }
  const int root_fd = ::open(store_->root().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (root_fd >= 0) {
    (void)::fsync(root_fd);
    ::close(root_fd);
  }
  bool remove_now = false;
  {
    MutexLock lock(&mu_);
    e->deleting = false;
    e->trash.push_back(trash);
    remove_now = true;
    if (e->current != nullptr && e->current->refs > 0) remove_now = false;
    for (const auto& [raw, v] : others_) {
      if (v->entry == e && v->refs > 0) remove_now = false;
    }
    if (remove_now) e->trash.clear();
  }
  if (remove_now) RemoveTrash({trash});
  return result;
}

std::vector<absl::Status> AdapterRegistry::RegisterAll() {
  std::vector<absl::Status> errors;
  absl::StatusOr<std::vector<std::string>> ids = store_->List();
  if (!ids.ok()) {
    errors.push_back(ids.status());
    return errors;
  }
  for (const std::string& id : *ids) {
    absl::StatusOr<Entry*> e = FindOrCreateEntry(id);
    if (!e.ok()) errors.push_back(e.status());
  }
  return errors;
}

absl::StatusOr<LoadedAdapter> AdapterRegistry::ValidateFrom(const AdapterStore& staging,
                                                            absl::string_view id) const {
  LoraLoadOptions load_options;
  load_options.dtype = options_.dtype;
  load_options.max_lora_rank = options_.max_lora_rank;
  load_options.base_weights = base_weights_;
  LS_ASSIGN_OR_RETURN(LoadedAdapter loaded, staging.Load(id, base_config_, load_options));
  if (pool_->PagesFor(loaded.adapter->packed_bytes()) > pool_->num_pages()) {
    return TooLargeStatus(std::string(id), loaded.adapter->packed_bytes());
  }
  return loaded;
}

void AdapterRegistry::SyncDisabledMarker(absl::string_view id) {
  if (!options_.persist_disabled) return;
  MutexLock marker_lock(&marker_mu_);
  bool disabled = false;
  {
    MutexLock lock(&mu_);
    const Entry* e = FindEntry(id);
    if (e == nullptr) return;
    disabled = e->disabled;
  }
  absl::StatusOr<AdapterPaths> paths = store_->Resolve(id);
  if (!paths.ok()) return;  // the directory is gone: nothing to mark
  const std::string marker = absl::StrCat(paths->dir, "/", kAdapterDisabledFile);
  if (disabled) {
    const int fd = ::open(marker.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
      LS_LOG(WARNING) << "adapter " << Quote(id) << ": cannot write " << marker << ": "
                      << std::strerror(errno) << " (the unload is not persisted)";
      return;
    }
    ::close(fd);
  } else if (::unlink(marker.c_str()) != 0 && errno != ENOENT) {
    LS_LOG(WARNING) << "adapter " << Quote(id) << ": cannot remove " << marker << ": "
                    << std::strerror(errno);
  }
}

}  // namespace ls
