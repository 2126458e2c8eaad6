/* int8_kernel.c as two torch operators, so that a call costs what torch's own kernels cost to call (from Python,
   from a compiled graph, no Python in between) and its time is named in a profile:

   mixtral_notebooks::int8_matmul(x, packed, scales): x [T, K] times int8 weights [N, K] -> [T, N] float32
   mixtral_notebooks::int8_experts(x, packed, scales, chosen): row i of x [count or 1, K] (or its one row) times
       expert chosen[i] of a stack [E, N, K], its weights read in place (not gathered) -> [count, N] float32

   x is float32 or bf16; the weights are held as int8_kernel.py's relayout(q), one bf16 scale a row. Bad input is
   refused here (a ValueError, an IndexError) before the kernel reads it. Each also has a Meta kernel: the shape
   of its result, which torch.compile traces with. int8_kernel.py builds this file with the kernel. */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

extern "C" {
int int8_matmul(const int8_t *q, const uint16_t *scale, const void *x, int x_bf16, float *y, int T, int N, int K);
int int8_experts(const int8_t *q, const uint16_t *scale, long q_stride, int experts, const int64_t *chosen, int count,
                 const void *x, int x_bf16, int x_rows, float *y, int N, int K);
}

namespace {

constexpr int64_t ROWS = 4, COLS = 16; /* the kernel's block, as int8_kernel.c defines it */

/* A dtype as torch names it in Python. */
std::string dtype(const at::Tensor &t) {
  switch (t.scalar_type()) {
  case at::kFloat: return "float32";
  case at::kBFloat16: return "bfloat16";
  case at::kChar: return "int8";
  default: return std::string(c10::toString(t.scalar_type()));
  }
}

/* x [rows, K] in float32 or bf16, contiguous, and weights [lead.., N, K] held as the kernel reads them. */
at::Tensor checked(const char *name, const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales,
                   int64_t lead) {
  TORCH_CHECK_VALUE(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), name,
                    ": inputs ", x.sizes(), " ", dtype(x), ": give [tokens, inputs] in float32 or bfloat16");
  int64_t k = x.size(1), n = scales.dim() ? scales.size(-1) : 0;
  bool held = packed.scalar_type() == at::kChar && scales.scalar_type() == at::kBFloat16 &&
              scales.dim() == lead + 1 && packed.numel() == scales.numel() * k && packed.is_contiguous() &&
              scales.is_contiguous() && n % ROWS == 0 && k % COLS == 0;
  TORCH_CHECK_VALUE(held, name, ": weights ", packed.sizes(), " ", dtype(packed), " with ", scales.sizes(), " ",
                    dtype(scales), " scales do not match inputs ", x.sizes(),
                    ": hold them as relayout(q) (int8, contiguous) with one bf16 scale a row");
  return x.contiguous();
}

void failed(const char *name, int status) {
  TORCH_CHECK_WITH(OutOfMemoryError, status != -1, name, ": no memory for the int16 activations");
  TORCH_CHECK_INDEX(status == 0, name, ": an expert index is out of range");
}

at::Tensor matmul(const at::Tensor &x_, const at::Tensor &packed, const at::Tensor &scales) {
  at::Tensor x = checked("int8_matmul", x_, packed, scales, 0);
  int64_t t = x.size(0), n = scales.size(0), k = x.size(1);
  at::Tensor y = at::empty({t, n}, x.options().dtype(at::kFloat));
  if (t)
    failed("int8_matmul", int8_matmul(packed.const_data_ptr<int8_t>(), (const uint16_t *)scales.const_data_ptr(),
                                      x.const_data_ptr(), x.scalar_type() == at::kBFloat16, y.mutable_data_ptr<float>(),
                                      t, n, k));
  return y;
}

at::Tensor experts(const at::Tensor &x_, const at::Tensor &packed, const at::Tensor &scales,
                   const at::Tensor &chosen_) {
  at::Tensor x = checked("int8_experts", x_, packed, scales, 1);
  at::Tensor chosen = chosen_.to(at::kLong).contiguous();
  int64_t rows = x.size(0), count = chosen.numel(), e = scales.size(0), n = scales.size(1), k = x.size(1);
  TORCH_CHECK_VALUE(rows == 1 || rows == count, "int8_experts: ", rows, " rows of inputs for ", count,
                    " experts: give one row, or one for each expert");
  at::Tensor y = at::empty({count, n}, x.options().dtype(at::kFloat));
  if (count)
    failed("int8_experts", int8_experts(packed.const_data_ptr<int8_t>(), (const uint16_t *)scales.const_data_ptr(),
                                        n * k, e, chosen.const_data_ptr<int64_t>(), count, x.const_data_ptr(),
                                        x.scalar_type() == at::kBFloat16, rows, y.mutable_data_ptr<float>(), n, k));
  return y;
}

/* The shapes alone, for torch.compile's tracing. */
at::Tensor matmul_shape(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales) {
  return at::empty_symint({x.sym_size(0), scales.sym_size(-1)}, x.options().dtype(at::kFloat));
}

at::Tensor experts_shape(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales,
                         const at::Tensor &chosen) {
  return at::empty_symint({chosen.sym_numel(), scales.sym_size(-1)}, x.options().dtype(at::kFloat));
}

} // namespace

TORCH_LIBRARY(mixtral_notebooks, m) {
  m.def("int8_matmul(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("int8_experts(Tensor x, Tensor packed, Tensor scales, Tensor chosen) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_notebooks, CPU, m) {
  m.impl("int8_matmul", &matmul);
  m.impl("int8_experts", &experts);
}

TORCH_LIBRARY_IMPL(mixtral_notebooks, Meta, m) {
  m.impl("int8_matmul", &matmul_shape);
  m.impl("int8_experts", &experts_shape);
}
