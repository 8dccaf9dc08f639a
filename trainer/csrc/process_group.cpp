// c10d process groups for Rust (trainer/src/dist/c10d.rs): ProcessGroupGloo, and the collectives the
// trainer issues on any c10d backend (Gloo here, NCCL from nccl_group.cpp), each returning its
// c10d::Work so that Rust can overlap it with other work and wait later. Tensors come from tch as
// `torch::Tensor*`; they must be dense and contiguous (the Rust side makes sure).
#include <sstream>

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "shim.h"

using ferroclip::guarded;

namespace {

// GLOO_SOCKET_IFNAME (comma-separated interfaces) as torch.distributed reads it; else the address this
// host's name resolves to, falling back to loopback.
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices(const char* ifnames) {
  std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
  if (ifnames != nullptr && ifnames[0] != '\0') {
    std::stringstream list(ifnames);
    std::string name;
    while (std::getline(list, name, ',')) {
      if (!name.empty()) devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
    }
  }
  if (devices.empty()) devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return devices;
}

FcWork* started(c10::intrusive_ptr<c10d::Work> work, std::vector<at::Tensor> keep) {
  return new FcWork{std::move(work), std::move(keep)};
}

}  // namespace

extern "C" {

// Connects all `world` ranks through `store` (blocks until every rank has joined, or the timeout);
// `timeout_ms` then bounds every collective of the group.
FcGroup* ferroclip_group_gloo(FcStore* store, int rank, int world, int64_t timeout_ms, const char* ifnames) {
  return guarded([&]() -> FcGroup* {
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    opts->devices = gloo_devices(ifnames);
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store->store, rank, world, opts);
    return new FcGroup{pg};
  }, static_cast<FcGroup*>(nullptr));
}

const char* ferroclip_group_name(FcGroup* g) {
  static thread_local std::string name;
  name = g->backend->getBackendName();
  return name.c_str();
}

FcWork* ferroclip_all_reduce_sum(FcGroup* g, at::Tensor* t) {
  return guarded([&]() {
    std::vector<at::Tensor> ts{*t};
    auto work = g->backend->allreduce(ts, c10d::AllreduceOptions{});
    return started(work, ts);
  }, static_cast<FcWork*>(nullptr));
}

// out: [world * n, ...] receives every rank's in: [n, ...], in rank order.
FcWork* ferroclip_all_gather(FcGroup* g, at::Tensor* in, at::Tensor* out) {
  return guarded([&]() {
    auto work = g->backend->_allgather_base(*out, *in, c10d::AllgatherOptions{});
    return started(work, {*in, *out});
  }, static_cast<FcWork*>(nullptr));
}

// in: [world * n, ...]; out: [n, ...] receives the sum over ranks of rows rank*n .. (rank+1)*n.
FcWork* ferroclip_reduce_scatter_sum(FcGroup* g, at::Tensor* in, at::Tensor* out) {
  return guarded([&]() {
    auto work = g->backend->_reduce_scatter_base(*out, *in, c10d::ReduceScatterOptions{});
    return started(work, {*in, *out});
  }, static_cast<FcWork*>(nullptr));
}

FcWork* ferroclip_broadcast(FcGroup* g, at::Tensor* t, int root) {
  return guarded([&]() {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    auto work = g->backend->broadcast(ts, opts);
    return started(work, ts);
  }, static_cast<FcWork*>(nullptr));
}

FcWork* ferroclip_barrier(FcGroup* g) {
  return guarded([&]() { return started(g->backend->barrier(c10d::BarrierOptions{}), {}); },
                 static_cast<FcWork*>(nullptr));
}

// Blocks until the collective is complete (Gloo), or until its result is ordered before later work on
// the current CUDA stream (NCCL); non-zero with the error (a timeout, a lost peer) otherwise.
int ferroclip_work_wait(FcWork* w) {
  return guarded([&]() {
    w->work->wait();
    return 0;
  }, 1);
}

void ferroclip_work_free(FcWork* w) { delete w; }

// Ends the group's pending collectives without waiting for peers (NCCL: ncclCommAbort).
void ferroclip_group_abort(FcGroup* g) {
  guarded([&]() { g->backend->abort(); return 0; }, 1);
}

void ferroclip_group_free(FcGroup* g) { delete g; }

}  // extern "C"
