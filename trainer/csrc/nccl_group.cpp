// ProcessGroupNCCL for Rust (trainer/src/dist/c10d.rs): the device group of a CUDA run. Compiled in
// every build against the CUDA 13 headers (scripts/setup fetches the header-only wheels) and linked
// against the wheel's libtorch_cuda.so; the collectives themselves are the generic ones of
// process_group.cpp. Built without USE_C10D_NCCL only for a CPU-only libtorch, where it reports so.
#include "shim.h"

#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

using ferroclip::guarded;

extern "C" {

bool ferroclip_nccl_compiled() {
#ifdef USE_C10D_NCCL
  return true;
#else
  return false;
#endif
}

// Binds this process to CUDA device `device` and connects all ranks' NCCL communicators through `store`
// (eagerly, so that a rank without a usable GPU fails here, during set-up). Collectives time out after
// `timeout_ms`; NCCL's own watchdog then aborts the communicator and ends the process.
FcGroup* ferroclip_group_nccl(FcStore* store, int rank, int world, int64_t timeout_ms, int device) {
  return guarded([&]() -> FcGroup* {
#ifdef USE_C10D_NCCL
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store->store, rank, world, opts);
    pg->eagerConnectSingleDevice(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    return new FcGroup{pg};
#else
    (void)store; (void)rank; (void)world; (void)timeout_ms; (void)device;
    throw std::runtime_error("this trainer was built against a libtorch without CUDA: no ProcessGroupNCCL");
#endif
  }, static_cast<FcGroup*>(nullptr));
}

}  // extern "C"
