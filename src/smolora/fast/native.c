/* SmoLoRA's CPU kernels, compiled on first use by smolora/fast/native.py (cc -O3 -march=native -fopenmp
 * -ffp-contract=off: no product is fused into a sum unless written so, as torch's kernels round them).
 *
 * Each does in one pass over memory what torch does in several element-wise calls, and gives the
 * same bits — but for the sums of RMSNorm and of the adapters' products, which add in another order
 * (~1e-7 relative), and SwiGLU's exp (within ~2 ulp): smolora/codes.py, lora.py and fused.py keep
 * the torch versions, used where no C compiler is found, and the tests compare the two. The span
 * attention at the end stands in for a flash-kernel call per span (smolora/attention.py), its sums
 * in its own order (~1e-6 relative against float64, as the flash kernel's). Vectors are GCC's and
 * clang's vector extensions; x86 intrinsics only where the portable form compiles to scalar code.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <immintrin.h>
#endif

enum { LANES = 16 };
typedef float vf __attribute__((vector_size(64), aligned(4)));  /* 16 floats: one AVX-512 register, two AVX ones */
typedef uint8_t bytes __attribute__((vector_size(16), aligned(1)));
typedef int32_t words __attribute__((vector_size(64), aligned(4)));

/* An fp16 value as fp32 (exact: every fp16 value is an fp32 one). */
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000 | (mantissa << 13);  /* inf, nan */
  } else if (exponent) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (!mantissa) {
    bits = sign;
  } else {  /* subnormal in fp16, normal in fp32 */
    for (exponent = 113; !(mantissa & 0x400); exponent--) mantissa <<= 1;
    bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* n fp16 values as fp32: eight at a time by the F16C instruction where the CPU has it. */
static inline void halves_to_floats(const uint16_t *restrict h, float *restrict f, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
  for (; i < n; i++) f[i] = half_to_float(h[i]);
}

enum { TILE = 2048 };  /* outputs whose scales and lows are converted at a time (16 KiB): a whole row of the model's weights */

/* W^T (blocks, 32, out) from input-major Q4_1 codes (blocks, 16, out), a block's first 16 weights in
 * the low nibbles, and fp16 scale and low (blocks, out): w = q * scale + low. q * scale is exact in
 * fp32 (4 bits times fp16's 11), so the sum rounds once, fused into an FMA or not. */
void q4_1_weight(const uint8_t *restrict codes, const uint16_t *restrict scale, const uint16_t *restrict low,
                 float *restrict w, int64_t blocks, int64_t out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; b++) {
    float s[TILE], l[TILE];
    for (int64_t start = 0; start < out; start += TILE) {
      int64_t n = out - start < TILE ? out - start : TILE;
      halves_to_floats(scale + b * out + start, s, n);
      halves_to_floats(low + b * out + start, l, n);
      for (int j = 0; j < 16; j++) {
        const uint8_t *q = codes + (b * 16 + j) * out + start;
        float *first = w + (b * 32 + j) * out + start, *second = first + 16 * out;
        for (int64_t o = 0; o < n; o++) {
          first[o] = (float)(q[o] & 15) * s[o] + l[o];
          second[o] = (float)(q[o] >> 4) * s[o] + l[o];
        }
      }
    }
  }
}

#ifdef __SSE2__
/* 16 bytes as 16 int32: one instruction with AVX-512, two with AVX2 (GCC's own conversion goes byte by byte). */
static inline words widen(bytes q) {
#if defined(__AVX512F__)
  return (words)_mm512_cvtepu8_epi32((__m128i)q);
#elif defined(__AVX2__)
  __m256i halves[2] = {_mm256_cvtepu8_epi32((__m128i)q), _mm256_cvtepu8_epi32(_mm_srli_si128((__m128i)q, 8))};
  words w;
  memcpy(&w, halves, sizeof w);
  return w;
#else
  return __builtin_convertvector(q, words);
#endif
}

