// c10d's key-value stores for Rust (trainer/src/dist/c10d.rs): the TCPStore that every rank of a job
// joins (rank 0 serves it, as torch.distributed's env:// rendezvous does), an in-process HashStore for
// a one-rank job, PrefixStore to give each process group its own key space, and the few store
// operations the rendezvous and the watchdog use.
#include <cstdlib>
#include <cstring>

#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "shim.h"

namespace ferroclip {
namespace {
thread_local std::string last_error;
}
void set_error(std::string what) { last_error = std::move(what); }
}  // namespace ferroclip

using ferroclip::guarded;

extern "C" {

const char* ferroclip_last_error() { return ferroclip::last_error.c_str(); }

// c10's log level, as TORCH_CPP_LOG_LEVEL sets it (0 info, 1 warning, 2 error).
void ferroclip_set_cpp_log_level(int level) { FLAGS_caffe2_log_level = level; }

// Rank 0 passes is_server = true and serves on `port` (0: any free port, see ferroclip_store_port);
// the others connect, retrying until `timeout_ms`, which also bounds every later blocking get.
FcStore* ferroclip_store_tcp(const char* host, uint16_t port, bool is_server, int64_t world, int64_t timeout_ms) {
  return guarded([&]() -> FcStore* {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    if (world > 0) opts.numWorkers = static_cast<size_t>(world);
    // Joining is checked by the Rust side (it names the ranks that are missing).
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    return new FcStore{c10::make_intrusive<c10d::TCPStore>(std::string(host), opts)};
  }, static_cast<FcStore*>(nullptr));
}

FcStore* ferroclip_store_hash() {
  return guarded([&]() -> FcStore* { return new FcStore{c10::make_intrusive<c10d::HashStore>()}; },
                 static_cast<FcStore*>(nullptr));
}

FcStore* ferroclip_store_prefix(FcStore* base, const char* prefix) {
  return guarded([&]() -> FcStore* {
    return new FcStore{c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base->store)};
  }, static_cast<FcStore*>(nullptr));
}

// A second client of the same store with its own connection, for another thread: a TCPStore client
// serializes its operations, so a blocking get on one thread would otherwise stall the heartbeat.
FcStore* ferroclip_store_clone(FcStore* s) {
  return guarded([&]() -> FcStore* { return new FcStore{s->store->clone()}; }, static_cast<FcStore*>(nullptr));
}

// The port a TCPStore listens on or connects to; -1 for other stores.
int ferroclip_store_port(FcStore* s) {
  auto* tcp = dynamic_cast<c10d::TCPStore*>(s->store.get());
  return tcp ? static_cast<int>(tcp->getPort()) : -1;
}

int ferroclip_store_set_timeout(FcStore* s, int64_t timeout_ms) {
  return guarded([&]() { s->store->setTimeout(std::chrono::milliseconds(timeout_ms)); return 0; }, 1);
}

int ferroclip_store_set(FcStore* s, const char* key, const uint8_t* data, size_t len) {
  return guarded([&]() {
    s->store->set(std::string(key), std::vector<uint8_t>(data, data + len));
    return 0;
  }, 1);
}

// Waits for `key` (up to the store's timeout); the value is malloc'ed, free it with ferroclip_bytes_free.
int ferroclip_store_get(FcStore* s, const char* key, uint8_t** data, size_t* len) {
  return guarded([&]() {
    auto v = s->store->get(std::string(key));
    *len = v.size();
    *data = static_cast<uint8_t*>(std::malloc(v.size() > 0 ? v.size() : 1));
    if (!v.empty()) std::memcpy(*data, v.data(), v.size());
    return 0;
  }, 1);
}

int ferroclip_store_add(FcStore* s, const char* key, int64_t delta, int64_t* value) {
  return guarded([&]() { *value = s->store->add(std::string(key), delta); return 0; }, 1);
}

int ferroclip_store_check(FcStore* s, const char* key, bool* present) {
  return guarded([&]() { *present = s->store->check({std::string(key)}); return 0; }, 1);
}

void ferroclip_bytes_free(uint8_t* data) { std::free(data); }

void ferroclip_store_free(FcStore* s) { delete s; }

}  // extern "C"
