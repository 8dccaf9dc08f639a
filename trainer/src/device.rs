//! Choosing the compute device for this rank.

use tch::Device;

/// The CUDA device for `local_rank` when CUDA is usable, else the CPU.
pub fn select(local_rank: usize, force_cpu: bool) -> Device {
    if !force_cpu && tch::Cuda::is_available() {
        let n = tch::Cuda::device_count() as usize;
        Device::Cuda(local_rank % n.max(1))
    } else {
        Device::Cpu
    }
}
