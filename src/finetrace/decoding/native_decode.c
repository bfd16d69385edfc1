/* One decode step of one row through a Llama decoder: fp16 weights, fp32 compute, in one call.
 *
 * Built and loaded by native.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp); see its docstring for why.
 * The arithmetic is lean.py's, step for step:
 *
 *   x = E16[token]
 *   per layer:  h = rms_norm(x) w_in
 *               qkv = h Wqkv16^T + b + (h A^T) B            (LoRA "one" plan: A (R, in), B (R, out))
 *               rope on the q and k heads; k and v written to column t of the layer's slab
 *               x += attention(q, K[0..t], V[0..t]) Wo16^T (+ LoRA)
 *               h = rms_norm(x) w_post
 *               gu = h Wgu16^T (+ LoRA);  x += (silu(g) * u) Wd16^T (+ LoRA)
 *   logits = rms_norm(x) w_final  W_head16^T
 *
 * Weights are fp16 (IEEE half, widened exactly with F16C), everything else fp32. Only the order of the
 * fp32 sums differs from the torch path (as it does between batch sizes there). The weight GEMVs are
 * split over output rows between `threads` OpenMP threads (the runtime torch itself uses: the same
 * libgomp.so.1 is loaded once per process).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint16_t *w[4];  /* qkv (Nqkv, d), o (d, H hd), gate_up (2 I, d), down (d, I): fp16, row-major */
    const float *b[4];     /* biases or NULL */
    const float *la[4];    /* LoRA A (r, in) or NULL */
    const float *lb[4];    /* LoRA B (r, out), the scale folded in */
    int64_t r[4];
    const float *norm_in, *norm_post;
    float *k, *v; /* row 0 of the layer's slabs: (kv_heads, T, head_dim) */
    int64_t T;     /* the slabs' time capacity */
    double eps_in, eps_post;
} Layer;

typedef struct {
    int64_t n_layers, d, heads, kv_heads, head_dim, inter, vocab;
    int64_t token, t; /* the token read; the column written (the cache held t columns before) */
    int64_t threads;
    double scale, eps_final;
    const float *cos, *sin;   /* (head_dim) for this position */
    const int64_t *mask;      /* (t + 1): 0 = not attended */
    const uint16_t *embed;    /* (vocab, d) fp16 */
    const uint16_t *head;     /* (vocab, d) fp16 */
    const float *head_bias;   /* or NULL */
    const float *norm_final;
    float *logits;            /* (vocab) */
} Step;

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

static inline __m256 h8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

