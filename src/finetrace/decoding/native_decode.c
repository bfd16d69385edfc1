/* One forward of B rows through a Llama decoder (q new tokens each: a decode step or a prefill chunk):
 * fp16 weights, fp32 compute, in one call.
 *
 * Built and loaded by native.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp); see its docstring for why.
 * The arithmetic is lean.py's, step for step, for each row b:
 *
 *   x = E16[token_b]
 *   per layer:  h = rms_norm(x) w_in
 *               qkv = h Wqkv16^T + b + s_b (h A_b^T) B_b     (the row's own adapter, per projection)
 *               rope on the q and k heads; k and v written to column t of row b's slabs
 *               x += attention(q, K_b[0..t], V_b[0..t], mask_b) Wo16^T (+ LoRA)
 *               h = rms_norm(x) w_post
 *               gu = h Wgu16^T (+ LoRA);  x += (silu(g) * u) Wd16^T (+ LoRA)
 *   logits_b = rms_norm(x of row b's last token) w_final  W_head16^T
 *
 * Weights, LoRA matrices included, are fp16 (IEEE half, widened exactly with F16C), everything else fp32. Every output of a row
 * is summed in the same order whatever the batch (one 8-lane accumulator per output along the input,
 * then the lanes, then the tail), so a row's answer does not depend on the rows decoded with it nor on
 * which adapters they use. Against the torch path only the order of fp32 sums differs. Where the CPU
 * has AVX-512, a batch of up to 64 rows runs against each weight panel in tiles of up to 16 (one 16-lane
 * register a row; ft_wide), else in tiles of up to 6 (two 8-lane registers a row): the same sums, the
 * same bits. In such a batch the first tile prefetches the next panel into L2 while it computes, so that
 * the weight read from memory overlaps the arithmetic (measured: a batch-16 step's GEMMs on SmolLM2,
 * 1 thread, 77 -> 52 ms). Weight GEMMs,
 * attention and the LoRA terms are split between `threads` OpenMP threads (the runtime torch itself
 * uses: the same libgomp.so.1 is loaded once per process).
 */
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_gemm.h" /* h8, the weight GEMMs (gemm16) */

/* one projection's LoRA inside its group: output columns [c0, c0 + n), rank r, the adapters' stacks in
 * fp16 (lora.GatheredLoRA: slot s has A = a + s * sa (r, in), B = bm + s * sb (r, n), scale[s]; slot 0
 * is the base: no term) */
typedef struct {
    int64_t c0, n, r;
    const uint16_t *a, *bm;
    const float *scale;
    int64_t sa, sb;
} Seg;

#define SEGS 3 /* LoRA terms per projection group at most (q, k and v) */

typedef struct {
    const uint16_t *w[4]; /* qkv (Nqkv, d), o (d, H hd), gate_up (2 I, d), down (d, I): fp16 panels */
    const float *b[4];    /* biases or NULL */
    Seg lora[4][SEGS];    /* r = 0: none */
    const float *norm_in, *norm_post;
    float *k, *v;  /* row 0 of the layer's slabs: (rows, kv_heads, T, head_dim) */
    int64_t T;     /* the slabs' time capacity */
    double eps_in, eps_post;
} Layer;

typedef struct {
    int64_t n_layers, d, heads, kv_heads, head_dim, inter, vocab;
    int64_t rows, q, t;     /* rows; new tokens per row (1: a decode step, more: prefill); columns held before */
    int64_t threads;
    double scale, eps_final;
    const int64_t *tokens;  /* (rows, q) */
    const int64_t *slots;   /* (rows): each row's adapter slot, or NULL (every row on the base) */
    const float *cos, *sin; /* (rows, q, head_dim) for each token's position */
    const int64_t *mask;    /* (rows, t + q): 0 = not attended (new token i also sees columns < t + i + 1 only) */
    const uint16_t *embed;  /* (vocab, d) fp16 */
    const uint16_t *head;   /* (vocab, d) fp16 panels */
    const float *head_bias; /* or NULL */
    const float *norm_final;
    float *logits;          /* (rows, vocab): each row's last token; with keep, (rows, q, vocab): every token */
    const uint8_t *keep;    /* or NULL; (rows, q, t + q): token i of row b attends column j iff keep[b][i][j]
                             * (label scoring's labels side by side), in place of mask + causal */
} Step;

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* e^x for eight floats (Cephes' expf: range reduction by ln 2 in two parts, a degree-5 polynomial,
 * 2^n put into the exponent). The SiLU gate and the softmax called libm's expf one value at a time:
 * about 10% of a prompt pass. Below -87.33 (where expf's result is subnormal) the answer is 0, so no
 * subnormal reaches the attention's weighted sum, which skips zero weights. Element-wise, so a row's
 * bits still do not depend on its batch. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
    __m256 normal = _mm256_cmp_ps(x, lo, _CMP_GE_OQ); /* false for NaN and below lo */
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), lo);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(n)), normal);
}

