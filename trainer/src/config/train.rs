//! `[train]`: the step loop's length, precision, accumulation, clipping, freezing and device.

pub use crate::device::DeviceConfig;
pub use crate::precision::Precision;
use ferroclip_data::section::Range;

use crate::lock::LockSpec;

ferroclip_data::config_section! {
    /// `[train]`
    pub struct TrainConfig {
        /// Optimizer steps of the run. Unset: `epochs` decides, or 1000 steps when neither is set.
        /// Not together with `epochs`.
        pub max_steps: Option<u64> = None => Range::at_least(1.0),
        /// The run's length in OpenCLIP's epochs (`--epochs`): `epochs` × OpenCLIP's optimizer steps
        /// per epoch, ceil(ceil(data.train_num_samples / (data.batch_size × ranks)) / data.workers) ×
        /// data.workers micro-batches divided by `accum_freq` (open_clip_train's `get_wds_dataset`
        /// and scheduler); needs `data.train_num_samples`. `trainer show-config --world N` prints it.
        pub epochs: Option<u64> = None => Range::at_least(1.0),
        /// `"fp32"` or `"amp_bf16"` (also spelled `"amp_bfloat16"`, as OpenCLIP allows; bf16 autocast on CUDA; fp32 on the CPU). Under autocast the logits matmul of the loss runs in bf16, as in OpenCLIP; the log-softmax and the loss reductions run in fp32 (autocast's fp32 list), and master weights and AdamW stay fp32.
        pub precision: Precision = Precision::Fp32,
        /// Micro-batches per optimizer step; the loss sees all their negatives (OpenCLIP `--accum-freq`).
        pub accum_freq: usize = 1 => Range::closed(1.0, 65536.0),
        /// Each rank computes only its rows of the logits (OpenCLIP `--local-loss`); same gradients,
        /// less memory.
        pub local_loss: bool = false,
        /// Clip gradients to this global L2 norm (OpenCLIP `--grad-clip-norm`); unset: no clipping.
        pub grad_clip_norm: Option<f64> = None => Range::positive(),
        /// Freeze the image tower (OpenCLIP `--lock-image`).
        pub lock_image: bool = false,
        /// With `lock_image`, leave the last N layer groups trainable.
        pub lock_image_unlocked_groups: usize = 0,
        /// Freeze the text tower (OpenCLIP `--lock-text`).
        pub lock_text: bool = false,
        /// With `lock_text`, leave the last N layers trainable.
        pub lock_text_unlocked_layers: usize = 0,
        /// With `lock_text`, freeze the LayerNorms of the unlocked layers too (OpenCLIP
        /// `--lock-text-freeze-layer-norm`; Hugging Face text towers only, as in OpenCLIP).
        pub lock_text_freeze_layer_norm: bool = false,
        /// Abort after this many consecutive steps with a non-finite loss or gradient (each is
        /// skipped on the device; checked at log and checkpoint steps).
        pub max_bad_steps: u64 = 20 => Range::at_least(1.0),
        /// `"auto"`, `"cpu"` or `"cuda"`. `auto` takes this rank's GPU, the CPU when the job has none,
        /// and is an error when the launcher allocated GPUs (`CUDA_VISIBLE_DEVICES`, `SLURM_GPUS*`,
        /// `SLURM_JOB_GPUS`, `SLURM_STEP_GPUS`) that libtorch does not see (usually a node driver
        /// older than the wheel's CUDA: run through `scripts/with-node-torch`). The GPU configs say
        /// `cuda`.
        pub device: DeviceConfig = DeviceConfig::Auto,
        /// libtorch intra-op threads per rank; 0 keeps libtorch's choice.
        pub threads: usize = 0 => Range::closed(0.0, 4096.0),
        /// Recompute each ConvNeXt block and transformer block in backward instead of keeping its
        /// activations (OpenCLIP `--grad-checkpointing`): far less activation memory for one more
        /// forward pass; same gradients. Not applied to the XLM-RoBERTa text tower.
        pub grad_checkpointing: bool = false,
    }
}

impl TrainConfig {
    /// What `lock_*` freezes.
    pub fn lock_spec(&self) -> LockSpec {
        LockSpec {
            lock_image: self.lock_image,
            image_unlocked_groups: self.lock_image_unlocked_groups,
            lock_text: self.lock_text,
            text_unlocked_layers: self.lock_text_unlocked_layers,
            text_freeze_layer_norm: self.lock_text_freeze_layer_norm,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        super::check_ranges("train", self)?;
        if self.max_steps.is_some() && self.epochs.is_some() {
            return Err("keys `train.max_steps` and `train.epochs`: set one of them, not both".into());
        }
        Ok(())
    }
}
