/* The fp16-weight GEMMs of the native step (included by native_decode.c, compiled with it; native.py
 * builds the pair): Y = X W16^T (+ b) for X (B, in) fp32 and W in panels of 16 outputs, in three tilings
 * by batch size (one row: six weight streams at once; up to 64 rows: 16-row AVX-512 tiles, else 6-row
 * AVX2 ones; more: weight blocks widened once into L1), every output summed in the same order whatever
 * the tiling, so a row's results are the same bits alone or in any batch. */
#ifndef FT_NATIVE_GEMM_H
#define FT_NATIVE_GEMM_H
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256 h8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* Weights are stored in panels of 16 outputs: panel j is (in, 16) fp16, outputs 16 j .. 16 j + 15 side by
 * side (the last panel zero-padded). Every output is summed in one order, whatever the batch: along the
 * input, acc = fma(w[k], x[k], acc) for k = 0, 1, ..., in - 1, from 0. So a row's results are the same
 * bits alone as in any batch. */
#define OB 16

/* nb rows of X (nb <= 6) against one panel: 2 x 6 accumulators in registers */
static inline __attribute__((always_inline)) void rows_tile(const uint16_t *P, const float *X, int64_t in,
                                                            float *acc_out, const uint16_t *pf, int nb) {
    __m256 c0[6], c1[6];
#pragma GCC unroll 6
    for (int r = 0; r < nb; r++) c0[r] = c1[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in; k++) {
        if (pf && !(k & 1)) _mm_prefetch((const char *)(pf + k * OB), _MM_HINT_T1); /* the next panel, to L2 */
        __m256 w0 = h8(P + k * OB), w1 = h8(P + k * OB + 8);
#pragma GCC unroll 6
        for (int r = 0; r < nb; r++) {
            __m256 xb = _mm256_broadcast_ss(X + r * in + k);
            c0[r] = _mm256_fmadd_ps(w0, xb, c0[r]);
            c1[r] = _mm256_fmadd_ps(w1, xb, c1[r]);
        }
    }
    for (int r = 0; r < nb; r++) {
        _mm256_storeu_ps(acc_out + r * OB, c0[r]);
        _mm256_storeu_ps(acc_out + r * OB + 8, c1[r]);
    }
}

#define GEMV_AHEAD (32 * OB) /* fp16 values a GEMV stream prefetches ahead, into L2: 1 KiB, 16 lines */

/* one row of X against nbk <= 6 consecutive panels (a GEMV: 6 weight streams, 12 independent sums).
 * duplicates: alike rows_tile on purpose: the same per-output sum, tiled over panels instead of rows */
static inline __attribute__((always_inline)) void panels_tile(const uint16_t *P, const float *x, int64_t in,
                                                              float *acc_out, int nbk) {
    __m256 c0[6], c1[6];
#pragma GCC unroll 6
    for (int j = 0; j < nbk; j++) c0[j] = c1[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in; k++) {
        __m256 xb = _mm256_broadcast_ss(x + k);
#pragma GCC unroll 6
        for (int j = 0; j < nbk; j++) {
            const uint16_t *p = P + j * in * OB + k * OB;
            if (!(k & 1)) _mm_prefetch((const char *)(p + GEMV_AHEAD), _MM_HINT_T1);
            c0[j] = _mm256_fmadd_ps(h8(p), xb, c0[j]);
            c1[j] = _mm256_fmadd_ps(h8(p + 8), xb, c1[j]);
        }
    }
    for (int j = 0; j < nbk; j++) {
        _mm256_storeu_ps(acc_out + j * OB, c0[j]);
        _mm256_storeu_ps(acc_out + j * OB + 8, c1[j]);
    }
}

static inline void put(float *y, const float *acc, int64_t n) { memcpy(y, acc, sizeof(float) * n); }

/* With AVX-512 (32 registers, 16 lanes): up to 16 rows against one panel in one pass, one 16-lane
 * accumulator per row, so a batch of 16 reads each panel once (the 8-lane tile reads it 3 times: tiles of
 * 6 + 5 + 5 rows, the first from memory, and cannot overlap that read with the other two). The lanes
 * compute the 8-lane tile's sums exactly (the same fma along the input, from 0): the same bits. */
