/* int8 and int4 weights times a few tokens, each matrix read front to back as one stream: the kernels that
   quant_ops.cpp makes torch operators and quant_kernel.py builds. Dense float32 and bf16 weights too, read in place
   (dense_matmul, dense_experts, at the end of this file).

   Each token's activations are rounded to int16 with one scale (max |x| / 32767): xq[t][k] * xscale[t].
   int8, as quantize.py stores it: w = q * scale, one bf16 scale a row (a bf16 is a float's top 16 bits), so
     y[t][n] = xscale[t] * scale[n] * sum_k q[n][k] * xq[t][k].
     q is re-laid as blocks of 4 rows x 16 inputs (64 bytes, one cache line): [N/4][K/16][4][16]. Products are
     summed exactly in int32 lanes (AVX2's vpmaddwd: 16 products, added in pairs) and moved to float every 4,096
     inputs, before a lane could overflow (2 x 127 x 32767 a pair, 256 pairs a lane).
   int4, as quantize.py stores it: w = (q - 8) * scale + zero for q in 0..15, one bf16 scale and zero a row and
     group of 32 inputs, so with xsum[t][g] the sum of a group's xq,
     y[t][n] = xscale[t] * sum_g (scale[n][g] * sum_{k in g} q[n][k] * xq[t][k] + (zero - 8 scale)[n][g] * xsum[t][g]).
     q is re-laid as blocks of 4 rows x 32 inputs (64 bytes): [N/4][K/32][4][16], byte j of a row holding input j
     in its low half and input j + 16 in its high half; the scales and zeros as [N/4][K/32][2][4] (the 4 rows'
     scales, then their zeros). A group's products are summed exactly in int32 (16 a lane at most, 16 x 15 x
     32768 < 2^24) and moved to float times its scale (AVX-512: each lane's exact sum of 4 products moved to float
     times its row's scale, the lanes summed after the last group). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "these kernels need AVX2 and FMA"
#endif

/* Where the CPU has AVX-512 with VNNI (vpdpwssd: int16 pairs multiplied and added into int32 lanes in one
   instruction), a 64-byte line's 4 rows are read as two 512-bit vectors of 2 rows each, and 32 vector registers
   hold the sums of up to 4 tokens: a block is read once for 4 tokens, where AVX2's 16 registers hold 2. Dense
   rows are read 32 inputs a step in 512-bit vectors, where AVX2 takes 16. Either way each sum is of the same
   products; AVX-512's are added in other orders (int8's alone in the same lanes and order: the same bits). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define WIDE 1
#define MOST 4 /* the tokens one pass over a block takes */
#else
#define WIDE 0
#define MOST 2
#endif

#define ROWS 4
#define COLS 16   /* int8: the inputs of a block's row */
#define GROUP 32  /* int4: the inputs of a block's row, and of a scale's group */
#define CHUNK 4096

static inline float sum8(__m256 f) { /* eight float lanes' sum */
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* int8: one block of 4 rows (w: its K/16 lines) against T = 1 or 2 tokens; adds into sums[4][.]. */
static inline __attribute__((always_inline)) void block8(const int8_t *w, const int16_t *xq, int K, const int T,
                                                         float sums[ROWS][MOST]) {
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
    for (int r = 0; r < ROWS; r++) /* summed in float: eight int32 lanes near their limit would overflow */
      for (int t = 0; t < T; t++) sums[r][t] += sum8(_mm256_cvtepi32_ps(acc[r][t]));
  }
}

/* int4: one block of 4 rows (w: its K/32 lines, sz: their scales and zeros) against T = 1 or 2 tokens (xq,
   and xsum: their groups' sums); adds the rows' sums, each group's times its scale, into sums[4][.]. */
