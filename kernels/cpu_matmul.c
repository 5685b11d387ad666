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

#include "cpu_blocks.h"
#include "cpu_vector.h"

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


/* A (layer, group)'s padded factor stacks, as kernels/cpu_matmul.py's GridFactors makes them once (a ctypes
 * Structure of these fields): A (J = num_slices R, d_in) per slot, slot_stride_a apart; Bt_i (R, widths[i]) per slot
 * at address bt[i], slot_stride_bt[i] apart, added into columns out_start[i]...; bf16: both in bfloat16. */
typedef struct {
    int64_t d_in;
    const void *a;
    int64_t slot_stride_a, R, num_slices;
    int64_t bt[MAX_SLICES], slot_stride_bt[MAX_SLICES], widths[MAX_SLICES], out_start[MAX_SLICES];
    int64_t bf16;
} grid_factors;

/* The grid's arguments (a call's groups, x, y and h, and its factors) and the sizes of its work items, made once a
 * call. */
typedef struct {
    int S;
    const int64_t *slots, *offsets, *rows;
    const float *x;
    int64_t ldx;
    int d_in;
    const float *a;
    int64_t slot_stride_a;
    int R, num_slices;
    const int64_t *bt, *slot_stride_bt, *widths, *out_start;
    float *y;
    int64_t ldy;
    float *h;
    int bf16;
    int J, a_items, a_panels;  /* A's rows per slot; phase-1 items of ROWS_PER_ITEM rows, panels of them */
    int64_t first_chunk[MAX_SLICES + 1];  /* phase-2 items: (group, slice, chunk of panels), slices in a row */
    int64_t chunks_per_group, big_chunks;  /* big groups' items: TOKENS_PER_ITEM tokens of one panel or slice */
} grid_args;

static grid_args grid_of(int S, const int64_t *slots, const int64_t *offsets, const int64_t *rows, const float *x,
                         int64_t ldx, const grid_factors *f, float *y, int64_t ldy, float *h) {
    grid_args g = {S, slots, offsets, rows, x, ldx, (int)f->d_in, (const float *)f->a, f->slot_stride_a, (int)f->R,
                   (int)f->num_slices, f->bt, f->slot_stride_bt, f->widths, f->out_start, y, ldy, h, (int)f->bf16};
    int num_slices = g.num_slices;
    g.J = num_slices * g.R;
    g.a_items = (g.J + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    g.a_panels = (g.J + PANEL - 1) / PANEL;
    g.first_chunk[0] = 0;
    for (int i = 0; i < num_slices; i++) {
        int64_t panels = (g.widths[i] + PANEL - 1) / PANEL;
        g.first_chunk[i + 1] = g.first_chunk[i] + (panels + PANELS_PER_ITEM - 1) / PANELS_PER_ITEM;
    }
    g.chunks_per_group = g.first_chunk[num_slices];
    int64_t max_n = 0;
    for (int k = 0; k < S; k++)
        if (offsets[k + 1] - offsets[k] > max_n) max_n = offsets[k + 1] - offsets[k];
    g.big_chunks = max_n >= BIG_GROUP ? (max_n + TOKENS_PER_ITEM - 1) / TOKENS_PER_ITEM : 0;
    return g;
}

/* Phase 1, the team's shares (a barrier at its end): h = the shrink of every group's tokens. */
static void grid_shrink(const grid_args *ga) {
    /* the arguments as locals, kept in registers by the loops below */
    const int64_t *slots = ga->slots, *offsets = ga->offsets, *rows = ga->rows, big_chunks = ga->big_chunks;
    const float *x = ga->x, *a = ga->a;
    float *h = ga->h;
    int64_t ldx = ga->ldx, slot_stride_a = ga->slot_stride_a;
    int S = ga->S, a_items = ga->a_items, a_panels = ga->a_panels, bf16 = ga->bf16;
    int J = ga->J, d_in = ga->d_in;
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
            pack_a_panel(a, bf16, slots[g] * slot_stride_a + (int64_t)p * PANEL * d_in, d_in, cols,
                         panel);
            packed = gp;
        }
        shrink_blocks(d_in, panel, cols, x, ldx, rows + t0 + t,
                      n - t < TOKENS_PER_ITEM ? n - t : TOKENS_PER_ITEM, h + (t0 + t) * J + p * PANEL, J, xb);
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
    free(panel);
    free(xb);
}

