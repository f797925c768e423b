// The adapter registry: which LoRA adapters exist, which version of each is served, where each
// version's weights are (disk, host cache, resident pool), who uses them (references held by
// requests, pins held by operators) and when they are loaded and evicted. docs/adapters.md
// ("Registry") is the operator's view; this header is the contract.
//
// Identity. An id names a directory of the AdapterStore (model/adapter_store.h). A *version*
// is one load of an id's files, identified by their SHA-256. An id has at most one *current*
// version, the one new references get; Reload makes a new current version when the files
// changed, and older versions live on, unchanged, as long as references hold them.
//
// States of an id (AdapterState, what Get reports for its current version):
//
//            Acquire / Load / Pin           loaded               placed (a run fits)
//   kOnDisk ----------------------> kLoading -------> kHost -----------------------> kResident
//      ^                               |               ^  <------------------------------+
//      |                     load error|               |   pool eviction: LRU, unreferenced,
//      |                               v               |   unpinned (the host copy may stay)
//      |                            kFailed            |
//      |                 (sticky until Load / Reload,  +-- host-cache eviction of an
//      |                  except transient errors)         unreferenced, unpinned version
//      +---------------------------------------------------that is in neither tier
//
//   any state --Unload--> kDisabled --Load / Reload--> kOnDisk / kLoading / ...
//
// Testing: with LORASERVE_FAILPOINTS=adapter_load_pause=<path> in the environment when the
// registry is created, every load waits (on its loader thread, before reading the files) while
// <path> exists: how tests make a load block (docs/adapters.md, "Testing").
//
// Loading covers read, validate, convert and the copy into the pool. Old versions (after
// Unload or Reload) are not an id's state: they live on, invisible to new requests, until their
// last reference drops, and are listed in AdapterInfo::versions.
//
// Tiers: the resident pool (AdapterPagePool: fixed-size pages, an adapter takes one contiguous
// run for its true packed size, first-fit) <- the host cache (loaded LoraAdapter objects, LRU,
// `host_cache_bytes`) <- disk. Eviction from either tier takes the least recently used version
// that no reference and no pin holds; a referenced or pinned version is never evicted from the
// pool, and a referenced version that is not resident keeps its host copy (the files on disk
// may already hold a newer version). When no free run is long enough, unreferenced unpinned
// versions are evicted in LRU order until one is, but only if evicting all of them would make
// one; otherwise nothing is evicted and the version waits for pages.
//
// The engine's use (one engine thread; see style rule 7):
//   gRPC thread, at admission:  absl::StatusOr<AdapterRef> ref = registry.Acquire(id);
//                               (NOT_FOUND, a failed load's status, ...; queues the load)
//   engine thread, each step:   if (!ref.resident()) ready = registry.TryMakeResident(ref, dl);
//                               (never waits on disk; false = skip this request this step;
//                               an error = fail the request with it)
//   engine thread, planning:    ref.groups()->group(layer, proj), lm_head(), embed() for the
//                               segments; ref.key() to count distinct adapters per step
//                               (max_loras_per_step) and to group rows
//   when the request ends:      drop the ref (frees an unloaded or replaced version)
//
// Thread safety: every AdapterRegistry method may be called from any thread. An AdapterRef is
// used by one thread at a time (its request's), and every ref must be dropped before the
// registry is destroyed.
#ifndef LORASERVE_SERVER_ADAPTERS_REGISTRY_H_
#define LORASERVE_SERVER_ADAPTERS_REGISTRY_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "common/mutex.h"
#include "model/adapter_store.h"
#include "model/config.h"
#include "model/lora_adapter.h"
#include "model/weights.h"
#include "server/adapters/adapter_pool.h"

