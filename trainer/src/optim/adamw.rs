//! AdamW with the semantics of `torch.optim.AdamW` (decoupled weight decay `p -= lr*wd*p`, bias
//! corrections, eps added outside `sqrt(v_hat)`), over a few large FLAT buffers.
//!
//! At construction the parameters of each group (decay / no-decay, OpenCLIP v3.3.0's rule from
//! `open_clip_train/main.py`, see [`weight_decay_applies`]) are laid out contiguously in one fp32
//! tensor and every parameter becomes a view into it (`set_data`); their gradients become views into
//! a second flat buffer the same way, so autograd accumulates straight into it. A step is then a
//! handful of big tensor ops per group instead of a loop over hundreds of parameters (tch 0.24 has no
//! `_foreach` kernels), and the gradient all-reduce works on slices of the same flat buffers
//! (`dist::grad_buckets`). Parameters are laid out in the order given, which the trainer makes the
//! order backward completes their gradients, so that buckets fill one after the other.
//!
//! Moments are saved and restored by parameter name ([`AdamW::state`] / [`AdamW::restore`]), bitwise.
//!
//! No host synchronization: the step count is a device tensor (torch's `state_steps`), the learning
//! rate a kernel argument, and a step with a non-finite loss or gradient ([`AdamW::non_finite`]) is
//! skipped on the device ([`AdamW::step_unless`]): parameters, moments and the step count stay as
//! they were, and the host never reads the flag. On CUDA the update is torch's fused kernel
//! (`at::_fused_adamw_` through `csrc/fused_adamw.cpp`, which takes the flag as `found_inf`); on the
//! CPU the chunked update below, masked by the same flag.

use tch::{Device, Kind, Tensor};

extern "C" {
    fn ferroclip_fused_adamw(
        param: *mut torch_sys::C_tensor,
        grad: *mut torch_sys::C_tensor,
        exp_avg: *mut torch_sys::C_tensor,
        exp_avg_sq: *mut torch_sys::C_tensor,
        step: *mut torch_sys::C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: *mut torch_sys::C_tensor,
    ) -> std::ffi::c_int;
    fn ferroclip_last_error() -> *const std::ffi::c_char;
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("parameter {name}: expected an fp32 tensor, found {kind:?}")]
    NotFloat { name: String, kind: Kind },
    #[error("parameter {name} is on {found:?}, the others on {expected:?}")]
    MixedDevices { name: String, expected: Device, found: Device },
    #[error("optimizer state: missing {0}")]
    MissingState(String),
    #[error("optimizer state: {key} has shape {found:?}, the parameter {expected:?}")]
    StateShape { key: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("optimizer state: {0} names no parameter of this optimizer")]
    UnknownState(String),
}

/// Elements per chunk of the CPU update (4 buffers × 1 MiB-element chunks ≈ 16 MB, about L2/L3 size).
const CPU_CHUNK: i64 = 1 << 20;

/// Hyper-parameters (OpenCLIP defaults for ViT models: betas (0.9, 0.98), eps 1e-6, wd 0.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Initial learning rate (the schedule sets it each step with [`AdamW::set_lr`]).
    pub lr: f64,
    /// Default (0.9, 0.98); OpenCLIP uses (0.9, 0.999) for non-ViT models.
    pub betas: (f64, f64),
    /// Default 1e-6; OpenCLIP uses 1e-8 for non-ViT models.
    pub eps: f64,
    /// Applied to the decay group only. Default 0.2.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 5e-4, betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 }
    }
}

/// OpenCLIP v3.3.0's rule (open_clip_train/main.py `exclude`): no weight decay for gains and biases,
/// i.e. where `ndim < 2` or the name contains `bn`, `ln`, `bias` or `logit_scale`. So
/// `positional_embedding`, `token_embedding` and `text_projection` ARE decayed.
pub fn weight_decay_applies(name: &str, ndim: usize) -> bool {
    !(ndim < 2 || name.contains("bn") || name.contains("ln") || name.contains("bias") || name.contains("logit_scale"))
}

