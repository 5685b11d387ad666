/* The decoder layer's elementwise ops on a CPU, in fp32 with AVX2 and FMA, each one pass over its rows (PyTorch runs
 * each as a chain of ops, every op a pass over memory and a temporary):
 *     rms_norm:  out[t] = (x[t] * 1 / sqrt(mean_d x[t, d]^2 + eps)) * w
 *     silu_mul:  out[t, i] = silu(gu[t, i]) * gu[t, I + i], silu(g) = g / (1 + exp(-g))
 *     rope:      x[t, h] <- x[t, h] * cos[t] + roll(x[t, h], D / 2) * sin_signed[t]   (in place; HF's rotate_half)
 * the semantics of kernels/cpu_elementwise.py's references, up to the order of fp32 sums and an exp within 2 ulp
 * (kernels/cpu_vector.h). Rows split over the calling thread's OpenMP team. Built on demand by
 * kernels/cpu_elementwise.py.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_vector.h"

static inline __m256 silu_ps(__m256 g) {
    __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* rows of at least this many floats per thread before a call splits them over its team */
#define PARALLEL_FLOATS 16384

/* one row of each op: the bodies of the loops below, which kernels/cpu_layer.c runs inside its own team */
static inline void rms_norm_row(int64_t H, const float *r, const float *w, float eps, float *o) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t d = 0;
    for (; d + 16 <= H; d += 16) {
        __m256 v0 = _mm256_loadu_ps(r + d), v1 = _mm256_loadu_ps(r + d + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    for (; d + 8 <= H; d += 8) {
        __m256 v = _mm256_loadu_ps(r + d);
        a0 = _mm256_fmadd_ps(v, v, a0);
    }
    float ss = hsum(_mm256_add_ps(a0, a1));
    for (; d < H; d++) ss += r[d] * r[d];
    float scale = 1.0f / sqrtf(ss / (float)H + eps);
    __m256 s = _mm256_set1_ps(scale);
    for (d = 0; d + 8 <= H; d += 8)
        _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + d), s), _mm256_loadu_ps(w + d)));
    for (; d < H; d++) o[d] = (r[d] * scale) * w[d];
}

static inline void silu_mul_row(int64_t I, const float *g, float *o) {
    const float *u = g + I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu_ps(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
    if (i < I) {  /* the tail through the same vector math, so every element rounds alike */
        float gt[8] = {0}, ut[8] = {0}, ot[8];
        for (int64_t k = i; k < I; k++) gt[k - i] = g[k], ut[k - i] = u[k];
        _mm256_storeu_ps(ot, _mm256_mul_ps(silu_ps(_mm256_loadu_ps(gt)), _mm256_loadu_ps(ut)));
        for (int64_t k = i; k < I; k++) o[k] = ot[k - i];
    }
}

/* one head of one row: a (its first half) and b = a + half, rotated in place by the row's tables c and s */
static inline void rope_head(int64_t half, float *a, const float *c, const float *s) {
    float *b = a + half;
    int64_t d = 0;
    for (; d + 8 <= half; d += 8) {
        __m256 va = _mm256_loadu_ps(a + d), vb = _mm256_loadu_ps(b + d);
        __m256 ra = _mm256_fmadd_ps(vb, _mm256_loadu_ps(s + d), _mm256_mul_ps(va, _mm256_loadu_ps(c + d)));
        __m256 rb = _mm256_fmadd_ps(va, _mm256_loadu_ps(s + half + d),
                                    _mm256_mul_ps(vb, _mm256_loadu_ps(c + half + d)));
        _mm256_storeu_ps(a + d, ra);
        _mm256_storeu_ps(b + d, rb);
    }
    for (; d < half; d++) {
        float va = a[d], vb = b[d];
        a[d] = fmaf(vb, s[d], va * c[d]);
        b[d] = fmaf(va, s[half + d], vb * c[half + d]);
    }
}

void multiplex_rms_norm(int64_t T, int64_t H, const float *x, int64_t ldx, const float *w, float eps, float *out,
                        int64_t ldo, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (T * H >= PARALLEL_FLOATS)
    for (int64_t t = 0; t < T; t++) rms_norm_row(H, x + t * ldx, w, eps, out + t * ldo);
}

void multiplex_silu_mul(int64_t T, int64_t I, const float *gu, int64_t ldg, float *out, int64_t ldo, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (T * I >= PARALLEL_FLOATS)
    for (int64_t t = 0; t < T; t++) silu_mul_row(I, gu + t * ldg, out + t * ldo);
}

void multiplex_rope(int64_t T, int64_t heads, int64_t D, float *x, int64_t ldt, int64_t ldh, const float *cos,
                    const float *sin_signed, int64_t ldc, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (T * heads * D >= PARALLEL_FLOATS)
    for (int64_t item = 0; item < T * heads; item++) {
        int64_t t = item / heads, h = item % heads;
        rope_head(D / 2, x + t * ldt + h * ldh, cos + t * ldc, sin_signed + t * ldc);
    }
}
