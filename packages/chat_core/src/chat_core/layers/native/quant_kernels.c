/* Weight-only matrix products (4-bit, 8-bit and bfloat16 weights) for x86-64 CPUs with AVX-512 (F + BW), in
 * float32 throughout.
 *
 * Built and loaded at run time by chat_core/layers/native_kernels.py (the system C compiler, about half a
 * second, cached on disk); where that is not possible torch's own kernels are used instead. Both products
 * compute y = x @ W^T for a few rows x [M, K] (float32, row-major) and write y [M, N] (row-major):
 *
 * - chat_int4_matmul: 4-bit W in 64-row blocks, the layout of torch's AVX-512 int4 kernel: block b is
 *   [K][32] bytes; byte j of input k holds row 64 b + j (low nibble) and row 64 b + 32 + j (high nibble).
 *   w[n, k] = scale[g, n] * q[n, k] + low[g, n] with g = k / group (GGUF's Q4_1 as stored: d q + m; Q4_0:
 *   low = -8 d), scale and low one array [2][groups][N] of float32 or (`half`) float16. The 64 rows of a block are 4 vectors of 16
 *   lanes: no horizontal sums. Computed as scale * sum(q x) + low * sum(x) per group.
 * - chat_int8_matmul: 8-bit W in 64-row blocks, block b [K][64] bytes (byte j of input k: row 64 b + j),
 *   w[n, k] = q[n, k] * scale[n] (int8 per output channel, `group` 0) or q[n, k] * scale[k / group][n] (a scale
 *   per `group` inputs, K a multiple of it: GGUF's Q8_0, 32, and Q6_K, 16, whose 6-bit values fit in 8), plus
 *   low[k / group][n] where `low` is not NULL (GGUF's Q5_1 and Q5_K: 5-bit values with a minimum per 32),
 *   added as low * sum(x) per group.
 * - chat_bf16_matmul: bfloat16 W in the int8 layout with 2-byte entries (block b [K][64], entry j of input k:
 *   row 64 b + j). A bfloat16 is the top half of a float32, so each weight widens exactly (a shift) and
 *   every product is exact in float32: the same sums as oneDNN's bfloat16 product, without rounding x.
 *
 * Each row of x is reduced in the same order whatever M is (rows are independent), so a row's result
 * does not depend on the rows batched with it. Threads split the output columns (OpenMP: torch's own
 * runtime, already loaded in the process). Both return 0, or -1 if scratch memory could not be had.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define INLINE static inline __attribute__((always_inline))
#define ROW_TILE 4 /* rows of x per pass over a weight block: 4 x 4 accumulators fit the 32 registers */

#define PREFETCH_BYTES 4096 /* how far ahead of the weights being read to ask for more (past page ends too) */
#define INT4_ROW_TILE 2 /* 2 x 4 group sums + 2 x 4 totals + 4 weights: the 32 registers, no spills */

/* One block's 64 rows for `rows` (1 or 2) rows of x. Per group: unscaled sums of q x (the low nibble turned
   into a float by a 16-entry table lookup, which ignores the high bits: no masking), then scaled once. */
INLINE __m512 load_scales(const void *base, int64_t index, int half) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index)));
    return _mm512_loadu_ps((const float *)base + index);
}