namespace ls {

struct AdapterRegistryOptions {
  // The resident pool (--adapter_pool_bytes, --adapter_page_bytes). page_bytes must be a
  // multiple of 256; the pool holds floor(pool_bytes / page_bytes) pages.
  size_t pool_bytes = size_t{1} << 30;
  size_t page_bytes = size_t{256} << 10;
  // The host cache of loaded adapters (--adapter_host_cache_bytes). A soft bound: copies that
  // must stay (a referenced or pinned version that is not resident yet) may exceed it.
  size_t host_cache_bytes = size_t{2} << 30;
  // How long a request waits for residency, at most (--adapter_wait_timeout); its own deadline
  // may cut this shorter.
  absl::Duration wait_timeout = absl::Seconds(30);
  // Loader threads, and the nice value they run at (best effort, setpriority per thread). 10
  // gives a loader about a tenth of a core that compute threads keep busy: loads yield to
  // decoding but still finish; 19 (about 1.5%) can stretch a load to seconds under full load.
  int loader_threads = 2;
  int loader_nice = 10;
  // Attempts per load when the store reports ABORTED (files replaced during the read).
  int load_attempts = 3;
  // The compute dtype adapters are converted to (kBF16 or kF32) and the rank bound.
  DType dtype = DType::kBF16;
  int32_t max_lora_rank = 256;
  // Unload writes `<root>/<id>/.loraserve-disabled` and Load/Reload remove it, so restarts and
  // replicas sharing the root start with the id disabled. A registry reads the marker when it
  // first meets an id.
  bool persist_disabled = true;
  // --load_on_demand. True: any enabled id on disk is served when a request names it (loaded
  // then). False: only ids an operator loaded in this process (Load, Reload, an upload with
  // `load`, --preload_adapters) are served; Acquire of any other id is NOT_FOUND. Once loaded,
  // an id evicted from every tier is still read back on demand: eviction is not an unload.
  bool load_on_demand = true;

  absl::Status Validate() const;
};

inline constexpr absl::string_view kAdapterDisabledFile = ".loraserve-disabled";

enum class AdapterState : uint8_t {
  kOnDisk,    // known, not in memory
  kLoading,   // queued, or being read, validated, converted or copied into the pool
  kHost,      // in the host cache, not resident
  kResident,  // in the compute pool (possibly also in the host cache)
  kDisabled,  // unloaded: new references get NOT_FOUND
  kFailed,    // the last load failed; new references get its status
};
absl::string_view AdapterStateName(AdapterState state);

class AdapterRegistry;
namespace registry_internal {
struct Entry;
struct Version;
struct LoadedInfo;
}  // namespace registry_internal

// A request's hold on one version of one adapter, or on nothing (the base model). Move-only;
// dropping it releases the version (RAII). While it lives, that version is never evicted from
// the pool once resident, and its memory is not freed even after Unload or a replace.
class AdapterRef {
 public:
  // The base model: no adapter.
  AdapterRef() = default;
  AdapterRef(AdapterRef&& other) noexcept;
  AdapterRef& operator=(AdapterRef&& other) noexcept;
  AdapterRef(const AdapterRef&) = delete;
  AdapterRef& operator=(const AdapterRef&) = delete;
  ~AdapterRef() { Reset(); }

  // Releases the hold; the ref becomes a base-model ref.
  void Reset();
  // Adds tokens generated for this ref's request; they count as the id's tokens served when the
  // ref drops. No lock: a plain add on the owner thread.
  void CountTokens(uint64_t n) { tokens_ += n; }

  bool is_base() const { return registry_ == nullptr; }
  // Identifies the adapter version: 0 for the base model; equal for refs to the same version,
  // different for different versions (also of one id). Cheap; for counting distinct adapters
  // in a step (max_loras_per_step) and grouping rows into segments.
  uint64_t key() const { return key_; }
  // The id ("" for the base model).
  const std::string& id() const;

  // Whether the registry has reported this ref resident (TryMakeResident returned true or
  // WaitResident returned OK). The base model is always "resident".
  bool resident() const { return is_base() || groups_ != nullptr; }
  // The version's groups in the compute pool, valid from residency until the ref is dropped,
  // immutable, never moved: the engine may keep `const LoraGroup*` into it for the ref's life.
  // Null for the base model and before residency.
  const LoraGroupTable* groups() const { return groups_; }
  // The version (SHA-256 hex) and bytes; valid once resident (empty / 0 before).
  const std::string& version() const;
  size_t packed_bytes() const;

 private:
  friend class AdapterRegistry;

