/* Decode attention over the paged KV cache on a CPU, in fp32 with AVX2 and FMA: each decode sequence's query heads
 * attend to its visible keys read in place from the cache (no gathered copy of K and V).
 *
 * Work item (sequence b, KV head g), OpenMP dynamic over items (one thread for fewer than 1024 keys in all, where a
 * team costs more than it saves): its `rep` query heads share the keys
 * keys[item * S + j] (rows of the cache viewed as (rows, D); j < nvis[b] visible, the rest are not read), so
 *     s[r][j] = sm_scale * q[b, g rep + r] . K[keys[item S + j]]
 *     out[b, g rep + r] = sum_j exp(s[r][j] - max_j s[r]) V[keys[item S + j]] / sum_j exp(s[r][j] - max_j s[r])
 * the semantics of kernels/attention.py's paged_attention_cpu (its reference), up to the order of fp32 sums and an
 * exp within 2 ulp (Cephes' polynomial, vectorised). Scores go 8 keys at a time (eight independent dot products, then
 * one transpose-and-add), values 64 columns at a time (eight independent sums). Built on demand by
 * kernels/cpu_attention.py.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* lane i = the dot product of a with the key row k + kr[i] * D, for 8 keys at once: eight independent sums (no
 * horizontal add per key), then one transpose-and-add of the eight */
static inline __m256 dots8(const float *a, const float *k, const int64_t *kr, int D) {
    const float *r0 = k + kr[0] * D, *r1 = k + kr[1] * D, *r2 = k + kr[2] * D, *r3 = k + kr[3] * D,
                *r4 = k + kr[4] * D, *r5 = k + kr[5] * D, *r6 = k + kr[6] * D, *r7 = k + kr[7] * D;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        __m256 av = _mm256_loadu_ps(a + d);
        c0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(r0 + d), c0);
        c1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(r1 + d), c1);
        c2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(r2 + d), c2);
        c3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(r3 + d), c3);
        c4 = _mm256_fmadd_ps(av, _mm256_loadu_ps(r4 + d), c4);
        c5 = _mm256_fmadd_ps(av, _mm256_loadu_ps(r5 + d), c5);
        c6 = _mm256_fmadd_ps(av, _mm256_loadu_ps(r6 + d), c6);
        c7 = _mm256_fmadd_ps(av, _mm256_loadu_ps(r7 + d), c7);
    }
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(c0, c1), _mm256_hadd_ps(c2, c3));  /* sums 0-3 of each 128-bit half */
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(c4, c5), _mm256_hadd_ps(c6, c7));  /* sums 4-7 */
    __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    if (d < D) {  /* a head size that is not a multiple of 8: the last columns one by one */
        float t[8];
        const float *rows[8] = {r0, r1, r2, r3, r4, r5, r6, r7};
        _mm256_storeu_ps(t, s);
        for (int i = 0; i < 8; i++)
            for (int dd = d; dd < D; dd++) t[i] += a[dd] * rows[i][dd];
        s = _mm256_loadu_ps(t);
    }
    return s;
}

#define MAX_REP 16  /* query heads per KV head handled in one item (GQA groups are at most 8 in Llama-family models) */

/* The probabilities of one query row qr over its n visible keys kr[0..n) into sr (exp(s - max), unnormalised)
 * -> 1 / their sum */
static float head_probs(const float *qr, const float *k, const int64_t *kr, int64_t n, int D, float sm_scale,
                        float *sr) {
    float m = -INFINITY;
    int64_t j = 0;
    if (n >= 8) {
        __m256 scale = _mm256_set1_ps(sm_scale), mv = _mm256_set1_ps(-INFINITY);
        for (; j + 8 <= n; j += 8) {
            __m256 sv = _mm256_mul_ps(scale, dots8(qr, k, kr + j, D));
            _mm256_storeu_ps(sr + j, sv);
            mv = _mm256_max_ps(mv, sv);
        }
        m = hmax(mv);
    }
    for (; j < n; j++) {
        sr[j] = sm_scale * dot(qr, k + kr[j] * D, D);
        if (sr[j] > m) m = sr[j];
    }
    __m256 mv = _mm256_set1_ps(m), lv = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 p = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));
        _mm256_storeu_ps(sr + j, p);
        lv = _mm256_add_ps(lv, p);
    }
    float l = hsum(lv);
    for (; j < n; j++) {
        sr[j] = exp_1(sr[j] - m);
        l += sr[j];
    }
    return 1.0f / l;
}