static inline __attribute__((always_inline)) void block4(const uint8_t *w, const uint16_t *sz, const int16_t *xq,
                                                         const float *xsum, int K, const int T, float sums[ROWS][MOST]) {
  const __m256i low = _mm256_set1_epi16(0x0F);
  const __m128 eight = _mm_set1_ps(8.f);
  __m256 acc[2];
  __m128 shifts[2];
  for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps(), shifts[t] = _mm_setzero_ps();
  for (int g = 0; g < K / GROUP; g++) {
    const uint8_t *line = w + (long)g * ROWS * 16;
    _mm_prefetch((const char *)line + 1024, _MM_HINT_T0);
    __m256i lo[ROWS], hi[ROWS];
    for (int r = 0; r < ROWS; r++) {
      __m256i both = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(line + 16 * r)));
      lo[r] = _mm256_and_si256(both, low); /* the group's inputs 0-15 */
      hi[r] = _mm256_srli_epi16(both, 4);  /* and 16-31 */
    }
    __m128i halves = _mm_loadu_si128((const __m128i *)(sz + (long)g * 2 * ROWS)); /* 4 scales, 4 zeros (bf16) */
    __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
    __m256 scale = _mm256_permute2f128_ps(f, f, 0x00);                                       /* twice over */
    __m128 shift = _mm_fnmadd_ps(eight, _mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1)); /* zero - 8 scale */
    for (int t = 0; t < T; t++) {
      const int16_t *x = xq + (long)t * K + (long)g * GROUP;
      __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 16));
      __m256i s[ROWS];
      for (int r = 0; r < ROWS; r++) s[r] = _mm256_add_epi32(_mm256_madd_epi16(lo[r], x0), _mm256_madd_epi16(hi[r], x1));
      /* lane r of the low half: row r's lanes 0-3 summed; of the high half: its lanes 4-7 */
      __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), scale, acc[t]);
      shifts[t] = _mm_fmadd_ps(shift, _mm_set1_ps(xsum[(long)t * (K / GROUP) + g]), shifts[t]);
    }
  }
  for (int t = 0; t < T; t++) {
    float rows[ROWS];
    _mm_storeu_ps(rows, _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1)),
                                   shifts[t]));
    for (int r = 0; r < ROWS; r++) sums[r][t] += rows[r];
  }
}

#if WIDE
/* The upper 8 of sixteen float lanes, as eight. */
static inline __m256 upper8(__m512 f) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)); }

/* 16 int16 from `x`, in both halves of a 512-bit vector: one token's inputs against two rows at once. */
static inline __m512i twice16(const int16_t *x) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x)); }

/* block8 by AVX-512: each line's rows 0-1 and 2-3 as two vectors of 32 int16 (a row in each half), their products
   with a token's 16 inputs added in pairs into int32 lanes (lanes 0-7: the first row's, 8-15: the second's), the
   same pairs and lanes as block8's, so the same sums; T = 1 to 4 tokens in one pass. */
static inline __attribute__((always_inline)) void block8_wide(const int8_t *w, const int16_t *xq, int K, const int T,
                                                              float sums[ROWS][MOST]) {
  for (int start = 0; start < K; start += CHUNK) {
    int end = start + CHUNK < K ? start + CHUNK : K;
    __m512i acc[2][MOST];
    for (int p = 0; p < 2; p++)
      for (int t = 0; t < T; t++) acc[p][t] = _mm512_setzero_si512();
    for (int k = start; k < end; k += COLS) {
      const int8_t *line = w + (long)k * ROWS;
      _mm_prefetch((const char *)line + 1024, _MM_HINT_T0);
      __m512i q0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)line));
      __m512i q1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(line + 2 * COLS)));
      for (int t = 0; t < T; t++) {
        __m512i x = twice16(xq + (long)t * K + k);
        acc[0][t] = _mm512_dpwssd_epi32(acc[0][t], q0, x);
        acc[1][t] = _mm512_dpwssd_epi32(acc[1][t], q1, x);
      }
    }
    for (int p = 0; p < 2; p++)
      for (int t = 0; t < T; t++) {
        __m512 f = _mm512_cvtepi32_ps(acc[p][t]);
        sums[2 * p][t] += sum8(_mm512_castps512_ps256(f));
        sums[2 * p + 1][t] += sum8(upper8(f));
      }
  }
}

/* block4 by AVX-512: each line's rows 0-1 and 2-3 as two vectors of 32 int16 (a row's 16 bytes in each half), split
   into their low and high halves (inputs 0-15 and 16-31), a group's products added into int32 lanes (exact) and
   each lane moved to float times its row's scale; the lanes are summed once, after the last group (block4 sums
   them in int32 first: the same products, rounded in another order). T = 1 to 4 tokens in one pass. */
