/* quant_kernel.c as torch operators, so that a call costs what torch's own kernels cost to call (from Python, or
   from a compiled graph with no Python in between) and its time is named in a profile. For int8 and int4:

   mixtral_notebooks::int8_matmul(x, packed, scales): x [T, K] times one matrix [N, K] -> [T, N] float32
   mixtral_notebooks::int8_experts(x, packed, scales, chosen): row i of x [count or 1, K] (or its one row) times
       expert chosen[i] of a stack [E, N, K], its weights read in place (not gathered) -> [count, N] float32
   and int4_matmul, int4_experts alike. For dense weights as the model holds them (float32 or bf16 [N, K], read in
   place, row by row):

   mixtral_notebooks::dense_matmul(x, weight): x [T, K] times weight [N, K] -> [T, N] in x's dtype
   mixtral_notebooks::dense_experts(x, weights, chosen): as int8_experts, of a stack [E, N, K] -> x's dtype

   x is float32 or bf16; the weights are held as quant_kernel.py's relayout8 / relayout4 made them: packed
   [.., N/4, K/16, 4, 16] int8 with bf16 scales [.., N], or packed [.., N/4, K/32, 4, 16] uint8 with bf16 scales
   and zeros [.., N/4, K/32, 2, 4]. Bad input is refused here (a ValueError, an IndexError) before the kernel reads
   it. Each operator also has a Meta kernel: the shape of its result, which torch.compile traces with. */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <climits>
#include <torch/library.h>

extern "C" {
int quant_matmul(int bits, const void *q, const uint16_t *scale, const void *x, int x_bf16, float *y, int T, int N,
                 int K);
int quant_experts(int bits, const void *q, const uint16_t *scale, int experts, const int64_t *chosen, int count,
                  const void *x, int x_bf16, int x_rows, float *y, int N, int K);
int dense_matmul(const void *w, int w_bf16, const void *x, int x_bf16, void *y, int y_bf16, int T, int N, int K);
int dense_experts(const void *w, int w_bf16, int experts, const int64_t *chosen, int count, const void *x, int x_bf16,
                  int x_rows, void *y, int y_bf16, int N, int K);
}

namespace {

/* A dtype as torch names it in Python. */
std::string dtype(const at::Tensor &t) {
  switch (t.scalar_type()) {
  case at::kFloat: return "float32";
  case at::kBFloat16: return "bfloat16";
  case at::kChar: return "int8";
  case at::kByte: return "uint8";
  case at::kLong: return "int64";
  case at::kHalf: return "float16";
  case at::kDouble: return "float64";
  case at::kInt: return "int32";
  case at::kBool: return "bool";
  default: return std::string(c10::toString(t.scalar_type()));
  }
}

/* The weights' N and K, after checking that x [rows, K] is float32 or bf16 and the weights ([E, ..] where `stack`)
   are held as the kernel of `bits` reads them. */
std::pair<int64_t, int64_t> checked(const char *name, int bits, const at::Tensor &x, const at::Tensor &packed,
                                    const at::Tensor &scales, bool stack) {
  TORCH_CHECK_VALUE(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), name,
                    ": inputs ", x.sizes(), " ", dtype(x), ": give [tokens, inputs] in float32 or bfloat16");
  int64_t lead = stack, n = 0, k = 0;
  bool held = packed.dim() == lead + 4 && packed.is_contiguous() && scales.is_contiguous() &&
              scales.scalar_type() == at::kBFloat16 && packed.size(-2) == 4 && packed.size(-1) == 16;
  if (held) {
    n = 4 * packed.size(-4), k = (bits == 8 ? 16 : 32) * packed.size(-3);
    auto expected = packed.sizes().slice(0, lead).vec();
    if (bits == 8)
      expected.push_back(n);
    else
      expected.insert(expected.end(), {n / 4, k / 32, 2, 4});
    held = packed.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && scales.sizes().vec() == expected &&
           x.size(1) == k;
  }
  TORCH_CHECK_VALUE(held, name, ": weights ", packed.sizes(), " ", dtype(packed), " with ", scales.sizes(), " ",
                    dtype(scales), " scales do not match inputs ", x.sizes(), ": hold them as relayout", bits,
                    "(...) made them (quant_kernel.py)");
  return {n, k};
}