static float dot16(const uint16_t *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(h8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(h8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += _cvtsh_ss(w[i]) * x[i];
    return s;
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

/* y = W x (+ b): W (out, in) fp16. Four rows at a time share each load of x, and the next four rows are
 * prefetched as these are read (a GEMV streams its weights once: memory bandwidth is the bound); rows
 * are split over the threads in contiguous blocks. */
static void gemv16(const uint16_t *W, const float *x, const float *b, float *y, int64_t out, int64_t in,
                   int64_t threads) {
    int64_t quads = out / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t p = 0; p < quads; p++) {
        const uint16_t *w0 = W + 4 * p * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) {
            __m256 xi = _mm256_loadu_ps(x + i);
            _mm_prefetch((const char *)(w0 + i + 4 * in), _MM_HINT_T0);
            _mm_prefetch((const char *)(w2 + i + 4 * in), _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(h8(w0 + i), xi, a0);
            a1 = _mm256_fmadd_ps(h8(w1 + i), xi, a1);
            a2 = _mm256_fmadd_ps(h8(w2 + i), xi, a2);
            a3 = _mm256_fmadd_ps(h8(w3 + i), xi, a3);
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (; i < in; i++) {
            s0 += _cvtsh_ss(w0[i]) * x[i];
            s1 += _cvtsh_ss(w1[i]) * x[i];
            s2 += _cvtsh_ss(w2[i]) * x[i];
            s3 += _cvtsh_ss(w3[i]) * x[i];
        }
        y[4 * p] = s0;
        y[4 * p + 1] = s1;
        y[4 * p + 2] = s2;
        y[4 * p + 3] = s3;
    }
    for (int64_t o = 4 * quads; o < out; o++) y[o] = dot16(W + o * in, x, in);
    if (b)
        for (int64_t o = 0; o < out; o++) y[o] += b[o];
}

/* one projection group: y = W16 x + b + (x A^T) B */
static void project(const Layer *L, int g, const float *x, float *y, int64_t out, int64_t in, float *tmp,
                    int64_t threads) {
    gemv16(L->w[g], x, L->b[g], y, out, in, threads);
    int64_t r = L->r[g];
    if (!L->la[g] || r <= 0) return;
    for (int64_t j = 0; j < r; j++) tmp[j] = dot32(L->la[g] + j * in, x, in);
    for (int64_t j = 0; j < r; j++) {
        const float *bj = L->lb[g] + j * out;
        float t = tmp[j];
        for (int64_t o = 0; o < out; o++) y[o] += t * bj[o];
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

static void attend(const Step *s, const Layer *L, const float *q, float *out, float *scores) {
    int64_t H = s->heads, KV = s->kv_heads, hd = s->head_dim, n = s->t + 1, g = H / KV;
    for (int64_t h = 0; h < H; h++) {
        const float *qh = q + h * hd;
        const float *K = L->k + (h / g) * L->T * hd, *V = L->v + (h / g) * L->T * hd;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            if (s->mask && !s->mask[j]) {
                scores[j] = -INFINITY;
                continue;
            }
            scores[j] = dot32(K + j * hd, qh, hd) * (float)s->scale;
            if (scores[j] > mx) mx = scores[j];
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; j++) {
            float e = scores[j] == -INFINITY ? 0.f : expf(scores[j] - mx);
            scores[j] = e;
            sum += e;
        }
        float *oh = out + h * hd;
        memset(oh, 0, sizeof(float) * hd);
        for (int64_t j = 0; j < n; j++) {
            float p = scores[j] / sum;
            if (p == 0.f) continue;
            const float *vj = V + j * hd;
            for (int64_t i = 0; i < hd; i++) oh[i] += p * vj[i];
        }
    }
}

int ft_decode_one(const Step *s, const Layer *layers) {
    int64_t d = s->d, H = s->heads, KV = s->kv_heads, hd = s->head_dim, I = s->inter;
    int64_t nq = H * hd, nkv = KV * hd, nqkv = nq + 2 * nkv, n = s->t + 1;
    int64_t rmax = 0;
    for (int64_t l = 0; l < s->n_layers; l++)
        for (int g = 0; g < 4; g++)
            if (layers[l].r[g] > rmax) rmax = layers[l].r[g];
    int64_t wide = nqkv > 2 * I ? nqkv : 2 * I;
    float *buf = malloc(sizeof(float) * (3 * d + nq + wide + I + rmax + n + 16));
    if (!buf) return 1;
    float *x = buf, *h = x + d, *y = h + d, *att = y + d, *w = att + nq, *act = w + wide, *tmp = act + I;
    float *scores = tmp + rmax;
    const uint16_t *e = s->embed + s->token * d;
    for (int64_t i = 0; i < d; i++) x[i] = _cvtsh_ss(e[i]);
    for (int64_t l = 0; l < s->n_layers; l++) {
        const Layer *L = &layers[l];
        if (L->T <= s->t) {
            free(buf);
            return 2;
        }
        rms_norm(x, L->norm_in, L->eps_in, h, d);
        project(L, 0, h, w, nqkv, d, tmp, s->threads);
        for (int64_t k = 0; k < H + KV; k++) rope(w + k * hd, s->cos, s->sin, hd);
        for (int64_t k = 0; k < KV; k++) {
            memcpy(L->k + (k * L->T + s->t) * hd, w + nq + k * hd, sizeof(float) * hd);
            memcpy(L->v + (k * L->T + s->t) * hd, w + nq + nkv + k * hd, sizeof(float) * hd);
        }
        attend(s, L, w, att, scores);
        project(L, 1, att, y, d, nq, tmp, s->threads);
        for (int64_t i = 0; i < d; i++) x[i] += y[i];
        rms_norm(x, L->norm_post, L->eps_post, h, d);
        project(L, 2, h, w, 2 * I, d, tmp, s->threads);
        for (int64_t i = 0; i < I; i++) {
            float g = w[i];
            act[i] = g / (1.f + expf(-g)) * w[I + i];
        }
        project(L, 3, act, y, d, I, tmp, s->threads);
        for (int64_t i = 0; i < d; i++) x[i] += y[i];
    }
    rms_norm(x, s->norm_final, s->eps_final, h, d);
    gemv16(s->head, h, s->head_bias, s->logits, s->vocab, d, s->threads);
    (void)n;
    free(buf);
    return 0;
}

/* y = W x + b for a test of the kernel alone (tails of any size) */
void ft_gemv16(const uint16_t *W, const float *x, const float *b, float *y, int64_t out, int64_t in,
               int64_t threads) {
    gemv16(W, x, b, y, out, in, threads);
}