INLINE void int4_block(const float *x, const float *xsum, const uint8_t *block, const void *scale,
                       const void *low, int half, float *y, int64_t N, int64_t K, int64_t group, int rows) {
    const int64_t groups = K / group;
    const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[INT4_ROW_TILE][4];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 sums[INT4_ROW_TILE][4];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < 4; j++) sums[r][j] = _mm512_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k++) {
            const uint8_t *bytes = block + k * 32;
            _mm_prefetch((const char *)(bytes + PREFETCH_BYTES), _MM_HINT_T0);
            __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));        /* rows 0-15 | 32-47 */
            __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 16))); /* rows 16-31 | 48-63 */
            __m512 w[4];
            w[0] = _mm512_permutexvar_ps(b0, levels);
            w[1] = _mm512_permutexvar_ps(b1, levels);
            w[2] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4));
            w[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4));
            for (int r = 0; r < rows; r++) {
                __m512 xk = _mm512_set1_ps(x[r * K + k]);
                for (int j = 0; j < 4; j++) sums[r][j] = _mm512_fmadd_ps(w[j], xk, sums[r][j]);
            }
        }
        for (int j = 0; j < 4; j++) {
            __m512 s = load_scales(scale, g * N + 16 * j, half), l = load_scales(low, g * N + 16 * j, half);
            for (int r = 0; r < rows; r++) {
                acc[r][j] = _mm512_fmadd_ps(sums[r][j], s, acc[r][j]);
                acc[r][j] = _mm512_fmadd_ps(l, _mm512_set1_ps(xsum[r * groups + g]), acc[r][j]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + r * N + 16 * j, acc[r][j]);
}

int chat_int4_matmul(const float *x, const uint8_t *w, const void *scale_low, int half, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t group, int threads) {
    const int64_t size = half ? 2 : 4; /* bytes per scale */
    const int64_t groups = K / group;
    const char *scale = scale_low, *low = (const char *)scale_low + groups * N * size; /* [2][groups][N] */
    float *xsum = malloc(sizeof(float) * (size_t)(M * groups + 1));
    if (xsum == NULL) return -1;
    for (int64_t i = 0; i < M * groups; i++) {
        float sum = 0.f;
        for (int64_t k = 0; k < group; k++) sum += x[i * group + k];
        xsum[i] = sum;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < N / 64; b++) {
        const uint8_t *block = w + b * K * 32;
        for (int64_t m = 0; m < M; m += INT4_ROW_TILE) {
            const float *xm = x + m * K, *xs = xsum + m * groups;
            float *ym = y + m * N + b * 64;
            /* a constant row count lets the compiler keep the accumulators in registers */
            const char *sb = scale + b * 64 * size, *lb = low + b * 64 * size;
            if (M - m >= 2)
                int4_block(xm, xs, block, sb, lb, half, ym, N, K, group, 2);
            else
                int4_block(xm, xs, block, sb, lb, half, ym, N, K, group, 1);
        }
    }
    free(xsum);
    return 0;
}

/* int8 in 64-row blocks: block b is [K][64] bytes, byte j of input k = row 64 b + j. Inputs [k0, k1) of the
   block's rows, each input's weights multiplied by s (group scales) when `scaled`. */
INLINE void int8_inputs(const float *x, const int8_t *block, const __m512 *s, __m512 acc[][4], int64_t K, int64_t k0,
                        int64_t k1, int scaled, int rows) {
    for (int64_t k = k0; k < k1; k++) {
        const int8_t *bytes = block + k * 64;
        _mm_prefetch((const char *)(bytes + PREFETCH_BYTES), _MM_HINT_T0);
        __m512 w[4];
        for (int j = 0; j < 4; j++) {
            w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 16 * j))));
            if (scaled) w[j] = _mm512_mul_ps(w[j], s[j]);
        }
        for (int r = 0; r < rows; r++) {
            __m512 xk = _mm512_set1_ps(x[r * K + k]);
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(w[j], xk, acc[r][j]);
        }
    }
}

/* Rows scale[n] (applied once at the end, `group` 0) or scale[g][n] per `group` inputs (applied per input),
   then low[g][n] times the group's sum of x (xsum[r][g]) where `low` is not NULL. */