void failed(const char *name, int status) {
  TORCH_CHECK_WITH(OutOfMemoryError, status != -1, name, ": no memory for the inputs as the kernel reads them");
  TORCH_CHECK_INDEX(status == 0, name, ": an expert index is out of range");
}

/* The chosen experts as int64, refusing indices that are not integers (a float or bool would be cast silently). */
at::Tensor indices(const char *name, const at::Tensor &chosen) {
  TORCH_CHECK_VALUE(at::isIntegralType(chosen.scalar_type(), /*includeBool=*/false) && chosen.numel() <= INT_MAX,
                    name, ": chosen experts ", chosen.sizes(), " ", dtype(chosen), ": give integer indices");
  return chosen.to(at::kLong).contiguous();
}

template <int bits> at::Tensor matmul(const at::Tensor &x_, const at::Tensor &packed, const at::Tensor &scales) {
  const char *name = bits == 8 ? "int8_matmul" : "int4_matmul";
  auto [n, k] = checked(name, bits, x_, packed, scales, false);
  at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
  if (x.size(0))
    failed(name, quant_matmul(bits, packed.const_data_ptr(), (const uint16_t *)scales.const_data_ptr(),
                              x.const_data_ptr(), x.scalar_type() == at::kBFloat16, y.mutable_data_ptr<float>(),
                              x.size(0), n, k));
  return y;
}

template <int bits>
at::Tensor experts(const at::Tensor &x_, const at::Tensor &packed, const at::Tensor &scales,
                   const at::Tensor &chosen_) {
  const char *name = bits == 8 ? "int8_experts" : "int4_experts";
  auto [n, k] = checked(name, bits, x_, packed, scales, true);
  at::Tensor x = x_.contiguous(), chosen = indices(name, chosen_);
  int64_t rows = x.size(0), count = chosen.numel();
  TORCH_CHECK_VALUE(rows == 1 || rows == count, name, ": ", rows, " rows of inputs for ", count,
                    " experts: give one row, or one for each expert");
  at::Tensor y = at::empty({count, n}, x.options().dtype(at::kFloat));
  if (count)
    failed(name, quant_experts(bits, packed.const_data_ptr(), (const uint16_t *)scales.const_data_ptr(),
                               packed.size(0), chosen.const_data_ptr<int64_t>(), count, x.const_data_ptr(),
                               x.scalar_type() == at::kBFloat16, rows, y.mutable_data_ptr<float>(), n, k));
  return y;
}

