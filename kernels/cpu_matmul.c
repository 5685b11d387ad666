/* out = x @ W^T (+ bias) (+ residual) in fp32 with AVX2 and FMA (or AVX-512), for the few-token products of a CPU
 * decode step.
 *
 * W is packed once into panels of 16 output columns, k-major: panels[p][k][j] = W[16 p + j][k] (zero past N), so a
 * panel streams from memory once per call and then from cache. Each thread takes whole panels (OpenMP, static) and
 * computes a block of rows of x against one panel at a time, the x values broadcast: with AVX2, 6 rows in 12
 * accumulators of 8 floats; with AVX-512 (built with -mavx512f), up to 16 rows in 16 accumulators of 16 floats, and
 * from 24 rows on 8 rows against three panels (24 accumulators). The sums run over k in order, one FMA each (fp32
 * throughout; the same bits in both forms); bias, then residual, are added after the sum.
 * Built on demand by kernels/cpu_matmul.py (gcc -O3 -mavx2 -mfma [-mavx512f] -fopenmp); its reference is F.linear.
 */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_vector.h"

#define PANEL 16
/* What the block loops prefetch: in packed panels (ldp == PANEL), the panel row PREFETCH rows (cache lines) ahead, a
 * stream that crosses pages, where the hardware prefetcher stops; in the LoRA grid's Bt read in place (ldp = its
 * width), the same row AHEAD_COLS columns (4 panels) ahead. */
#define PREFETCH 64
#define AHEAD_COLS 64
static inline void prefetch_ahead(const float *panel, int k, int64_t ldp) {
    _mm_prefetch((const char *)(ldp == PANEL ? panel + (k + PREFETCH) * PANEL : panel + k * ldp + AHEAD_COLS),
                 _MM_HINT_T0);
}

/* bf16 -> fp32 is exact: the 16 bits are the float's upper half. */
static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c = {(uint32_t)v << 16};
    return c.f;
}
static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

#ifdef __AVX512F__
/* AVX-512: a panel is one register; a block is up to 16 rows of x against one panel, 16 accumulators. */
#define BLOCK_ROWS 16
static inline void store_row(__m512 v, float *out, const float *bias, const float *res, int cols) {
    __mmask16 m = cols == PANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias));
    if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res));
    _mm512_mask_storeu_ps(out, m, v);
}
#define ROW_FMA(R, i) if (R > i) c##i = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), b, c##i);
#define ROW_STORE(R, i) if (R > i) { int64_t r = orows ? orows[i] : i;                                      \
    store_row(c##i, out + r * ldo, bias, res ? res + r * ldr : 0, cols); }
/* Block NAME##ROWS over a panel of T values, LOAD_ROW(panel, k, ldp) loading row k of it into b as 16 floats. */
#define DEFINE_BLOCK_OF(NAME, T, LOAD_ROW, ROWS)                                                                    \
static void NAME##ROWS(int K, const float *x, int64_t ldx, const T *panel, int64_t ldp, float *out,               \
                       int64_t ldo, const int64_t *orows, const float *bias, const float *res, int64_t ldr,       \
                       int cols) {                                                                                \
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,     \
           c9 = c0, c10 = c0, c11 = c0, c12 = c0, c13 = c0, c14 = c0, c15 = c0;                                  \
    for (int k = 0; k < K; k++) {                                                                                 \
        LOAD_ROW(panel, k, ldp)                                                                                   \
        ROW_FMA(ROWS, 0) ROW_FMA(ROWS, 1) ROW_FMA(ROWS, 2) ROW_FMA(ROWS, 3) ROW_FMA(ROWS, 4) ROW_FMA(ROWS, 5)     \
        ROW_FMA(ROWS, 6) ROW_FMA(ROWS, 7) ROW_FMA(ROWS, 8) ROW_FMA(ROWS, 9) ROW_FMA(ROWS, 10) ROW_FMA(ROWS, 11)   \
        ROW_FMA(ROWS, 12) ROW_FMA(ROWS, 13) ROW_FMA(ROWS, 14) ROW_FMA(ROWS, 15)                                   \
    }                                                                                                             \
    ROW_STORE(ROWS, 0) ROW_STORE(ROWS, 1) ROW_STORE(ROWS, 2) ROW_STORE(ROWS, 3) ROW_STORE(ROWS, 4)                \
    ROW_STORE(ROWS, 5) ROW_STORE(ROWS, 6) ROW_STORE(ROWS, 7) ROW_STORE(ROWS, 8) ROW_STORE(ROWS, 9)                \
    ROW_STORE(ROWS, 10) ROW_STORE(ROWS, 11) ROW_STORE(ROWS, 12) ROW_STORE(ROWS, 13) ROW_STORE(ROWS, 14)           \
    ROW_STORE(ROWS, 15)                                                                                           \
}
#define F32_ROW(panel, k, ldp) prefetch_ahead(panel, k, ldp); __m512 b = _mm512_loadu_ps(panel + k * ldp);
/* a row of bf16 values (the LoRA grid's Bt in bf16), widened as it is loaded */
#define BF16_ROW(panel, k, ldp) _mm_prefetch((const char *)(panel + k * ldp + 2 * AHEAD_COLS), _MM_HINT_T0);      \
    __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(                                                               \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(panel + k * ldp))), 16));
