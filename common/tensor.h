// Non-owning tensor views. A view is a pointer plus dtype, shape, strides (in elements) and the
// device the memory lives on; it never owns or frees memory. Ownership lives in a few buffer
// and arena types (mapped files, the weight arena, pools), which must outlive every view into
// them.
#ifndef LORASERVE_COMMON_TENSOR_H_
#define LORASERVE_COMMON_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "common/dtype.h"

namespace ls {

enum class DeviceType : uint8_t { kCpu, kCuda };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;

  static Device Cpu() { return {DeviceType::kCpu, 0}; }
  static Device Cuda(int index) { return {DeviceType::kCuda, index}; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

using Shape = absl::InlinedVector<int64_t, 4>;

inline std::string ShapeToString(absl::Span<const int64_t> shape) {
  return "[" + absl::StrJoin(shape, ", ") + "]";
}

// Row-major strides for `shape`, in elements.
inline Shape ContiguousStrides(absl::Span<const int64_t> shape) {
  Shape strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  return strides;
}

// A view of `shape` elements of `dtype` at `data`. Copyable; copies alias the same memory.
// Views of sub-byte dtypes (F4, F6) are only ever contiguous.
class TensorView {
 public:
  TensorView() = default;
  TensorView(void* data, DType dtype, Shape shape, Device device = Device::Cpu())
      : data_(data), dtype_(dtype), shape_(std::move(shape)), device_(device) {
    strides_ = ContiguousStrides(shape_);
  }
  TensorView(void* data, DType dtype, Shape shape, Shape strides, Device device)
      : data_(data),
        dtype_(dtype),
        shape_(std::move(shape)),
        strides_(std::move(strides)),
        device_(device) {}

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  Device device() const { return device_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[static_cast<size_t>(i)]; }

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape_) n *= d;
    return n;
  }
  // Bytes covered by a contiguous view.
  size_t nbytes() const {
    return static_cast<size_t>(numel()) * static_cast<size_t>(DTypeBits(dtype_)) / 8;
  }
  bool is_contiguous() const { return strides_ == ContiguousStrides(shape_); }

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Shape shape_;
  Shape strides_;
  Device device_;
};

}  // namespace ls

#endif  // LORASERVE_COMMON_TENSOR_H_