/* t[o][j] = codes[j * stride + o] for a 16 x 16 block of bytes: four rounds of interleaving. */
static inline void transpose_bytes(const uint8_t *codes, int64_t stride, bytes t[16]) {
  __m128i r[16], u[16];
  for (int j = 0; j < 16; j++) r[j] = _mm_loadu_si128((const __m128i *)(codes + j * stride));
  for (int j = 0; j < 8; j++) u[j] = _mm_unpacklo_epi8(r[2 * j], r[2 * j + 1]), u[j + 8] = _mm_unpackhi_epi8(r[2 * j], r[2 * j + 1]);
  for (int j = 0; j < 4; j++)
    for (int h = 0; h < 2; h++)
      r[8 * h + j] = _mm_unpacklo_epi16(u[8 * h + 2 * j], u[8 * h + 2 * j + 1]),
      r[8 * h + j + 4] = _mm_unpackhi_epi16(u[8 * h + 2 * j], u[8 * h + 2 * j + 1]);
  for (int j = 0; j < 2; j++)
    for (int h = 0; h < 4; h++)
      u[4 * h + j] = _mm_unpacklo_epi32(r[4 * h + 2 * j], r[4 * h + 2 * j + 1]),
      u[4 * h + j + 2] = _mm_unpackhi_epi32(r[4 * h + 2 * j], r[4 * h + 2 * j + 1]);
  for (int h = 0; h < 8; h++)
    r[2 * h] = _mm_unpacklo_epi64(u[2 * h], u[2 * h + 1]), r[2 * h + 1] = _mm_unpackhi_epi64(u[2 * h], u[2 * h + 1]);
  for (int o = 0; o < 16; o++) t[o] = (bytes)r[o];  /* register o: output o's 16 codes */
}
#else
static inline words widen(bytes q) { return __builtin_convertvector(q, words); }

static inline void transpose_bytes(const uint8_t *codes, int64_t stride, bytes t[16]) {
  for (int j = 0; j < 16; j++)
    for (int o = 0; o < 16; o++) t[o][j] = codes[j * stride + o];
}
#endif

/* W (out, blocks * 32), row-major, from the same input-major Q4_1 codes as q4_1_weight, with the
 * same values: 16 outputs at a time, each block's codes for them transposed in registers. */
void q4_1_weight_rows(const uint8_t *restrict codes, const uint16_t *restrict scale, const uint16_t *restrict low,
                      float *restrict w, int64_t blocks, int64_t out, int threads) {
  enum { BLOCKS = 8 };  /* blocks per task: 16 rows x 1 KiB written at a time */
  int64_t width = blocks * 32, tiles = (out + 15) / 16, tasks_per_tile = (blocks + BLOCKS - 1) / BLOCKS;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t task = 0; task < tiles * tasks_per_tile; task++) {
    int64_t o0 = task / tasks_per_tile * 16, n = out - o0 < 16 ? out - o0 : 16, first = task % tasks_per_tile * BLOCKS;
    int64_t last = first + BLOCKS < blocks ? first + BLOCKS : blocks;
    float s[16], l[16];
    bytes t[16];
    for (int64_t b = first; b < last; b++) {
      halves_to_floats(scale + b * out + o0, s, n);
      halves_to_floats(low + b * out + o0, l, n);
      if (n == 16) {
        transpose_bytes(codes + b * 16 * out + o0, out, t);
      } else {
        for (int j = 0; j < 16; j++)
          for (int64_t o = 0; o < n; o++) t[o][j] = codes[(b * 16 + j) * out + o0 + o];
      }
      for (int64_t o = 0; o < n; o++) {
        float *row = w + (o0 + o) * width + b * 32;
        words wide = widen(t[o]);
        vf low_half = __builtin_convertvector(wide & 15, vf) * s[o] + l[o], high_half = __builtin_convertvector(wide >> 4, vf) * s[o] + l[o];
        memcpy(row, &low_half, sizeof low_half);
        memcpy(row + 16, &high_half, sizeof high_half);
      }
    }
  }
}

/* W (rows, blocks * 32) from row-major Q8_0 codes (rows, blocks, 32) and fp16 scales (rows, blocks):
 * w = q * scale, exact in fp32 (8 bits times 11). */
void q8_0_weight(const int8_t *restrict codes, const uint16_t *restrict scale, float *restrict w,
                 int64_t rows, int64_t blocks, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t b = 0; b < blocks; b++) {
      const int8_t *q = codes + (r * blocks + b) * 32;
      float *row = w + (r * blocks + b) * 32, s = half_to_float(scale[r * blocks + b]);
      for (int k = 0; k < 32; k++) row[k] = (float)q[k] * s;
    }
  }
}

/* NumPy's SFC64 (Chris Doty-Humphrey's Small Fast Chaotic generator, 64-bit). */
typedef struct { uint64_t a, b, c, counter; } sfc64;

