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
   it. Each of these six operators also has a Meta kernel: the shape of its result, which torch.compile traces with.

   mixtral_notebooks::layer_step(h, length, visible, inv_freq, key, value, weights, plan, shape, constants): one token
       through one Mixtral decoder layer on a static cache, in one call: what decode.graph_layer computes, rounded to
       the model's dtype where its compiled graph rounds (decode.native_layer); its products by the kernels above, the
       rest in plain loops: a layer's norms, rotary angles, attention over the visible positions, router and top-k are
       a few thousand values for one token. It too refuses bad input before reading it, and has no Meta kernel
       (torch.compile never traces it); the cache is written before the experts' products, so an error there (out of
       memory) leaves this position written.
   mixtral_notebooks::layers_step(h, lengths, visible, inv_freq, keys, values, weights, plans, shape, constants): the
       same through every layer in turn, in one call (each layer's length, keys and values, its 6 codes in plans and
       its tensors in weights, one layer after another): a decode step's layers with no Python between them. */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <torch/library.h>
#include <vector>

extern "C" {
int quant_matmul(int bits, const void *q, const uint16_t *scale, const void *x, int x_bf16, float *y, int T, int N,
                 int K);
int quant_experts(int bits, const void *q, const uint16_t *scale, int experts, const int64_t *chosen, int count,
                  const void *x, int x_bf16, int x_rows, float *y, int N, int K);
int dense_matmul(const void *w, int w_bf16, const void *x, int x_bf16, void *y, int y_bf16, int T, int N, int K);
int dense_experts(const void *w, int w_bf16, int experts, const int64_t *chosen, int count, const void *x, int x_bf16,
                  int x_rows, void *y, int y_bf16, int N, int K);
int tokens_per_pass(void);
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

std::pair<int64_t, int64_t> held_as(const char *name, int bits, int64_t inputs, const at::Tensor &packed,
                                    const at::Tensor &scales, bool stack);

/* The weights' N and K, after checking that x [rows, K] is float32 or bf16 and the weights ([E, ..] where `stack`)
   are held as the kernel of `bits` reads them. */
std::pair<int64_t, int64_t> checked(const char *name, int bits, const at::Tensor &x, const at::Tensor &packed,
                                    const at::Tensor &scales, bool stack) {
  TORCH_CHECK_VALUE(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), name,
                    ": inputs ", x.sizes(), " ", dtype(x), ": give [tokens, inputs] in float32 or bfloat16");
  return held_as(name, bits, x.size(1), packed, scales, stack);
}

/* The N and K of weights held for the kernel of `bits` ([E, ..] where `stack`), after checking them against
   `inputs` (K). */