/* o[0..D) = inv * sum_j pr[j] V[kr[j]], D in chunks of 8 columns */
static void weighted_values(const float *pr, const float *v, const int64_t *kr, int64_t n, int D, float inv,
                            float *o) {
    int d = 0;
    for (; d + 64 <= D; d += 64) {  /* eight independent sums, enough to keep both FMA units busy */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t j = 0; j < n; j++) {
            const float *vr = v + kr[j] * D + d;
            __m256 p = _mm256_set1_ps(pr[j]);
            a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr), a0);
            a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8), a1);
            a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 16), a2);
            a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 24), a3);
            a4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 32), a4);
            a5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 40), a5);
            a6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 48), a6);
            a7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 56), a7);
        }
        __m256 iv = _mm256_set1_ps(inv);
        __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(o + d + 8 * c, _mm256_mul_ps(acc[c], iv));
    }
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
        __m256 iv = _mm256_set1_ps(inv);
        _mm256_storeu_ps(o + d, _mm256_mul_ps(a0, iv));
        _mm256_storeu_ps(o + d + 8, _mm256_mul_ps(a1, iv));
        _mm256_storeu_ps(o + d + 16, _mm256_mul_ps(a2, iv));
        _mm256_storeu_ps(o + d + 24, _mm256_mul_ps(a3, iv));
    }
    for (; d + 8 <= D; d += 8) {
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++)
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(pr[j]), _mm256_loadu_ps(v + kr[j] * D + d), a0);
        _mm256_storeu_ps(o + d, _mm256_mul_ps(a0, _mm256_set1_ps(inv)));
    }
    for (; d < D; d++) {
        float a = 0.0f;
        for (int64_t j = 0; j < n; j++) a += pr[j] * v[kr[j] * D + d];
        o[d] = a * inv;
    }
}

/* One work item, (sequence b, KV head g) = (item / Hkv, item % Hkv); the arguments as multiplex_decode_attention's,
 * but orows: the row of out (Hq D floats) of each sequence, or NULL (row b). kernels/cpu_layer.c runs the items inside
 * its own team. */
static void decode_item(int64_t item, int Hkv, int rep, int D, int64_t S, const float *q, int64_t ldq, int64_t ldh,
                        const int64_t *qrows, const float *k, const float *v, const int64_t *keys,
                        const int64_t *nvis, float sm_scale, const int64_t *orows, float *out, float *scratch) {
    int64_t b = item / Hkv, g = item % Hkv, n = nvis[b];
    const int64_t *kr = keys + item * S;
    const float *qb = q + (qrows ? qrows[b] : b) * ldq + g * rep * ldh;
    float *s = scratch + item * rep * S;
    float inv[MAX_REP];
    for (int r = 0; r < rep; r++) inv[r] = head_probs(qb + r * ldh, k, kr, n, D, sm_scale, s + r * S);
    for (int r = 0; r < rep; r++)
        weighted_values(s + r * S, v, kr, n, D, inv[r], out + ((orows ? orows[b] : b) * Hkv * rep + g * rep + r) * D);
}

/* q: query rows ldq apart, heads ldh apart (unit stride within a head); qrows: (Bd,) row of each decode sequence
 * or NULL (row b); k, v: caches as (rows, Hkv, D) contiguous, keys index rows of (rows * Hkv, D); nvis (Bd,) > 0;
 * out (Bd, Hq, D) contiguous; scratch: items * rep * S floats. */
void multiplex_decode_attention(int Bd, int Hkv, int rep, int D, int64_t S, const float *q, int64_t ldq, int64_t ldh,
                                const int64_t *qrows, const float *k, const float *v, const int64_t *keys,
                                const int64_t *nvis, float sm_scale, float *out, float *scratch, int threads) {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if ((int64_t)Bd * Hkv * S >= 1024)
    for (int64_t item = 0; item < (int64_t)Bd * Hkv; item++)
        decode_item(item, Hkv, rep, D, S, q, ldq, ldh, qrows, k, v, keys, nvis, sm_scale, 0, out, scratch);
}

/* The step's new keys and values into the cache: row rows[i] (or i when rows is NULL) of k and of v, `width` values
 * each (its KV heads, end to end), to row slots[i] of k_cache and v_cache (viewed as (rows, width)), for i < n. One
 * call for both caches where kernels/attention.py's write_kv_cpu (its reference) runs a reshape, an index_select and
 * an index_copy_ per cache. */
void multiplex_write_kv(int64_t n, int64_t width, const float *k, int64_t ldk, const float *v, int64_t ldv,
                        const int64_t *rows, const int64_t *slots, float *k_cache, float *v_cache) {
    for (int64_t i = 0; i < n; i++) {
        int64_t r = rows ? rows[i] : i;
        memcpy(k_cache + slots[i] * width, k + r * ldk, sizeof(float) * width);
        memcpy(v_cache + slots[i] * width, v + r * ldv, sizeof(float) * width);
    }
}
