/* One next token per row of logits on a CPU, in fp32 with AVX2 and FMA: greedy, or temperature, top-k, top-p and
 * an inverse CDF at the row's uniform draw, a few passes over the row instead of PyTorch's chain of batched ops:
 *     temperature == 0:  the first maximum (the first NaN when there is one), as torch.argmax
 *     otherwise:         p = softmax(x / temperature); with top-k or top-p, p sorted descending (ties: the lower
 *                        token first) and kept while rank < top_k and the float32 prefix sum before it < top_p
 *                        (the prefix sum accumulated in float64 and rounded, as torch.cumsum on a CPU); then the
 *                        first token whose float64 cumulative probability exceeds u * the kept total (never one that
 *                        adds nothing)
 * the semantics of kernels/cpu_sampler.py's reference up to rounding: x * (1 / t) for x / t, exp within 2 ulp, the
 * softmax's sum in float64, e^d below e^-87.33 counting 0, and a plain temperature's draw on the weights before
 * they are normalised. Only the most likely tokens are sorted (those at least FLOOR x the row's maximum); a row
 * whose top-k/top-p would keep more than them is sorted whole (a radix sort on the probabilities' bits). A row
 * whose maximum is not finite after the temperature (NaN, +-inf) takes its first maximum, as greedy does. Rows
 * split over the calling thread's OpenMP team. Built on demand by kernels/cpu_sampler.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vector.h"

#define PARALLEL_FLOATS 65536 /* work per call (floats read, about) before rows split over the team */
#define FLOOR 1e-4f           /* candidates: tokens at least this fraction as likely as the most likely one */
#define BLOCK 256             /* the inverse CDF of a whole row goes by blocks of this many tokens */
#define EXP_MIN -87.3365447505f

