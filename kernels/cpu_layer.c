/* A Llama-family decoder layer of a CPU decode step in one call (fp32; AVX2 and FMA, or AVX-512 for the projections'
 * register blocks): the ops server/model/llama.py runs one by one, in one OpenMP parallel region of the calling
 * thread's team, each a team share followed by a barrier:
 *     h = rms_norm(x, input_norm)                               the rows split over the team
 *     qkv = h @ W_qkv^T (+ bias) (+ the LoRA grid's deltas)       the panels split (kernels/cpu_matmul.c)
 *     rotate q and k (RoPE), write k and v into the paged cache   by rows
 *     attn = decode attention of every row over its cache keys    (sequence, KV head) items (cpu_attention.c)
 *     x += attn @ W_o^T (+ deltas)                                in place: each output reads its residual first
 *     h = rms_norm(x, post_norm)
 *     gu = h @ W_gu^T (+ deltas);  act = silu(gate) * up
 *     x += act @ W_down^T (+ deltas)
 * The same functions as those ops' own calls (this file includes their sources), so the same sums in the same order:
 * what it saves is the ~10 Python ops between them a layer, each of which ran on caches the projection's weights had
 * just evicted. multiplex_decode_layer runs it all for a step whose every row is a decode; a step with prefill rows
 * runs multiplex_layer_front (up to the decode rows' attention), the prefills' attention in PyTorch, then
 * multiplex_layer_back (from o on). Adapters of LowRank kind only (the grid); kernels/cpu_layer.py binds it,
 * server/model/fused_layers.py decides when.
 * Built on demand by kernels/cpu_layer.py (the flags of kernels/cpu_matmul.c's native variant).
 */
#include <string.h>

#include "cpu_attention.c"
#include "cpu_elementwise.c"
#include "cpu_matmul.c"

#define MAX_WINDOWS 4  /* distinct attention windows among the layers (0 = full attention) a step's plan holds */

typedef struct {  /* the model's shapes (kernels/cpu_layer.py's Shapes) */
    int64_t hidden, q_size, kv_size, intermediate, num_heads, num_kv_heads, head_dim;
    float eps, sm_scale;
} layer_shapes;

typedef struct {  /* one layer's weights, the matrices as packed panels, and its KV cache (LayerRefs) */
    const float *input_norm, *qkv, *qkv_bias, *o, *post_norm, *gate_up, *down;
    float *k_cache, *v_cache;  /* (rows, kv_size) */
    int64_t window;  /* which of the step's key layouts (its attention window's) */
} layer_weights;

typedef struct {  /* a step's rows, shared by every layer, and its buffers (StepRefs) */
    int64_t T;  /* rows */
    float *x;  /* (T, hidden): the residual stream, updated in place */
    const float *cos, *sin_signed;  /* (T, head_dim) rotary tables */
    int64_t num_writes;
    const int64_t *write_slots, *write_rows;  /* row write_rows[i] (i when NULL) to cache row write_slots[i] */
    int64_t num_decodes;
    const int64_t *decode_rows;  /* the decode sequences' rows (NULL: rows 0 .. num_decodes - 1) */
    const int64_t *keys[MAX_WINDOWS], *visible[MAX_WINDOWS];  /* kernels/attention_plan.py's, per window */
    int64_t span[MAX_WINDOWS];  /* S: keys per (sequence, KV head) */
    int64_t num_groups;
    const int64_t *slots, *offsets, *rows;  /* the LoRA grid's groups (kernels/cpu_matmul.c) */
    float *h, *qkv, *attn, *gu, *act;  /* (T, hidden), (T, q + 2 kv), (T, q), (T, 2 I), (T, I) */
    float *grid_h, *scores;  /* the grid's shrink outputs (T, widest J), attention scratch (items rep max S) */
    int64_t threads;
} layer_step;

/* out = x @ W^T (+ bias) (+ res), then the grid's deltas when it has some, by the team; a barrier at its end */
static void project(int M, int N, int K, const float *x, const float *panels, float *out, const float *bias,
                    const float *res, const grid_args *ga) {
    matmul_team(M, N, K, x, K, panels, out, N, bias, res, N);
    if (ga) {
        grid_shrink(ga);
        grid_expand(ga);
    } else {
        #pragma omp barrier
    }
}

/* the grid's arguments for one projection, or NULL where it has no deltas */
static const grid_args *grid_for(const layer_step *st, const grid_factors *f, const float *x, int64_t ldx, float *y,
                                 int64_t ldy, grid_args *store) {
    if (!f) return 0;
    *store = grid_of((int)st->num_groups, st->slots, st->offsets, st->rows, x, ldx, f, y, ldy, st->grid_h);
    return store;
}

/* RoPE on row t's q and k heads */
static void rotate(const layer_shapes *s, const layer_step *st, int64_t t) {
    int64_t D = s->head_dim;
    float *row = st->qkv + t * (s->q_size + 2 * s->kv_size);
    for (int64_t head = 0; head < s->num_heads + s->num_kv_heads; head++)
        rope_head(D / 2, row + head * D, st->cos + t * D, st->sin_signed + t * D);
}