#define DEFINE_BLOCKS(ROWS) DEFINE_BLOCK_OF(block, float, F32_ROW, ROWS)                                               \
    DEFINE_BLOCK_OF(blockb, uint16_t, BF16_ROW, ROWS)
DEFINE_BLOCKS(1) DEFINE_BLOCKS(2) DEFINE_BLOCKS(3) DEFINE_BLOCKS(4) DEFINE_BLOCKS(5) DEFINE_BLOCKS(6)
DEFINE_BLOCKS(7) DEFINE_BLOCKS(8) DEFINE_BLOCKS(9) DEFINE_BLOCKS(10) DEFINE_BLOCKS(11) DEFINE_BLOCKS(12)
DEFINE_BLOCKS(13) DEFINE_BLOCKS(14) DEFINE_BLOCKS(15) DEFINE_BLOCKS(16)

/* Large row counts: 8 rows against three panels (24 accumulators), 11 loads per 24 FMAs (12 rows against two
 * panels, tried first, takes 14 and ran 5-10% slower). */
#define TRIPLE_ROWS 8
#define TRIPLE_FMA(i) { __m512 a = _mm512_set1_ps(x[i * ldx + k]);                                                   \
    c##i##0 = _mm512_fmadd_ps(a, b0, c##i##0); c##i##1 = _mm512_fmadd_ps(a, b1, c##i##1);                          \
    c##i##2 = _mm512_fmadd_ps(a, b2, c##i##2); }
#define TRIPLE_STORE(i) { int64_t r = orows ? orows[i] : i;                                                          \
    store_row(c##i##0, out + r * ldo, bias, res ? res + r * ldr : 0, PANEL);                                         \
    store_row(c##i##1, out + r * ldo + PANEL, bias ? bias + PANEL : 0, res ? res + r * ldr + PANEL : 0, PANEL);      \
    store_row(c##i##2, out + r * ldo + 2 * PANEL, bias ? bias + 2 * PANEL : 0,                                       \
              res ? res + r * ldr + 2 * PANEL : 0, cols - 2 * PANEL); }
static void triple8(int K, const float *x, int64_t ldx, const float *panel, int64_t ldp, float *out, int64_t ldo,
                    const int64_t *orows, const float *bias, const float *res, int64_t ldr, int cols) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00, c20 = c00, c21 = c00,
           c22 = c00, c30 = c00, c31 = c00, c32 = c00, c40 = c00, c41 = c00, c42 = c00, c50 = c00, c51 = c00,
           c52 = c00, c60 = c00, c61 = c00, c62 = c00, c70 = c00, c71 = c00, c72 = c00;
    const float *panel1 = panel + (int64_t)K * PANEL, *panel2 = panel1 + (int64_t)K * PANEL;
    for (int k = 0; k < K; k++) {
        prefetch_ahead(panel, k, ldp);
        prefetch_ahead(panel1, k, ldp);
        prefetch_ahead(panel2, k, ldp);
        __m512 b0 = _mm512_loadu_ps(panel + k * ldp), b1 = _mm512_loadu_ps(panel1 + k * ldp),
               b2 = _mm512_loadu_ps(panel2 + k * ldp);
        TRIPLE_FMA(0) TRIPLE_FMA(1) TRIPLE_FMA(2) TRIPLE_FMA(3) TRIPLE_FMA(4) TRIPLE_FMA(5) TRIPLE_FMA(6) TRIPLE_FMA(7)
    }
    TRIPLE_STORE(0) TRIPLE_STORE(1) TRIPLE_STORE(2) TRIPLE_STORE(3) TRIPLE_STORE(4) TRIPLE_STORE(5) TRIPLE_STORE(6)
    TRIPLE_STORE(7)
}
#else
/* AVX2: a panel is two registers; a block is up to 6 rows of x against one panel, 12 accumulators. */
#define BLOCK_ROWS 6
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