static inline uint64_t sfc64_next(sfc64 *g) {
  uint64_t out = g->a + g->b + g->counter++;
  g->a = g->b ^ (g->b >> 11);
  g->b = g->c + (g->c << 3);
  g->c = ((g->c << 24) | (g->c >> 40)) + out;
  return out;
}

/* FastDropout's mask (smolora/lora.py), bit for bit: SFC64 seeded with a = b = c = seed, counter 1,
 * 12 outputs discarded; element i's high byte is byte i of the little-endian output stream; it is kept
 * when that byte is above the threshold's high byte; the elements whose byte equals it (ties) then
 * take, in order, the next 32-bit halves of the stream (low half first), kept when the half's top 24
 * bits are at least the threshold's low 24. Returns the number of ties. */
int64_t dropout_keep(uint64_t seed, uint32_t threshold, uint8_t *restrict keep, int64_t n) {
  sfc64 g = {seed, seed, seed, 1};
  for (int i = 0; i < 12; i++) sfc64_next(&g);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) memcpy(keep + i, &(uint64_t){sfc64_next(&g)}, 8);  /* the stream's bytes, in order */
  if (i < n) memcpy(keep + i, &(uint64_t){sfc64_next(&g)}, (size_t)(n - i));   /* little-endian: a word's low bytes first */
  const uint8_t high = (uint8_t)(threshold >> 24);
  int64_t ties = 0;
  for (i = 0; i < n; i++) {
    ties += keep[i] == high;
    keep[i] = (uint8_t)((keep[i] > high) + 2 * (keep[i] == high));  /* 2: a tie, settled below */
  }
  uint64_t word = 0;
  uint8_t *tie = keep;
  for (int64_t drawn = 0; drawn < ties; drawn++, tie++) {
    tie = memchr(tie, 2, (size_t)(keep + n - tie));  /* ~256 bytes apart: memchr's vector loop finds the next */
    if (drawn % 2 == 0) word = sfc64_next(&g);
    uint32_t half = (uint32_t)(drawn % 2 == 0 ? word : word >> 32);
    *tie = (half >> 8) >= (threshold & 0xFFFFFF);
  }
  return ties;
}

/* RMSNorm over rows of width h, x and out contiguous: r = 1 / sqrt(mean(x^2) + eps) per row (rows,),
 * out = (x * r) * w, the two products rounded in that order as smolora.fast.fused.rms_scale rounds them. */
void rms_norm_forward(const float *restrict x, const float *restrict w, float eps, float *restrict out,
                      float *restrict r, int64_t rows, int64_t h, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; i++) {
    const float *xi = x + i * h;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < h; j++) sum += xi[j] * xi[j];
    float ri = 1.f / sqrtf(sum / (float)h + eps);
    r[i] = ri;
    for (int64_t j = 0; j < h; j++) out[i * h + j] = (xi[j] * ri) * w[j];
  }
}

/* Its gradient to x: with gw = grad * w, r * gw - x * r^3 * mean(gw * x). */
void rms_norm_backward(const float *restrict grad, const float *restrict x, const float *restrict w,
                       const float *restrict r, float *restrict grad_x, int64_t rows, int64_t h, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; i++) {
    const float *gi = grad + i * h, *xi = x + i * h;
    float dot = 0.f, ri = r[i];
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < h; j++) dot += gi[j] * w[j] * xi[j];
    float coef = dot * (ri * ri * ri) / (float)-h;
    for (int64_t j = 0; j < h; j++) grad_x[i * h + j] = gi[j] * w[j] * ri + xi[j] * coef;
  }
}

/* Rotary embedding, rotate-half layout, on x (tokens, heads, d) with strides (x_token, x_head, 1),
 * cos and sin (tokens, d) contiguous, into out (tokens, heads, d) contiguous:
 * out = x * cos + cat(-x2, x1) * sin; sign -1 gives its gradient (x * cos + cat(x2, -x1) * sin).
 * Rounded as torch's mul then addcmul_ round them: x * cos, then the other product fused into the sum. */
void rotary(const float *restrict x, int64_t x_token, int64_t x_head, const float *restrict cos,
            const float *restrict sin, float *restrict out, int64_t tokens, int64_t heads, int64_t d, float sign, int threads) {
  int64_t half = d / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tokens; t++) {
    const float *c = cos + t * d, *s = sin + t * d;
    for (int64_t h = 0; h < heads; h++) {
      const float *xi = x + t * x_token + h * x_head;
      float *o = out + (t * heads + h) * d;
      for (int64_t j = 0; j < half; j++) {
        o[j] = fmaf(-sign * xi[half + j], s[sign > 0 ? j : half + j], xi[j] * c[j]);
        o[half + j] = fmaf(sign * xi[j], s[sign > 0 ? half + j : j], xi[half + j] * c[half + j]);
      }
    }
  }
}