/* write i: its row's k and v into the cache */
static void write_kv_row(const layer_shapes *s, const layer_weights *w, const layer_step *st, int64_t i) {
    const float *row = st->qkv + (st->write_rows ? st->write_rows[i] : i) * (s->q_size + 2 * s->kv_size);
    int64_t slot = st->write_slots[i];
    memcpy(w->k_cache + slot * s->kv_size, row + s->q_size, sizeof(float) * s->kv_size);
    memcpy(w->v_cache + slot * s->kv_size, row + s->q_size + s->kv_size, sizeof(float) * s->kv_size);
}

/* The team's shares up to attention: x -> h -> qkv (+ grid), rotated, written into the cache, then the decode rows'
 * attention into their rows of attn (the other rows' attention is the caller's) */
static void layer_front(const layer_shapes *s, const layer_weights *w, const layer_step *st, const grid_args *qkv_g) {
    int T = (int)st->T, H = (int)s->hidden, qkv_n = (int)(s->q_size + 2 * s->kv_size), D = (int)s->head_dim;
    int Hkv = (int)s->num_kv_heads, rep = (int)(s->num_heads / s->num_kv_heads);
    int64_t win = w->window, S = st->span[win];
    #pragma omp for schedule(static)
    for (int t = 0; t < T; t++) rms_norm_row(H, st->x + (int64_t)t * H, w->input_norm, s->eps, st->h + (int64_t)t * H);
    project(T, qkv_n, H, st->h, w->qkv, st->qkv, w->qkv_bias, 0, qkv_g);
    #pragma omp for schedule(static)
    for (int t = 0; t < T; t++) rotate(s, st, t);
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < st->num_writes; i++) write_kv_row(s, w, st, i);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < st->num_decodes * Hkv; item++)
        decode_item(item, Hkv, rep, D, S, st->qkv, qkv_n, D, st->decode_rows, w->k_cache, w->v_cache,
                    st->keys[win], st->visible[win], s->sm_scale, st->decode_rows, st->attn, st->scores);
}

/* The team's shares from attention's output on: x += attn W_o^T (+ grid), h, gate|up (+ grid), act, x += down */
static void layer_back(const layer_shapes *s, const layer_weights *w, const layer_step *st, const grid_args *o_g,
                       const grid_args *gu_g, const grid_args *down_g) {
    int T = (int)st->T, H = (int)s->hidden, Q = (int)s->q_size, I = (int)s->intermediate;
    float *x = st->x, *h = st->h;
    project(T, H, Q, st->attn, w->o, x, 0, x, o_g);
    #pragma omp for schedule(static)
    for (int t = 0; t < T; t++) rms_norm_row(H, x + (int64_t)t * H, w->post_norm, s->eps, h + (int64_t)t * H);
    project(T, 2 * I, H, h, w->gate_up, st->gu, 0, 0, gu_g);
    #pragma omp for schedule(static)
    for (int t = 0; t < T; t++) silu_mul_row(I, st->gu + (int64_t)t * 2 * I, st->act + (int64_t)t * I);
    project(T, H, I, st->act, w->down, x, 0, x, down_g);
}

/* the four projections' grid arguments (NULL where a projection has no deltas) */
typedef struct {
    grid_args store[4];
    const grid_args *qkv, *o, *gu, *down;
} layer_grids;

static void grids_of(const layer_shapes *s, const layer_step *st, const grid_factors *qkv_f, const grid_factors *o_f,
                     const grid_factors *gu_f, const grid_factors *down_f, layer_grids *g) {
    int64_t H = s->hidden, Q = s->q_size, I = s->intermediate, qkv_n = s->q_size + 2 * s->kv_size;
    g->qkv = grid_for(st, qkv_f, st->h, H, st->qkv, qkv_n, &g->store[0]);
    g->o = grid_for(st, o_f, st->attn, Q, st->x, H, &g->store[1]);
    g->gu = grid_for(st, gu_f, st->h, H, st->gu, 2 * I, &g->store[2]);
    g->down = grid_for(st, down_f, st->act, I, st->x, H, &g->store[3]);
}

/* the whole layer, for a step whose every row is a decode */
void multiplex_decode_layer(const layer_shapes *s, const layer_weights *w, const layer_step *st,
                            const grid_factors *qkv_f, const grid_factors *o_f, const grid_factors *gu_f,
                            const grid_factors *down_f) {
    layer_grids g;
    grids_of(s, st, qkv_f, o_f, gu_f, down_f, &g);
    #pragma omp parallel num_threads((int)st->threads)
    {
        layer_front(s, w, st, g.qkv);
        layer_back(s, w, st, g.o, g.gu, g.down);
    }
}

/* up to attention (the decode rows' included): a step with prefill rows, whose attention the caller runs next */
void multiplex_layer_front(const layer_shapes *s, const layer_weights *w, const layer_step *st,
                           const grid_factors *qkv_f) {
    layer_grids g;
    grids_of(s, st, qkv_f, 0, 0, 0, &g);
    #pragma omp parallel num_threads((int)st->threads)
    layer_front(s, w, st, g.qkv);
}

/* from attention's output on */
void multiplex_layer_back(const layer_shapes *s, const layer_weights *w, const layer_step *st,
                          const grid_factors *o_f, const grid_factors *gu_f, const grid_factors *down_f) {
    layer_grids g;
    grids_of(s, st, 0, o_f, gu_f, down_f, &g);
    #pragma omp parallel num_threads((int)st->threads)
    layer_back(s, w, st, g.o, g.gu, g.down);
}