/* One block of ROWS rows of x against one panel; accumulators are named so they stay in registers. */
#define ROW_FMA(R, i) if (R > i) { a = _mm256_broadcast_ss(x + i * ldx + k); \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0); c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1); }
#define ROW_STORE(R, i) if (R > i) { int64_t r = orows ? orows[i] : i;                                      \
    store_row(c##i##0, c##i##1, out + r * ldo, bias, res ? res + r * ldr : 0, cols); }
/* Output row i of the block is row orows[i] of out (and res), or row i when orows is NULL. Block NAME##ROWS reads
 * a panel of T values, LOAD_ROW(panel, k, ldp) loading row k of it into b0, b1 as 16 floats. */
#define DEFINE_BLOCK_OF(NAME, T, LOAD_ROW, ROWS)                                                                    \
static void NAME##ROWS(int K, const float *x, int64_t ldx, const T *panel, int64_t ldp, float *out,               \
                       int64_t ldo, const int64_t *orows, const float *bias, const float *res, int64_t ldr,       \
                       int cols) {                                                                                \
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,                     \
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, a;                                  \
    for (int k = 0; k < K; k++) {                                                                                 \
        LOAD_ROW(panel, k, ldp)                                                                                   \
        ROW_FMA(ROWS, 0) ROW_FMA(ROWS, 1) ROW_FMA(ROWS, 2) ROW_FMA(ROWS, 3) ROW_FMA(ROWS, 4) ROW_FMA(ROWS, 5)     \
    }                                                                                                             \
    ROW_STORE(ROWS, 0) ROW_STORE(ROWS, 1) ROW_STORE(ROWS, 2) ROW_STORE(ROWS, 3) ROW_STORE(ROWS, 4)                \
    ROW_STORE(ROWS, 5)                                                                                            \
}
#define F32_ROW(panel, k, ldp) prefetch_ahead(panel, k, ldp);                                                       \
    __m256 b0 = _mm256_loadu_ps(panel + k * ldp), b1 = _mm256_loadu_ps(panel + k * ldp + 8);
/* a row of bf16 values (the LoRA grid's Bt in bf16), widened as it is loaded */
#define BF16_ROW(panel, k, ldp) _mm_prefetch((const char *)(panel + k * ldp + 2 * AHEAD_COLS), _MM_HINT_T0);      \
    __m256 b0 = load_bf16x8(panel + k * ldp), b1 = load_bf16x8(panel + k * ldp + 8);
#define DEFINE_BLOCKS(ROWS) DEFINE_BLOCK_OF(block, float, F32_ROW, ROWS)                                               \
    DEFINE_BLOCK_OF(blockb, uint16_t, BF16_ROW, ROWS)
DEFINE_BLOCKS(1) DEFINE_BLOCKS(2) DEFINE_BLOCKS(3) DEFINE_BLOCKS(4) DEFINE_BLOCKS(5) DEFINE_BLOCKS(6)
#endif


typedef void (*block_fn)(int, const float *, int64_t, const float *, int64_t, float *, int64_t, const int64_t *,
                         const float *, const float *, int64_t, int);
#if BLOCK_ROWS == 16
static const block_fn BLOCKS[BLOCK_ROWS + 1] = {0, block1, block2, block3, block4, block5, block6, block7, block8,
                                                block9, block10, block11, block12, block13, block14, block15, block16};
#else
static const block_fn BLOCKS[BLOCK_ROWS + 1] = {0, block1, block2, block3, block4, block5, block6};
#endif
typedef void (*blockb_fn)(int, const float *, int64_t, const uint16_t *, int64_t, float *, int64_t, const int64_t *,
                          const float *, const float *, int64_t, int);
#if BLOCK_ROWS == 16
static const blockb_fn BLOCKS_BF16[BLOCK_ROWS + 1] = {0, blockb1, blockb2, blockb3, blockb4, blockb5, blockb6, blockb7,
                                                      blockb8, blockb9, blockb10, blockb11, blockb12, blockb13,
                                                      blockb14, blockb15, blockb16};
