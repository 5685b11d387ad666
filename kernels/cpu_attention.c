/* Decode attention over the paged KV cache on a CPU, in fp32 with AVX2 and FMA: each decode sequence's query heads
 * attend to its visible keys read in place from the cache (no gathered copy of K and V).
 *
 * Work item (sequence b, KV head g), OpenMP dynamic over items: its `rep` query heads share the keys
 * keys[item * S + j] (rows of the cache viewed as (rows, D); j < nvis[b] visible, the rest are not read), so
 *     s[r][j] = sm_scale * q[b, g rep + r] . K[keys[item S + j]]
 *     out[b, g rep + r] = sum_j exp(s[r][j] - max_j s[r]) V[keys[item S + j]] / sum_j exp(s[r][j] - max_j s[r])
 * the semantics of kernels/attention.py's paged_attention_cpu (its reference), up to the order of fp32 sums and an
 * exp within 2 ulp (Cephes' polynomial, vectorised). Built on demand by kernels/cpu_attention.py.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_vector.h"

static inline float exp_1(float x) {  /* the same exp for one value */
    float r[8];
    _mm256_storeu_ps(r, exp_ps(_mm256_set1_ps(x)));
    return r[0];
}

static float dot(const float *a, const float *b, int D) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int d = 0;
    for (; d + 16 <= D; d += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
    }
    for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

#define MAX_REP 16  /* query heads per KV head handled in one item (GQA groups are at most 8 in Llama-family models) */

/* q: query rows ldq apart, heads ldh apart (unit stride within a head); qrows: (Bd,) row of each decode sequence
 * or NULL (row b); k, v: caches as (rows, Hkv, D) contiguous, keys index rows of (rows * Hkv, D); nvis (Bd,) > 0;
 * out (Bd, Hq, D) contiguous; scratch: items * rep * S floats. */
void multiplex_decode_attention(int Bd, int Hkv, int rep, int D, int64_t S, const float *q, int64_t ldq, int64_t ldh,
                                const int64_t *qrows, const float *k, const float *v, const int64_t *keys,
                                const int64_t *nvis, float sm_scale, float *out, float *scratch, int threads) {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t item = 0; item < (int64_t)Bd * Hkv; item++) {
        int64_t b = item / Hkv, g = item % Hkv, n = nvis[b];
        const int64_t *kr = keys + item * S;
        const float *qb = q + (qrows ? qrows[b] : b) * ldq + g * rep * ldh;
        float *s = scratch + item * rep * S;
        float inv[MAX_REP];
        for (int r = 0; r < rep; r++) {  /* scores, then exp(s - max) in place and their sum */
            const float *qr = qb + r * ldh;
            float *sr = s + r * S, m = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                sr[j] = sm_scale * dot(qr, k + kr[j] * D, D);
                if (sr[j] > m) m = sr[j];
            }
            __m256 mv = _mm256_set1_ps(m), lv = _mm256_setzero_ps();
            int64_t j = 0;
            for (; j + 8 <= n; j += 8) {
                __m256 p = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));
                _mm256_storeu_ps(sr + j, p);
                lv = _mm256_add_ps(lv, p);
            }
            float l = hsum(lv);
            for (; j < n; j++) {
                sr[j] = exp_1(sr[j] - m);
                l += sr[j];
            }
            inv[r] = 1.0f / l;
        }
        for (int r = 0; r < rep; r++) {  /* out = sum_j p_j V_j / l, D in chunks of 8 columns */
            const float *pr = s + r * S;
            float *o = out + (b * Hkv * rep + g * rep + r) * (int64_t)D;
            int d = 0;
            for (; d + 32 <= D; d += 32) {
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t j = 0; j < n; j++) {
                    const float *vr = v + kr[j] * D + d;
                    __m256 p = _mm256_set1_ps(pr[j]);
                    a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr), a0);
                    a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8), a1);
                    a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 16), a2);
                    a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 24), a3);
                }
                __m256 iv = _mm256_set1_ps(inv[r]);
                _mm256_storeu_ps(o + d, _mm256_mul_ps(a0, iv));
                _mm256_storeu_ps(o + d + 8, _mm256_mul_ps(a1, iv));
                _mm256_storeu_ps(o + d + 16, _mm256_mul_ps(a2, iv));
                _mm256_storeu_ps(o + d + 24, _mm256_mul_ps(a3, iv));
            }
            for (; d + 8 <= D; d += 8) {
                __m256 a0 = _mm256_setzero_ps();
                for (int64_t j = 0; j < n; j++)
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(pr[j]), _mm256_loadu_ps(v + kr[j] * D + d), a0);
                _mm256_storeu_ps(o + d, _mm256_mul_ps(a0, _mm256_set1_ps(inv[r])));
            }
            for (; d < D; d++) {
                float a = 0.0f;
                for (int64_t j = 0; j < n; j++) a += pr[j] * v[kr[j] * D + d];
                o[d] = a * inv[r];
            }
        }
    }
}