/* act = silu(g) * u over n values (n % 8 == 0 in Llama shapes; a tail takes the same exp8) */
static void silu_mul(const float *g, const float *u, float *act, int64_t n) {
    int64_t i = 0;
    for (; i < n; i += 8) {
        __m256 gv, uv;
        if (i + 8 <= n) {
            gv = _mm256_loadu_ps(g + i);
            uv = _mm256_loadu_ps(u + i);
        } else {
            float gt[8] = {0}, ut[8] = {0};
            memcpy(gt, g + i, sizeof(float) * (n - i));
            memcpy(ut, u + i, sizeof(float) * (n - i));
            gv = _mm256_loadu_ps(gt);
            uv = _mm256_loadu_ps(ut);
        }
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        __m256 a = _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)), uv);
        if (i + 8 <= n) {
            _mm256_storeu_ps(act + i, a);
        } else {
            float at[8];
            _mm256_storeu_ps(at, a);
            memcpy(act + i, at, sizeof(float) * (n - i));
        }
    }
}


static float dot32(const float *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

#define MAX_RANK 256

/* two ranges of memory to fetch into L2 a line at a time, the first then the second, while other work
 * runs (the next LoRA term's A and B; the next key/value head's keys and values): a burst of prefetches
 * would stall on the line fill buffers instead */
typedef struct {
    const char *p[2], *end[2];
} Cursor;

static inline void fetch_one(Cursor *c) {
    int k = c->p[0] < c->end[0] ? 0 : 1;
    if (c->p[k] < c->end[k]) {
        _mm_prefetch(c->p[k], _MM_HINT_T1);
        c->p[k] += 64;
    }
}

/* y += scale_b (A_b x) B_b for each LoRA term, for nb <= LORA_TOKENS tokens on one adapter slot (a
 * prompt's tokens; a decode step's row alone), A and B fp16 as the base weights. Each token's numbers
 * are computed as alone: t_j = dot32's sum of A_j x (two 8-lane sums along the input, then the lanes,
 * then the tail), y_o = fma(t_j, B[j][o], y_o) for j in order; the tokens only share the reads of A and
 * B (prefill: 4 tokens a pass, 4x the independent sums). While one term runs, the next term's matrices
 * (after the last, the next slot's first) are fetched a line every few instructions: with 16 rows on 16
 * adapters each row reads its own (5 MB a step on SmolLM2, r = 8), which no other row shares (measured:
 * 5.8 -> 5.2 ms a step against a burst of prefetches, 9.0 in fp32). */
#define LORA_TOKENS 4
static inline __attribute__((always_inline)) void lora_tokens(const Seg *seg, int64_t slot, const float *x, float *y,
                                                              int64_t in, int64_t ys, int64_t next, int nb) {
    float t[LORA_TOKENS][MAX_RANK];
    for (int q = 0; q < SEGS && seg[q].r > 0; q++) {
        const Seg *e = &seg[q];
        const uint16_t *a = e->a + slot * e->sa, *bm = e->bm + slot * e->sb;
        int64_t rank = e->r < MAX_RANK ? e->r : MAX_RANK;
        const Seg *f = q + 1 < SEGS && seg[q + 1].r > 0 ? &seg[q + 1] : (next > 0 ? seg : NULL);
        Cursor c = {{NULL, NULL}, {NULL, NULL}};
        if (f) {
            const uint16_t *fa = f->a + (f == seg ? next : slot) * f->sa, *fb = f->bm + (f == seg ? next : slot) * f->sb;
            c = (Cursor){{(const char *)fa, (const char *)fb}, {(const char *)(fa + f->r * in), (const char *)(fb + f->r * f->n)}};
        }
        float scale = e->scale[slot];
        for (int64_t j = 0; j < rank; j++) {
            const uint16_t *w = a + j * in;
            __m256 a0[LORA_TOKENS], a1[LORA_TOKENS];
            for (int k = 0; k < nb; k++) a0[k] = a1[k] = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 16 <= in; i += 16) {
                fetch_one(&c);
                __m256 w0 = h8(w + i), w1 = h8(w + i + 8);
                for (int k = 0; k < nb; k++) {
                    a0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k * in + i), a0[k]);
                    a1[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k * in + i + 8), a1[k]);
                }
            }
            for (int k = 0; k < nb; k++) {
                float sum = hsum(_mm256_add_ps(a0[k], a1[k]));
                for (int64_t i2 = i; i2 < in; i2++) sum += _cvtsh_ss(w[i2]) * x[k * in + i2];
                t[k][j] = sum * scale;
            }
        }
        int64_t n = e->n, n8 = n - n % 8;
        for (int64_t j = 0; j < rank; j++) {
            const uint16_t *bj = bm + j * n;
            __m256 tj[LORA_TOKENS];
            for (int k = 0; k < nb; k++) tj[k] = _mm256_set1_ps(t[k][j]);
            for (int64_t o = 0; o < n8; o += 8) {
                fetch_one(&c);
                __m256 wv = h8(bj + o);
                for (int k = 0; k < nb; k++) {
                    float *yo = y + k * ys + e->c0 + o;
                    _mm256_storeu_ps(yo, _mm256_fmadd_ps(tj[k], wv, _mm256_loadu_ps(yo)));
                }
            }
            for (int64_t o = n8; o < n; o++)
                for (int k = 0; k < nb; k++) {
                    float *yo = y + k * ys + e->c0 + o;
                    *yo = fmaf(t[k][j], _cvtsh_ss(bj[o]), *yo);
                }
        }
    }
}