static inline __attribute__((always_inline)) void block4_wide(const uint8_t *w, const uint16_t *sz, const int16_t *xq,
                                                              const float *xsum, int K, const int T,
                                                              float sums[ROWS][MOST]) {
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512i rows01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0); /* lane 15 first */
  const __m512i rows23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m128 eight = _mm_set1_ps(8.f);
  __m512 acc[2][MOST];
  __m128 shifts[MOST];
  for (int t = 0; t < T; t++) acc[0][t] = acc[1][t] = _mm512_setzero_ps(), shifts[t] = _mm_setzero_ps();
  for (int g = 0; g < K / GROUP; g++) {
    const uint8_t *line = w + (long)g * ROWS * 16;
    _mm_prefetch((const char *)line + 1024, _MM_HINT_T0);
    __m512i both0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)line));
    __m512i both1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(line + 32)));
    __m512i lo0 = _mm512_and_si512(both0, low), hi0 = _mm512_srli_epi16(both0, 4);
    __m512i lo1 = _mm512_and_si512(both1, low), hi1 = _mm512_srli_epi16(both1, 4);
    __m128i halves = _mm_loadu_si128((const __m128i *)(sz + (long)g * 2 * ROWS)); /* 4 scales, 4 zeros (bf16) */
    __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
    __m512 scale01 = _mm512_permutexvar_ps(rows01, _mm512_castps256_ps512(f)); /* each row's scale on its lanes */
    __m512 scale23 = _mm512_permutexvar_ps(rows23, _mm512_castps256_ps512(f));
    __m128 shift = _mm_fnmadd_ps(eight, _mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1)); /* zero - 8 scale */
    for (int t = 0; t < T; t++) {
      const int16_t *x = xq + (long)t * K + (long)g * GROUP;
      __m512i x0 = twice16(x), x1 = twice16(x + 16);
      __m512i s0 = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), lo0, x0), hi0, x1);
      __m512i s1 = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), lo1, x0), hi1, x1);
      acc[0][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), scale01, acc[0][t]);
      acc[1][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), scale23, acc[1][t]);
      shifts[t] = _mm_fmadd_ps(shift, _mm_set1_ps(xsum[(long)t * (K / GROUP) + g]), shifts[t]);
    }
  }
  for (int t = 0; t < T; t++) {
    float shifted[ROWS];
    _mm_storeu_ps(shifted, shifts[t]);
    for (int p = 0; p < 2; p++) {
      sums[2 * p][t] += sum8(_mm512_castps512_ps256(acc[p][t])) + shifted[2 * p];
      sums[2 * p + 1][t] += sum8(upper8(acc[p][t])) + shifted[2 * p + 1];
    }
  }
}
#endif

static inline float from_bf16(uint16_t bits) { /* a bf16 is a float's top 16 bits */
  union { uint32_t bits; float value; } f = {.bits = (uint32_t)bits << 16};
  return f.value;
}

/* Eight of x's values from `at` as floats: x is float32, or bf16 where `bf16` (a float's top 16 bits: exact). */
static inline __m256 load8(const void *x, int bf16, long at) {
  if (!bf16) return _mm256_loadu_ps((const float *)x + at);
  __m256i half = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + at)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(half, 16));
}

/* Tokens rounded to int16: xq [T][K], one scale each, and (where K splits into groups) each group's sum of xq
   [T][K/32]; one allocation, `buffer`. */
typedef struct {
  void *buffer;
  int16_t *xq;
  float *scale, *sum;
} Tokens;

static inline size_t lines(size_t bytes) { return (bytes + 31) / 32 * 32; }

/* x [T][K] (float32, or bf16 where `bf16`) rounded to int16, each row with one scale (max |x| / 32767); 0, or -1
   where memory ran out. */
static int quantize_tokens(const void *x, int bf16, int T, int K, Tokens *out) {
  size_t values = lines((size_t)T * K * sizeof(int16_t)), scales = lines((size_t)T * sizeof(float));
  out->buffer = aligned_alloc(32, values + scales + lines((size_t)T * (K / GROUP) * sizeof(float)));
  if (!out->buffer) return -1;
  out->xq = out->buffer;
  out->scale = (float *)((char *)out->buffer + values);
  out->sum = (float *)((char *)out->buffer + values + scales);
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int t = 0; t < T; t++) {
    long row = (long)t * K;
    __m256 m8 = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8) m8 = _mm256_max_ps(m8, _mm256_andnot_ps(sign, load8(x, bf16, row + k)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    float most = _mm_cvtss_f32(m);
    out->scale[t] = most > 0.f ? most / 32767.f : 1.f;
    __m256 inverse = _mm256_set1_ps(1.f / out->scale[t]);
    for (int k = 0; k < K; k += 16) { /* round to nearest, saturate to int16, keep the order */
      __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, bf16, row + k), inverse));
      __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, bf16, row + k + 8), inverse));
      __m256i both = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);
      _mm256_storeu_si256((__m256i *)(out->xq + row + k), both);
    }
    for (int g = 0; g < K / GROUP; g++) {
      int sum = 0;
      for (int k = 0; k < GROUP; k++) sum += out->xq[row + (long)g * GROUP + k];
      out->sum[(long)t * (K / GROUP) + g] = (float)sum; /* exact: |sum| < 2^24 */
    }
  }
  return 0;
}

