/* int8 weights times a few tokens, read as one stream: the kernel helpers/int8_kernel.py compiles and calls.

   y[t][n] = scale[n] * xscale[t] * sum_k q[n][k] * xq[t][k]

   scale: one bf16 scale per row, as quantize.py stores it (a bf16 is a float's top 16 bits).
   q: the int8 weights [N][K], re-laid as blocks of 4 rows x 16 inputs (64 bytes, one cache line):
      [N/4][K/16][4][16], so that each thread reads its rows front to back as one stream.
   xq: each token's activations rounded to int16 with one scale per token (max |x| / 32767).
   Products are summed exactly in int32 lanes (AVX2's vpmaddwd: 16 products, added in pairs) and moved to
   float every 4,096 inputs, before a lane could overflow (2 x 127 x 32767 a pair, 256 pairs a lane). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if !defined(__AVX2__)
#error "this kernel needs AVX2"
#endif

#define ROWS 4
#define COLS 16
#define CHUNK 4096

static inline float sum8(__m256i v) { /* in float: eight int32 lanes near their limit would overflow */
  __m256 f = _mm256_cvtepi32_ps(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* One block of 4 rows (w: its K/16 lines) against T = 1 or 2 tokens; adds into sums[4][2]. */
static inline __attribute__((always_inline)) void block(const int8_t *w, const int16_t *xq, int K, const int T,
                                                        float sums[ROWS][2]) {
  for (int start = 0; start < K; start += CHUNK) {
    int end = start + CHUNK < K ? start + CHUNK : K;
    __m256i acc[ROWS][2];
    for (int r = 0; r < ROWS; r++)
      for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
    for (int k = start; k < end; k += COLS) {
      const int8_t *line = w + (long)k * ROWS;
      _mm_prefetch((const char *)line + 1024, _MM_HINT_T0);
      __m256i x[2];
      for (int t = 0; t < T; t++) x[t] = _mm256_loadu_si256((const __m256i *)(xq + (long)t * K + k));
      for (int r = 0; r < ROWS; r++) {
        __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(line + COLS * r)));
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(q, x[t]));
      }
    }
    for (int r = 0; r < ROWS; r++)
      for (int t = 0; t < T; t++) sums[r][t] += sum8(acc[r][t]);
  }
}

/* Bytes of T x K int16 values, rounded up to whole 32-byte lines: the token scales follow them. */
static inline size_t values_bytes(int T, int K) { return ((size_t)T * K * sizeof(int16_t) + 31) / 32 * 32; }

/* Eight of x's values from `at` as floats: x is float32, or bf16 where `bf16` (a float's top 16 bits: exact). */
static inline __m256 load8(const void *x, int bf16, long at) {
  if (!bf16) return _mm256_loadu_ps((const float *)x + at);
  __m256i half = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + at)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(half, 16));
}

/* Each token's row of x [T][K] (float32, or bf16 where `bf16`) rounded to int16 with one scale (max |x| / 32767):
   one buffer to free, the values first, then the T scales (at values_bytes); NULL where memory ran out. */
static int16_t *quantize_tokens(const void *x, int bf16, int T, int K) {
  int16_t *xq = aligned_alloc(32, values_bytes(T, K) + ((size_t)T * sizeof(float) + 31) / 32 * 32);
  if (!xq) return NULL;
  float *xscale = (float *)((char *)xq + values_bytes(T, K));
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int t = 0; t < T; t++) {
    long row = (long)t * K;
    __m256 m8 = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8) m8 = _mm256_max_ps(m8, _mm256_andnot_ps(sign, load8(x, bf16, row + k)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    float most = _mm_cvtss_f32(m);
    xscale[t] = most > 0.f ? most / 32767.f : 1.f;
    __m256 inverse = _mm256_set1_ps(1.f / xscale[t]);
    for (int k = 0; k < K; k += 16) { /* round to nearest, saturate to int16, keep the order */
      __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, bf16, row + k), inverse));
      __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, bf16, row + k + 8), inverse));
      __m256i both = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);
      _mm256_storeu_si256((__m256i *)(xq + row + k), both);
    }
  }
  return xq;
}

/* y [T][N] (float32) = x [T][K] (float32, or bf16 where x_bf16) times the weights; N a multiple of 4, K of 16.
   Returns 0, or -1 where memory ran out. */
int int8_matmul(const int8_t *q, const uint16_t *scale, const void *x, int x_bf16, float *y, int T, int N, int K) {
  int16_t *xq = quantize_tokens(x, x_bf16, T, K);
  if (!xq) return -1;
  const float *xscale = (const float *)((char *)xq + values_bytes(T, K));
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n += ROWS) {
    const int8_t *w = q + (long)n * K;
    for (int t = 0; t < T; t += 2) { /* two tokens at a time: the block stays in L1 for the next two */
      float sums[ROWS][2] = {{0}};
      int two = T - t >= 2;
      if (two)
        block(w, xq + (long)t * K, K, 2, sums);
      else
        block(w, xq + (long)t * K, K, 1, sums);
      for (int r = 0; r < ROWS; r++) {
        union { uint32_t bits; float value; } row_scale = {.bits = (uint32_t)scale[n + r] << 16};
        for (int j = 0; j <= two; j++) y[(long)(t + j) * N + n + r] = sums[r][j] * row_scale.value * xscale[t + j];
      }
    }
  }
  free(xq);
  return 0;
}

/* The chosen experts of a stack, each against its own row of x (or all against x's one row), without gathering
   their weights: y [count][N] = x_i (float32, or bf16 where x_bf16) times expert chosen[i], whose weights start at q + chosen[i] * q_stride and
   scales at scale + chosen[i] * N. Returns 0, -1 where memory ran out, -2 where an expert is out of range. */
int int8_experts(const int8_t *q, const uint16_t *scale, long q_stride, int experts, const int64_t *chosen, int count,
                 const void *x, int x_bf16, int x_rows, float *y, int N, int K) {
  for (int i = 0; i < count; i++)
    if (chosen[i] < 0 || chosen[i] >= experts) return -2;
  int16_t *xq = quantize_tokens(x, x_bf16, x_rows, K);
  if (!xq) return -1;
  const float *xscale = (const float *)((char *)xq + values_bytes(x_rows, K));
  int blocks = N / ROWS;
#pragma omp parallel for schedule(static)
  for (int j = 0; j < count * blocks; j++) {
    int i = j / blocks, n = (j % blocks) * ROWS, row = x_rows == 1 ? 0 : i;
    const int8_t *w = q + chosen[i] * q_stride + (long)n * K;
    const uint16_t *s = scale + chosen[i] * N;
    float sums[ROWS][2] = {{0}};
    block(w, xq + (long)row * K, K, 1, sums);
    for (int r = 0; r < ROWS; r++) {
      union { uint32_t bits; float value; } row_scale = {.bits = (uint32_t)s[n + r] << 16};
      y[(long)i * N + n + r] = sums[r][0] * row_scale.value * xscale[row];
    }
  }
  free(xq);
  return 0;
}
