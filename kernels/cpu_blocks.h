/* The register blocks of kernels/cpu_matmul.c: a block of rows of x against one panel of 16 output columns, read
 * k-major (fp32, or bf16 widened as loaded), in AVX2 or (built with -mavx512f) AVX-512 registers; BLOCKS[rows] and
 * BLOCKS_BF16[rows] pick one by its row count. Included by kernels/cpu_matmul.c only (kernels/cpu_build.py hashes it
 * with the source). */
#ifndef MULTIPLEX_CPU_BLOCKS_H
#define MULTIPLEX_CPU_BLOCKS_H
#include <stdint.h>

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
#endif