#define WIDE_ROWS 16
#define WIDE_MAX_BATCH 64
/* Xt: the tile's rows transposed, (in, nb): the nb values of input k side by side, so that one pointer
 * addresses them all (16 row pointers left the loop short of registers: 122 of 159 GFLOP/s a core) */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void wide_tile(
    const uint16_t *P, const float *Xt, int64_t in, float *acc_out, const uint16_t *pf, int nb) {
    __m512 c[WIDE_ROWS];
#pragma GCC unroll 16
    for (int r = 0; r < nb; r++) c[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= in; k += 2) { /* two inputs a pass: one line of the next panel fetched to L2 */
        if (pf) _mm_prefetch((const char *)(pf + k * OB), _MM_HINT_T1);
        __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P + k * OB)));
        __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P + k * OB + OB)));
        const float *x = Xt + k * nb;
#pragma GCC unroll 16
        for (int r = 0; r < nb; r++) c[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[r]), c[r]);
#pragma GCC unroll 16
        for (int r = 0; r < nb; r++) c[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[nb + r]), c[r]);
    }
    for (; k < in; k++) {
        __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(P + k * OB)));
#pragma GCC unroll 16
        for (int r = 0; r < nb; r++) c[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(Xt[k * nb + r]), c[r]);
    }
    for (int r = 0; r < nb; r++) _mm512_storeu_ps(acc_out + r * OB, c[r]);
}

#define WIDE_CASE(n) \
    case n: wide_tile(P, X, in, acc, pf, n); break;

/* the rows of X (nb <= 16) against one panel, each tile size its own unrolled loop */
__attribute__((target("avx512f"))) static void wide_rows(const uint16_t *P, const float *X, int64_t in, float *acc,
                                                         const uint16_t *pf, int64_t nb) {
    switch (nb) {
        WIDE_CASE(16) WIDE_CASE(15) WIDE_CASE(14) WIDE_CASE(13) WIDE_CASE(12) WIDE_CASE(11) WIDE_CASE(10)
        WIDE_CASE(9) WIDE_CASE(8) WIDE_CASE(7) WIDE_CASE(6) WIDE_CASE(5) WIDE_CASE(4) WIDE_CASE(3)
        WIDE_CASE(2) default: wide_tile(P, X, in, acc, pf, 1); break;
    }
}

/* Past BIG_MIN_BATCH rows (prefill chunks, label scoring's prompt pass, wide decode batches) the GEMM
 * is bound by arithmetic more than by the weight read, and the tiles above leave most of it unused:
 * their rows of X no longer stay in L1 beside the panel, and half the issue slots go to widening fp16.
 * Here, per group of BIG_PANELS panels and block of BIG_K inputs, the weights are widened once into an
 * fp32 block in L1; tiles of BIG_ROWS rows x 64 outputs then run 24 16-lane accumulators against it
 * (24 FMAs to 10 loads an input: the FMA units stay busy). Threads split the rows when there are many
 * (B >= 48 per thread), the panel groups otherwise. A block's partial sums go to Y and come back for
 * the next block, unrounded: each output is still acc = fma(w[k], x[k], acc) for k = 0, 1, ..., from
 * 0, so a row's results are the same bits as from the tiles above, alone or in any batch (tested). */
#define BIG_ROWS 6
#define BIG_PANELS 4
#define BIG_K 128
#define BIG_CHUNK 120 /* rows of X a thread runs against one weight block before the next: ~2 x L2 / in */

