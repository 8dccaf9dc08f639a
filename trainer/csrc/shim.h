// Shared by the C++ shim files: the handle types Rust holds and the error convention.
//
// Every extern "C" function of the shim catches C++ exceptions and reports failure through its return
// value (null, or non-zero); the message is kept per thread and read by Rust right after the failing
// call with `ferroclip_last_error()`. c10 errors are reported without their C++ backtrace.
#pragma once

#include <string>
#include <utility>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace ferroclip {

void set_error(std::string what);

// Runs `f`; on an exception records its message and returns `on_error`.
template <class F, class R>
R guarded(F&& f, R on_error) {
  try {
    return f();
  } catch (const c10::Error& e) {
    set_error(e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(e.what());
  } catch (...) {
    set_error("unknown C++ exception");
  }
  return on_error;
}

}  // namespace ferroclip

// A key-value store (TCPStore, HashStore, PrefixStore): rendezvous, heartbeats, the abort notice.
struct FcStore {
  c10::intrusive_ptr<c10d::Store> store;
};

// One c10d backend (ProcessGroupGloo or ProcessGroupNCCL) over all ranks.
struct FcGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
};

// A collective in flight. Holds the tensors it reads and writes until it has completed.
struct FcWork {
  c10::intrusive_ptr<c10d::Work> work;
  std::vector<at::Tensor> keep;
};
