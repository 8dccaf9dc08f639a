// Activation checkpointing for Rust (trainer/src/model/checkpointing.rs), the reentrant scheme of
// torch.utils.checkpoint: the forward runs a segment of the model (a Rust callback) without keeping
// its activations, only its input; the backward runs the segment again with grad, under the RNG
// state (CPU and CUDA) and autocast state the forward had, so that stochastic-depth masks and
// dtypes are the same, and backpropagates through the recomputed graph. The parameters inside the
// segment get their gradients from that inner backward (their accumulate-grad hooks fire there); the
// segment's input gets the returned gradient.
#include <memory>
#include <mutex>

#include <ATen/autocast_mode.h>
#include <ATen/core/Generator.h>
#include <ATen/Context.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "shim.h"

using ferroclip::guarded;

extern "C" {
// Runs the segment on `input` (borrowed); returns a new heap tensor, or null after a Rust panic.
typedef at::Tensor* (*FcSegmentRun)(void* ctx, const at::Tensor* input);
// Frees the callback's context.
typedef void (*FcSegmentDrop)(void* ctx);
}

namespace {

// Owns the Rust callback's context.
struct Segment {
  void* ctx;
  FcSegmentRun run_fn;
  FcSegmentDrop drop_fn;
  Segment(void* c, FcSegmentRun r, FcSegmentDrop d) : ctx(c), run_fn(r), drop_fn(d) {}
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  ~Segment() { drop_fn(ctx); }

  at::Tensor run(const at::Tensor& x) const {
    std::unique_ptr<at::Tensor> y(run_fn(ctx, &x));
    TORCH_CHECK(y, "the checkpointed segment failed (see the panic message above)");
    return *y;
  }
};

// What the forward ran under, to run the recomputation under the same.
struct Replay {
  at::Tensor cpu_rng;
  c10::optional<at::Tensor> cuda_rng;
  c10::DeviceIndex cuda_index = 0;
  bool autocast_cuda = false;
  at::ScalarType autocast_cuda_dtype = at::kBFloat16;
  bool autocast_cpu = false;
  at::ScalarType autocast_cpu_dtype = at::kBFloat16;

  static at::Generator cpu_gen() { return at::globalContext().defaultGenerator(c10::DeviceType::CPU); }
  static at::Generator cuda_gen(c10::DeviceIndex i) { return at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, i)); }

  static Replay capture(const at::Tensor& x) {
    Replay r;
    {
      auto g = cpu_gen();
      std::lock_guard<std::mutex> lock(g.mutex());
      r.cpu_rng = g.get_state();
    }
    if (x.is_cuda()) {
      r.cuda_index = x.device().index();
      auto g = cuda_gen(r.cuda_index);
      std::lock_guard<std::mutex> lock(g.mutex());
      r.cuda_rng = g.get_state();
    }
    r.autocast_cuda = at::autocast::is_autocast_enabled(at::kCUDA);
    r.autocast_cuda_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
    r.autocast_cpu = at::autocast::is_autocast_enabled(at::kCPU);
    r.autocast_cpu_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    return r;
  }

  // Installs this state and returns the one it replaced.
  Replay swap_in() const {
    Replay now;
    {
      auto g = cpu_gen();
      std::lock_guard<std::mutex> lock(g.mutex());
      now.cpu_rng = g.get_state();
      g.set_state(cpu_rng);
    }
    if (cuda_rng) {
      now.cuda_index = cuda_index;
      auto g = cuda_gen(cuda_index);
      std::lock_guard<std::mutex> lock(g.mutex());
      now.cuda_rng = g.get_state();
      g.set_state(*cuda_rng);
    }
    now.autocast_cuda = at::autocast::is_autocast_enabled(at::kCUDA);
    now.autocast_cuda_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
    now.autocast_cpu = at::autocast::is_autocast_enabled(at::kCPU);
    now.autocast_cpu_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    at::autocast::set_autocast_dtype(at::kCUDA, autocast_cuda_dtype);
    at::autocast::set_autocast_enabled(at::kCUDA, autocast_cuda);
    at::autocast::set_autocast_dtype(at::kCPU, autocast_cpu_dtype);
    at::autocast::set_autocast_enabled(at::kCPU, autocast_cpu);
    return now;
  }
};

struct CheckpointBackward : torch::autograd::Node {
  std::unique_ptr<Segment> segment;
  at::Tensor input;  // detached: the only activation kept
  bool input_requires_grad = false;
  Replay replay;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(segment, "a checkpointed segment was backpropagated twice (retain_graph is not supported)");
    at::Tensor x = input.detach();
    x.set_requires_grad(input_requires_grad);
    at::Tensor y;
    {
      Replay outer = replay.swap_in();
      try {
        at::AutoGradMode grad(true);
        at::autocast::increment_nesting();
        y = segment->run(x);
        if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
      } catch (...) {
        outer.swap_in();
        throw;
      }
      outer.swap_in();
    }
    if (!y.requires_grad() || !grads[0].defined()) return {at::Tensor()};  // nothing to backpropagate
    torch::autograd::backward({y}, {grads[0]});
    segment.reset();
    input.reset();
    return {input_requires_grad ? x.grad() : at::Tensor()};
  }

  void release_variables() override {
    segment.reset();
    input.reset();
  }
  std::string name() const override { return "ferroclip::CheckpointBackward"; }
};

}  // namespace

extern "C" {

// y = segment(x), keeping only x for backward (see the top of this file). With grad mode off, or when
// autograd would not reach the segment, it just runs the segment. Takes ownership of `ctx` (freed by
// `drop` when the graph is freed, or before returning on failure). Returns a new tensor, or null.
at::Tensor* ferroclip_checkpoint(const at::Tensor* x, void* ctx, FcSegmentRun run, FcSegmentDrop drop) {
  auto segment = std::make_unique<Segment>(ctx, run, drop);
  return guarded([&]() -> at::Tensor* {
    if (!at::GradMode::is_enabled()) return new at::Tensor(segment->run(*x));
    Replay replay = Replay::capture(*x);
    at::Tensor y;
    {
      at::NoGradGuard no_grad;
      y = segment->run(*x);
    }
    auto node = std::shared_ptr<CheckpointBackward>(new CheckpointBackward(), torch::autograd::deleteNode);
    node->input = x->detach();
    node->input_requires_grad = x->requires_grad();
    node->replay = std::move(replay);
    node->set_next_edges(torch::autograd::collect_next_edges(*x));
    node->segment = std::move(segment);
    // A fresh tensor (the segment's output may alias its input, e.g. an identity) with the node as history.
    at::Tensor out = y.detach();
    torch::autograd::set_history(out, node);
    return new at::Tensor(out);
  }, static_cast<at::Tensor*>(nullptr));
}

}  // extern "C"
