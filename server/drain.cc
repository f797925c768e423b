#include "server/drain.h"

namespace ls {

DrainGate::Ticket& DrainGate::Ticket::operator=(Ticket&& other) noexcept {
  if (this != &other) {
    Release();
    gate_ = other.gate_;
    other.gate_ = nullptr;
  }
  return *this;
}

void DrainGate::Ticket::Release() {
  if (gate_ != nullptr) {
    gate_->Exit();
    gate_ = nullptr;
  }
}

DrainGate::Ticket DrainGate::Enter() {
  MutexLock lock(&mu_);
  if (draining_) return Ticket();
  ++in_flight_;
  return Ticket(this);
}

void DrainGate::Exit() {
  MutexLock lock(&mu_);
  if (--in_flight_ == 0) idle_.SignalAll();
}

void DrainGate::StartDrain() {
  MutexLock lock(&mu_);
  draining_ = true;
}

bool DrainGate::draining() const {
  MutexLock lock(&mu_);
  return draining_;
}

int64_t DrainGate::in_flight() const {
  MutexLock lock(&mu_);
  return in_flight_;
}

bool DrainGate::WaitIdle(absl::Time deadline) {
  MutexLock lock(&mu_);
  while (in_flight_ > 0) {
    if (!idle_.WaitWithDeadline(&mu_, deadline) && absl::Now() >= deadline) {
      return in_flight_ == 0;
    }
  }
  return true;
}

}  // namespace ls
