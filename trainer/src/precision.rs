//! Mixed precision: bf16 autocast on CUDA (OpenCLIP's `amp_bf16`); master weights stay fp32, the
//! loss's logits matmul runs in bf16 as in OpenCLIP, its log-softmax and reductions in fp32.

use tch::Device;

/// `train.precision`
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in fp32.
    Fp32,
    /// bf16 autocast on CUDA (OpenCLIP's `amp_bf16`: the loss's logits matmul in bf16, its
    /// log-softmax and reductions in fp32); fp32 on the CPU. `amp_bfloat16`, OpenCLIP's other
    /// spelling of the same choice, reads as this.
    #[serde(alias = "amp_bfloat16")]
    AmpBf16,
}

impl Precision {
    /// Mixed precision for a forward pass on `device` while the guard lives; a no-op for fp32 and
    /// on the CPU.
    pub fn autocast(self, device: Device) -> AutocastGuard {
        AutocastGuard::new(self == Precision::AmpBf16 && device != Device::Cpu)
    }
}

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