/* Bytes of one matrix's weights, and its scales' count, for `bits` 8 or 4. */
static inline long weight_bytes(int bits, int N, int K) { return bits == 8 ? (long)N * K : (long)N * K / 2; }
static inline long scale_count(int bits, int N, int K) { return bits == 8 ? N : (long)N * (K / GROUP) * 2; }

/* `block(..., count, sums)` with `count` (1 to MOST) a constant in each case: each count its own loop, the sums in
   registers. */
#if WIDE
#define BY_COUNT(block, ...)                                                                                         \
  switch (count) {                                                                                                   \
  case 1: block##_wide(__VA_ARGS__, 1, sums); break;                                                                 \
  case 2: block##_wide(__VA_ARGS__, 2, sums); break;                                                                 \
  case 3: block##_wide(__VA_ARGS__, 3, sums); break;                                                                 \
  default: block##_wide(__VA_ARGS__, 4, sums); break;                                                                \
  }
#else
#define BY_COUNT(block, ...)                                                                                         \
  switch (count) {                                                                                                   \
  case 1: block(__VA_ARGS__, 1, sums); break;                                                                        \
  default: block(__VA_ARGS__, 2, sums); break;                                                                       \
  }
#endif

/* Rows n to n + 3 of one matrix (q, scale: that matrix's) against `count` (1 to MOST) tokens from token t, into rows
   o to o + count - 1 of y [.][N]. */
static inline void rows(int bits, const void *q, const uint16_t *scale, const Tokens *x, int t, int count, float *y,
                        long o, int n, int N, int K) {
  float sums[ROWS][MOST] = {{0}};
  const int16_t *xq = x->xq + (long)t * K;
  if (bits == 8) {
    const int8_t *w = (const int8_t *)q + (long)n * K;
    BY_COUNT(block8, w, xq, K)
    for (int r = 0; r < ROWS; r++) {
      float row_scale = from_bf16(scale[n + r]);
      for (int j = 0; j < count; j++) sums[r][j] *= row_scale;
    }
  } else {
    const uint8_t *w = (const uint8_t *)q + (long)n * K / 2;
    const uint16_t *sz = scale + (long)n * (K / GROUP) * 2;
    BY_COUNT(block4, w, sz, xq, x->sum + (long)t * (K / GROUP), K)
  }
  for (int r = 0; r < ROWS; r++)
    for (int j = 0; j < count; j++) y[(o + j) * N + n + r] = sums[r][j] * x->scale[t + j];
}

/* MOST: 4 where these loops were built with AVX-512 and VNNI, 2 with AVX2 (the tests check which ran). */
int tokens_per_pass(void) { return MOST; }

/* y [T][N] (float32) = x [T][K] (float32, or bf16 where x_bf16) times one matrix of `bits` 8 or 4; N a multiple
   of 4, K of 16 (int8) or 32 (int4). Returns 0, or -1 where memory ran out. */
int quant_matmul(int bits, const void *q, const uint16_t *scale, const void *x, int x_bf16, float *y, int T, int N,
                 int K) {
  Tokens tokens;
  if (quantize_tokens(x, x_bf16, T, K, &tokens)) return -1;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n += ROWS)
    for (int t = 0; t < T; t += MOST) /* MOST tokens a pass: the block stays in L1 for the next ones */
      rows(bits, q, scale, &tokens, t, T - t < MOST ? T - t : MOST, y, t, n, N, K);
  free(tokens.buffer);
  return 0;
}

/* The chosen experts of a stack of `experts` matrices, each against its own row of x (or all against x's one
   row), without gathering their weights: y [count][N] = x_i times expert chosen[i]. Returns 0, -1 where memory
   ran out, -2 where an expert is out of range. */
