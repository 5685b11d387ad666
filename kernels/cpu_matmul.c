/* out = x @ W^T (+ bias) (+ residual) in fp32 with AVX2 and FMA, for the few-token products of a CPU decode step.
 *
 * W is packed once into panels of 16 output columns, k-major: panels[p][k][j] = W[16 p + j][k] (zero past N), so a
 * panel streams from memory once per call and then from cache. Each thread takes whole panels (OpenMP, static) and
 * computes 6 rows of x against one panel at a time: 12 accumulators of 8 floats, the x values broadcast. The sums
 * run over k in order, one FMA each (fp32 throughout); bias, then residual, are added after the sum.
 * Built on demand by kernels/cpu_matmul.py (gcc -O3 -mavx2 -mfma -fopenmp); its reference is F.linear there.
 */
#include <immintrin.h>
#include <stdint.h>

#define PANEL 16

static inline void store_row(__m256 lo, __m256 hi, float *out, const float *bias, const float *res, int cols) {
    if (cols == PANEL) {  /* a whole panel: in registers */
        if (bias) { lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias)); hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8)); }
        if (res) { lo = _mm256_add_ps(lo, _mm256_loadu_ps(res)); hi = _mm256_add_ps(hi, _mm256_loadu_ps(res + 8)); }
        _mm256_storeu_ps(out, lo);
        _mm256_storeu_ps(out + 8, hi);
        return;
    }
    float row[PANEL];
    _mm256_storeu_ps(row, lo);
    _mm256_storeu_ps(row + 8, hi);
    for (int j = 0; j < cols; j++) {
        float v = row[j];
        if (bias) v += bias[j];
        if (res) v += res[j];
        out[j] = v;
    }
}

/* One block of ROWS rows of x (ROWS <= 6) against one panel; accumulators are named so they stay in registers. */
#define ROW_FMA(R, i) if (R > i) { a = _mm256_broadcast_ss(x + i * ldx + k); \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0); c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1); }
#define ROW_STORE(R, i) if (R > i) store_row(c##i##0, c##i##1, out + i * ldo, bias, res ? res + i * ldr : 0, cols);
#define DEFINE_BLOCK(ROWS)                                                                                          \
static void block##ROWS(int K, const float *x, int64_t ldx, const float *panel, float *out, int64_t ldo,          \
                        const float *bias, const float *res, int64_t ldr, int cols) {                             \
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,                     \
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, a;                                  \
    for (int k = 0; k < K; k++) {                                                                                 \
        __m256 b0 = _mm256_loadu_ps(panel + (int64_t)k * PANEL), b1 = _mm256_loadu_ps(panel + (int64_t)k * PANEL + 8); \
        ROW_FMA(ROWS, 0) ROW_FMA(ROWS, 1) ROW_FMA(ROWS, 2) ROW_FMA(ROWS, 3) ROW_FMA(ROWS, 4) ROW_FMA(ROWS, 5)                                   \
    }                                                                                                             \
    ROW_STORE(ROWS, 0) ROW_STORE(ROWS, 1) ROW_STORE(ROWS, 2) ROW_STORE(ROWS, 3) ROW_STORE(ROWS, 4) ROW_STORE(ROWS, 5)                           \
}
DEFINE_BLOCK(1) DEFINE_BLOCK(2) DEFINE_BLOCK(3) DEFINE_BLOCK(4) DEFINE_BLOCK(5) DEFINE_BLOCK(6)

typedef void (*block_fn)(int, const float *, int64_t, const float *, float *, int64_t, const float *, const float *,
                         int64_t, int);
static const block_fn BLOCKS[7] = {0, block1, block2, block3, block4, block5, block6};

/* x (M, K) rows ldx apart; panels (ceil(N / 16), K, 16); out (M, N) rows ldo apart; bias (N,) or NULL; res (M, N)
 * rows ldr apart or NULL; threads: the OpenMP team's size. */
void multiplex_cpu_matmul(int M, int N, int K, const float *x, int64_t ldx, const float *panels, float *out,
                          int64_t ldo, const float *bias, const float *res, int64_t ldr, int threads) {
    int num_panels = (N + PANEL - 1) / PANEL;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int p = 0; p < num_panels; p++) {
        int n0 = p * PANEL, cols = N - n0 < PANEL ? N - n0 : PANEL;
        const float *panel = panels + (int64_t)p * K * PANEL;
        for (int m = 0; m < M; m += 6) {
            int rows = M - m < 6 ? M - m : 6;
            BLOCKS[rows](K, x + m * ldx, ldx, panel, out + m * ldo + n0, ldo, bias ? bias + n0 : 0,
                         res ? res + m * ldr + n0 : 0, ldr, cols);
        }
    }
}