#else
static const blockb_fn BLOCKS_BF16[BLOCK_ROWS + 1] = {0, blockb1, blockb2, blockb3, blockb4, blockb5, blockb6};
#endif

/* Rows per block for M rows: as few blocks as BLOCK_ROWS allows, of even sizes (16 rows on AVX2: 6, 5, 5). */
static inline int block_rows(int64_t M) {
    int64_t blocks = (M + BLOCK_ROWS - 1) / BLOCK_ROWS;
    return blocks ? (int)((M + blocks - 1) / blocks) : 1;
}

static void matmul_rows(int M, int N, int K, const float *x, int64_t ldx, const float *panels, float *out,
                        int64_t ldo, const float *bias, const float *res, int64_t ldr);

/* Rows of x per pass over the panels: as many as fill about CHUNK_BYTES (a share of L2), so that a long prefill's x
 * is read from cache by every panel instead of from memory (the panels are re-read once per chunk instead). */
#define CHUNK_BYTES (512 * 1024)

/* The product, shared out among the enclosing OpenMP team (every thread calls it; no barrier at its end). */
static void matmul_team(int M, int N, int K, const float *x, int64_t ldx, const float *panels, float *out, int64_t ldo,
                        const float *bias, const float *res, int64_t ldr) {
    int chunk = CHUNK_BYTES / (4 * (K > 0 ? K : 1));
    chunk = chunk < 48 ? 48 : chunk - chunk % 24;  /* whole blocks of 8 and of 6 rows */
    for (int m = 0; m < M; m += chunk) {
        int rows = M - m < chunk ? M - m : chunk;
        if (M - m - rows > 0 && M - m - rows < 24) rows = M - m;  /* no short last chunk */
        matmul_rows(rows, N, K, x + m * ldx, ldx, panels, out + m * ldo, ldo, bias, res ? res + m * ldr : 0, ldr);
        if (rows == M - m) break;
    }
}

/* x (M, K) rows ldx apart; panels (ceil(N / 16), K, 16); out (M, N) rows ldo apart; bias (N,) or NULL; res (M, N)
 * rows ldr apart or NULL; threads: the OpenMP team's size. */
void multiplex_cpu_matmul(int M, int N, int K, const float *x, int64_t ldx, const float *panels, float *out,
                          int64_t ldo, const float *bias, const float *res, int64_t ldr, int threads) {
    #pragma omp parallel num_threads(threads)
    matmul_team(M, N, K, x, ldx, panels, out, ldo, bias, res, ldr);
}

static void matmul_rows(int M, int N, int K, const float *x, int64_t ldx, const float *panels, float *out,
                        int64_t ldo, const float *bias, const float *res, int64_t ldr) {
    int num_panels = (N + PANEL - 1) / PANEL;
#ifdef TRIPLE_ROWS
    if (M >= 3 * TRIPLE_ROWS && num_panels >= 3) {  /* many rows: three panels at a time, 8 rows per block */
        int triples = num_panels / 3;
        #pragma omp for schedule(static) nowait
        for (int q = 0; q < (num_panels + 2) / 3; q++) {
            int n0 = 3 * q * PANEL, cols = N - n0 < 3 * PANEL ? N - n0 : 3 * PANEL;
            const float *panel = panels + (int64_t)3 * q * K * PANEL;
            int m = 0;
            if (q < triples)
                for (; m + TRIPLE_ROWS <= M; m += TRIPLE_ROWS)
                    triple8(K, x + m * ldx, ldx, panel, PANEL, out + m * ldo + n0, ldo, 0, bias ? bias + n0 : 0,
                            res ? res + m * ldr + n0 : 0, ldr, cols);
            for (int pp = 0; pp < 3 && n0 + pp * PANEL < N; pp++) {  /* the rows left, or the last panels */
                int n1 = n0 + pp * PANEL, cols1 = N - n1 < PANEL ? N - n1 : PANEL;
                for (int mm = m, step = block_rows(M - m); mm < M; mm += step) {
                    int rows = M - mm < step ? M - mm : step;
                    BLOCKS[rows](K, x + mm * ldx, ldx, panel + (int64_t)pp * K * PANEL, PANEL, out + mm * ldo + n1,
                                 ldo, 0, bias ? bias + n1 : 0, res ? res + mm * ldr + n1 : 0, ldr, cols1);
                }
            }
        }
        return;
    }
#endif
    #pragma omp for schedule(static) nowait
    for (int p = 0; p < num_panels; p++) {
        int n0 = p * PANEL, cols = N - n0 < PANEL ? N - n0 : PANEL;
        const float *panel = panels + (int64_t)p * K * PANEL;
        for (int m = 0, step = block_rows(M); m < M; m += step) {
            int rows = M - m < step ? M - m : step;
            BLOCKS[rows](K, x + m * ldx, ldx, panel, PANEL, out + m * ldo + n0, ldo, 0, bias ? bias + n0 : 0,
                         res ? res + m * ldr + n0 : 0, ldr, cols);
        }
    }
}