/* Phase 2, the team's shares (a barrier at its end): y's rows += h's products with the Bt panels. */
static void grid_expand(const grid_args *ga) {
    /* the arguments as locals, kept in registers by the loops below */
    const int64_t *slots = ga->slots, *offsets = ga->offsets, *rows = ga->rows, *bt = ga->bt, *widths = ga->widths;
    const int64_t *slot_stride_bt = ga->slot_stride_bt, *out_start = ga->out_start, *first_chunk = ga->first_chunk;
    int64_t big_chunks = ga->big_chunks, chunks_per_group = ga->chunks_per_group, ldy = ga->ldy;
    const float *h = ga->h;
    float *y = ga->y;
    int S = ga->S, num_slices = ga->num_slices, bf16 = ga->bf16;
    int J = ga->J, R = ga->R, bytes = bf16 ? 2 : 4;
    /* a big group: items of TOKENS_PER_ITEM tokens of one slice, a block of tokens across all its panels at a time,
     * so that y's rows are read and written in long runs (by panel chunks, each of a prefill's rows was touched 256
     * bytes at a time: 3x slower) */
    #pragma omp for schedule(static) nowait
    for (int64_t item = 0; item < (int64_t)S * num_slices * big_chunks; item++) {
        int g = item / (num_slices * big_chunks), i = item / big_chunks % num_slices;
        int64_t t0 = offsets[g], n = offsets[g + 1] - t0, t = item % big_chunks * TOKENS_PER_ITEM;
        if (n < BIG_GROUP || t >= n) continue;
        int64_t end = n - t < TOKENS_PER_ITEM ? n : t + TOKENS_PER_ITEM, first = slots[g] * slot_stride_bt[i];
        for (int64_t step = block_rows(end - t); t < end; t += step)
            expand_panels(R, end - t < step ? end - t : step, h + (t0 + t) * J + i * R, J,
                          bt[i] + first * bytes, bf16, widths[i], 0, widths[i],
                          y + out_start[i], ldy, rows + t0 + t);
    }
    #pragma omp for schedule(static)
    for (int64_t item = 0; item < (int64_t)S * chunks_per_group; item++) {
        int g = item / chunks_per_group, q = item % chunks_per_group, i = 0;
        while (q >= first_chunk[i + 1]) i++;
        int64_t t0 = offsets[g], n = offsets[g + 1] - t0;
        if (n == 0 || n >= BIG_GROUP) continue;
        int64_t first = slots[g] * slot_stride_bt[i];
        int64_t c_start = (q - first_chunk[i]) * PANELS_PER_ITEM * PANEL, c_end = c_start + PANELS_PER_ITEM * PANEL;
        if (c_end > widths[i]) c_end = widths[i];
        expand_panels(R, n, h + t0 * J + i * R, J, bt[i] + first * bytes, bf16, widths[i], c_start,
                      c_end, y + out_start[i], ldy, rows + t0);
    }
}

void multiplex_lowrank_grid(int S, const int64_t *slots, const int64_t *offsets, const int64_t *rows,
                            const float *x, int64_t ldx, const grid_factors *f, float *y, int64_t ldy, float *h,
                            int threads) {
    grid_args ga = grid_of(S, slots, offsets, rows, x, ldx, f, y, ldy, h);
    #pragma omp parallel num_threads(threads)
    {
        grid_shrink(&ga);
        grid_expand(&ga);
    }
}

/* out = x @ W^T (+ bias) (+ residual), then the LoRA grid's deltas of the same x added into out (y = out): the two
 * above in one parallel region, with no return to Python between them (whose first steps after a projection's
 * weights streamed through the caches run cold: ~10 us of a decode step's every op), a thread done with its share of
 * the product going on to the grid's shrink (which reads x only; the barrier after it precedes every add into out). */
void multiplex_matmul_lowrank(int M, int N, int K, const float *x, int64_t ldx, const float *panels, float *out,
                              int64_t ldo, const float *bias, const float *res, int64_t ldr, int threads, int S,
                              const int64_t *slots, const int64_t *offsets, const int64_t *rows,
                              const grid_factors *f, float *h) {
    grid_args ga = grid_of(S, slots, offsets, rows, x, ldx, f, out, ldo, h);
    #pragma omp parallel num_threads(threads)
    {
        matmul_team(M, N, K, x, ldx, panels, out, ldo, bias, res, ldr);
        grid_shrink(&ga);
        grid_expand(&ga);
    }
}