bool floats(const at::Tensor &t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

/* Dense weights [N, K] ([E, N, K] where `stack`), float32 or bf16, held as the model holds them: their N and K,
   after checking them and x [rows, K]. */
std::pair<int64_t, int64_t> checked_dense(const char *name, const at::Tensor &x, const at::Tensor &weight,
                                          bool stack) {
  TORCH_CHECK_VALUE(x.dim() == 2 && floats(x), name, ": inputs ", x.sizes(), " ", dtype(x),
                    ": give [tokens, inputs] in float32 or bfloat16");
  TORCH_CHECK_VALUE(weight.dim() == 2 + stack && floats(weight) && weight.is_contiguous() &&
                        weight.size(-1) == x.size(1),
                    name, ": weights ", weight.sizes(), " ", dtype(weight), " do not match inputs ", x.sizes(),
                    ": give ", stack ? "[experts, outputs, inputs]" : "[outputs, inputs]",
                    " float32 or bfloat16 weights, contiguous (row by row), with as many inputs as x");
  for (int64_t size : {x.size(0), weight.size(0), weight.size(-2), weight.size(-1)})
    TORCH_CHECK_VALUE(size <= INT_MAX, name, ": weights ", weight.sizes(), " and inputs ", x.sizes(),
                      " are past the kernel's sizes (int)");
  return {weight.size(-2), weight.size(-1)};
}

/* x [T, K] times weight [N, K] -> [T, N] in x's dtype, the sums in float32. */
at::Tensor dense_matmul_op(const at::Tensor &x_, const at::Tensor &weight) {
  auto [n, k] = checked_dense("dense_matmul", x_, weight, false);
  at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  bool x_bf16 = x.scalar_type() == at::kBFloat16;
  if (x.size(0) && n)
    failed("dense_matmul", dense_matmul(weight.const_data_ptr(), weight.scalar_type() == at::kBFloat16,
                                        x.const_data_ptr(), x_bf16, y.mutable_data_ptr(), x_bf16, x.size(0), n, k));
  return y;
}

/* Row i of x [count or 1, K] (or its one row) times expert chosen[i] of weights [E, N, K], read in place ->
   [count, N] in x's dtype. */
at::Tensor dense_experts_op(const at::Tensor &x_, const at::Tensor &weights, const at::Tensor &chosen_) {
  auto [n, k] = checked_dense("dense_experts", x_, weights, true);
  at::Tensor x = x_.contiguous(), chosen = indices("dense_experts", chosen_);
  int64_t rows = x.size(0), count = chosen.numel();
  TORCH_CHECK_VALUE(rows == 1 || rows == count, "dense_experts: ", rows, " rows of inputs for ", count,
                    " experts: give one row, or one for each expert");
  at::Tensor y = at::empty({count, n}, x.options());
  bool x_bf16 = x.scalar_type() == at::kBFloat16;
  if (count && n)
    failed("dense_experts", dense_experts(weights.const_data_ptr(), weights.scalar_type() == at::kBFloat16,
                                          weights.size(0), chosen.const_data_ptr<int64_t>(), count,
                                          x.const_data_ptr(), x_bf16, rows, y.mutable_data_ptr(), x_bf16, n, k));
  return y;
}

/* The shapes alone, for torch.compile's tracing. */
at::Tensor matmul_shape(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &) {
  return at::empty_symint({x.sym_size(0), packed.sym_size(-4) * 4}, x.options().dtype(at::kFloat));
}

at::Tensor experts_shape(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &, const at::Tensor &chosen) {
  return at::empty_symint({chosen.sym_numel(), packed.sym_size(-4) * 4}, x.options().dtype(at::kFloat));
}

at::Tensor dense_matmul_shape(const at::Tensor &x, const at::Tensor &weight) {
  return at::empty_symint({x.sym_size(0), weight.sym_size(-2)}, x.options());
}

at::Tensor dense_experts_shape(const at::Tensor &x, const at::Tensor &weights, const at::Tensor &chosen) {
  return at::empty_symint({chosen.sym_numel(), weights.sym_size(-2)}, x.options());
}

} // namespace

TORCH_LIBRARY(mixtral_notebooks, m) {
  m.def("int8_matmul(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("int8_experts(Tensor x, Tensor packed, Tensor scales, Tensor chosen) -> Tensor");
  m.def("int4_matmul(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("int4_experts(Tensor x, Tensor packed, Tensor scales, Tensor chosen) -> Tensor");
  m.def("dense_matmul(Tensor x, Tensor weight) -> Tensor");
  m.def("dense_experts(Tensor x, Tensor weights, Tensor chosen) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_notebooks, CPU, m) {
  m.impl("int8_matmul", &matmul<8>);
  m.impl("int8_experts", &experts<8>);
  m.impl("int4_matmul", &matmul<4>);
  m.impl("int4_experts", &experts<4>);
  m.impl("dense_matmul", &dense_matmul_op);
  m.impl("dense_experts", &dense_experts_op);
}

TORCH_LIBRARY_IMPL(mixtral_notebooks, Meta, m) {
  m.impl("int8_matmul", &matmul_shape);
  m.impl("int8_experts", &experts_shape);
  m.impl("int4_matmul", &matmul_shape);
  m.impl("int4_experts", &experts_shape);
  m.impl("dense_matmul", &dense_matmul_shape);
  m.impl("dense_experts", &dense_experts_shape);
}
