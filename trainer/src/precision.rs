//! Mixed precision: bf16 autocast on CUDA (OpenCLIP's `amp_bf16`); master weights and the loss stay fp32.

extern "C" {
    fn ferroclip_autocast_enter_bf16();
    fn ferroclip_autocast_exit();
}

/// bf16 autocast for CUDA while alive (when enabled).
pub struct AutocastGuard {
    enabled: bool,
}

impl AutocastGuard {
    pub fn new(enabled: bool) -> Self {
        if enabled {
            // SAFETY: plain calls into libtorch's thread-local autocast state.
            unsafe { ferroclip_autocast_enter_bf16() };
        }
        Self { enabled }
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        if self.enabled {
            // SAFETY: paired with the enter call in `new`.
            unsafe { ferroclip_autocast_exit() };
        }
    }
}