/* A LoRA adapter's dropout and A product (smolora.lora.DropoutLinear): y (rows, r) = ((x * keep) *
 * scale) @ A^T for x (rows, h), keep (rows, h) bool, A (r, h). The products sum in another order
 * than a BLAS's (~1e-7 relative). */
void dropout_linear_forward(const float *restrict x, const uint8_t *restrict keep, float scale, const float *restrict a,
                            float *restrict y, int64_t rows, int64_t h, int64_t r, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < rows; t++) {
    float dropped[h];
    for (int64_t j = 0; j < h; j++) dropped[j] = (x[t * h + j] * (float)keep[t * h + j]) * scale;
    for (int64_t k = 0; k < r; k++) {
      const float *ak = a + k * h;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < h; j++) sum += dropped[j] * ak[j];
      y[t * r + k] = sum;
    }
  }
}

/* Its gradients: grad_x (rows, h) = ((grad @ A) * keep) * scale, grad_a (r, h) = grad^T @ dropped,
 * the dropped input recomputed from x — or, where norm_r and norm_w are given, from a fused RMSNorm's
 * input as (x * norm_r[t]) * norm_w, as smolora.fast.fused.rms_scale makes it. Either output may be NULL. */
void dropout_linear_backward(const float *restrict grad, const float *restrict x, const float *restrict norm_r,
                             const float *restrict norm_w, const uint8_t *restrict keep, float scale, const float *restrict a,
                             float *restrict grad_x, float *restrict grad_a, int64_t rows, int64_t h, int64_t r, int threads) {
  if (grad_x) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < rows; t++) {
      float *out = grad_x + t * h;
      for (int64_t j = 0; j < h; j++) out[j] = 0.f;
      for (int64_t k = 0; k < r; k++) {
        float g = grad[t * r + k];
        const float *ak = a + k * h;
        for (int64_t j = 0; j < h; j++) out[j] = fmaf(g, ak[j], out[j]);
      }
      for (int64_t j = 0; j < h; j++) out[j] = (out[j] * (float)keep[t * h + j]) * scale;
    }
  }
  if (grad_a) {
    enum { COLUMNS = 64 };  /* each task owns a band of grad_a's columns: no two write the same sum */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j0 = 0; j0 < h; j0 += COLUMNS) {
      int64_t n = h - j0 < COLUMNS ? h - j0 : COLUMNS;
      float acc[r * COLUMNS], dropped[COLUMNS];
      for (int64_t i = 0; i < r * n; i++) acc[i] = 0.f;
      for (int64_t t = 0; t < rows; t++) {
        const float *xt = x + t * h + j0;
        const uint8_t *kt = keep + t * h + j0;
        for (int64_t j = 0; j < n; j++) {
          float source = norm_r ? (xt[j] * norm_r[t]) * norm_w[j0 + j] : xt[j];
          dropped[j] = (source * (float)kt[j]) * scale;
        }
        for (int64_t k = 0; k < r; k++) {
          float g = grad[t * r + k];
          for (int64_t j = 0; j < n; j++) acc[k * n + j] = fmaf(g, dropped[j], acc[k * n + j]);
        }
      }
      for (int64_t k = 0; k < r; k++)
        for (int64_t j = 0; j < n; j++) grad_a[k * h + j0 + j] = acc[k * n + j];
    }
  }
}

/* exp(x) for x in [-87.3, 88.7] (clamped outside), within ~2 ulp: Cody-Waite reduction by ln 2 and
 * Cephes' degree-6 polynomial, branch-free so that a loop of it is vectorised. */
static inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : x > 88.7f ? 88.7f : x;
  float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r) + 1.f;
  union { int32_t bits; float value; } scale = {.bits = ((int32_t)n + 127) << 23};  /* 2^n */
  return p * scale.value;
}

enum { CHUNK = 4096 };  /* elements a thread takes at a time in the element-wise kernels below */

static void swiglu_part(const float *restrict gate, const float *restrict up, float *restrict out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = (gate[i] / (1.f + fast_exp(-gate[i]))) * up[i];
}