/* ---- LoRA deltas of many adapters in one step (kernels/lowrank_padded.py's grid):
 * y[t, out_start[i] : out_start[i] + widths[i]] += (x[t] @ A_s[i R : (i + 1) R]^T) @ Bt_i,s for each token t of
 * slot s. Group g holds slot slots[g] and the token rows rows[offsets[g] : offsets[g + 1]]. A: (J = num_slices R,
 * d_in) per slot, slot_stride_a apart; Bt_i: (R, widths[i]) per slot, slot_stride_bt[i] apart (scale folded in).
 * Phase 1 (shrink): h[offsets[g] + t, j] = x[rows[.]] . A_s[j], dot products streaming each row of A once; for a
 * group of BIG_GROUP tokens or more (a prefill), the panel blocks above against A's rows packed into panels.
 * Phase 2 (expand): the panel blocks above with Bt_i read in place (panel row stride widths[i]), added into y's rows
 * (a big group: a block of its tokens across every panel of a slice at a time).
 * bf16 != 0: A and Bt hold bfloat16 values (half the bytes to stream), each widened to fp32 exactly as it is read
 * (A's rows in the dot products, a work item's columns of Bt into an fp32 copy); sums in fp32 as above. */


/* h[t * ldh] = x_t . arow for TOKENS (<= 4) tokens whose rows are xr[0..TOKENS) */
#define DOT_FMA(T, t) if (T > t) { d##t##0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(xr[t] + k), d##t##0); \
    d##t##1 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(xr[t] + k + 8), d##t##1); }
#define DOT_END(T, t, VALUE) if (T > t) { float v = hsum(_mm256_add_ps(d##t##0, d##t##1));                \
    for (int kk = k; kk < K; kk++) v += VALUE(arow[kk]) * xr[t][kk];                                       \
    h[t * ldh] = v; }
/* dots NAME##TOKENS over a row of T values, LOAD8 widening 8 of them to floats, VALUE one */
#define DEFINE_DOTS_OF(NAME, T, LOAD8, VALUE, TOKENS)                                                        \
static void NAME##TOKENS(int K, const T *arow, const float *const *xr, float *h, int64_t ldh) {             \
    __m256 d00 = _mm256_setzero_ps(), d01 = d00, d10 = d00, d11 = d00, d20 = d00, d21 = d00, d30 = d00, d31 = d00; \
    int k = 0;                                                                                               \
    for (; k + 16 <= K; k += 16) {                                                                           \
        /* rows of A lie end to end: 4 KB ahead */                                                           \
        _mm_prefetch((const char *)(arow + k) + PREFETCH * PANEL * sizeof(float), _MM_HINT_T0);             \
        __m256 a0 = LOAD8(arow + k), a1 = LOAD8(arow + k + 8);                                               \
        DOT_FMA(TOKENS, 0) DOT_FMA(TOKENS, 1) DOT_FMA(TOKENS, 2) DOT_FMA(TOKENS, 3)                          \
    }                                                                                                        \
    DOT_END(TOKENS, 0, VALUE) DOT_END(TOKENS, 1, VALUE) DOT_END(TOKENS, 2, VALUE) DOT_END(TOKENS, 3, VALUE)  \
}
#define F32_VALUE(v) (v)
/* the dots over a row of fp32 values (dots1..4) and of bf16 values (dotsb1..4, widened as loaded) */
#define DEFINE_DOTS(TOKENS) DEFINE_DOTS_OF(dots, float, _mm256_loadu_ps, F32_VALUE, TOKENS)                   \
    DEFINE_DOTS_OF(dotsb, uint16_t, load_bf16x8, bf16_to_f32, TOKENS)
