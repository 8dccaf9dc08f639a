// Host-to-device copies off the compute stream: a side stream from the device's pool copies a batch
// from pinned host memory while the compute stream runs the previous step, and the compute stream
// waits for the copy through an event (the pattern of `torch.cuda.Stream` + `Event.wait` in a
// prefetcher). Everything goes through c10's device-generic stream and event interfaces, so this file
// needs no CUDA headers; without a GPU every call reports libtorch's error.
#include <memory>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "shim.h"

using ferroclip::guarded;

struct FcCopyStream {
  c10::Device device;
  c10::Stream stream;
};

// Completion of one upload.
struct FcEvent {
  c10::Event event{c10::DeviceType::CUDA};
};

extern "C" {

FcCopyStream* ferroclip_copy_stream_new(int device) {
  return guarded(
      [&]() -> FcCopyStream* {
        c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        return new FcCopyStream{d, impl.getStreamFromGlobalPool(d, /*isHighPriority=*/false)};
      },
      static_cast<FcCopyStream*>(nullptr));
}

void ferroclip_copy_stream_free(FcCopyStream* s) { delete s; }

// Copies srcs[i] (pinned host) into new device tensors dsts[i] (heap `at::Tensor*`, owned by the caller)
// on the copy stream, without blocking the host and without waiting for the compute stream: the
// destinations are allocated on the copy stream, so the caching allocator hands out only memory whose
// earlier uses on that stream are ordered before the copy, and `record_stream(compute)` keeps each
// block from being reused until the compute stream's kernels queued after this call are done with it.
// So the upload of batch N+1 overlaps step N (waiting for the compute stream first, as an earlier
// version did, serialized them). The compute stream then waits for the copies. Returns the event the
// copies completed at (to know when the host memory is free again).
FcEvent* ferroclip_copy_stream_upload(FcCopyStream* s, at::Tensor** srcs, at::Tensor** dsts, size_t n) {
  return guarded(
      [&]() -> FcEvent* {
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        c10::Stream compute = impl.getStream(s->device);
        auto done = std::make_unique<FcEvent>();
        std::vector<at::Tensor> out;
        out.reserve(n);
        {
          c10::StreamGuard guard(s->stream);
          for (size_t i = 0; i < n; ++i) {
            at::Tensor d = at::empty(srcs[i]->sizes(), srcs[i]->options().device(s->device).pinned_memory(false));
            d.copy_(*srcs[i], /*non_blocking=*/true);
            out.push_back(std::move(d));
          }
          done->event.record(s->stream);
        }
        done->event.block(compute);
        for (auto& d : out) d.record_stream(compute);
        for (size_t i = 0; i < n; ++i) dsts[i] = new at::Tensor(std::move(out[i]));
        return done.release();
      },
      static_cast<FcEvent*>(nullptr));
}

// 1: complete, 0: not yet, -1: error. Never blocks.
int ferroclip_event_query(FcEvent* e) {
  return guarded([&]() -> int { return e->event.query() ? 1 : 0; }, -1);
}

int ferroclip_event_synchronize(FcEvent* e) {
  return guarded(
      [&]() -> int {
        e->event.synchronize();
        return 0;
      },
      1);
}

void ferroclip_event_free(FcEvent* e) { delete e; }

// `bytes` bytes of page-locked host memory from torch's caching host allocator, as a uint8 tensor.
at::Tensor* ferroclip_pinned_empty(int64_t bytes) {
  return guarded(
      [&]() -> at::Tensor* {
        return new at::Tensor(at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
      },
      static_cast<at::Tensor*>(nullptr));
}

}  // extern "C"
