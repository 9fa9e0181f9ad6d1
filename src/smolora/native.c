/* SmoLoRA's CPU kernels, compiled on first use by smolora/native.py (cc -O3 -march=native -fopenmp
 * -ffp-contract=off: no product is fused into a sum unless written so, as torch's kernels round them).
 *
 * Each does in one pass over memory what torch does in several element-wise calls, and gives the
 * same bits — but for the sums of RMSNorm and of the adapters' products, which add in another order
 * (~1e-7 relative), and SwiGLU's exp (within ~2 ulp): smolora/codes.py, lora.py and fused.py keep
 * the torch versions, used where no C compiler is found, and the tests compare the two.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

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
 * out = (x * r) * w, the two products rounded in that order as smolora.fused.rms_scale rounds them. */
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
 * input as (x * norm_r[t]) * norm_w, as smolora.fused.rms_scale makes it. Either output may be NULL. */
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