DEFINE_DOTS(1) DEFINE_DOTS(2) DEFINE_DOTS(3) DEFINE_DOTS(4)
typedef void (*dots_fn)(int, const float *, const float *const *, float *, int64_t);
static const dots_fn DOTS[5] = {0, dots1, dots2, dots3, dots4};
typedef void (*dotsb_fn)(int, const uint16_t *, const float *const *, float *, int64_t);
static const dotsb_fn DOTS_BF16[5] = {0, dotsb1, dotsb2, dotsb3, dotsb4};

#define MAX_SLICES 4
#define ROWS_PER_ITEM 8  /* rows of A per phase-1 work item */
#define PANELS_PER_ITEM 4  /* Bt panels per phase-2 work item */
/* A group of at least BIG_GROUP tokens (a prefill chunk) is shrunk by the panel blocks instead of dot products: 16
 * rows of A transposed once into a panel, then BLOCK_ROWS tokens at a time against it (the dots re-read A's rows
 * for every 4 tokens; smollm2's 7 projections, 128 tokens: ~2.5x the dots' speed); work items of TOKENS_PER_ITEM
 * tokens of one panel, so that a lone group still spreads over the threads. */
#define BIG_GROUP 16
#define TOKENS_PER_ITEM 64

/* panel[k * PANEL + j] = A[j][k] for the cols rows of A at `row` (d_in values each, fp32 or bf16 widened), 0 past */
static void pack_a_panel(const void *a, int bf16, int64_t row, int d_in, int cols, float *panel) {
    for (int j = 0; j < PANEL; j++) {
        const float *f = (const float *)a + row + (int64_t)j * d_in;
        const uint16_t *b = (const uint16_t *)a + row + (int64_t)j * d_in;
        for (int k = 0; k < d_in; k++)
            panel[k * PANEL + j] = j >= cols ? 0.0f : bf16 ? bf16_to_f32(b[k]) : f[k];
    }
}

/* h[t, 16 p + c] for the tokens [t, t + n) of a group (its rows rows[0..n)), c < cols: blocks against the packed
 * panel; a block's x rows are read in place when they are consecutive rows of x, else gathered into xb. */
static void shrink_blocks(int d_in, const float *panel, int cols, const float *x, int64_t ldx, const int64_t *rows,
                          int64_t n, float *h, int64_t ldh, float *xb) {
    for (int64_t t = 0, step = block_rows(n); t < n; t += step) {
        int tn = n - t < step ? n - t : step, consecutive = 1;
        for (int i = 1; i < tn; i++) consecutive &= rows[t + i] == rows[t] + i;
        const float *xs = x + rows[t] * ldx;
        int64_t lds = ldx;
        if (!consecutive) {
            for (int i = 0; i < tn; i++)
                for (int k = 0; k < d_in; k++) xb[(int64_t)i * d_in + k] = x[rows[t + i] * ldx + k];
            xs = xb;
            lds = d_in;
        }
        BLOCKS[tn](d_in, xs, lds, panel, PANEL, h + t * ldh, ldh, 0, 0, 0, 0, cols);
    }
}

/* y[rows[t], c] += h[t] . Bt[:, c] for c in [c_start, c_end) and the n token rows of one group: Bt (R, width) of one
 * slot and slice, fp32 or bf16 (each whole bf16 panel widened in registers as it is read, a partial panel of either
 * copied zero-padded: never read past Bt); h: the group's shrink outputs for this slice, rows ldh apart. */