/* The row's maximum, or NaN when it holds one (four running maxima: one is a chain of 4-cycle steps). */
static float row_max(const float *x, int64_t V) {
    __m256 m[4], nan = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++)
        m[j] = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 32 <= V; i += 32)
        for (int j = 0; j < 4; j++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * j);
            m[j] = _mm256_max_ps(m[j], v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
    for (; i + 8 <= V; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        m[0] = _mm256_max_ps(m[0], v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float best = hmax(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
    int any_nan = _mm256_movemask_ps(nan);
    for (; i < V; i++) {
        any_nan |= isnan(x[i]);
        best = x[i] > best ? x[i] : best;
    }
    return any_nan ? NAN : best;
}

/* The first token equal to `m` (the first NaN when m is NaN). */
static int64_t first_of(const float *x, int64_t V, float m) {
    if (isnan(m)) {
        for (int64_t i = 0; i < V; i++)
            if (isnan(x[i]))
                return i;
    }
    __m256 mv = _mm256_set1_ps(m);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
        if (hit)
            return i + __builtin_ctz(hit);
    }
    for (; i < V; i++)
        if (x[i] == m)
            return i;
    return 0;
}

/* the float64 sum of 8 floats added to the running sums s (two lanes of 4) */
static inline void add_pd(__m256d s[2], __m256 v) {
    s[0] = _mm256_add_pd(s[0], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    s[1] = _mm256_add_pd(s[1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

static inline double hsum_pd(__m256d s[2]) {
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(s[0], s[1]));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

/* p[i] = exp(x[i] * inv_t - m) for the whole row (0 below e^EXP_MIN) -> their sum, in float64 lanes (a float32
 * sum of 49152 terms is off by ~1e-6 of itself: enough to move a draw to the neighbouring token). */
static float exps(const float *x, int64_t V, float inv_t, float m, float *p) {
    __m256 tv = _mm256_set1_ps(inv_t), mv = _mm256_set1_ps(m), lo = _mm256_set1_ps(EXP_MIN);
    __m256d sum[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
        __m256 d = _mm256_fmsub_ps(_mm256_loadu_ps(x + i), tv, mv);
        __m256 e = _mm256_and_ps(exp_ps(d), _mm256_cmp_ps(d, lo, _CMP_GE_OQ));
        _mm256_storeu_ps(p + i, e);
        add_pd(sum, e);
    }
    if (i < V) {  /* the last few through the same vector exp: equal logits, equal probabilities */
        float in[8], e[8];
        for (int j = 0; j < 8; j++)
            in[j] = i + j < V ? x[i + j] : -INFINITY;
        __m256 d = _mm256_fmsub_ps(_mm256_loadu_ps(in), tv, mv);
        _mm256_storeu_ps(e, _mm256_and_ps(exp_ps(d), _mm256_cmp_ps(d, lo, _CMP_GE_OQ)));
        for (int j = 0; i + j < V; j++)
            p[i + j] = e[j];
        add_pd(sum, _mm256_loadu_ps(e));
    }
    return (float)hsum_pd(sum);
}

/* The first index whose float64 running sum of p exceeds target, else the last whose p is above 0 (else 0). */
static int64_t first_above(const float *p, int64_t n, double target) {
    double cum = 0.0;
    int64_t last = 0;
    for (int64_t i = 0; i < n; i++) {
        cum += p[i];
        if (cum > target)
            return i;
        if (p[i] > 0.0f)
            last = i;
    }
    return last;
}

/* the float64 sum of p[0:n] in vector lanes */
static double sum_pd(const float *p, int64_t n) {
    __m256d s[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        add_pd(s, _mm256_loadu_ps(p + i));
    double total = hsum_pd(s);
    for (; i < n; i++)
        total += p[i];
    return total;
}

/* Plain temperature: the inverse CDF over the whole row of weights p (normalised or not), by blocks: each
 * block's float64 sum, then the token inside the block where the target falls (by a running sum, which may round
 * otherwise than the block's: then the block's last token with any probability). */
static inline int64_t block_len(int64_t b, int64_t V) { return (b + 1) * BLOCK < V ? BLOCK : V - b * BLOCK; }

static int64_t inverse_cdf(const float *p, int64_t V, double u) {
    int64_t nb = (V + BLOCK - 1) / BLOCK, last = 0;
    double sums[nb], total = 0.0;
    for (int64_t b = 0; b < nb; b++) {
        sums[b] = sum_pd(p + b * BLOCK, block_len(b, V));
        total += sums[b];
    }
    double target = u * total;
    for (int64_t b = 0; b < nb; b++) {
        if (sums[b] > target)
            return b * BLOCK + first_above(p + b * BLOCK, block_len(b, V), target);
        target -= sums[b];
        if (sums[b] > 0.0)
            last = b;
    }
    /* rounding put the target past the total: the last token that adds some */
    return last * BLOCK + first_above(p + last * BLOCK, block_len(last, V), INFINITY);
}

/* a key sorts by probability descending, then token ascending: (float bits << 32) | (0xffffffff - token) */
static inline uint64_t key_of(float p, int64_t token) {
    union { float f; uint32_t u; } bits = {p};
    return ((uint64_t)bits.u << 32) | (uint32_t)(0xffffffffu - (uint32_t)token);
}
static inline float prob_of(uint64_t key) {
    union { uint32_t u; float f; } bits = {(uint32_t)(key >> 32)};
    return bits.f;
}
static inline int64_t token_of(uint64_t key) { return (int64_t)(0xffffffffu - (uint32_t)key); }

/* keys in descending order: by insertion below RADIX_MIN keys, else a stable LSD radix sort on the probability's
 * bits (8 at a time, a byte all keys share skipped), which keeps the collected (ascending) token order among
 * equal probabilities; tmp holds n keys */
#define RADIX_MIN 48
static void sort_desc(uint64_t *a, uint64_t *tmp, int64_t n) {
    if (n < RADIX_MIN) {
        for (int64_t i = 1; i < n; i++) {
            uint64_t v = a[i];
            int64_t j = i;
            for (; j > 0 && a[j - 1] < v; j--)
                a[j] = a[j - 1];
            a[j] = v;
        }
        return;
    }
    uint32_t at[4][256];  /* every pass's histogram from one read of the keys, by descending byte value */
    memset(at, 0, sizeof at);
    for (int64_t i = 0; i < n; i++) {
        uint32_t p = (uint32_t)(a[i] >> 32);
        at[0][255 - (p & 255)]++;
        at[1][255 - ((p >> 8) & 255)]++;
        at[2][255 - ((p >> 16) & 255)]++;
        at[3][255 - (p >> 24)]++;
    }
    uint64_t *src = a, *dst = tmp;
    for (int pass = 0, shift = 32; pass < 4; pass++, shift += 8) {
        uint32_t *h = at[pass];
        if (h[255 - ((src[0] >> shift) & 255)] == (uint32_t)n)
            continue;  /* a byte all keys share */
        for (uint32_t d = 0, sum = 0; d < 256; d++) {
            uint32_t c = h[d];
            h[d] = sum;
            sum += c;
        }
        for (int64_t i = 0; i < n; i++)
            dst[h[255 - ((src[i] >> shift) & 255)]++] = src[i];
        uint64_t *t = src;
        src = dst, dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof(uint64_t));
}

/* The keys of the tokens whose weight e is at least `at` (all of them when at <= 0), by their probability e * inv
 * -> how many. */
static int64_t collect(const float *e, float inv, int64_t V, float at, uint64_t *keys) {
    int64_t n = 0, i = 0;
    __m256 av = _mm256_set1_ps(at);
    for (; i + 8 <= V; i += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(e + i), av, _CMP_GE_OQ));
        while (hit) {
            int lane = __builtin_ctz(hit);
            keys[n++] = key_of(e[i + lane] * inv, i + lane);
            hit &= hit - 1;
        }
    }
    for (; i < V; i++)
        if (e[i] >= at)
            keys[n++] = key_of(e[i] * inv, i);
    return n;
}

/* How many of the sorted keys top-k/top-p keep (a prefix); -1 when all n are kept and the row has more that the
 * rule could keep (n < k, n < V): the caller then sorts the whole row. */
static int64_t kept(const uint64_t *keys, int64_t n, int64_t k, float top_p, int64_t V) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float p = prob_of(keys[i]);
        acc += p;
        if (i >= k || !((float)acc - p < top_p))
            return i;
    }
    return n < k && n < V ? -1 : n;
}

/* Top-k/top-p then the inverse CDF over what they keep: weights e (the maximum's ~1; overwritten), probabilities
 * e * inv. */
static int64_t sample_ranked(float *e, float inv, int64_t V, int64_t k, float top_p, double u, uint64_t *keys) {
    int64_t n = collect(e, inv, V, FLOOR, keys);
    sort_desc(keys, keys + V, n);
    int64_t keep = kept(keys, n, k, top_p, V);
    if (keep < 0) {
        n = collect(e, inv, V, -1.0f, keys);
        sort_desc(keys, keys + V, n);
        keep = kept(keys, n, k, top_p, V);
    }
    double total = 0.0;  /* the weights are read no more: e now holds the kept probabilities, in rank order */
    for (int64_t i = 0; i < keep; i++)
        total += e[i] = prob_of(keys[i]);
    return token_of(keys[first_above(e, keep, u * total)]);
}

/* this thread's scratch: V floats and 2V keys, kept between calls (OpenMP's threads persist) */
static __thread float *scratch_p;
static __thread uint64_t *scratch_keys;
static __thread int64_t scratch_len;

static int scratch(int64_t V) {
    if (scratch_len >= V)
        return 1;
    free(scratch_p), free(scratch_keys);
    scratch_p = malloc(V * sizeof(float));
    scratch_keys = malloc(2 * V * sizeof(uint64_t));
    scratch_len = scratch_p && scratch_keys ? V : 0;
    return scratch_len > 0;
}

static int64_t sample_row(const float *x, int64_t V, float t, int64_t k, float top_p, double u, uint8_t *bad) {
    float m = row_max(x, V), inv_t = 1.0f / t;
    *bad = !isfinite(m);
    if (t == 0.0f || !isfinite(m) || !isfinite(m * inv_t))
        return first_of(x, V, m);
    if (!scratch(V))
        return -1;
    float *e = scratch_p;  /* e^(x / t - max): the maximum's ~1 */
    float inv = 1.0f / exps(x, V, inv_t, m * inv_t, e);
    if (k >= V && top_p >= 1.0f)
        return inverse_cdf(e, V, u);  /* the same draw on unnormalised weights */
    return sample_ranked(e, inv, V, k, top_p, u, scratch_keys);
}

/* logits: (n, V) rows ld apart; settings: (4, n) float64, per row its temperature, top-k (<= 0: V), top-p and uniform
 * draw -> out: (n,) token ids, bad: (n,) 1 where the row's maximum is not finite (a NaN in it, +inf, or every entry
 * -inf), else 0. Returns how many rows are bad, or -1 when scratch memory could not be had (out then holds -1 for the
 * rows it failed). */
int multiplex_sample(int64_t n, int64_t V, const float *logits, int64_t ld, const double *settings, int64_t *out,
                     uint8_t *bad, int threads) {
    const double *temps = settings, *top_k = settings + n, *top_p = settings + 2 * n, *u = settings + 3 * n;
    int failed = 0, num_bad = 0;
    int64_t work = 0;  /* in floats read: a row that sorts costs some 16 passes over its candidates (at most V) */
    for (int64_t r = 0; r < n; r++)
        work += temps[r] != 0.0 && ((top_k[r] > 0 && top_k[r] < V) || (float)top_p[r] < 1.0f) ? 17 * V : V;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (work >= PARALLEL_FLOATS) \
        reduction(|: failed) reduction(+: num_bad)
    for (int64_t r = 0; r < n; r++) {
        int64_t k = top_k[r] > 0 && top_k[r] < V ? (int64_t)top_k[r] : V;
        out[r] = sample_row(logits + r * ld, V, (float)temps[r], k, (float)top_p[r], u[r], bad + r);
        failed |= out[r] < 0;
        num_bad += bad[r];
    }
    return failed ? -1 : num_bad;
}
