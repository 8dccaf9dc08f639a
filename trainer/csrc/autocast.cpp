// bf16 autocast for CUDA. tch's `autocast` only toggles libtorch autocast, whose CUDA dtype
// defaults to fp16; OpenCLIP's `amp_bf16` needs the dtype set to bfloat16 as well.
#include <ATen/autocast_mode.h>

extern "C" void ferroclip_autocast_enter_bf16() {
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::increment_nesting();
}

extern "C" void ferroclip_autocast_exit() {
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(at::kCUDA, false);
}
