// The CUDA caching allocator's statistics (`torch.cuda.max_memory_allocated` and friends) through c10's
// device-generic allocator interface: the peak memory a step needed, for the logs and the benchmark
// table. Without a GPU every call reports libtorch's error.
#include <c10/core/CachingDeviceAllocator.h>

#include "shim.h"

using ferroclip::guarded;

extern "C" {

// Bytes: currently allocated, peak allocated and peak reserved (held by the cache) on `device`; and
// how often an allocation failed, freed the cache and retried (`num_alloc_retries`).
int ferroclip_cuda_memory_stats(int device, int64_t* allocated, int64_t* peak_allocated, int64_t* peak_reserved,
                                int64_t* num_alloc_retries) {
  return guarded(
      [&]() -> int {
        auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
        const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
        *allocated = stats.allocated_bytes[all].current;
        *peak_allocated = stats.allocated_bytes[all].peak;
        *peak_reserved = stats.reserved_bytes[all].peak;
        *num_alloc_retries = stats.num_alloc_retries;
        return 0;
      },
      1);
}

int ferroclip_cuda_reset_peak_memory(int device) {
  return guarded(
      [&]() -> int {
        c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
        return 0;
      },
      1);
}

}  // extern "C"