int quant_experts(int bits, const void *q, const uint16_t *scale, int experts, const int64_t *chosen, int count,
                  const void *x, int x_bf16, int x_rows, float *y, int N, int K) {
  for (int i = 0; i < count; i++)
    if (chosen[i] < 0 || chosen[i] >= experts) return -2;
  Tokens tokens;
  if (quantize_tokens(x, x_bf16, x_rows, K, &tokens)) return -1;
  int blocks = N / ROWS;
#pragma omp parallel for schedule(static)
  for (int j = 0; j < count * blocks; j++) {
    int i = j / blocks, n = (j % blocks) * ROWS;
    const void *w = (const char *)q + chosen[i] * weight_bytes(bits, N, K);
    rows(bits, w, scale + chosen[i] * scale_count(bits, N, K), &tokens, x_rows == 1 ? 0 : i, 1, y, i, n, N, K);
  }
  free(tokens.buffer);
  return 0;
}

/* Dense weights as the model holds them, read in place: W [N][K] float32, or bf16 where w_bf16, row by row;
   y[t][n] = sum_k W[n][k] * x[t][k] summed in float32 (FMA), for x float32 or bf16. The weights' own bytes are
   the stream: nothing is re-laid or copied. */

/* One bf16 from a float, rounded to nearest even as torch rounds (a NaN stays a NaN). */
static inline uint16_t to_bf16(float value) {
  union { float value; uint32_t bits; } f = {.value = value};
  if (isnan(value)) return 0x7FC0;
  return (uint16_t)((f.bits + 0x7FFF + ((f.bits >> 16) & 1)) >> 16);
}

/* How far ahead of its reads dense_row's AVX-512 loop asks for a row's bytes (_mm_prefetch), as block8_wide and
   block4_wide ask for theirs 1 KiB ahead: a row after a row is one stream, which the hardware's prefetcher follows.
   On the Xeon with AMX, asking 2 KiB ahead (the one distance timed in a committed run) read faster with four tokens in
   both pairs of benchmarks/results/2026-12-07b-step-ab-amx.md; with one token, the decode's case, the kernels' own
   runs showed no gain through that machine's noise, and the decode's side-by-side rounds there time it only together
   with the step's other changes. The AVX2 loop, timed on no machine with and without, asks for nothing. */
#define AHEAD 2048

/* The inputs one step of dense_row takes: two vectors of floats, 8 each (AVX2) or 16 (AVX-512). */
#if WIDE
#define SPAN 32
#else
#define SPAN 16
#endif

/* x [T][K] as float32 (exact from bf16) into `out`. For bf16 weights (`pairs`) each SPAN inputs are held as their
   even ones, then their odd ones: the order in which dense_row takes a bf16 row's SPAN values from one load. */
static void tokens_float(const void *x, int bf16, int T, int K, int pairs, float *out) {
  for (long t = 0; t < T; t++)
    for (int k = 0; k < K; k++) {
      long at = t * K + k;
      float value = bf16 ? from_bf16(((const uint16_t *)x)[at]) : ((const float *)x)[at];
      int in = k % SPAN, held = pairs && k < K / SPAN * SPAN ? k - in + (in % 2) * (SPAN / 2) + in / 2 : k;
      out[t * K + held] = value;
    }
}

/* Row n of W against T = 1 to 4 tokens of xf from token t, into sums[j]: the row read once, as one stream (a row
   after a row is the matrix front to back, which the hardware's prefetcher follows; several rows side by side ran
   slower on the stand-in's short rows). Each SPAN inputs give two vectors of weights: a bf16 row's from one load
   (each 32-bit lane holds two bf16: the lane shifted left by 16 is the even one, the lane with its low half
   cleared the odd one; tokens_float laid xf out to match), a float32 row's from two loads. Each token keeps a sum
   for each of the two, so that FMAs overlap. */