/// One group's parameters in one flat buffer.
struct FlatGroup {
    weight_decay: f64,
    names: Vec<String>,
    /// The parameters themselves (views into `params`), for gradient hooks.
    vars: Vec<Tensor>,
    shapes: Vec<Vec<i64>>,
    offsets: Vec<i64>,
    params: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl FlatGroup {
    fn view(&self, flat: &Tensor, i: usize) -> Tensor {
        let numel: i64 = self.shapes[i].iter().product();
        flat.narrow(0, self.offsets[i], numel).view(self.shapes[i].as_slice())
    }
}

/// One flat gradient buffer and its parameters `(parameter, offset, numel)`, in buffer order.
pub type GradBuffer = (Tensor, Vec<(Tensor, i64, i64)>);

/// AdamW over flat buffers; see the module doc.
pub struct AdamW {
    groups: Vec<FlatGroup>,
    cfg: AdamWConfig,
    /// Steps taken, a 0-dim fp32 tensor on the parameters' device (exact up to 2^24 steps).
    step: Tensor,
    /// 0.0 on the device: the `found_inf` of an unconditional [`AdamW::step`].
    no_skip: Tensor,
    /// torch's fused kernel (the default on CUDA) instead of the chunked update.
    fused: bool,
}

impl AdamW {
    /// Takes over the trainable parameters `named` (name, parameter; what trains is decided by
    /// [`crate::lock::trainable_parameters`]): they are moved into flat buffers (their values
    /// unchanged) with zeroed flat gradients. All must be fp32 on one device.
    pub fn new(named: &[(String, Tensor)], cfg: AdamWConfig) -> Result<Self, OptimError> {
        let mut decay: Vec<(String, Tensor)> = Vec::new();
        let mut no_decay: Vec<(String, Tensor)> = Vec::new();
        let mut device: Option<Device> = None;
        for (name, p) in named {
            if p.kind() != Kind::Float {
                return Err(OptimError::NotFloat { name: name.clone(), kind: p.kind() });
            }
            match device {
                None => device = Some(p.device()),
                Some(d) if d != p.device() => {
                    return Err(OptimError::MixedDevices { name: name.clone(), expected: d, found: p.device() })
                }
                _ => {}
            }
            let entry = (name.clone(), p.shallow_clone());
            if weight_decay_applies(name, p.dim()) {
                decay.push(entry)
            } else {
                no_decay.push(entry)
            }
        }
        let device = device.unwrap_or(Device::Cpu);
        let mut groups = Vec::new();
        for (members, wd) in [(decay, cfg.weight_decay), (no_decay, 0.0)] {
            if !members.is_empty() {
                groups.push(Self::flatten_group(members, wd, device));
            }
        }
        let step = Tensor::zeros([], (Kind::Float, device));
        let no_skip = Tensor::zeros([], (Kind::Float, device));
        Ok(AdamW { groups, cfg, step, no_skip, fused: device.is_cuda() })
    }

    fn flatten_group(members: Vec<(String, Tensor)>, weight_decay: f64, device: Device) -> FlatGroup {
        let shapes: Vec<Vec<i64>> = members.iter().map(|(_, p)| p.size()).collect();
        let mut offsets = Vec::with_capacity(members.len());
        let mut total = 0i64;
        for s in &shapes {
            offsets.push(total);
            total += s.iter().product::<i64>();
        }
        let opts = (Kind::Float, device);
        let params = Tensor::zeros([total], opts);
        let grads = Tensor::zeros([total], opts);
        let names = members.iter().map(|(n, _)| n.clone()).collect();
        let group = FlatGroup {
            weight_decay,
            names,
            vars: members.iter().map(|(_, p)| p.shallow_clone()).collect(),
            shapes,
            offsets,
            params,
            grads,
            exp_avg: Tensor::zeros([total], opts),
            exp_avg_sq: Tensor::zeros([total], opts),
        };
        tch::no_grad(|| {
            for (i, (_, p)) in members.iter().enumerate() {
                let mut dst = group.view(&group.params, i);
                dst.copy_(&p.detach());
            }
        });
        // Materialize every gradient (a zero backward) so that it can be re-pointed at the flat
        // gradient buffer; afterwards autograd accumulates in place (AccumulateGrad's `grad += new`).
        tch::with_grad(|| {
            let zero: Tensor =
                members.iter().map(|(_, p)| p.sum(Kind::Float) * 0.0).fold(Tensor::zeros([], opts), |a, b| a + b);
            zero.backward();
        });
        for (i, (_, p)) in members.iter().enumerate() {
            let mut p = p.shallow_clone();
            p.set_data(&group.view(&group.params, i));
            let mut g = p.grad();
            g.set_data(&group.view(&group.grads, i));
        }
        group
    }