static void swiglu_grad_part(const float *restrict grad, const float *restrict gate, const float *restrict up,
                             float *restrict grad_gate, float *restrict grad_up, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    float e = 1.f + fast_exp(-gate[i]), s = 1.f / e;
    grad_gate[i] = ((grad[i] * up[i]) * s) * (1.f + gate[i] * (1.f - s));
    grad_up[i] = grad[i] * (gate[i] / e);
  }
}

/* The SwiGLU MLP's silu(gate) * up over n elements, silu(g) = g / (1 + exp(-g)), exp within ~2 ulp
 * of torch's. */
void swiglu_forward(const float *restrict gate, const float *restrict up, float *restrict out, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; i += CHUNK) swiglu_part(gate + i, up + i, out + i, n - i < CHUNK ? n - i : CHUNK);
}

/* Its gradients: grad_gate = (grad * up) * s * (1 + g * (1 - s)) with s = sigmoid(g), as torch's
 * silu_backward; grad_up = grad * silu(g). */
void swiglu_backward(const float *restrict grad, const float *restrict gate, const float *restrict up, float *restrict grad_gate,
                     float *restrict grad_up, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; i += CHUNK)
    swiglu_grad_part(grad + i, gate + i, up + i, grad_gate + i, grad_up + i, n - i < CHUNK ? n - i : CHUNK);
}

/* Attention over the spans of a packed row (smolora.fast.attention.SpanAttention): each span's
 * queries see the context's keys (a prefix every span shares) if it is marked to, then their own
 * span's keys up to their own position. Its work is small blocks — a ~35-query span against ~60
 * keys — that torch's flash kernel runs one span per call; here a row's spans and key-value heads
 * are one parallel loop of register-blocked products over 16-float vectors (64 bytes: one AVX-512
 * register, two AVX ones), with FMAs. The sums add in another order than torch's kernels, and exp is
 * fast_exp's polynomial (within ~2 ulp): ~1e-6 relative in the outputs. */
enum { QUERIES = 4, PANEL = 64 };  /* a block of 4 queries; head dims padded to 64 (4 vectors) */