INLINE void int8_block(const float *x, const int8_t *block, const float *scale, const float *low, const float *xsum,
                       float *y, int64_t N, int64_t K, int64_t group, int rows) {
    __m512 acc[ROW_TILE][4];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    if (group) {
        const int64_t groups = K / group;
        for (int64_t g = 0; g < groups; g++) {
            __m512 s[4];
            for (int j = 0; j < 4; j++) s[j] = _mm512_loadu_ps(scale + g * N + 16 * j);
            int8_inputs(x, block, s, acc, K, g * group, (g + 1) * group, 1, rows);
            if (low)
                for (int j = 0; j < 4; j++) {
                    __m512 l = _mm512_loadu_ps(low + g * N + 16 * j);
                    for (int r = 0; r < rows; r++) acc[r][j] = _mm512_fmadd_ps(l, _mm512_set1_ps(xsum[r * groups + g]), acc[r][j]);
                }
        }
    } else {
        int8_inputs(x, block, NULL, acc, K, 0, K, 0, rows);
        for (int j = 0; j < 4; j++) {
            __m512 s = _mm512_loadu_ps(scale + 16 * j);
            for (int r = 0; r < rows; r++) acc[r][j] = _mm512_mul_ps(acc[r][j], s);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + r * N + 16 * j, acc[r][j]);
}

int chat_int8_matmul(const float *x, const int8_t *w, const float *scale, const float *low, int64_t group, float *y,
                     int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t groups = group ? K / group : 0;
    float *xsum = NULL; /* each row's sum of x per group, for the minima */
    if (low) {
        xsum = malloc(sizeof(float) * (size_t)(M * groups + 1));
        if (xsum == NULL) return -1;
        for (int64_t i = 0; i < M * groups; i++) {
            float sum = 0.f;
            for (int64_t k = 0; k < group; k++) sum += x[i * group + k];
            xsum[i] = sum;
        }
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < N / 64; b++) {
        const int8_t *block = w + b * K * 64;
        const float *sb = scale + b * 64, *lb = low ? low + b * 64 : NULL;
        for (int64_t m = 0; m < M; m += ROW_TILE) {
            int rows = M - m < ROW_TILE ? (int)(M - m) : ROW_TILE;
            const float *xm = x + m * K, *xs = xsum ? xsum + m * groups : NULL;
            float *ym = y + m * N + b * 64;
            switch (rows) { /* constant row counts: the compiler unrolls the accumulators into registers */
                case 4: int8_block(xm, block, sb, lb, xs, ym, N, K, group, 4); break;
                case 3: int8_block(xm, block, sb, lb, xs, ym, N, K, group, 3); break;
                case 2: int8_block(xm, block, sb, lb, xs, ym, N, K, group, 2); break;
                default: int8_block(xm, block, sb, lb, xs, ym, N, K, group, 1); break;
            }
        }
    }
    free(xsum);
    return 0;
}

/* bfloat16 in 64-row blocks: block b is [K][64] 2-byte entries, entry j of input k = row 64 b + j. */
INLINE __m512 widen_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

INLINE void bf16_block(const float *x, const uint16_t *block, float *y, int64_t N, int64_t K, int rows) {
    __m512 acc[ROW_TILE][4];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const uint16_t *entries = block + k * 64;
        _mm_prefetch((const char *)entries + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)entries + PREFETCH_BYTES + 64, _MM_HINT_T0);
        __m512 w[4];
        for (int j = 0; j < 4; j++) w[j] = widen_bf16(entries + 16 * j);
        for (int r = 0; r < rows; r++) {
            __m512 xk = _mm512_set1_ps(x[r * K + k]);
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(w[j], xk, acc[r][j]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + r * N + 16 * j, acc[r][j]);
}

int chat_bf16_matmul(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < N / 64; b++) {
        const uint16_t *block = w + b * K * 64;
        for (int64_t m = 0; m < M; m += ROW_TILE) {
            const float *xm = x + m * K;
            float *ym = y + m * N + b * 64;
            switch (M - m < ROW_TILE ? (int)(M - m) : ROW_TILE) {
                case 4: bf16_block(xm, block, ym, N, K, 4); break;
                case 3: bf16_block(xm, block, ym, N, K, 3); break;
                case 2: bf16_block(xm, block, ym, N, K, 2); break;
                default: bf16_block(xm, block, ym, N, K, 1); break;
            }
        }
    }
    return 0;
}
