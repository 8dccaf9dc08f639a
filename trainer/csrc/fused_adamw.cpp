// torch's fused AdamW kernel (`torch.optim.AdamW(fused=True)`: `at::_fused_adamw_`), which tch does not
// bind: one pass over parameters, gradients and both moments instead of about ten full-buffer kernels.
// `found_inf` (fp32, 1.0 = skip) makes the kernel leave everything unchanged on the device, so a
// non-finite step is skipped without the host reading a flag. The step count is the caller's tensor
// (torch's `state_steps`): it is read by the kernel, never incremented by it.
#include <ATen/ATen.h>

#include "shim.h"

using ferroclip::guarded;

extern "C" int ferroclip_fused_adamw(at::Tensor* param, at::Tensor* grad, at::Tensor* exp_avg, at::Tensor* exp_avg_sq,
                                     at::Tensor* step, double lr, double beta1, double beta2, double weight_decay,
                                     double eps, at::Tensor* found_inf) {
  return guarded(
      [&]() -> int {
        at::_fused_adamw_({*param}, {*grad}, {*exp_avg}, {*exp_avg_sq}, {}, {*step}, lr, beta1, beta2, weight_decay,
                          eps, /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt, *found_inf);
        return 0;
      },
      1);
}