  AdapterRegistry* registry_ = nullptr;
  registry_internal::Version* version_ = nullptr;
  uint64_t key_ = 0;
  // Set by the registry under its mutex when it reports residency; read by the owner thread.
  const LoraGroupTable* groups_ = nullptr;
  const registry_internal::LoadedInfo* info_ = nullptr;
  absl::Time wait_start_ = absl::InfinitePast();
  // Whether dropping it counts a served request for the id (false for the admin's own refs).
  bool count_served_ = true;
  uint64_t tokens_ = 0;  // CountTokens, added to the id on release
};

// One live version of an id.
struct AdapterVersionInfo {
  std::string version;  // empty while loading
  bool current = false;
  int64_t refs = 0;
  bool in_pool = false;
  bool in_host = false;
  size_t packed_bytes = 0;
};

// The outcome of one load of an id's files (a loader thread's read, validate, convert),
// whatever asked for it: a request, Load, Reload or Pin. Immutable once recorded.
struct AdapterLoadRecord {
  absl::Status status;  // OK, or the load's error (the adapter did not load)
  std::string version;  // the version loaded; empty when the load failed
  // The version the id was serving (or had last served, enabled) before this load, when it
  // differs; `unchanged` when the files held that same version again.
  std::string previous_version;
  bool unchanged = false;
  // Null when the files could not be read and validated; set for a load that read them but
  // then failed (an adapter larger than the pool).
  std::shared_ptr<const LoraAdapterReport> report;
  double seconds = 0.0;  // wall time of the load, retries included
  absl::Time finished_at = absl::InfinitePast();
};

// What Get / List / Load / Reload report about an id.
struct AdapterInfo {
  std::string id;
  AdapterState state = AdapterState::kOnDisk;
  absl::Status status;      // kFailed: the load's error
  std::string version;      // the current version; empty when none is loaded
  size_t packed_bytes = 0;  // of the current version
  bool in_pool = false;
  bool in_host = false;
  PageRun pool_run;  // the current version's pages when in_pool
  int64_t refs = 0;  // over every version of the id
  int64_t pins = 0;
  absl::Time last_used = absl::InfinitePast();  // last Acquire or release
  absl::Time loaded_at = absl::InfinitePast();
  std::shared_ptr<const LoraAdapterReport> report;  // the current version's; null if none
  std::vector<AdapterVersionInfo> versions;         // current first, then older ones in use
  // The version of the id's last successful load in this process, kept after the version has
  // left every tier (state kOnDisk again); empty if none.
  std::string last_loaded_version;
  // Requests whose reference on this id (any version) was dropped, since the registry started,
  // and the tokens their engine counted (AdapterRef::CountTokens).
  uint64_t requests_served = 0;
  uint64_t tokens_served = 0;
  // The last load of this id in this process that finished, successful or not; null if none.
  std::shared_ptr<const AdapterLoadRecord> last_load;
};

struct AdapterDeleteResult {
  AdapterInfo info;               // as it was just before the files were removed (disabled)
  uint64_t freed_disk_bytes = 0;  // bytes of the files (freed now, or after the last reference)
};

struct AdapterReloadResult {
  AdapterInfo info;
  std::string previous_version;  // empty when none was loaded
  bool new_version = false;      // false: the files still hold the current version
};

// Counters and gauges for metrics. Bytes are packed bytes unless named "pages".
struct AdapterRegistryStats {
  // Counters.
  uint64_t loads = 0;          // successful disk -> host loads
  uint64_t load_failures = 0;  // loads that ended in an error
  uint64_t load_retries = 0;   // ABORTED attempts retried
  uint64_t placements = 0;     // copies into the pool
  uint64_t pool_evictions = 0;
  uint64_t host_evictions = 0;
  uint64_t wait_timeouts = 0;  // RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED after waiting
  // Load latency (read, validate, convert; retries included), seconds.
  static constexpr int kNumLatencyBuckets = 12;
  static constexpr double kLatencyBucketBounds[kNumLatencyBuckets] = {
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0};
  uint64_t load_latency_buckets[kNumLatencyBuckets + 1] = {};  // last: +Inf
  double load_seconds_sum = 0.0;
  double load_seconds_max = 0.0;
  double place_seconds_sum = 0.0;
  // Gauges.
  size_t pool_capacity_bytes = 0;
  size_t pool_page_bytes = 0;
  size_t pool_used_pages_bytes = 0;  // pages in use * page size
  size_t pool_bytes = 0;             // packed bytes resident
  size_t pool_referenced_bytes = 0;  // resident, referenced (or being placed), not pinned
  size_t pool_pinned_bytes = 0;      // resident and pinned
  size_t host_cache_capacity_bytes = 0;
  size_t host_bytes = 0;
  int64_t resident_versions = 0;
  int64_t host_versions = 0;
  int64_t loading_versions = 0;
  int64_t live_versions = 0;  // every version object, loaded or not
  int64_t refs = 0;
  int64_t pinned_ids = 0;
  int64_t waiting_versions = 0;  // loaded, wanted resident, no room yet
};

class AdapterRegistry {
 public:
  // `store` is owned. `base_config` is copied; `base_weights` (may be null: adapters that carry
  // copies of base weights are then refused) must outlive the registry. `pool` null: a host
  // pool of options.pool_bytes / page_bytes. Starts the loader threads.
  static absl::StatusOr<std::unique_ptr<AdapterRegistry>> Create(
      std::unique_ptr<AdapterStore> store, const ModelConfig& base_config,
      const ModelWeights* base_weights, const AdapterRegistryOptions& options,
      std::unique_ptr<AdapterPagePool> pool = nullptr);

