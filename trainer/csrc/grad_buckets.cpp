// Gradient all-reduce overlapped with backward, for Rust (trainer/src/dist/grad_buckets.rs).
//
// The gradients live in a few flat buffers (trainer/src/optim/adamw.rs); a bucket is a contiguous slice
// of one of them. While a backward pass is "armed", a post-accumulate-grad hook on every parameter counts
// down its bucket; when a bucket is complete it is all-reduced asynchronously on the group, like DDP's
// Reducer (torch/csrc/distributed/c10d/reducer.cpp). Buckets are launched strictly in their index order
// (every rank issues collectives in the same order, whatever order its hooks fire in); the ones whose
// parameters got no gradient in the armed pass are launched by `finish`, which then waits for all.
#include <memory>
#include <mutex>

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "shim.h"

using ferroclip::guarded;

struct FcBuckets {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::vector<at::Tensor> views;         // bucket b: a slice of a flat gradient buffer
  std::vector<at::Tensor> params;        // every parameter with a hook
  std::vector<int64_t> members;          // parameters per bucket
  std::mutex mu;
  bool armed = false;
  std::vector<int64_t> pending;          // parameters of bucket b still to accumulate
  size_t next = 0;                       // the next bucket to launch
  size_t early = 0;                      // buckets launched from hooks during the last armed pass
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  std::string error;

  // With `mu` held: launch every complete bucket from `next` on, in order.
  void launch_ready(bool all) {
    while (next < views.size() && (all || pending[next] == 0)) {
      try {
        std::vector<at::Tensor> ts{views[next]};
        works.push_back(backend->allreduce(ts, c10d::AllreduceOptions{}));
      } catch (const c10::Error& e) {
        if (error.empty()) error = e.what_without_backtrace();
      } catch (const std::exception& e) {
        if (error.empty()) error = e.what();
      }
      next += 1;
    }
  }

  void on_accumulated(int64_t bucket) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || pending[bucket] <= 0) return;
    pending[bucket] -= 1;
    size_t before = next;
    launch_ready(false);
    early += next - before;
  }
};

namespace {

struct BucketHook : torch::autograd::PostAccumulateGradHook {
  FcBuckets* owner;
  int64_t bucket;
  BucketHook(FcBuckets* o, int64_t b) : owner(o), bucket(b) {}
  void operator()(const torch::autograd::Variable& /*param*/) override { owner->on_accumulated(bucket); }
};

}  // namespace

extern "C" {

// views[0..n_buckets): the bucket slices; params[i] belongs to bucket param_bucket[i].
FcBuckets* ferroclip_buckets_new(FcGroup* g, at::Tensor** views, size_t n_buckets, at::Tensor** params,
                                 const int64_t* param_bucket, size_t n_params) {
  return guarded([&]() -> FcBuckets* {
    auto b = std::make_unique<FcBuckets>();
    b->backend = g->backend;
    for (size_t i = 0; i < n_buckets; ++i) b->views.push_back(*views[i]);
    b->members.assign(n_buckets, 0);
    for (size_t i = 0; i < n_params; ++i) {
      TORCH_CHECK(param_bucket[i] >= 0 && static_cast<size_t>(param_bucket[i]) < n_buckets, "bad bucket index");
      b->members[param_bucket[i]] += 1;
    }
    for (size_t i = 0; i < n_params; ++i) {
      const at::Tensor& p = *params[i];
      TORCH_CHECK(p.requires_grad() && p.is_leaf(), "gradient buckets need leaf parameters that require grad");
      torch::autograd::impl::set_post_acc_grad_hooks(p, std::make_unique<BucketHook>(b.get(), param_bucket[i]));
      b->params.push_back(p);
    }
    b->pending = b->members;
    b->next = n_buckets;  // nothing to launch until armed
    return b.release();
  }, static_cast<FcBuckets*>(nullptr));
}

// The next backward pass is the last of the step: launch buckets as they complete.
void ferroclip_buckets_arm(FcBuckets* b) {
  std::lock_guard<std::mutex> lock(b->mu);
  b->pending = b->members;
  b->next = 0;
  b->early = 0;
  b->works.clear();
  b->error.clear();
  b->armed = true;
}

// Launches the buckets not launched yet (all of them when the pass was not armed), waits for every
// one, and disarms. Non-zero with the error when a collective failed.
int ferroclip_buckets_finish(FcBuckets* b, size_t* early) {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  {
    std::lock_guard<std::mutex> lock(b->mu);
    if (!b->armed) {
      b->next = 0;
      b->early = 0;
      b->works.clear();
      b->error.clear();
    }
    b->armed = false;
    b->launch_ready(true);
    works.swap(b->works);
    *early = b->early;
    if (!b->error.empty()) {
      ferroclip::set_error(b->error);
      return 1;
    }
  }
  return guarded([&]() {
    for (auto& w : works) w->wait();
    return 0;
  }, 1);
}

void ferroclip_buckets_free(FcBuckets* b) {
  for (auto& p : b->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  delete b;
}

}  // extern "C"
