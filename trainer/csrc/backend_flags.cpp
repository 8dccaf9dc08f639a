// TF32 for matmuls and cuDNN convolutions, and cuDNN's benchmark mode: what OpenCLIP's main.py sets on
// a GPU (`torch.backends.cuda.matmul.allow_tf32 = True`, `torch.backends.cudnn.allow_tf32 = True`,
// `torch.backends.cudnn.benchmark = True`). Process-wide flags of ATen's global context; they change
// nothing on the CPU.
#include <ATen/Context.h>

extern "C" {

void ferroclip_enable_tf32_and_cudnn_benchmark() {
  auto& ctx = at::globalContext();
  ctx.setAllowTF32CuBLAS(true);
  ctx.setAllowTF32CuDNN(true);
  ctx.setBenchmarkCuDNN(true);
}

// The three flags as set now, for the start-up log and tests.
void ferroclip_backend_flags(bool* tf32_matmul, bool* tf32_cudnn, bool* cudnn_benchmark) {
  auto& ctx = at::globalContext();
  *tf32_matmul = ctx.allowTF32CuBLAS();
  *tf32_cudnn = ctx.allowTF32CuDNN();
  *cudnn_benchmark = ctx.benchmarkCuDNN();
}

}  // extern "C"