/* lora_tokens with nb a constant, each its own unrolled loop */
static void lora_run(const Seg *seg, int64_t slot, const float *x, float *y, int64_t in, int64_t ys, int64_t next,
                     int64_t nb) {
    switch (nb) {
        case 4: lora_tokens(seg, slot, x, y, in, ys, next, 4); break;
        case 3: lora_tokens(seg, slot, x, y, in, ys, next, 3); break;
        case 2: lora_tokens(seg, slot, x, y, in, ys, next, 2); break;
        default: lora_tokens(seg, slot, x, y, in, ys, next, 1); break;
    }
}

/* one projection group for every row: Y = X W16^T + b + each row's own LoRA terms, a thread taking a
 * fixed share of the tokens, in runs of up to LORA_TOKENS on one slot */
static void project(const Step *s, const Layer *L, int g, const float *X, float *Y, int64_t out, int64_t in) {
    int64_t M = s->rows * s->q;
    gemm16(L->w[g], X, M, L->b[g], Y, out, in, s->threads);
    const Seg *seg = L->lora[g];
    if (seg[0].r <= 0 || !s->slots) return;
#pragma omp parallel num_threads(s->threads) if (s->threads > 1 && M > 1)
    {
        int64_t nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads(), t = omp_get_thread_num();
#endif
        for (int64_t r = M * t / nt, hi = M * (t + 1) / nt; r < hi;) {
            int64_t slot = s->slots[r / s->q], nb = 1;
            while (nb < LORA_TOKENS && r + nb < hi && s->slots[(r + nb) / s->q] == slot) nb++;
            int64_t next = r + nb < M ? s->slots[(r + nb) / s->q] : 0;
            if (slot > 0) lora_run(seg, slot, X + r * in, Y + r * out, in, out, next == slot ? 0 : next, nb);
            r += nb;
        }
    }
}

static void rms_norm(const float *x, const float *w, double eps, float *y, int64_t d) {
    double ss = 0.0;
    for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / d + eps));
    for (int64_t i = 0; i < d; i++) y[i] = w[i] * (x[i] * inv);
}