std::pair<int64_t, int64_t> held_as(const char *name, int bits, int64_t inputs, const at::Tensor &packed,
                                    const at::Tensor &scales, bool stack) {
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
           inputs == k;
  }
  TORCH_CHECK_VALUE(held, name, ": weights ", packed.sizes(), " ", dtype(packed), " with ", scales.sizes(), " ",
                    dtype(scales), " scales do not match ", inputs, " inputs: hold them as relayout", bits,
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

/* ---- layer_step: one token through one decoder layer (see the header) ---- */

inline float bf16_float(uint16_t bits) {
  uint32_t u = (uint32_t)bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_bf16(float value) { /* rounded to nearest even, as torch rounds */
  uint32_t u;
  std::memcpy(&u, &value, 4);
  return std::isnan(value) ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) { return bf16_float(v); }

/* The model's dtype, float32 or bf16: `round` is where the model rounds a value to it; get and set read and write
   a tensor's values in it, by its data pointer (looked up once, not per value). */
struct Model {
  bool bf16;
  float round(float v) const { return bf16 ? bf16_float(float_bf16(v)) : v; }
  float get(const void *data, int64_t i) const {
    return bf16 ? bf16_float(((const uint16_t *)data)[i]) : ((const float *)data)[i];
  }
  void set(void *data, int64_t i, float v) const {
    if (bf16)
      ((uint16_t *)data)[i] = float_bf16(v);
    else
      ((float *)data)[i] = v;
  }
};

/* e^x with no library call, so that a loop of them becomes vector instructions: 2^n e^r with n = x / ln 2 rounded
   and |r| <= ln 2 / 2 (ln 2 in two parts, so r is exact to a float's precision), e^r by its Taylor sum to r^7 (the
   first term left out, r^8 / 8!, under 6e-9); x is taken within [-87.3, 88.3], where 2^n is a normal float: below,
   it gives about 1e-38 (the C library's a smaller, subnormal value, down to about -103.9), above about 2.2e38 (the C
   library's more, or infinity). */
inline float exp_float(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float big = 12582912.0f;                // 1.5 * 2^23: adding it rounds to a whole number, to nearest
  float n = (x * 1.44269504088896341f + big) - big;
  float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720, p = p * r + 1.0f / 120, p = p * r + 1.0f / 24, p = p * r + 1.0f / 6;
  p = p * r + 0.5f, p = p * r + 1.0f, p = p * r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;       // 2^n
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

/* a . b over n values, in 16 running sums added at the end (the compiler keeps them in vector registers): the same
   products as an in-order sum, added in another order. */
template <typename T>
inline float dot(const float *a, const T *b, int64_t n) {
  float lane[16] = {0}, sum = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) lane[j] += a[i + j] * as_float(b[i + j]);
  for (; i < n; i++) sum += a[i] * as_float(b[i]);
  for (int j = 0; j < 16; j++) sum += lane[j];
  return sum;
}

/* One product of the layer: how 0 (dense weights, our dense kernel), 8 or 4 (int8, int4), its tensors from
   weights[at]; checked against n outputs and k inputs ([E, n, k] where experts). */
struct Product {
  int how;
  const at::Tensor *w, *scales;
  Product(const char *name, int how_, const std::vector<at::Tensor> &weights, size_t at, int64_t n, int64_t k,
          int64_t experts)
      : how(how_), w(&weights[at]), scales(how_ ? &weights[at + 1] : nullptr) {
    int64_t got_n, got_k;
    if (how) {
      std::tie(got_n, got_k) = held_as(name, how, k, *w, *scales, experts > 0);
    } else {
      TORCH_CHECK_VALUE(w->dim() == 2 + (experts > 0) && floats(*w) && w->is_contiguous() && w->device().is_cpu(),
                        "layer_step: ", name, " weights ", w->sizes(), " ", dtype(*w),
                        ": give float32 or bfloat16 weights, contiguous, in CPU memory");
      got_n = w->size(-2), got_k = w->size(-1);
    }
    TORCH_CHECK_VALUE(got_n == n && got_k == k && (!experts || w->size(0) == experts), "layer_step: ", name,
                      " weights ", w->sizes(), " are not [", experts ? std::to_string(experts) + ", " : "", n, ", ",
                      k, "], the layer's shape");
  }
  /* y [rows][N] (float32) = x [rows][K] (float32) times the weights; with `chosen` (count experts), row i of y is
     row i of x (or x's one row, where rows is 1) times expert chosen[i]. */
  void operator()(const float *x, int rows, float *y, int N, int K, const int64_t *chosen = nullptr,
                  int count = 0) const {
    RECORD_USER_SCOPE("mixtral_notebooks::layer_product");  // what torch.profiler sees inside layer_step (make bench)
    int status;
    bool w_bf16 = w->scalar_type() == at::kBFloat16;
    const uint16_t *s = how ? (const uint16_t *)scales->const_data_ptr() : nullptr;
    if (how && chosen)
      status = quant_experts(how, w->const_data_ptr(), s, w->size(0), chosen, count, x, 0, rows, y, N, K);
    else if (how)
      status = quant_matmul(how, w->const_data_ptr(), s, x, 0, y, rows, N, K);
    else if (chosen)
      status = dense_experts(w->const_data_ptr(), w_bf16, w->size(0), chosen, count, x, 0, rows, y, 0, N, K);
    else
      status = dense_matmul(w->const_data_ptr(), w_bf16, x, 0, y, 0, rows, N, K);
    failed("layer_step", status);
  }
};

/* Each query head against its group's keys and values at the visible positions (softmax in float32): att [H][d]. */
template <typename T>
void attend(const float *q, const T *key, const T *value, const bool *visible, int H, int KV, int64_t L, int d,
            float scaling, float *s, float *att) {
  for (int head = 0; head < H; head++) {
    const T *keys = key + head / (H / KV) * L * d, *values = value + head / (H / KV) * L * d;
    const float *qh = q + head * d;
    float *out = att + head * d, best = -INFINITY, total = 0;
    for (int64_t t = 0; t < L; t++) {
      s[t] = 0.0f;  // read below, for every position
      if (!visible[t]) continue;
      best = std::max(best, s[t] = dot(qh, keys + t * d, d) * scaling);
    }
    std::fill(out, out + d, 0.0f);
    for (int64_t t = 0; t < L; t++) s[t] = visible[t] ? exp_float(s[t] - best) : 0.0f;  // one vector loop
    for (int64_t t = 0; t < L; t++) total += s[t];
    for (int64_t t = 0; t < L; t++)
      if (visible[t]) {
        const float share = s[t] / total;
        for (int i = 0; i < d; i++) out[i] += share * as_float(values[t * d + i]);
      }
  }
}

/* x = the RMS norm of h times its weight, rounded where transformers' MixtralRMSNorm rounds (decode._rms). */
void rms(const Model &m, const std::vector<float> &h, const at::Tensor &weight, float eps, std::vector<float> &x) {
  double squares = 0;
  for (float v : h) squares += (double)v * v;
  float r = 1.0f / std::sqrt((float)(squares / h.size()) + eps);
  const void *w = weight.const_data_ptr();
  for (size_t i = 0; i < h.size(); i++) x[i] = m.round(m.get(w, i) * m.round(h[i] * r));
}

/* x [D] rotated by the angles (length * inv_freq, both halves) as decode.graph_layer rotates it, head by head. */
void rotate(const Model &m, std::vector<float> &x, int heads, int d, const std::vector<float> &cos,
            const std::vector<float> &sin) {
  std::vector<float> r(d);
  for (int g = 0; g < heads; g++) {
    float *v = x.data() + g * d;
    for (int i = 0; i < d; i++) r[i] = m.round(v[i]);
    for (int i = 0; i < d; i++) v[i] = m.round(r[i] * cos[i] + (i < d / 2 ? -r[i + d / 2] : r[i - d / 2]) * sin[i]);
  }
}

/* layer_step's work, or (`checked_only`) its checks alone: an undefined tensor where they pass, nothing written. */
at::Tensor layer(const at::Tensor &h_, at::Tensor &length, const at::Tensor &visible_, const at::Tensor &inv_freq_,
                 at::Tensor &key, at::Tensor &value, at::TensorList weights_, at::IntArrayRef plan,
                 at::IntArrayRef shape, at::ArrayRef<double> constants, bool checked_only) {
  const char *name = "layer_step";
  TORCH_CHECK_VALUE(shape.size() == 4 && constants.size() == 3 && plan.size() == 6, name, ": shape [heads, kv "
                    "heads, experts, experts per token] ", shape, ", constants [eps, scaling, attention scaling] ",
                    constants, " and a plan of 6 products ", plan, ": give them as decode.native_layer does");
  const int64_t H = shape[0], KV = shape[1], E = shape[2], K = shape[3];
  TORCH_CHECK_VALUE(KV > 0 && H > 0 && H % KV == 0 && K > 0 && K <= E, name, ": shape ", shape, ": give [heads, kv "
                    "heads, experts, experts per token] with the heads a multiple of the kv heads and 1 to experts "
                    "chosen");
  TORCH_CHECK_VALUE(h_.dim() == 1 && floats(h_) && h_.device().is_cpu() && h_.is_contiguous(), name, ": h ",
                    h_.sizes(), " ", dtype(h_), ": give one token's hidden state [D], float32 or bfloat16, contiguous, "
                    "in CPU memory");
  const Model m{h_.scalar_type() == at::kBFloat16};
  const int64_t D = h_.size(0);
  TORCH_CHECK_VALUE(key.dim() == 4 && key.size(0) == 1 && key.size(1) == KV && key.is_contiguous() &&
                        value.sizes() == key.sizes() && value.is_contiguous() &&
                        key.scalar_type() == h_.scalar_type() && value.scalar_type() == h_.scalar_type(),
                    name, ": keys ", key.sizes(), " ", dtype(key), " and values ", value.sizes(), " ", dtype(value),
                    ": give the static cache's [1, ", KV, ", positions, head size], contiguous, in h's dtype");
  const int64_t L = key.size(2), d = key.size(3);
  TORCH_CHECK_VALUE(d > 0 && d % 2 == 0, name, ": keys ", key.sizes(), ": the head size must be even (two halves)");
  at::Tensor visible = visible_.contiguous(), inv_freq = inv_freq_.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(visible.dim() == 1 && visible.size(0) == L && visible.scalar_type() == at::kBool &&
                        inv_freq.numel() == d / 2 && length.numel() == 1 && length.scalar_type() == at::kLong,
                    name, ": visible ", visible.sizes(), " ", dtype(visible), ", inv_freq ", inv_freq.sizes(),
                    ", length ", length.sizes(), " ", dtype(length), ": give [", L, "] bool, [", d / 2,
                    "] and one int64 position");
  TORCH_CHECK_VALUE(length.device().is_cpu() && length.is_contiguous(), name, ": length on ", length.device(),
                    ": give it in CPU memory");
  int64_t *at_length = length.mutable_data_ptr<int64_t>();  // read and advanced in place (no operator call)
  const int64_t position = *at_length;
  TORCH_CHECK_INDEX(position >= 0 && position < L, name, ": position ", position, " is past the cache's ", L);
  std::vector<at::Tensor> w(weights_.begin(), weights_.end());
  size_t at[6], count = 3;
  for (int j = 0; j < 6; j++) {
    TORCH_CHECK_VALUE(plan[j] == 0 || plan[j] == 8 || plan[j] == 4, name, ": plan ", plan,
                      ": each product 0 (dense), 8 (int8) or 4 (int4)");
    at[j] = count, count += plan[j] ? 2 : 1;
  }
  TORCH_CHECK_VALUE(w.size() == count && w[0].numel() == D && w[1].numel() == D && w[2].dim() == 2 &&
                        w[2].size(0) == E && w[2].size(1) == D && w[2].scalar_type() == h_.scalar_type() &&
                        w[0].scalar_type() == h_.scalar_type() && w[1].scalar_type() == h_.scalar_type(),
                    name, ": ", w.size(), " weights for a plan that holds ", count, ": give the two norms' [", D,
                    "] and the router's [", E, ", ", D, "] in h's dtype, then each product's tensors");
  for (int j = 0; j < 3; j++) w[j] = w[j].contiguous();
  const int64_t I = (plan[4] ? 4 * w[at[4]].size(-4) : w[at[4]].size(-2)) / 2;
  const Product q_proj("q_proj", plan[0], w, at[0], H * d, D, 0), k_proj("k_proj", plan[1], w, at[1], KV * d, D, 0),
      v_proj("v_proj", plan[2], w, at[2], KV * d, D, 0), o_proj("o_proj", plan[3], w, at[3], D, H * d, 0),
      gate_up("gate_up_proj", plan[4], w, at[4], 2 * I, D, E), down("down_proj", plan[5], w, at[5], D, I, E);
  const float eps = constants[0], scaling = constants[1], attention_scaling = constants[2];
  if (checked_only) return at::Tensor();

  std::vector<float> h(D), x(D), q(H * d), k(KV * d), v(KV * d), att(H * d), o(D), s(L), cos(d), sin(d);
  for (int64_t i = 0; i < D; i++) h[i] = m.get(h_.const_data_ptr(), i);
  rms(m, h, w[0], eps, x);
  q_proj(x.data(), 1, q.data(), H * d, D), k_proj(x.data(), 1, k.data(), KV * d, D);
  v_proj(x.data(), 1, v.data(), KV * d, D);
  for (int64_t i = 0; i < d; i++) {
    float angle = (float)position * inv_freq.const_data_ptr<float>()[i % (d / 2)];
    cos[i] = m.round(std::cos(angle) * attention_scaling), sin[i] = m.round(std::sin(angle) * attention_scaling);
  }
  rotate(m, q, H, d, cos, sin), rotate(m, k, KV, d, cos, sin);
  void *keys = key.mutable_data_ptr(), *values = value.mutable_data_ptr();
  for (int64_t g = 0; g < KV; g++)
    for (int64_t i = 0; i < d; i++) {
      m.set(keys, (g * L + position) * d + i, k[g * d + i]);
      m.set(values, (g * L + position) * d + i, m.round(v[g * d + i]));
    }
  *at_length += 1;
  const bool *seen = visible.const_data_ptr<bool>();
  {
    RECORD_USER_SCOPE("mixtral_notebooks::layer_attention");
    if (m.bf16)
      attend((const float *)q.data(), (const uint16_t *)key.const_data_ptr(),
             (const uint16_t *)value.const_data_ptr(), seen, H, KV, L, d, scaling, s.data(), att.data());
    else
      attend(q.data(), key.const_data_ptr<float>(), value.const_data_ptr<float>(), seen, H, KV, L, d, scaling,
             s.data(), att.data());
  }
  for (float &a : att) a = m.round(a);
  o_proj(att.data(), 1, o.data(), D, H * d);
  for (int64_t i = 0; i < D; i++) h[i] = m.round(h[i] + m.round(o[i]));

  rms(m, h, w[1], eps, x);
  std::vector<float> p(E);  // the router: its product rounded as the library's, then softmax and top-k in float32
  for (int64_t e = 0; e < E; e++)
    p[e] = m.round(m.bf16 ? dot(x.data(), (const uint16_t *)w[2].const_data_ptr() + e * D, D)
                          : dot(x.data(), w[2].const_data_ptr<float>() + e * D, D));
  const float top = *std::max_element(p.begin(), p.end());
  float total = 0, kept = 0;
  for (float &e : p) total += (e = std::exp(e - top));
  std::vector<int64_t> chosen;
  for (int64_t j = 0; j < K; j++) {  // the largest first; of equal ones the first (torch.topk's order is not fixed)
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++)
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end() && (best < 0 || p[e] > p[best])) best = e;
    chosen.push_back(best), kept += p[best] / total;
  }
  std::vector<float> up(K * 2 * I), act(K * I), y(K * D);
  gate_up(x.data(), 1, up.data(), 2 * I, D, chosen.data(), K);
  const bool dense = plan[4] == 0;  // dense products give the model's dtype; int8 and int4 theirs in float32
  for (int64_t j = 0; j < K; j++) {  // SiLU(gate) * up, each loop over I values one vector loop
    const float *gate = up.data() + j * 2 * I, *upper = gate + I;
    float *a = act.data() + j * I;
    if (dense && m.bf16)
      for (int64_t i = 0; i < I; i++) {
        float g = bf16_float(float_bf16(gate[i]));
        a[i] = bf16_float(float_bf16(g / (1.0f + exp_float(-g)) * bf16_float(float_bf16(upper[i]))));
      }
    else
      for (int64_t i = 0; i < I; i++) a[i] = gate[i] / (1.0f + exp_float(-gate[i])) * upper[i];
  }
  down(act.data(), K, y.data(), D, I, chosen.data(), K);
  at::Tensor out = at::empty({D}, h_.options());
  void *h_out = out.mutable_data_ptr();
  std::vector<float> share(K);  // each chosen expert's weight, renormalized over the chosen ones
  for (int64_t j = 0; j < K; j++) share[j] = m.round(p[chosen[j]] / total / kept);
  for (int64_t i = 0; i < D; i++) {
    float sum = h[i];
    for (int64_t j = 0; j < K; j++) sum += m.round(y[j * D + i]) * share[j];
    m.set(h_out, i, sum);
  }
  return out;
}