  // Stops the loader threads (a load in progress finishes first). No AdapterRef may be alive.
  ~AdapterRegistry();
  AdapterRegistry(const AdapterRegistry&) = delete;
  AdapterRegistry& operator=(const AdapterRegistry&) = delete;

  // ---- Requests ---------------------------------------------------------------------------

  // A reference to `id`'s current version; "" gives the base-model ref. NOT_FOUND for an id
  // that has no directory or is disabled; INVALID_ARGUMENT for a malformed id; the stored
  // status of a failed load (e.g. INVALID_ARGUMENT with the load report's problems). Never
  // waits on a load: if the version is not loaded (or not resident) the load (placement) is
  // queued and the ref is returned at once. Resolving an id the registry has not met yet reads
  // its directory entry (a few syscalls); call this off the engine thread.
  absl::StatusOr<AdapterRef> Acquire(absl::string_view id);

  // Engine thread, non-blocking (a short mutex hold, no I/O): true once the ref's version is
  // resident (then ref.groups() is set), false while it is loading or waiting for pool pages
  // (a load or placement is queued if none is). Errors: the version's load failed (its status),
  // it is larger than the pool (RESOURCE_EXHAUSTED naming both sizes), or it was not resident
  // by min(`deadline`, first call + wait_timeout): RESOURCE_EXHAUSTED naming the pool bytes held
  // by referenced and by pinned adapters when it waited for pages, DEADLINE_EXCEEDED when it
  // was still loading.
  absl::StatusOr<bool> TryMakeResident(AdapterRef& ref, absl::Time deadline);
  // The same outcome, blocking until resident or an error (tests, admin, warm-up).
  absl::Status WaitResident(AdapterRef& ref, absl::Time deadline);

  // ---- Operators (the admin service) -------------------------------------------------------

  // Enables `id` (removes a disabled mark, clears a failed load) and loads its current version
  // if none is in memory, waiting for the load (up to `deadline`), then tries to place it in
  // the pool (evicting LRU unreferenced, unpinned adapters, without waiting for others).
  // Returns the id's info with the load report, or the load's error.
  absl::StatusOr<AdapterInfo> Load(absl::string_view id,
                                   absl::Time deadline = absl::InfiniteFuture());
  // Disables `id`: new Acquire calls get NOT_FOUND at once, its pins are dropped, and its
  // versions' memory is freed when their last reference drops (in-flight requests finish on
  // them unchanged). Idempotent. NOT_FOUND when the id is neither known nor on disk.
  // `force` false: FAILED_PRECONDITION while the id is pinned (an operator's pin is a promise
  // to keep it served).
  absl::Status Unload(absl::string_view id, bool force = true);
  // Deletes `id`: disables it as Unload does (refused with FAILED_PRECONDITION when it is enabled
  // and `force` is false), waits (up to `deadline`) for loads of its files in progress, then
  // renames `<root>/<id>` (the link itself when it is a symlink) out of the id namespace at once
  // and removes it after the last reference to the id's versions drops (in-flight requests hold
  // their weights in memory and finish). From then on the id is NOT_FOUND until a directory of
  // that name appears again (an upload).
  absl::StatusOr<AdapterDeleteResult> Delete(absl::string_view id, bool force,
                                             absl::Time deadline = absl::InfiniteFuture());
  // Meets every id in the root (the start-up registration, tier disk): reads each one's
  // disabled marker. Ids that do not resolve (broken links, files missing) are skipped and
  // returned with their errors.
  std::vector<absl::Status> RegisterAll();
  // Loads `id` from another store (an upload's staging directory) exactly as a load of this
  // registry would (base model, dtype, rank bound, pool size), without registering anything.
  absl::StatusOr<LoadedAdapter> ValidateFrom(const AdapterStore& staging,
                                             absl::string_view id) const;
  // Loads the files again (enabling the id). When their version differs from the current one it
  // becomes the current version (pins follow the id) and the old one lives on while referenced;
  // when the load fails the current version stays. Waits up to `deadline`.
  absl::StatusOr<AdapterReloadResult> Reload(absl::string_view id,
                                             absl::Time deadline = absl::InfiniteFuture());
  // Pins nest (a count per id). Pin loads the id if needed and waits until its current version
  // is resident (up to min(deadline, wait_timeout)); on failure the pin is not taken. A pinned
  // id's current version is never evicted from the pool.
  absl::Status Pin(absl::string_view id, absl::Time deadline = absl::InfiniteFuture());
  // FAILED_PRECONDITION when the id is not pinned; NOT_FOUND when unknown.
  absl::Status Unpin(absl::string_view id);