static void expand_panels(int R, int64_t n, const float *h, int64_t ldh, int64_t bt_addr, int bf16, int64_t width,
                          int64_t c_start, int64_t c_end, float *y, int64_t ldy, const int64_t *rows) {
    for (int64_t c0 = c_start; c0 < c_end; c0 += PANEL) {
        int cols = c_end - c0 < PANEL ? c_end - c0 : PANEL;
        float *out = y + c0;
        if (bf16 && cols == PANEL) {
            const uint16_t *panel = (const uint16_t *)(intptr_t)bt_addr + c0;
            for (int64_t t = 0, step = block_rows(n); t < n; t += step) {
                int tn = n - t < step ? n - t : step;
                BLOCKS_BF16[tn](R, h + t * ldh, ldh, panel, width, out, ldy, rows + t, 0, out, ldy, cols);
            }
            continue;
        }
        const float *panel = (const float *)(intptr_t)bt_addr + c0;  /* fp32 only */
        const uint16_t *panel16 = (const uint16_t *)(intptr_t)bt_addr + c0;  /* bf16 only */
        int64_t ldp = width;
        float tail[cols < PANEL ? R * PANEL : 1];
        if (cols < PANEL) {
            for (int r = 0; r < R; r++)
                for (int j = 0; j < PANEL; j++)
                    tail[r * PANEL + j] = j >= cols ? 0.0f : bf16 ? bf16_to_f32(panel16[r * width + j])
                                                                  : panel[r * width + j];
            panel = tail;
            ldp = PANEL;
        }
        for (int64_t t = 0, step = block_rows(n); t < n; t += step) {
            int tn = n - t < step ? n - t : step;
            BLOCKS[tn](R, h + t * ldh, ldh, panel, ldp, out, ldy, rows + t, 0, out, ldy, cols);
        }
    }
}


/* The grid, shared out among the enclosing OpenMP team (every thread calls it; a barrier between its phases and at
 * its end). */
static void grid_team(int S, const int64_t *slots, const int64_t *offsets, const int64_t *rows, const float *x,
                      int64_t ldx, int d_in, const float *a, int64_t slot_stride_a, int R, int num_slices,
                      const int64_t *bt, const int64_t *slot_stride_bt, const int64_t *widths,
                      const int64_t *out_start, float *y, int64_t ldy, float *h, int bf16) {
    int J = num_slices * R, a_items = (J + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    int64_t first_chunk[MAX_SLICES + 1];  /* phase-2 work items: (group, slice, chunk of panels), slices in a row */
    first_chunk[0] = 0;
    for (int i = 0; i < num_slices; i++) {
        int64_t panels = (widths[i] + PANEL - 1) / PANEL;
        first_chunk[i + 1] = first_chunk[i] + (panels + PANELS_PER_ITEM - 1) / PANELS_PER_ITEM;
    }
    int64_t chunks_per_group = first_chunk[num_slices], max_n = 0;
    for (int g = 0; g < S; g++)
        if (offsets[g + 1] - offsets[g] > max_n) max_n = offsets[g + 1] - offsets[g];
    int a_panels = (J + PANEL - 1) / PANEL;
    int64_t big_chunks = max_n >= BIG_GROUP ? (max_n + TOKENS_PER_ITEM - 1) / TOKENS_PER_ITEM : 0;
    {
        float *panel = 0, *xb = 0;  /* big groups: this thread's packed panel of A, gathered x rows */
        int64_t packed = -1;  /* which (group, panel) the buffer holds */
        if (big_chunks) {
            panel = malloc(sizeof(float) * PANEL * d_in);
            xb = malloc(sizeof(float) * BLOCK_ROWS * d_in);
        }
        #pragma omp for schedule(static) nowait
        for (int64_t item = 0; item < (int64_t)S * a_panels * big_chunks; item++) {
            int64_t gp = item / big_chunks, c = item % big_chunks;
            int g = gp / a_panels, p = gp % a_panels, cols = J - p * PANEL < PANEL ? J - p * PANEL : PANEL;
            int64_t t0 = offsets[g], n = offsets[g + 1] - t0, t = c * TOKENS_PER_ITEM;
            if (n < BIG_GROUP || t >= n) continue;
            if (packed != gp) {
                pack_a_panel(a, bf16, slots[g] * slot_stride_a + (int64_t)p * PANEL * d_in, d_in, cols, panel);
                packed = gp;
            }
            shrink_blocks(d_in, panel, cols, x, ldx, rows + t0 + t, n - t < TOKENS_PER_ITEM ? n - t : TOKENS_PER_ITEM,
                          h + (t0 + t) * J + p * PANEL, J, xb);
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)S * a_items; item++) {
            int g = item / a_items, j0 = (item % a_items) * ROWS_PER_ITEM;
            int64_t t0 = offsets[g], n = offsets[g + 1] - t0;
            if (n >= BIG_GROUP) continue;
            for (int64_t t = 0; t < n; t += 4) {
                int tn = n - t < 4 ? n - t : 4;
                const float *xr[4];
                for (int u = 0; u < tn; u++) xr[u] = x + rows[t0 + t + u] * ldx;
                for (int j = j0; j < j0 + ROWS_PER_ITEM && j < J; j++) {
                    int64_t at = slots[g] * slot_stride_a + (int64_t)j * d_in;
                    if (bf16)
                        DOTS_BF16[tn](d_in, (const uint16_t *)a + at, xr, h + (t0 + t) * J + j, J);
                    else
                        DOTS[tn](d_in, a + at, xr, h + (t0 + t) * J + j, J);
                }
            }
        }
        /* a big group: items of TOKENS_PER_ITEM tokens of one slice, a block of tokens across all its panels at a
         * time, so that y's rows are read and written in long runs (by panel chunks, each of a prefill's rows was
         * touched 256 bytes at a time: 3x slower) */
        #pragma omp for schedule(static) nowait
        for (int64_t item = 0; item < (int64_t)S * num_slices * big_chunks; item++) {
            int g = item / (num_slices * big_chunks), i = item / big_chunks % num_slices;
            int64_t t0 = offsets[g], n = offsets[g + 1] - t0, t = item % big_chunks * TOKENS_PER_ITEM;
            if (n < BIG_GROUP || t >= n) continue;
            int64_t end = n - t < TOKENS_PER_ITEM ? n : t + TOKENS_PER_ITEM, first = slots[g] * slot_stride_bt[i];
            for (int64_t step = block_rows(end - t); t < end; t += step)
                expand_panels(R, end - t < step ? end - t : step, h + (t0 + t) * J + i * R, J,
                              bt[i] + first * (bf16 ? 2 : 4), bf16, widths[i], 0, widths[i], y + out_start[i], ldy,
                              rows + t0 + t);
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)S * chunks_per_group; item++) {
            int g = item / chunks_per_group, q = item % chunks_per_group, i = 0;
            while (q >= first_chunk[i + 1]) i++;
            int64_t t0 = offsets[g], n = offsets[g + 1] - t0;
            if (n == 0 || n >= BIG_GROUP) continue;
            int64_t first = slots[g] * slot_stride_bt[i], c_start = (q - first_chunk[i]) * PANELS_PER_ITEM * PANEL;
            int64_t c_end = c_start + PANELS_PER_ITEM * PANEL;
            if (c_end > widths[i]) c_end = widths[i];
            expand_panels(R, n, h + t0 * J + i * R, J, bt[i] + first * (bf16 ? 2 : 4), bf16, widths[i], c_start,
                          c_end, y + out_start[i], ldy, rows + t0);
        }
        free(panel);
        free(xb);
    }
}

