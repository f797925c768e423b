// Tracks in-flight RPCs so that shutdown can drain them: once draining starts, new RPCs are
// refused (the caller answers UNAVAILABLE) while those already admitted run to completion or
// until the drain deadline.
#ifndef LORASERVE_SERVER_DRAIN_H_
#define LORASERVE_SERVER_DRAIN_H_

#include <cstdint>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/mutex.h"

namespace ls {

// Thread-safe: every method may be called from any thread.
class DrainGate {
 public:
  // Held by an admitted RPC for its whole life; releasing it (destruction) lets a drain finish.
  class Ticket {
   public:
    Ticket() = default;
    explicit Ticket(DrainGate* gate) : gate_(gate) {}
    Ticket(Ticket&& other) noexcept : gate_(other.gate_) { other.gate_ = nullptr; }
    Ticket& operator=(Ticket&& other) noexcept;
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;
    ~Ticket() { Release(); }

    // False when the gate refused the RPC because a drain has started.
    explicit operator bool() const { return gate_ != nullptr; }
    void Release();

   private:
    DrainGate* gate_ = nullptr;
  };

  // Admits one RPC unless draining. The gate must outlive every ticket it issued.
  Ticket Enter();

  // Stops admitting. Idempotent.
  void StartDrain();
  bool draining() const;
  int64_t in_flight() const;

  // Blocks until no ticket is held or `deadline` passes; true when drained.
  bool WaitIdle(absl::Time deadline);

 private:
  void Exit();

  mutable Mutex mu_;
  CondVar idle_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_DRAIN_H_