at::Tensor layer_step(const at::Tensor &h, at::Tensor &length, const at::Tensor &visible, const at::Tensor &inv_freq,
                      at::Tensor &key, at::Tensor &value, at::TensorList weights, at::IntArrayRef plan,
                      at::IntArrayRef shape, at::ArrayRef<double> constants) {
  return layer(h, length, visible, inv_freq, key, value, weights, plan, shape, constants, false);
}

/* layer_step through each layer in turn: layer i's length, keys and values, plans[6i:6i+6], and its tensors, the
   next ones of weights (as many as its plan holds). Every layer's input is checked before any layer runs, so a call
   refused changes no cache and no length. */
at::Tensor layers_step(const at::Tensor &h, at::TensorList lengths, const at::Tensor &visible,
                       const at::Tensor &inv_freq, at::TensorList keys, at::TensorList values, at::TensorList weights,
                       at::IntArrayRef plans, at::IntArrayRef shape, at::ArrayRef<double> constants) {
  const size_t layers = lengths.size();
  TORCH_CHECK_VALUE(layers > 0 && keys.size() == layers && values.size() == layers && plans.size() == 6 * layers,
                    "layers_step: ", layers, " lengths, ", keys.size(), " keys, ", values.size(), " values and ",
                    plans.size(), " plan codes: give each layer's length, keys and values and 6 codes a layer");
  std::vector<size_t> first(layers + 1, 0);  // layer i's tensors: weights[first[i]:first[i + 1]]
  for (size_t i = 0; i < layers; i++) {
    size_t count = 3;
    for (int64_t code : plans.slice(6 * i, 6)) count += code == 8 || code == 4 ? 2 : 1;
    first[i + 1] = first[i] + count;
  }
  TORCH_CHECK_VALUE(first[layers] == weights.size(), "layers_step: ", weights.size(), " weights where the plans hold ",
                    first[layers], ": give each layer's norms, router and products' tensors, one layer after another");
  at::Tensor out = h;
  for (bool checked_only : {true, false})
    for (size_t i = 0; i < layers; i++) {
      at::Tensor length = lengths[i], key = keys[i], value = values[i];  // handles: written in place
      at::Tensor next = layer(out, length, visible, inv_freq, key, value,
                              weights.slice(first[i], first[i + 1] - first[i]), plans.slice(6 * i, 6), shape,
                              constants, checked_only);
      if (!checked_only) out = next;
    }
  return out;
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
  // how many tokens one pass over an int8 or int4 block takes: 4 where built with AVX-512 and VNNI, else 2
  m.def("tokens_per_pass() -> int", []() -> int64_t { return tokens_per_pass(); });
  m.def("layer_step(Tensor h, Tensor(a!) length, Tensor visible, Tensor inv_freq, Tensor(b!) key, Tensor(c!) value, "
        "Tensor[] weights, int[] plan, int[] shape, float[] constants) -> Tensor");
  m.def("layers_step(Tensor h, Tensor(a!)[] lengths, Tensor visible, Tensor inv_freq, Tensor(b!)[] keys, "
        "Tensor(c!)[] values, Tensor[] weights, int[] plans, int[] shape, float[] constants) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_notebooks, CPU, m) {
  m.impl("int8_matmul", &matmul<8>);
  m.impl("int8_experts", &experts<8>);
  m.impl("int4_matmul", &matmul<4>);
  m.impl("int4_experts", &experts<4>);
  m.impl("dense_matmul", &dense_matmul_op);
  m.impl("dense_experts", &dense_experts_op);
  m.impl("layer_step", &layer_step);
  m.impl("layers_step", &layers_step);
}

TORCH_LIBRARY_IMPL(mixtral_notebooks, Meta, m) {
  m.impl("int8_matmul", &matmul_shape);
  m.impl("int8_experts", &experts_shape);
  m.impl("int4_matmul", &matmul_shape);
  m.impl("int4_experts", &experts_shape);
  m.impl("dense_matmul", &dense_matmul_shape);
  m.impl("dense_experts", &dense_experts_shape);
}