    /// One line per group for the start-up log: the decay rule and what it selected.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "AdamW ({}) lr={} betas=({}, {}) eps={}; no weight decay where ndim < 2 or the name contains bn/ln/bias/logit_scale (OpenCLIP v3.3.0)",
            if self.fused { "torch's fused kernel" } else { "chunked update" },
            self.cfg.lr,
            self.cfg.betas.0,
            self.cfg.betas.1,
            self.cfg.eps
        );
        for g in &self.groups {
            s.push_str(&format!(
                "\n  weight_decay={}: {} tensors, {} values",
                g.weight_decay,
                g.names.len(),
                g.params.size()[0]
            ));
        }
        s
    }

    /// Names of the parameters this optimizer updates, by group.
    pub fn param_names(&self) -> Vec<(f64, Vec<String>)> {
        self.groups.iter().map(|g| (g.weight_decay, g.names.clone())).collect()
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of steps taken (torch's `state['step']`). Reads a device value back: for checkpoints.
    pub fn step_count(&self) -> i64 {
        self.step.double_value(&[]) as i64
    }

    /// Whether the update runs torch's fused kernel (default: on CUDA).
    pub fn fused(&self) -> bool {
        self.fused
    }

    /// Chooses the fused kernel (it has a CPU implementation too) or the chunked update.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// The flat gradient buffers (one per group); every parameter's `.grad()` is a view into one.
    pub fn flat_grads(&self) -> Vec<Tensor> {
        self.groups.iter().map(|g| g.grads.shallow_clone()).collect()
    }

    /// Zeroes the gradients in place (they must stay views into the flat buffers).
    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            let _ = g.grads.zero_();
        }
    }

    /// Each flat gradient buffer with its parameters `(parameter, offset, numel)` in buffer order,
    /// for the bucketed all-reduce (`dist::grad_buckets`).
    pub fn grad_layout(&self) -> Vec<GradBuffer> {
        self.groups
            .iter()
            .map(|g| {
                let members = (0..g.names.len())
                    .map(|i| (g.vars[i].shallow_clone(), g.offsets[i], g.shapes[i].iter().product::<i64>()))
                    .collect();
                (g.grads.shallow_clone(), members)
            })
            .collect()
    }

    /// Global L2 norm of all gradients (0-dim fp32 tensor, no host sync), as
    /// `torch.nn.utils.clip_grad_norm_`.
    pub fn grad_norm(&self) -> Tensor {
        let norms: Vec<Tensor> = self.groups.iter().map(|g| g.grads.norm()).collect();
        if norms.is_empty() {
            return Tensor::zeros([], (Kind::Float, Device::Cpu));
        }
        Tensor::stack(&norms, 0).norm()
    }

    /// `clip_grad_norm_(max_norm)`: scales gradients by `min(1, max_norm / (norm + 1e-6))` and
    /// returns the norm before clipping, without a host sync.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let total = self.grad_norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for g in &mut self.groups {
            let _ = g.grads.g_mul_(&coef);
        }
        total
    }

    /// A 0-dim fp32 tensor on the device, 1.0 when `loss` or any gradient is not finite (else 0.0):
    /// the `found_inf` of [`AdamW::step_unless`]. One reduction per group (a sum: inf and NaN
    /// propagate through it); nothing is read back.
    pub fn non_finite(&self, loss: &Tensor) -> Tensor {
        let mut bad = loss.isfinite().logical_not();
        for g in &self.groups {
            bad = bad.logical_or(&g.grads.sum(Kind::Float).isfinite().logical_not());
        }
        bad.to_kind(Kind::Float)
    }

    /// One AdamW step with the current learning rate.
    pub fn step(&mut self) {
        let none = self.no_skip.shallow_clone();
        self.step_unless(&none);
    }

    /// One AdamW step, or none where `found_inf` (0-dim fp32 on the device, from
    /// [`AdamW::non_finite`]) is 1.0: then parameters, moments and the step count keep their values
    /// (and the gradients, which are zeroed before the next step anyway, are set to zero). Decided
    /// on the device, without a host sync.
    pub fn step_unless(&mut self, found_inf: &Tensor) {
        let (beta1, beta2) = self.cfg.betas;
        let (lr, eps) = (self.cfg.lr, self.cfg.eps);
        let keep = found_inf.neg() + 1.0; // [] fp32: 1 = apply
        tch::no_grad(|| {
            let _ = self.step.g_add_(&keep);
            if self.fused {
                self.fused_step(lr, found_inf);
                return;
            }
            // Bias corrections from the device step count, in f64 as torch's (host) float math.
            let step = self.step.to_kind(Kind::Double);
            let bias_correction1 = Tensor::pow_scalar(beta1, &step).neg() + 1.0;
            let bias_correction2_sqrt = (Tensor::pow_scalar(beta2, &step).neg() + 1.0).sqrt().to_kind(Kind::Float);
            // -lr / bc1 where applied, 0 where skipped (then exp_avg * 0 adds nothing).
            let neg_step_size =
                (bias_correction1.reciprocal() * (-lr) * keep.to_kind(Kind::Double)).to_kind(Kind::Float);
            // Exactly the scalars of an applied step when keep = 1, exactly identities when 0.
            let blend = |applied: f64, skipped: f64| &keep * applied + (keep.neg() + 1.0) * skipped;
            let avg_weight = blend(1.0 - beta1, 0.0);
            let sq_decay = blend(beta2, 1.0);
            let skip = found_inf.gt(0.5);
            for g in &mut self.groups {
                let decay = (g.weight_decay != 0.0).then(|| blend(1.0 - lr * g.weight_decay, 1.0));
                // On the CPU, run the whole update on one cache-sized chunk at a time: a dozen
                // passes over each chunk while it is in cache instead of a dozen trips through
                // memory for buffers of hundreds of MB. On a GPU one pass over the whole buffer
                // is fewest kernel launches.
                let n = g.params.numel() as i64;
                let chunk = if g.params.device() == Device::Cpu { CPU_CHUNK } else { n.max(1) };
                let mut start = 0;
                while start < n {
                    let len = chunk.min(n - start);
                    let mut params = g.params.narrow(0, start, len);
                    let mut exp_avg = g.exp_avg.narrow(0, start, len);
                    let mut exp_avg_sq = g.exp_avg_sq.narrow(0, start, len);
                    let mut grads = g.grads.narrow(0, start, len);
                    // A skipped step's gradients may hold inf/NaN, which would survive `* 0`.
                    let _ = grads.masked_fill_(&skip, 0.0);
                    if let Some(decay) = &decay {
                        let _ = params.g_mul_(decay);
                    }
                    let _ = exp_avg.lerp_tensor_(&grads, &avg_weight);
                    let _ = exp_avg_sq.g_mul_(&sq_decay);
                    let _ = exp_avg_sq.addcmul_(&grads, &(&grads * (1.0 - beta2)));
                    let denom = (exp_avg_sq.sqrt() / &bias_correction2_sqrt) + eps;
                    let _ = params.addcdiv_(&(&exp_avg * &neg_step_size), &denom);
                    start += len;
                }
            }
        });
    }

    /// torch's fused AdamW kernel per group (it reads the already incremented step count).
    fn fused_step(&self, lr: f64, found_inf: &Tensor) {
        let (beta1, beta2) = self.cfg.betas;
        let raw = |t: &Tensor| t.as_ptr() as *mut torch_sys::C_tensor;
        for g in &self.groups {
            // SAFETY: all tensors are live, fp32, on one device, of equal length (and 0-dim for the
            // step and found_inf), as the kernel requires.
            let rc = unsafe {
                ferroclip_fused_adamw(
                    raw(&g.params),
                    raw(&g.grads),
                    raw(&g.exp_avg),
                    raw(&g.exp_avg_sq),
                    raw(&self.step),
                    lr,
                    beta1,
                    beta2,
                    g.weight_decay,
                    self.cfg.eps,
                    raw(found_inf),
                )
            };
            if rc != 0 {
                // SAFETY: a NUL-terminated thread-local message from the shim.
                let msg = unsafe { std::ffi::CStr::from_ptr(ferroclip_last_error()) }.to_string_lossy().into_owned();
                panic!("the fused AdamW kernel failed: {msg}");
            }
        }
    }

    /// Moments keyed `exp_avg.{name}` and `exp_avg_sq.{name}`. The tensors are views of the live
    /// state: write them out (or copy them) before the next step.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for g in &self.groups {
            for (i, name) in g.names.iter().enumerate() {
                out.push((format!("exp_avg.{name}"), g.view(&g.exp_avg, i)));
                out.push((format!("exp_avg_sq.{name}"), g.view(&g.exp_avg_sq, i)));
            }
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] and the step count. Entries whose key does not
    /// start with `exp_avg.`/`exp_avg_sq.` are ignored; a missing moment or one naming an unknown
    /// parameter is an error.
    pub fn restore(&mut self, named: &[(String, Tensor)], step: i64) -> Result<(), OptimError> {
        let mut seen = std::collections::HashSet::new();
        for (key, t) in named {
            let (is_sq, pname) = if let Some(n) = key.strip_prefix("exp_avg_sq.") {
                (true, n)
            } else if let Some(n) = key.strip_prefix("exp_avg.") {
                (false, n)
            } else {
                continue;
            };
            let found = self
                .groups
                .iter()
                .enumerate()
                .find_map(|(gi, g)| g.names.iter().position(|n| n == pname).map(|i| (gi, i)));
            let Some((gi, i)) = found else {
                return Err(OptimError::UnknownState(key.clone()));
            };
            let g = &self.groups[gi];
            if t.size() != g.shapes[i] {
                return Err(OptimError::StateShape {
                    key: key.clone(),
                    expected: g.shapes[i].clone(),
                    found: t.size(),
                });
            }
            let mut dst = g.view(if is_sq { &g.exp_avg_sq } else { &g.exp_avg }, i);
            tch::no_grad(|| dst.copy_(t));
            seen.insert(key.clone());
        }
        for g in &self.groups {
            for name in &g.names {
                for key in [format!("exp_avg.{name}"), format!("exp_avg_sq.{name}")] {
                    if !seen.contains(&key) {
                        return Err(OptimError::MissingState(key));
                    }
                }
            }
        }
        let _ = self.step.fill_(step as f64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn fixture() -> HashMap<String, Tensor> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/optim/adamw.safetensors");
        Tensor::read_safetensors(path).expect("run scripts/gen-optim-fixtures.py").into_iter().collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn params_from(fx: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = fx
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("init.").map(|n| (n.to_string(), v.copy().set_requires_grad(true))))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Sets the gradients the way backward would: accumulate into the (flat) grad views.
    fn load_grads(named: &[(String, Tensor)], fx: &HashMap<String, Tensor>, step: usize) {
        for (n, p) in named {
            let mut g = p.grad();
            g.copy_(&fx[&format!("grad.{step}.{n}")]);
        }
    }

    #[test]
    fn weight_decay_rule_is_openclips() {
        assert!(weight_decay_applies("visual.conv1.weight", 4));
        assert!(weight_decay_applies("positional_embedding", 2));
        assert!(weight_decay_applies("token_embedding.weight", 2));
        assert!(weight_decay_applies("text_projection", 2));
        assert!(!weight_decay_applies("visual.trunk.stages.0.blocks.0.norm.weight", 1));
        assert!(!weight_decay_applies("transformer.resblocks.0.ln_1.weight", 1));
        assert!(!weight_decay_applies("visual.bn1.weight", 2));
        assert!(!weight_decay_applies("visual.head.proj.bias", 1));
        assert!(!weight_decay_applies("logit_scale", 0));
    }

    /// The optimizer, stepped through the fixture's steps with the chunked or the fused update,
    /// against `torch.optim.AdamW`.
    fn check_against_torch_fixture(fused: bool) {
        let fx = fixture();
        let named = params_from(&fx);
        let mut opt =
            AdamW::new(&named, AdamWConfig { lr: 0.0, betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 }).unwrap();
        opt.set_fused(fused);
        let lrs = &fx["lr"];
        for step in 0..lrs.size()[0] as usize {
            opt.zero_grad();
            load_grads(&named, &fx, step);
            opt.set_lr(lrs.double_value(&[step as i64]));
            opt.step();
        }
        assert_eq!(opt.step_count(), lrs.size()[0]);
        for (n, p) in &named {
            let d = max_diff(p, &fx[&format!("out.{n}")]);
            assert!(d < 1e-6, "{n} (fused: {fused}): parameter differs by {d}");
        }
        for (k, v) in opt.state() {
            let d = max_diff(&v, &fx[&k]);
            assert!(d < 1e-6, "{k} (fused: {fused}): differs by {d}");
        }
        assert!(opt.describe().contains("weight_decay=0.2"));
    }

    #[test]
    fn matches_torch_adamw_fixture() {
        check_against_torch_fixture(false);
    }

    /// torch 2.11's `_fused_adamw_` has a CPU kernel: the CUDA path's binding runs here too.
    #[test]
    fn fused_kernel_matches_torch_adamw_fixture() {
        check_against_torch_fixture(true);
    }

    /// A step whose gradients hold inf (or whose loss is NaN) is skipped on the device: parameters,
    /// both moments and the step count keep their values, and the next good step continues exactly
    /// as if the bad one had never been there. For the chunked and the fused update.
    #[test]
    fn a_non_finite_step_changes_nothing() {
        let fx = fixture();
        for fused in [false, true] {
            let run = |bad_at: Option<usize>| {
                let named = params_from(&fx);
                let mut opt = AdamW::new(&named, AdamWConfig::default()).unwrap();
                opt.set_fused(fused);
                let finite_loss = Tensor::from(1.5f32);
                let mut snapshots = Vec::new();
                for s in 0..3 {
                    if bad_at == Some(s) {
                        let before: Vec<Tensor> = named.iter().map(|(_, p)| p.detach().copy()).collect();
                        let moments: Vec<Tensor> = opt.state().into_iter().map(|(_, v)| v.copy()).collect();
                        let steps = opt.step_count();
                        opt.zero_grad();
                        load_grads(&named, &fx, s);
                        let g = named[0].1.grad();
                        let _ = g.view([-1]).get(0).fill_(f64::INFINITY);
                        let found = opt.non_finite(&finite_loss);
                        assert_eq!(found.double_value(&[]), 1.0);
                        assert_eq!(opt.non_finite(&Tensor::from(f32::NAN)).double_value(&[]), 1.0);
                        opt.step_unless(&found);
                        for ((n, p), b) in named.iter().zip(&before) {
                            assert!(p.equal(b), "{n} changed by a skipped step (fused: {fused})");
                        }
                        for ((k, v), b) in opt.state().iter().zip(&moments) {
                            assert!(v.equal(b), "{k} changed by a skipped step (fused: {fused})");
                        }
                        assert_eq!(opt.step_count(), steps, "the step count moved (fused: {fused})");
                    }
                    opt.zero_grad();
                    load_grads(&named, &fx, s);
                    let found = opt.non_finite(&finite_loss);
                    assert_eq!(found.double_value(&[]), 0.0);
                    opt.step_unless(&found);
                    snapshots.push(named.iter().map(|(_, p)| p.detach().copy()).collect::<Vec<_>>());
                }
                (snapshots, opt.step_count())
            };
            let (clean, n_clean) = run(None);
            let (with_bad, n_bad) = run(Some(1));
            assert_eq!((n_clean, n_bad), (3, 3));
            for (a, b) in clean.iter().flatten().zip(with_bad.iter().flatten()) {
                assert!(a.equal(b), "a skipped step changed what followed (fused: {fused})");
            }
        }
    }

    #[test]
    fn backward_accumulates_into_flat_grads() {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let named = vec![("w".to_string(), a.shallow_clone()), ("b.bias".to_string(), b.shallow_clone())];
        let mut opt = AdamW::new(&named, AdamWConfig::default()).unwrap();
        for _ in 0..2 {
            (a.sum(Kind::Float) * 2.0 + (&b * &b).sum(Kind::Float)).backward();
        }
        let flat: Vec<f64> = opt.flat_grads().iter().map(|g| g.sum(Kind::Double).double_value(&[])).collect();
        assert_eq!(flat, vec![2.0 * 2.0 * 6.0, 2.0 * 2.0 * 3.0]);
        opt.zero_grad();
        assert_eq!(a.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Parameters are views into the flat buffer: a step moves them.
        (a.sum(Kind::Float)).backward();
        opt.step();
        assert!(a.double_value(&[0, 0]) < 1.0);
    }

    #[test]
    fn clip_and_finite_check_use_the_global_norm() {
        let a = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let named = vec![("w".to_string(), a.shallow_clone()), ("bias".to_string(), b.shallow_clone())];
        let mut opt = AdamW::new(&named, AdamWConfig::default()).unwrap();
        a.grad().copy_(&Tensor::from_slice(&[3.0f32, 0.0, 0.0, 0.0]).view([2, 2]));
        b.grad().copy_(&Tensor::from_slice(&[4.0f32]));
        let norm = opt.clip_grad_norm(1.0).double_value(&[]);
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((opt.grad_norm().double_value(&[]) - 1.0).abs() < 1e-5);
        let loss = Tensor::from(0.5f32);
        assert_eq!(opt.non_finite(&loss).double_value(&[]), 0.0);
        b.grad().copy_(&Tensor::from_slice(&[f32::NAN]));
        assert_eq!(opt.non_finite(&loss).double_value(&[]), 1.0);
    }

    #[test]
    fn state_restores_bitwise_and_continues_identically() {
        let fx = fixture();
        let cfg = AdamWConfig::default();
        let run = |steps: std::ops::Range<usize>, opt: &mut AdamW, named: &[(String, Tensor)]| {
            for s in steps {
                opt.zero_grad();
                load_grads(named, &fx, s);
                opt.step();
            }
        };
        // Straight: 4 steps.
        let named_a = params_from(&fx);
        let mut a = AdamW::new(&named_a, cfg).unwrap();
        run(0..4, &mut a, &named_a);
        // 2 steps, save params + state, fresh optimizer restored, 2 more.
        let named_b = params_from(&fx);
        let mut b = AdamW::new(&named_b, cfg).unwrap();
        run(0..2, &mut b, &named_b);
        let saved: Vec<(String, Tensor)> = b.state().into_iter().map(|(k, v)| (k, v.copy())).collect();
        let saved_params: Vec<Tensor> = named_b.iter().map(|(_, p)| p.detach().copy()).collect();
        let named_c: Vec<(String, Tensor)> = named_b
            .iter()
            .zip(&saved_params)
            .map(|((n, _), p)| (n.clone(), p.copy().set_requires_grad(true)))
            .collect();
        let mut c = AdamW::new(&named_c, cfg).unwrap();
        c.restore(&saved, b.step_count()).unwrap();
        run(2..4, &mut c, &named_c);
        for ((n, pa), (_, pc)) in named_a.iter().zip(&named_c) {
            assert!(pa.equal(pc), "{n} not bitwise equal after resume");
        }
        // A missing moment is refused.
        let mut d = AdamW::new(&params_from(&fx), cfg).unwrap();
        assert!(matches!(d.restore(&saved[1..], 2), Err(OptimError::MissingState(_))));
    }
}