/* rotate one head in place: x cos + rotate_half(x) sin */
static void rope(float *x, const float *cos, const float *sin, int64_t hd) {
    int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* attention of every new token's query heads over its row's cache columns [0, t + i] (token i of q) */
static void attend(const Step *s, const Layer *L, const float *QKV, int64_t nqkv, float *out, float *scores) {
    int64_t H = s->heads, KV = s->kv_heads, hd = s->head_dim, g = H / KV, M = s->rows * s->q;
    int64_t cols = s->t + s->q, row_stride = KV * L->T * hd;
#pragma omp parallel for schedule(static) num_threads(s->threads) if (s->threads > 1 && M * H > 1)
    for (int64_t task = 0; task < M * H; task++) {
        int64_t m = task / H, h = task % H, r = m / s->q, n = s->t + m % s->q + 1;
        const float *qh = QKV + m * nqkv + h * hd;
        const float *K = L->k + r * row_stride + (h / g) * L->T * hd;
        const float *V = L->v + r * row_stride + (h / g) * L->T * hd;
        const int64_t *mask = s->mask + r * cols;
        const uint8_t *keep = s->keep ? s->keep + m * cols : NULL;
        if (keep) n = cols;
        float *sc = scores + task * cols;
        Cursor c = {{NULL, NULL}, {NULL, NULL}}; /* this head's share of the next key/value head's columns */
        int64_t nxt = m * H + (h / g + 1) * g; /* the first task of the next key/value head */
        if (nxt < M * H) {
            int64_t m2 = nxt / H, r2 = m2 / s->q, kv2 = (nxt % H) / g, n2 = keep ? cols : s->t + m2 % s->q + 1;
            const char *K2 = (const char *)(L->k + r2 * row_stride + kv2 * L->T * hd);
            const char *V2 = (const char *)(L->v + r2 * row_stride + kv2 * L->T * hd);
            int64_t bytes = n2 * hd * 4, lo = bytes * (h % g) / g, hi = bytes * (h % g + 1) / g;
            c = (Cursor){{K2 + lo, V2 + lo}, {K2 + hi, V2 + hi}};
        }
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            fetch_one(&c);
            fetch_one(&c);
            if (keep ? !keep[j] : !mask[j]) {
                sc[j] = -INFINITY;
                continue;
            }
            sc[j] = dot32(K + j * hd, qh, hd) * (float)s->scale;
            if (sc[j] > mx) mx = sc[j];
        }
        float sum = 0.f;
        for (int64_t j0 = 0; j0 < n; j0 += 8) { /* e^(s - max) eight at a time (masked columns: 0) */
            float e[8], v[8];
            int64_t k = n - j0 < 8 ? n - j0 : 8;
            for (int64_t i = 0; i < 8; i++) v[i] = i < k ? sc[j0 + i] : -INFINITY;
            __m256 x = _mm256_loadu_ps(v);
            __m256 ex = _mm256_and_ps(exp8(_mm256_sub_ps(x, _mm256_set1_ps(mx))),
                                      _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
            _mm256_storeu_ps(e, ex);
            for (int64_t i = 0; i < k; i++) sc[j0 + i] = e[i];
        }
        for (int64_t j = 0; j < n; j++) sum += sc[j]; /* in column order: padding adds exact zeros */
        float *oh = out + m * H * hd + h * hd;
        float inv = sum > 0.f ? 1.f / sum : 0.f; /* a padding token that sees nothing: zeros, never NaN */
        int64_t i0 = 0;
        for (; i0 + 32 <= hd; i0 += 32) { /* o = sum_j p_j V[j]: j in order, 32 dims in registers */
            __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
            for (int64_t j = 0; j < n; j++) {
                fetch_one(&c);
                if (sc[j] == 0.f) continue;
                __m256 p = _mm256_set1_ps(sc[j] * inv);
                const float *vj = V + j * hd + i0;
                o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj), o0);
                o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8), o1);
                o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 16), o2);
                o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 24), o3);
            }
            _mm256_storeu_ps(oh + i0, o0);
            _mm256_storeu_ps(oh + i0 + 8, o1);
            _mm256_storeu_ps(oh + i0 + 16, o2);
            _mm256_storeu_ps(oh + i0 + 24, o3);
        }
        for (; i0 < hd; i0++) {
            float o = 0.f;
            for (int64_t j = 0; j < n; j++)
                if (sc[j] != 0.f) o = fmaf(sc[j] * inv, V[j * hd + i0], o);
            oh[i0] = o;
        }
    }
}