static inline vf vload(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
static inline void vstore(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline vf splat(float s) {
  vf r;
  for (int l = 0; l < LANES; l++) r[l] = s;
  return r;
}
static inline vf vfma(vf a, vf b, vf c) {  /* lane by lane fmaf: one vector FMA where the CPU has them */
  vf r;
  for (int l = 0; l < LANES; l++) r[l] = fmaf(a[l], b[l], c[l]);
  return r;
}
static inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

typedef struct {
  const float *q, *k, *v, *ck, *cv;  /* q (T, H, D); k, v (T, KV, D); ck, cv (context, KV, D) */
  const int64_t *spans;              /* (spans, 3): start, end, whether the span sees the context */
  int64_t context, heads, kv_heads, d, dp;  /* dp: d rounded up to PANEL */
  float scale;
} span_layout;

/* Key (or value) j of a span starting at row `start` that sees `p` context keys, KV head g. */
static inline const float *key_row(const span_layout *t, const float *own, const float *context, int64_t start, int64_t p,
                                   int64_t j, int64_t g) {
  return j < p ? context + (j * t->kv_heads + g) * t->d : own + ((start + j - p) * t->kv_heads + g) * t->d;
}

/* columns [j, j + 16 * width) of s (QUERIES rows, row stride mp) = a (QUERIES, dp; first d used) @ bt (d, mp). */
static inline void product_tile(const float *restrict a, int64_t dp, const float *restrict bt, int64_t mp, int64_t d, int64_t j,
                                int width, float *restrict s) {
  vf acc[QUERIES][2] = {{{0}}};
  for (int64_t c = 0; c < d; c++) {
    vf b[2];
#pragma GCC unroll 2
    for (int w = 0; w < width; w++) b[w] = vload(bt + c * mp + j + w * LANES);
#pragma GCC unroll 4
    for (int r = 0; r < QUERIES; r++) {
      vf x = splat(a[r * dp + c]);
#pragma GCC unroll 2
      for (int w = 0; w < width; w++) acc[r][w] = vfma(x, b[w], acc[r][w]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < QUERIES; r++)
#pragma GCC unroll 2
    for (int w = 0; w < width; w++) vstore(s + r * mp + j + w * LANES, acc[r][w]);
}

/* Columns [0, len) of s, as product_tile: 32 columns at a time (8 independent sums in flight). */
static void block_product(const float *restrict a, int64_t dp, const float *restrict bt, int64_t mp, int64_t d, int64_t len,
                          float *restrict s) {
  int64_t j = 0;
  for (; j + 2 * LANES <= round_up(len, LANES); j += 2 * LANES) product_tile(a, dp, bt, mp, d, j, 2, s);
  if (j < len) product_tile(a, dp, bt, mp, d, j, 1, s);
}

/* Column j of p (QUERIES rows, row stride mp), each value in a vector of its own. */
static inline void column(const float *restrict p, int64_t mp, int64_t j, vf weight[QUERIES]) {
#pragma GCC unroll 4
  for (int r = 0; r < QUERIES; r++) weight[r] = splat(p[r * mp + j]);
}

/* out (QUERIES, dp) = p (QUERIES, [0, len); row stride mp) @ rows (len, dp), times `factor`. */
static void weighted_rows(const float *restrict p, int64_t mp, const float *restrict rows, int64_t dp, int64_t len, float factor,
                          float *restrict out) {
  for (int64_t c = 0; c < dp; c += PANEL) {
    vf acc[QUERIES][PANEL / LANES] = {{{0}}};
    for (int64_t j = 0; j < len; j++) {
      const float *row = rows + j * dp + c;
      vf weight[QUERIES];
      column(p, mp, j, weight);
#pragma GCC unroll 4
      for (int u = 0; u < PANEL / LANES; u++) {
        vf x = vload(row + u * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < QUERIES; r++) acc[r][u] = vfma(weight[r], x, acc[r][u]);
      }
    }
    for (int r = 0; r < QUERIES; r++)
      for (int u = 0; u < PANEL / LANES; u++) vstore(out + r * dp + c + u * LANES, acc[r][u] * factor);
  }
}

/* rows (len, dp) += p^T (len x QUERIES; p's row stride mp) @ x (QUERIES, dp). */
static void add_outer(const float *restrict p, int64_t mp, const float *restrict x, int64_t dp, int64_t len, float *restrict rows) {
  for (int64_t c = 0; c < dp; c += PANEL) {
    vf xs[QUERIES][PANEL / LANES];
    for (int r = 0; r < QUERIES; r++)
      for (int u = 0; u < PANEL / LANES; u++) xs[r][u] = vload(x + r * dp + c + u * LANES);
    for (int64_t j = 0; j < len; j++) {
      float *row = rows + j * dp + c;
      vf weight[QUERIES];
      column(p, mp, j, weight);
#pragma GCC unroll 4
      for (int u = 0; u < PANEL / LANES; u++) {
        vf acc = vload(row + u * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < QUERIES; r++) acc = vfma(weight[r], xs[r][u], acc);
        vstore(row + u * LANES, acc);
      }
    }
  }
}

/* A span's keys (or values) for KV head g: transposed (d, mp), zero past m, and/or as rows (m, dp), zero past d. */
static void gather_keys(const span_layout *t, const float *own, const float *context, int64_t start, int64_t p, int64_t m, int64_t g,
                        float *restrict transposed, int64_t mp, float *restrict rows) {
  if (transposed) memset(transposed, 0, sizeof(float) * t->d * mp);
  if (rows) memset(rows, 0, sizeof(float) * m * t->dp);
  for (int64_t j = 0; j < m; j++) {
    const float *row = key_row(t, own, context, start, p, j, g);
    if (transposed)
      for (int64_t c = 0; c < t->d; c++) transposed[c * mp + j] = row[c];
    if (rows) memcpy(rows + j * t->dp, row, sizeof(float) * t->d);
  }
}

/* QUERIES rows of x (T, H, D) from row `first` (n - i0 of them real, the rest zero) at head h into (QUERIES, dp), times factor. */
static void gather_queries(const span_layout *t, const float *x, int64_t first, int64_t real, int64_t h, float factor, float *restrict out) {
  memset(out, 0, sizeof(float) * QUERIES * t->dp);
  for (int64_t r = 0; r < real; r++)
    for (int64_t c = 0; c < t->d; c++) out[r * t->dp + c] = x[((first + r) * t->heads + h) * t->d + c] * factor;
}

/* row[0, seen) = softmax(row[0, seen)), zero from there to len rounded up to 16; returns the log of
 * the softmax's denominator. */
static float softmax(float *restrict row, int64_t seen, int64_t len) {
  int64_t end = round_up(len, LANES), j = 0;
  for (int64_t i = seen; i < end; i++) row[i] = 0.f;
  if (!seen) return 0.f;
  vf most = splat(row[0]), total = {0};
  for (; j + LANES <= seen; j += LANES) {
    vf x = vload(row + j);
    for (int l = 0; l < LANES; l++) most[l] = x[l] > most[l] ? x[l] : most[l];
  }
  float top = row[0], sum = 0.f;
  for (; j < seen; j++) top = row[j] > top ? row[j] : top;
  for (int l = 0; l < LANES; l++) top = most[l] > top ? most[l] : top;
  for (j = 0; j < seen; j++) row[j] = fast_exp(row[j] - top);
  for (j = 0; j < end; j += LANES) total += vload(row + j);
  for (int l = 0; l < LANES; l++) sum += total[l];
  float inverse = 1.f / sum;
  for (j = 0; j < seen; j++) row[j] *= inverse;
  return top + logf(sum);
}

static void span_forward(const span_layout *t, int64_t b, int64_t g, float *restrict out, float *restrict lse) {
  int64_t start = t->spans[3 * b], n = t->spans[3 * b + 1] - start, p = t->spans[3 * b + 2] ? t->context : 0;
  int64_t d = t->d, dp = t->dp, m = p + n, mp = round_up(m, LANES), group = t->heads / t->kv_heads;
  float *kt = malloc(sizeof(float) * (d * mp + m * dp + 2 * QUERIES * dp + QUERIES * mp));
  float *values = kt + d * mp, *qs = values + m * dp, *o = qs + QUERIES * dp, *s = o + QUERIES * dp;
  gather_keys(t, t->k, t->ck, start, p, m, g, kt, mp, NULL);
  gather_keys(t, t->v, t->cv, start, p, m, g, NULL, mp, values);
  for (int64_t h = g * group; h < (g + 1) * group; h++) {
    for (int64_t i0 = 0; i0 < n; i0 += QUERIES) {
      int64_t real = n - i0 < QUERIES ? n - i0 : QUERIES, len = p + i0 + real;
      gather_queries(t, t->q, start + i0, real, h, t->scale, qs);
      block_product(qs, dp, kt, mp, d, len, s);
      for (int64_t r = 0; r < QUERIES; r++) {  /* softmax over the keys query i0 + r sees; zero past them */
        int64_t seen = r < real ? p + i0 + r + 1 : 0;
        float top = softmax(s + r * mp, seen, len);
        if (r < real) lse[(start + i0 + r) * t->heads + h] = top;
      }
      weighted_rows(s, mp, values, dp, len, 1.f, o);
      for (int64_t r = 0; r < real; r++) memcpy(out + ((start + i0 + r) * t->heads + h) * d, o + r * dp, sizeof(float) * d);
    }
  }
  free(kt);
}

/* out (T, H, D) and lse (T, H): the log of each query's softmax denominator, kept for the backward. */
void span_attention_forward(const float *q, const float *k, const float *v, const float *ck, const float *cv, int64_t context,
                            const int64_t *spans, int64_t n_spans, int64_t heads, int64_t kv_heads, int64_t d, float scale,
                            float *out, float *lse, int threads) {
  span_layout t = {q, k, v, ck, cv, spans, context, heads, kv_heads, d, round_up(d, PANEL), scale};
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t item = 0; item < n_spans * kv_heads; item++) span_forward(&t, item / kv_heads, item % kv_heads, out, lse);
}

static void span_backward(const span_layout *t, int64_t b, int64_t g, const float *restrict grad, const float *restrict out,
                          const float *restrict lse, float *restrict grad_q, float *restrict grad_k, float *restrict grad_v,
                          float *restrict context_k, float *restrict context_v) {
  int64_t start = t->spans[3 * b], n = t->spans[3 * b + 1] - start, p = t->spans[3 * b + 2] ? t->context : 0;
  int64_t d = t->d, dp = t->dp, m = p + n, mp = round_up(m, LANES), group = t->heads / t->kv_heads;
  float *kt = malloc(sizeof(float) * (2 * d * mp + 3 * m * dp + 4 * QUERIES * dp + 2 * QUERIES * mp));
  float *vt = kt + d * mp, *keys = vt + d * mp, *dk = keys + m * dp, *dv = dk + m * dp;
  float *qs = dv + m * dp, *go = qs + QUERIES * dp, *o = go + QUERIES * dp, *dq = o + QUERIES * dp;
  float *s = dq + QUERIES * dp, *ds = s + QUERIES * mp;
  gather_keys(t, t->k, t->ck, start, p, m, g, kt, mp, keys);
  gather_keys(t, t->v, t->cv, start, p, m, g, vt, mp, NULL);
  memset(dk, 0, sizeof(float) * 2 * m * dp);
  for (int64_t h = g * group; h < (g + 1) * group; h++) {
    for (int64_t i0 = 0; i0 < n; i0 += QUERIES) {
      int64_t real = n - i0 < QUERIES ? n - i0 : QUERIES, len = p + i0 + real;
      gather_queries(t, t->q, start + i0, real, h, t->scale, qs);
      gather_queries(t, grad, start + i0, real, h, 1.f, go);
      gather_queries(t, out, start + i0, real, h, 1.f, o);
      block_product(qs, dp, kt, mp, d, len, s);   /* the scores again */
      block_product(go, dp, vt, mp, d, len, ds);  /* grad . v */
      for (int64_t r = 0; r < QUERIES; r++) {  /* probabilities, and ds = p * (grad . v - grad . out) */
        float *pr = s + r * mp, *dr = ds + r * mp, top = r < real ? lse[(start + i0 + r) * t->heads + h] : 0.f, delta = 0.f;
        int64_t seen = r < real ? p + i0 + r + 1 : 0;
        for (int64_t c = 0; c < d; c++) delta += go[r * dp + c] * o[r * dp + c];
        for (int64_t j = 0; j < seen; j++) pr[j] = fast_exp(pr[j] - top);
        for (int64_t j = 0; j < seen; j++) dr[j] = pr[j] * (dr[j] - delta);
        for (int64_t j = seen; j < len; j++) pr[j] = dr[j] = 0.f;
      }
      weighted_rows(ds, mp, keys, dp, len, t->scale, dq);
      for (int64_t r = 0; r < real; r++) memcpy(grad_q + ((start + i0 + r) * t->heads + h) * d, dq + r * dp, sizeof(float) * d);
      add_outer(s, mp, go, dp, len, dv);
      add_outer(ds, mp, qs, dp, len, dk);
    }
  }
  for (int64_t j = 0; j < m; j++) {  /* the span's own keys are its alone; the context's add up over spans */
    const float *rk = dk + j * dp, *rv = dv + j * dp;
    if (j < p) {
      float *ok = context_k + (j * t->kv_heads + g) * d, *ov = context_v + (j * t->kv_heads + g) * d;
      for (int64_t c = 0; c < d; c++) ok[c] += rk[c], ov[c] += rv[c];
    } else {
      memcpy(grad_k + ((start + j - p) * t->kv_heads + g) * d, rk, sizeof(float) * d);
      memcpy(grad_v + ((start + j - p) * t->kv_heads + g) * d, rv, sizeof(float) * d);
    }
  }
  free(kt);
}

/* The gradients to q, k, v (T, ...; every row written) and, added to grad_ck and grad_cv (context, KV,
 * D), to the context — which may be rows of grad_k and grad_v themselves, a row's own prefix. Each
 * span's share of the context's gradient is kept apart and they are added in the spans' order: the
 * same bits whichever thread ran which span. */
void span_attention_backward(const float *grad, const float *q, const float *k, const float *v, const float *ck, const float *cv,
                             int64_t context, const int64_t *spans, int64_t n_spans, int64_t heads, int64_t kv_heads, int64_t d,
                             float scale, const float *out, const float *lse, float *grad_q, float *grad_k, float *grad_v,
                             float *grad_ck, float *grad_cv, int threads) {
  span_layout t = {q, k, v, ck, cv, spans, context, heads, kv_heads, d, round_up(d, PANEL), scale};
  int64_t size = context * kv_heads * d;
  float *parts = calloc((size_t)(2 * size * n_spans) + 1, sizeof(float));  /* each span's gradient to the context's k, then v */
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t item = 0; item < n_spans * kv_heads; item++) {
    int64_t b = item / kv_heads;
    span_backward(&t, b, item % kv_heads, grad, out, lse, grad_q, grad_k, grad_v, parts + 2 * size * b, parts + 2 * size * b + size);
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t e = 0; e < size; e++)
    for (int64_t b = 0; b < n_spans; b++) grad_ck[e] += parts[2 * size * b + e], grad_cv[e] += parts[2 * size * b + size + e];
  free(parts);
}
