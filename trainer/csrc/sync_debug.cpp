// CUDA's sync debug mode (`torch.cuda.set_sync_debug_mode`): with "warn" every call that makes the host
// wait for the GPU (a stream synchronize, a blocking copy, `.item()`) warns, with "error" it throws.
// Used to prove that the steady-state training step never synchronizes (FERROCLIP_SYNC_DEBUG).
//
// `c10::cuda::warning_state()` is an inline function whose static lives in libc10_cuda as a unique
// symbol; a copy compiled into this binary could be a second instance that libtorch never reads, so
// the instance is looked up the way the dynamic linker resolves libtorch's own references.
#include <dlfcn.h>

#ifdef USE_CUDA
#include <c10/cuda/CUDAFunctions.h>

static c10::cuda::WarningState* process_warning_state() {
  static auto* state = static_cast<c10::cuda::WarningState*>(
      dlsym(RTLD_DEFAULT, "_ZZN3c104cuda13warning_stateEvE14warning_state_"));
  return state;
}
#endif

extern "C" {

// level: 0 off, 1 warn, 2 error. Returns 0, or -1 when this libtorch has no CUDA.
int ferroclip_set_sync_debug_mode(int level) {
#ifdef USE_CUDA
  auto* state = process_warning_state();
  if (state == nullptr) return -1;
  state->set_sync_debug_mode(static_cast<c10::cuda::SyncDebugMode>(level));
  return 0;
#else
  (void)level;
  return -1;
#endif
}

// The current level, or -1 without CUDA.
int ferroclip_sync_debug_mode() {
#ifdef USE_CUDA
  auto* state = process_warning_state();
  return state == nullptr ? -1 : static_cast<int>(state->get_sync_debug_mode());
#else
  return -1;
#endif
}

}  // extern "C"