int ft_decode(const Step *s, const Layer *layers) {
    int64_t d = s->d, H = s->heads, KV = s->kv_heads, hd = s->head_dim, I = s->inter, B = s->rows, q = s->q;
    int64_t M = B * q, nq = H * hd, nkv = KV * hd, nqkv = nq + 2 * nkv, cols = s->t + q;
    int64_t wide = nqkv > 2 * I ? nqkv : 2 * I;
    int64_t outs = s->keep ? M : B; /* tokens whose logits are wanted: every one, or each row's last */
    float *buf = malloc(sizeof(float) * (M * (3 * d + nq + wide + I) + M * H * cols + outs * d + 16));
    if (!buf) return 1;
    float *x = buf, *h = x + M * d, *y = h + M * d, *att = y + M * d, *w = att + M * nq, *act = w + M * wide;
    float *scores = act + M * I, *hl = scores + M * H * cols; /* hl: the tokens whose logits are wanted, normed */
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *e = s->embed + s->tokens[m] * d;
        for (int64_t i = 0; i < d; i++) x[m * d + i] = _cvtsh_ss(e[i]);
    }
    for (int64_t l = 0; l < s->n_layers; l++) {
        const Layer *L = &layers[l];
        if (L->T < cols) {
            free(buf);
            return 2;
        }
        int64_t row_stride = KV * L->T * hd;
        int par = s->threads > 1 && M > 1; /* the element-wise work of many rows is split too */
#pragma omp parallel for schedule(static) num_threads(s->threads) if (par)
        for (int64_t m = 0; m < M; m++) rms_norm(x + m * d, L->norm_in, L->eps_in, h + m * d, d);
        project(s, L, 0, h, w, nqkv, d);
#pragma omp parallel for schedule(static) num_threads(s->threads) if (par)
        for (int64_t m = 0; m < M; m++) {
            float *qm = w + m * nqkv;
            int64_t r = m / q, col = s->t + m % q;
            for (int64_t k = 0; k < H + KV; k++) rope(qm + k * hd, s->cos + m * hd, s->sin + m * hd, hd);
            for (int64_t k = 0; k < KV; k++) {
                memcpy(L->k + r * row_stride + (k * L->T + col) * hd, qm + nq + k * hd, sizeof(float) * hd);
                memcpy(L->v + r * row_stride + (k * L->T + col) * hd, qm + nq + nkv + k * hd, sizeof(float) * hd);
            }
        }
        attend(s, L, w, nqkv, att, scores);
        project(s, L, 1, att, y, d, nq);
        for (int64_t i = 0; i < M * d; i++) x[i] += y[i];
#pragma omp parallel for schedule(static) num_threads(s->threads) if (par)
        for (int64_t m = 0; m < M; m++) rms_norm(x + m * d, L->norm_post, L->eps_post, h + m * d, d);
        project(s, L, 2, h, w, 2 * I, d);
#pragma omp parallel for schedule(static) num_threads(s->threads) if (par)
        for (int64_t m = 0; m < M; m++) silu_mul(w + m * 2 * I, w + m * 2 * I + I, act + m * I, I);
        project(s, L, 3, act, y, d, I);
        for (int64_t i = 0; i < M * d; i++) x[i] += y[i];
    }
    for (int64_t r = 0; r < outs; r++) {
        int64_t m = s->keep ? r : r * q + q - 1;
        rms_norm(x + m * d, s->norm_final, s->eps_final, hl + r * d, d);
    }
    gemm16(s->head, hl, outs, s->head_bias, s->logits, s->vocab, d, s->threads);
    free(buf);
    return 0;
}

/* Y = X W^T + b for a test of the kernels alone (W in panels: native.py's panels) */
void ft_gemm16(const uint16_t *W, const float *X, int64_t B, const float *b, float *Y, int64_t out, int64_t in,
               int64_t threads) {
    gemm16(W, X, B, b, Y, out, in, threads);
}