__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void big_tile(
    const float *Wf, const float *X, int64_t in, int64_t kb, float *Y, int64_t out, const __mmask16 *mask,
    int first, int nr, int np) {
    __m512 c[BIG_ROWS][BIG_PANELS];
#pragma GCC unroll 6
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
        for (int p = 0; p < np; p++)
            c[r][p] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[p], Y + r * out + p * OB);
    for (int64_t k = 0; k < kb; k++) {
        __m512 w[BIG_PANELS];
#pragma GCC unroll 4
        for (int p = 0; p < np; p++) w[p] = _mm512_load_ps(Wf + (k * np + p) * OB);
#pragma GCC unroll 6
        for (int r = 0; r < nr; r++) {
            __m512 xb = _mm512_set1_ps(X[r * in + k]);
#pragma GCC unroll 4
            for (int p = 0; p < np; p++) c[r][p] = _mm512_fmadd_ps(w[p], xb, c[r][p]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 4
        for (int p = 0; p < np; p++) _mm512_mask_storeu_ps(Y + r * out + p * OB, mask[p], c[r][p]);
}

#define BIG_CASE(r, p) \
    case (r) * 8 + (p): big_tile(Wf, X, in, kb, Y, out, mask, first, r, p); break;
#define BIG_ROW(r) BIG_CASE(r, 4) BIG_CASE(r, 3) BIG_CASE(r, 2) BIG_CASE(r, 1)

/* one tile, its sizes as constants (each its own unrolled loop) */
__attribute__((target("avx512f"))) static void big_rows(const float *Wf, const float *X, int64_t in, int64_t kb,
                                                        float *Y, int64_t out, const __mmask16 *mask, int first,
                                                        int nr, int np) {
    switch (nr * 8 + np) {
        BIG_ROW(6) BIG_ROW(5) BIG_ROW(4) BIG_ROW(3) BIG_ROW(2) BIG_ROW(1) default: break;
    }
}

/* Y = X W^T with AVX-512 for B > BIG_MIN_BATCH rows (no bias: gemm16 adds it). A large batch splits its
 * rows between the threads (each widens every weight block once per chunk of rows); a small one splits
 * the panels, so that each weight is read from memory by one thread only. */
#define BIG_MIN_BATCH 16
__attribute__((target("avx512f"))) static void gemm_big(const uint16_t *W, const float *X, int64_t B, float *Y,
                                                        int64_t out, int64_t in, int64_t threads) {
    int64_t blocks = (out + OB - 1) / OB;
    int by_rows = B >= 48 * threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads(), t = omp_get_thread_num();
#endif
        int64_t lo = by_rows ? B * t / nt : 0, hi = by_rows ? B * (t + 1) / nt : B;   /* this thread's rows */
        int64_t b0 = by_rows ? 0 : blocks * t / nt, b1 = by_rows ? blocks : blocks * (t + 1) / nt; /* panels */
        float *Wf = aligned_alloc(64, sizeof(float) * BIG_K * BIG_PANELS * OB);
        for (int64_t c0 = lo; c0 < hi; c0 += BIG_CHUNK) {
            int64_t c1 = c0 + BIG_CHUNK < hi ? c0 + BIG_CHUNK : hi;
            for (int64_t j0 = b0; j0 < b1; j0 += BIG_PANELS) {
                int np = b1 - j0 < BIG_PANELS ? (int)(b1 - j0) : BIG_PANELS;
                __mmask16 mask[BIG_PANELS];
                for (int p = 0; p < np; p++) {
                    int64_t n = out - (j0 + p) * OB;
                    mask[p] = n >= OB ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
                }
                for (int64_t k0 = 0; k0 < in; k0 += BIG_K) {
                    int64_t kb = in - k0 < BIG_K ? in - k0 : BIG_K;
                    for (int64_t k = 0; k < kb; k++) /* widen the block: (kb, np panels, 16) */
                        for (int p = 0; p < np; p++)
                            _mm512_store_ps(Wf + (k * np + p) * OB,
                                            _mm512_cvtph_ps(_mm256_loadu_si256(
                                                (const __m256i *)(W + (j0 + p) * in * OB + (k0 + k) * OB))));
                    for (int64_t r0 = c0; r0 < c1; r0 += BIG_ROWS) {
                        int nr = c1 - r0 < BIG_ROWS ? (int)(c1 - r0) : BIG_ROWS;
                        big_rows(Wf, X + r0 * in + k0, in, kb, Y + r0 * out + j0 * OB, out, mask, k0 == 0, nr, np);
                    }
                }
            }
        }
        free(Wf);
    }
}

static int wide_on = -1; /* the 16-row tile in use: -1 until the CPU is asked */

/* on = 1: use the 16-row tile where the CPU has AVX-512, 0: the 8-lane tile only, -1: leave it; returns
 * whether the 16-row tile is in use (tests compare the two tiles' bits) */
int ft_wide(int on) {
    if (on >= 0 || wide_on < 0) wide_on = on != 0 && __builtin_cpu_supports("avx512f");
    return wide_on;
}

/* fn(args..., n) with n a constant 1..6, so that each tile size compiles to its own unrolled loop */
#define BY_SIZE(n, fn, ...)                      \
    switch (n) {                                 \
        case 6: fn(__VA_ARGS__, 6); break;       \
        case 5: fn(__VA_ARGS__, 5); break;       \
        case 4: fn(__VA_ARGS__, 4); break;       \
        case 3: fn(__VA_ARGS__, 3); break;       \
        case 2: fn(__VA_ARGS__, 2); break;       \
        default: fn(__VA_ARGS__, 1); break;      \
    }

/* Y = X W^T (+ b): X (B, in), Y (B, out), W in panels; panels (and their rows) split over the threads */
static void gemm16(const uint16_t *W, const float *X, int64_t B, const float *b, float *Y, int64_t out,
                   int64_t in, int64_t threads) {
    int64_t blocks = (out + OB - 1) / OB;
    if (B == 1) {
        int64_t groups = (blocks + 5) / 6;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t g = 0; g < groups; g++) {
            float acc[6 * OB];
            int64_t j0 = 6 * g, nbk = blocks - j0 < 6 ? blocks - j0 : 6;
            const uint16_t *P = W + j0 * in * OB;
            BY_SIZE(nbk, panels_tile, P, X, in, acc)
            int64_t o0 = j0 * OB, n = out - o0 < 6 * OB ? out - o0 : 6 * OB;
            put(Y + o0, acc, n);
        }
    } else if (B > BIG_MIN_BATCH && (wide_on < 0 ? ft_wide(-1) : wide_on)) {
        gemm_big(W, X, B, Y, out, in, threads);
    } else {
        /* the 16-row tile up to 64 rows; past that its 16 rows of X no longer stay in L1 beside the panel,
         * and the 8-lane tiles of 6 rows measure faster (prefill chunks: 880 rows 99 vs 88 GFLOP/s) */
        int wide = (wide_on < 0 ? ft_wide(-1) : wide_on) && B <= WIDE_MAX_BATCH;
        float *Xt = wide ? malloc(sizeof(float) * B * in) : NULL; /* each tile's rows transposed (wide_tile) */
        wide = Xt != NULL;                   /* (no memory for them: the 8-lane tiles) */
        int64_t most = wide ? WIDE_ROWS : 6; /* rows a tile holds */
        int64_t tiles = (B + most - 1) / most, base = B / tiles, extra = B % tiles; /* even: 16 = 6 + 5 + 5 */
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            int64_t nt = 1, t = 0;
#ifdef _OPENMP
            nt = omp_get_num_threads(), t = omp_get_thread_num();
#endif
            for (int64_t r0 = 0, k = 0; wide && r0 < B; k++) { /* this thread's share of the inputs */
                int64_t nb = base + (k < extra);
                for (int64_t i = in * t / nt; i < in * (t + 1) / nt; i++)
                    for (int64_t r = 0; r < nb; r++) Xt[r0 * in + i * nb + r] = X[(r0 + r) * in + i];
                r0 += nb;
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t j = 0; j < blocks; j++) {
                float acc[WIDE_ROWS * OB];
                const uint16_t *P = W + j * in * OB;
                int64_t o0 = j * OB, n = out - o0 < OB ? out - o0 : OB;
                for (int64_t r0 = 0, k = 0; r0 < B; k++) {
                    int64_t nb = base + (k < extra);
                    const float *x0 = (wide ? Xt : X) + r0 * in;
                    /* a small batch's first tile fetches the next panel (a large one reuses each panel long enough) */
                    const uint16_t *pf = k == 0 && B <= WIDE_MAX_BATCH ? P + in * OB : NULL;
                    if (wide)
                        wide_rows(P, x0, in, acc, pf, nb);
                    else
                        BY_SIZE(nb, rows_tile, P, x0, in, acc, pf)
                    for (int64_t r = 0; r < nb; r++) put(Y + (r0 + r) * out + o0, acc + r * OB, n);
                    r0 += nb;
                }
            }
        }
        free(Xt);
    }
    if (b)
        for (int64_t r = 0; r < B; r++)
            for (int64_t o = 0; o < out; o++) Y[r * out + o] += b[o];
}

#endif
