//! Activation checkpointing (OpenCLIP's `--grad-checkpointing`, timm's `checkpoint_seq`, PyTorch's
//! `torch.utils.checkpoint` in its reentrant form): a segment of the model — one ConvNeXt block, one
//! transformer block — keeps only its input for backward instead of every activation inside it, and
//! the backward runs it again. The C++ shim (`csrc/activation_checkpoint.cpp`) holds the autograd
//! node; it replays the forward's RNG state (CPU and CUDA) and autocast state in the recomputation,
//! so stochastic-depth masks and dtypes are those of the forward and the gradients are the same as
//! without checkpointing. Costs one more forward of each segment per step.

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

type RawTensor = *mut torch_sys::C_tensor;
/// The segment, boxed twice: the C++ side holds a thin pointer.
type Segment<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;

extern "C" {
    fn ferroclip_last_error() -> *const c_char;
    fn ferroclip_checkpoint(
        x: *const torch_sys::C_tensor,
        ctx: *mut c_void,
        run: extern "C" fn(*mut c_void, *const torch_sys::C_tensor) -> RawTensor,
        drop: extern "C" fn(*mut c_void),
    ) -> RawTensor;
}

/// `segment(x)`, checkpointed when autograd records (grad mode on); otherwise just `segment(x)`.
///
/// The graph that results holds `segment` until backward or until the graph is dropped, after the
/// caller has returned. So `segment` must be a `move` closure that borrows nothing but the model
/// (`move |x| block.forward(x, train)`, never a reference to a local), and the model must outlive
/// the graph, as it does in the training step, which runs backward before the step ends while the
/// model lives for the whole run.
pub(crate) fn checkpoint<'a>(x: &Tensor, segment: impl Fn(&Tensor) -> Tensor + 'a) -> Tensor {
    let boxed: Box<Segment<'a>> = Box::new(Box::new(segment));
    // SAFETY: only the lifetime is erased; see the contract above.
    let boxed: Box<Segment<'static>> = unsafe { std::mem::transmute(boxed) };
    let ctx = Box::into_raw(boxed) as *mut c_void;
    // SAFETY: `x` is a live tensor; the shim takes ownership of `ctx` (it calls `drop_segment`).
    let y = unsafe { ferroclip_checkpoint(x.as_ptr(), ctx, run_segment, drop_segment) };
    if y.is_null() {
        // SAFETY: the shim keeps a NUL-terminated thread-local message until the next failing call.
        let msg = unsafe { CStr::from_ptr(ferroclip_last_error()) }.to_string_lossy().into_owned();
        panic!("activation checkpointing: {msg}");
    }
    // SAFETY: a new heap tensor whose ownership passes to us.
    unsafe { Tensor::from_ptr(y) }
}

extern "C" fn run_segment(ctx: *mut c_void, x: *const torch_sys::C_tensor) -> RawTensor {
    // SAFETY: `ctx` is the `Box<Segment>` made by `checkpoint`, alive until `drop_segment`.
    let segment = unsafe { &*(ctx as *const Segment<'static>) };
    // SAFETY: `x` is live for the call; the clone shares its storage and autograd identity.
    let x = unsafe { Tensor::clone_from_ptr(x as RawTensor) };
    // A panic must not unwind into C++: report it as a failure (the panic hook has printed it).
    match catch_unwind(AssertUnwindSafe(|| segment(&x))) {
        Ok(mut y) => {
            let p = y.as_mut_ptr();
            std::mem::forget(y); // the shim owns (and deletes) the heap tensor now
            p
        }
        Err(_) => std::ptr::null_mut(),
    }
}

extern "C" fn drop_segment(ctx: *mut c_void) {
    // SAFETY: the shim calls this exactly once per `checkpoint`, with the pointer it was given.
    drop(unsafe { Box::from_raw(ctx as *mut Segment<'static>) });
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    // The model-level checks (same gradients with stochastic depth, lower peak memory) are in
    // tests/grad_checkpointing.rs: they need torch's global RNG to themselves.

    #[test]
    fn without_grad_mode_the_segment_just_runs() {
        let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let y = tch::no_grad(|| checkpoint(&x, |x| x * 3.0));
        assert!(!y.requires_grad());
        assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![3.0, 6.0]);
        let z = checkpoint(&x, |x| x * x);
        z.sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(&x.grad()).unwrap(), vec![2.0, 4.0]);
    }
}