  // NOT_FOUND when the id is neither known nor on disk.
  absl::StatusOr<AdapterInfo> Get(absl::string_view id) const;
  // Every id known to the registry or present in the root, sorted.
  absl::StatusOr<std::vector<AdapterInfo>> List() const;
  AdapterRegistryStats Stats() const;

  const AdapterStore& store() const { return *store_; }
  const AdapterRegistryOptions& options() const { return options_; }

 private:
  using Entry = registry_internal::Entry;
  using Version = registry_internal::Version;
  enum class TaskKind : uint8_t { kLoad, kPlace, kPlacePass, kFree };
  struct Task {
    TaskKind kind = TaskKind::kLoad;
    std::shared_ptr<Version> version;  // null for kPlacePass and kFree
  };
  friend class AdapterRef;

  AdapterRegistry(std::unique_ptr<AdapterStore> store, const ModelConfig& base_config,
                  const ModelWeights* base_weights, const AdapterRegistryOptions& options,
                  std::unique_ptr<AdapterPagePool> pool);

  // Finds the entry for `id`, creating it (after resolving the id in the store, outside the
  // lock) when the registry has not met it. Errors: the store's (NOT_FOUND, ...).
  absl::StatusOr<Entry*> FindOrCreateEntry(absl::string_view id) ABSL_LOCKS_EXCLUDED(mu_);
  Entry* FindEntry(absl::string_view id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  AdapterRef MakeRefLocked(const std::shared_ptr<Version>& v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Release(AdapterRef& ref) ABSL_LOCKS_EXCLUDED(mu_);
  // The entry's current version, created (and its load queued) when there is none.
  std::shared_ptr<Version> CurrentOrNewLocked(Entry* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::shared_ptr<Version> NewVersionLocked(Entry* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes `e`'s current version an old one (freed once unused).
  void RetireCurrentLocked(Entry* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees a version that no longer serves anyone: retired (or dropped) with no references and
  // no copy in flight.
  void MaybeFreeLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropHostCopyLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EvictFromPoolLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A version in neither tier is forgotten: the entry goes back to kOnDisk.
  void ForgetIfNowhereLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The version's load failed (or its copy into the pool): refs holding it get `status`.
  void FailLocked(Version* v, absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Every live version: the entries' current ones, then others_.
  std::vector<Version*> AllVersionsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The owning share of a live version (null when freed).
  std::shared_ptr<Version> SharedLocked(Version* v) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks / unmarks a version as waiting for pool pages (wanted resident, no run fits).
  void SetWaitingLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ClearWaitingLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  bool PinnedLocked(const Version* v) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool WantsResidencyLocked(const Version* v) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TouchLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Queues whatever brings `v` closer to residency (a load or a placement) if nothing is queued.
  void EnsureProgressLocked(const std::shared_ptr<Version>& v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EnqueueLocked(TaskKind kind, std::shared_ptr<Version> v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Called when pool pages may have become available to waiting versions.
  void CapacityChangedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EnforceHostBudgetLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Residency check shared by TryMakeResident and WaitResident: true when resident (ref
  // updated), false when pending, or the error.
  absl::StatusOr<bool> CheckResidentLocked(AdapterRef& ref, absl::Time now, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status NoRoomStatusLocked(const Version* v, absl::Duration waited)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status TooLargeStatus(const std::string& id, size_t bytes) const;

  // Allocates pages for `v` (evicting LRU candidates when that makes a run fit). On success
  // v->run and v->placing are set and the caller copies with CopyAndPublishLocked.
  bool AllocateForLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Copies v's bytes into its pages without the lock, then publishes the residency.
  void CopyAndPublishLocked(const std::shared_ptr<Version>& v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Tries to place `v` now; returns whether it became resident.
  bool TryPlaceLocked(const std::shared_ptr<Version>& v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void LoaderMain() ABSL_LOCKS_EXCLUDED(mu_);
  void RunLoad(const std::shared_ptr<Version>& v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Keeps the outcome of a finished load of `e` as its last load (AdapterInfo::last_load).
  void RecordLoadLocked(Entry* e, const absl::Status& status,
                        const std::shared_ptr<const registry_internal::LoadedInfo>& info,
                        double seconds) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The adapter_load_pause failpoint (docs/adapters.md, "Testing"): when set, blocks the calling
  // loader thread while that file exists (at most 300 s, or until the registry stops).
  void MaybePauseLoad(const std::string& id) ABSL_LOCKS_EXCLUDED(mu_);
  void RunPlacePass() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Waits until `v` is loaded or failed (or `deadline`); the load's status.
  absl::Status WaitLoadedLocked(const std::shared_ptr<Version>& v, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  AdapterInfo InfoLocked(const Entry& e) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes directories that Delete renamed away (file I/O: call without mu_).
  static void RemoveTrash(const std::vector<std::string>& dirs);
  // Queues the entry's trash for removal once no version of it is referenced.
  void MaybeQueueTrashLocked(Entry* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes or removes the disabled marker to match the entry's state.
  void SyncDisabledMarker(absl::string_view id) ABSL_LOCKS_EXCLUDED(mu_, marker_mu_);

  const std::unique_ptr<AdapterStore> store_;
  const ModelConfig base_config_;
  const ModelWeights* const base_weights_;
  const AdapterRegistryOptions options_;
  // From LORASERVE_FAILPOINTS, read once when the registry is created; empty (the production
  // case) costs one emptiness check per load.
  const std::string load_pause_file_;

  // Serializes writes of disabled markers (file I/O, never under mu_).
  Mutex marker_mu_ ABSL_ACQUIRED_BEFORE(mu_);

  // Guards every registry structure below, and every field of Entry and Version not marked
  // immutable. Never held across file I/O or a copy into the pool.
  mutable Mutex mu_;
  // Signalled whenever a version finishes loading, fails, or becomes resident, or when a place
  // pass ends.
  CondVar changed_;
  CondVar work_cv_;  // loader threads wait here for tasks_ or stop_

  // Allocate, Free and the queries under mu_; CopyIn and Address by a run's owner without it.
  const std::unique_ptr<AdapterPagePool> pool_;
  absl::flat_hash_map<std::string, std::unique_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  // Versions that are not an entry's current one but still alive (referenced, loading for a
  // Reload, or being copied).
  absl::flat_hash_map<Version*, std::shared_ptr<Version>> others_ ABSL_GUARDED_BY(mu_);
  std::deque<Task> tasks_ ABSL_GUARDED_BY(mu_);
  bool place_pass_queued_ ABSL_GUARDED_BY(mu_) = false;
  // Host copies dropped under mu_, freed by a loader thread without it (kFree).
  std::vector<std::unique_ptr<LoraAdapter>> graveyard_ ABSL_GUARDED_BY(mu_);
  bool free_queued_ ABSL_GUARDED_BY(mu_) = false;
  // Deleted adapters' directories to remove (kFree does it, after graveyard_).
  std::vector<std::string> trash_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_key_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t use_tick_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t wait_seq_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t num_waiting_ ABSL_GUARDED_BY(mu_) = 0;     // versions with wait_seq != 0
  AdapterRegistryStats stats_ ABSL_GUARDED_BY(mu_);  // counters; gauges are computed in Stats()
  size_t host_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t live_refs_ ABSL_GUARDED_BY(mu_) = 0;

  std::vector<std::thread> loaders_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_ADAPTERS_REGISTRY_H_