static inline __attribute__((always_inline)) void dense_row(const void *w, int w_bf16, const float *xf, int K, long n,
                                                            int t, const int T, float sums[4]) {
#if WIDE /* the same, 32 inputs a step in 512-bit vectors */
  __m512 first[4], second[4];
  for (int j = 0; j < T; j++) first[j] = second[j] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000);
  int k = 0;
  for (; k + SPAN <= K; k += SPAN) {
    __m512 a, b;
    if (w_bf16) {
      const uint16_t *at = (const uint16_t *)w + n * K + k;
      _mm_prefetch((const char *)at + AHEAD, _MM_HINT_T0);
      __m512i v = _mm512_loadu_si512((const void *)at);
      a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      b = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    } else {
      const float *at = (const float *)w + n * K + k;
      _mm_prefetch((const char *)at + AHEAD, _MM_HINT_T0);
      _mm_prefetch((const char *)at + AHEAD + 64, _MM_HINT_T0);
      a = _mm512_loadu_ps(at);
      b = _mm512_loadu_ps(at + 16);
    }
    for (int j = 0; j < T; j++) {
      const float *x = xf + (long)(t + j) * K + k;
      first[j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x), first[j]);
      second[j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + 16), second[j]);
    }
  }
  for (int j = 0; j < T; j++) {
    __m512 both = _mm512_add_ps(first[j], second[j]);
    float sum = sum8(_mm256_add_ps(_mm512_castps512_ps256(both), upper8(both)));
#else
  __m256 first[4], second[4];
  for (int j = 0; j < T; j++) first[j] = second[j] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
  int k = 0;
  for (; k + SPAN <= K; k += SPAN) {
    __m256 a, b;
    if (w_bf16) {
      __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + n * K + k));
      a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      b = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    } else {
      a = _mm256_loadu_ps((const float *)w + n * K + k);
      b = _mm256_loadu_ps((const float *)w + n * K + k + 8);
    }
    for (int j = 0; j < T; j++) {
      const float *x = xf + (long)(t + j) * K + k;
      first[j] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x), first[j]);
      second[j] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + 8), second[j]);
    }
  }
  for (int j = 0; j < T; j++) {
    float sum = sum8(_mm256_add_ps(first[j], second[j]));
#endif
    for (int i = k; i < K; i++) { /* the inputs past the last SPAN */
      long at = n * K + i;
      sum += (w_bf16 ? from_bf16(((const uint16_t *)w)[at]) : ((const float *)w)[at]) * xf[(long)(t + j) * K + i];
    }
    sums[j] = sum;
  }
}

/* Row n of W against `count` (1 to 4) tokens from token t, into rows o to o + count - 1 of y [.][N], float32 or
   bf16 where y_bf16. */
static inline void dense_rows(const void *w, int w_bf16, const float *xf, int t, int count, void *y, int y_bf16,
                              long o, long n, int N, int K) {
  float sums[4];
  switch (count) { /* each token count its own loop: the sums stay in registers */
  case 1: dense_row(w, w_bf16, xf, K, n, t, 1, sums); break;
  case 2: dense_row(w, w_bf16, xf, K, n, t, 2, sums); break;
  case 3: dense_row(w, w_bf16, xf, K, n, t, 3, sums); break;
  default: dense_row(w, w_bf16, xf, K, n, t, 4, sums); break;
  }
  for (int j = 0; j < count; j++) {
    long at = (o + j) * N + n;
    if (y_bf16)
      ((uint16_t *)y)[at] = to_bf16(sums[j]);
    else
      ((float *)y)[at] = sums[j];
  }
}

/* y [T][N] (float32, or bf16 where y_bf16) = x [T][K] (float32, or bf16 where x_bf16) times W [N][K]; -1 where
   memory ran out, else 0. */
int dense_matmul(const void *w, int w_bf16, const void *x, int x_bf16, void *y, int y_bf16, int T, int N, int K) {
  float *xf = aligned_alloc(32, lines((size_t)T * K * sizeof(float) + 1)); /* + 1: never a request for none */
  if (!xf) return -1;
  tokens_float(x, x_bf16, T, K, w_bf16, xf);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++)
    for (int t = 0; t < T; t += 4) /* four tokens at a time: each row read once for them */
      dense_rows(w, w_bf16, xf, t, T - t < 4 ? T - t : 4, y, y_bf16, t, n, N, K);
  free(xf);
  return 0;
}

/* The chosen experts of a stack W [experts][N][K], each against its own row of x (or all against x's one row),
   read in place: y [count][N] = x_i times W[chosen[i]]. 0, -1 where memory ran out, -2 where an expert is out of
   range. */
int dense_experts(const void *w, int w_bf16, int experts, const int64_t *chosen, int count, const void *x, int x_bf16,
                  int x_rows, void *y, int y_bf16, int N, int K) {
  for (int i = 0; i < count; i++)
    if (chosen[i] < 0 || chosen[i] >= experts) return -2;
  float *xf = aligned_alloc(32, lines((size_t)x_rows * K * sizeof(float) + 1));
  if (!xf) return -1;
  tokens_float(x, x_bf16, x_rows, K, w_bf16, xf);
  long matrix = (long)N * K * (w_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static)
  for (long j = 0; j < (long)count * N; j++) {
    int i = j / N;
    const void *expert = (const char *)w + chosen[i] * matrix;
    dense_rows(expert, w_bf16, xf, x_rows == 1 ? 0 : i, 1, y, y_bf16, i, j % N, N, K);
  }
  free(xf);
  return 0;
}