void multiplex_lowrank_grid(int S, const int64_t *slots, const int64_t *offsets, const int64_t *rows,
                            const float *x, int64_t ldx, int d_in, const float *a, int64_t slot_stride_a, int R,
                            int num_slices, const int64_t *bt, const int64_t *slot_stride_bt, const int64_t *widths,
                            const int64_t *out_start, float *y, int64_t ldy, float *h, int bf16, int threads) {
    #pragma omp parallel num_threads(threads)
    grid_team(S, slots, offsets, rows, x, ldx, d_in, a, slot_stride_a, R, num_slices, bt, slot_stride_bt, widths,
              out_start, y, ldy, h, bf16);
}

/* out = x @ W^T (+ bias) (+ residual), then the LoRA grid's deltas of the same x added into out (y = out): the two
 * above in one parallel region, with no return to Python between them (whose first steps after a projection's
 * weights streamed through the caches run cold: ~10 us of a decode step's every op), a thread done with its share of
 * the product going on to the grid's shrink (which reads x only; the barrier after it precedes every add into out). */
void multiplex_matmul_lowrank(int M, int N, int K, const float *x, int64_t ldx, const float *panels, float *out,
                              int64_t ldo, const float *bias, const float *res, int64_t ldr, int threads, int S,
                              const int64_t *slots, const int64_t *offsets, const int64_t *rows, int d_in,
                              const float *a, int64_t slot_stride_a, int R, int num_slices, const int64_t *bt,
                              const int64_t *slot_stride_bt, const int64_t *widths, const int64_t *out_start, float *h,
                              int bf16) {
    #pragma omp parallel num_threads(threads)
    {
        matmul_team(M, N, K, x, ldx, panels, out, ldo, bias, res, ldr);
        grid_team(S, slots, offsets, rows, x, ldx, d_in, a, slot_stride_a, R, num_slices, bt, slot_stride_bt, widths,
                  out_start, out, ldo, h, bf16);
    }
}
