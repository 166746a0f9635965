/* The small operations around a decoder layer's matrix products, in float32, for x86-64 CPUs with AVX-512
 * (F, BW and VL).
 *
 * Eagerly, each of these is several torch ops of a few microseconds each (RMSNorm alone is seven), and a
 * batch-1 decode step of a small model is mostly such overhead. Each function here is one call:
 *
 * - chat_rms_norm: out = v / sqrt(mean(v^2) + eps) * weight per row, with v = x + residual (written to
 *   residual_out) when a residual is given, else v = x.
 * - chat_silu_mul: out = silu(gate) * up, gate and up the two halves of each row of gate_up.
 * - chat_rope: rotary embedding in Hugging Face's rotate_half layout, out = x cos + roll(x, D/2) signed_sin
 *   (signed_sin: sin with its first half negated), out of place, for every head of every token.
 * - chat_decode_attention: one new token per sequence: writes its keys and values into the paged cache, then
 *   attends each query head to its sequence's keys, read through the block table in place (no gather, no
 *   padding: the work grows with the tokens cached), with a running softmax over chunks of keys. In a recorded
 *   step the cache may also be bfloat16 (a bfloat16 model's).
 *
 * - chat_run_decoder: a whole decode step's decoder layers as one call: a list of the operations above and
 *   the weight-only products (quant_kernels.c), recorded once over fixed buffers, run in order for the step's
 *   rows (worker/native_decode.py builds the list): the CPU's counterpart of replaying a CUDA graph.
 *
 * Rows (tokens, sequences, heads) are independent and each is reduced in the same order whatever else is in
 * the call: results do not depend on the batch. exp is a polynomial (Cephes' expf, within 2 ulp).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define KEY_CHUNK 64 /* keys scored at a time by the decode attention */
#define MAX_HEAD_DIM 512
#define PARALLEL_WORK 65536 /* below this many elements a call runs on one thread */

INLINE __mmask16 tail_mask(int64_t remaining) { return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1); }

INLINE __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* x - n ln2, ln2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* p 2^n */
}

void chat_rms_norm(const float *x, const float *residual, const float *weight, float *out, float *residual_out,
                   int64_t rows, int64_t dim, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * dim >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        const float *v = xr;
        if (residual) {
            const float *rr = residual + r * dim;
            float *sum = residual_out + r * dim;
            for (int64_t j = 0; j < dim; j += 16) {
                __mmask16 m = tail_mask(dim - j);
                _mm512_mask_storeu_ps(sum + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, xr + j), _mm512_maskz_loadu_ps(m, rr + j)));
            }
            v = sum;
        }
        __m512 squares = _mm512_setzero_ps();
        for (int64_t j = 0; j < dim; j += 16) {
            __m512 a = _mm512_maskz_loadu_ps(tail_mask(dim - j), v + j);
            squares = _mm512_fmadd_ps(a, a, squares);
        }
        float inverse = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps);
        __m512 scale = _mm512_set1_ps(inverse);
        float *o = out + r * dim;
        for (int64_t j = 0; j < dim; j += 16) {
            __mmask16 m = tail_mask(dim - j);
            __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, v + j), scale);
            _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, weight + j)));
        }
    }
}

void chat_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * width >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * width, *up = gate + width;
        float *o = out + r * width;
        for (int64_t j = 0; j < width; j += 16) {
            __mmask16 m = tail_mask(width - j);
            __m512 g = _mm512_maskz_loadu_ps(m, gate + j);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + j)));
        }
    }
}

/* x: [tokens] rows of `x_stride` floats, each starting with `heads` heads of `dim` floats; cos and
   signed_sin: [tokens, dim]; out: [tokens, heads, dim] contiguous. */
void chat_rope(const float *x, int64_t x_stride, const float *cos, const float *signed_sin, float *out,
               int64_t tokens, int64_t heads, int64_t dim, int threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * heads * dim >= PARALLEL_WORK)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * dim, *s = signed_sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + t * x_stride + h * dim;
            float *o = out + (t * heads + h) * dim;
            for (int64_t j = 0; j < half; j += 16) {
                __mmask16 m = tail_mask(half - j);
                __m512 x1 = _mm512_maskz_loadu_ps(m, xh + j), x2 = _mm512_maskz_loadu_ps(m, xh + half + j);
                __m512 first = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, c + j));
                __m512 second = _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(m, c + half + j));
                first = _mm512_fmadd_ps(x2, _mm512_maskz_loadu_ps(m, s + j), first);
                second = _mm512_fmadd_ps(x1, _mm512_maskz_loadu_ps(m, s + half + j), second);
                _mm512_mask_storeu_ps(o + j, m, first);
                _mm512_mask_storeu_ps(o + half + j, m, second);
            }
        }
    }
}

/* The cache holds float32, or (`bf16`) bfloat16: the top halves of float32s, widened exactly when read and
   rounded to nearest even (as torch rounds) when written. */
INLINE __m512 load_cache(const void *cache, int64_t offset, __mmask16 m, int bf16) {
    if (bf16) {
        __m256i halves = _mm256_maskz_loadu_epi16(m, (const uint16_t *)cache + offset);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)cache + offset);
}

INLINE void store_cache(void *cache, int64_t offset, float value, int bf16) {
    if (!bf16) {
        ((float *)cache)[offset] = value;
        return;
    }
    union { float f; uint32_t u; } bits = {value};
    uint16_t rounded = value != value ? 0x7FC0 : (uint16_t)((bits.u + 0x7FFFu + ((bits.u >> 16) & 1u)) >> 16);
    ((uint16_t *)cache)[offset] = rounded;
}

INLINE float cache_dot(const float *a, const void *cache, int64_t offset, int64_t dim, int bf16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < dim; j += 16) {
        __mmask16 m = tail_mask(dim - j);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), load_cache(cache, offset + j, m, bf16), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* q: [batch] rows of `q_stride` floats starting with `heads` heads of `dim`; k and v: the new keys/values,
   [batch] rows of `k_stride` / `v_stride` floats starting with `kv_heads` heads (k NULL: nothing to write);
   key_cache and value_cache: [slots][kv_heads][dim] float32 or (`bf16`) bfloat16; slot_mapping [batch];
   block_tables [batch][max_blocks]; seq_lens [batch] (counting the new token); window 0 for none;
   out [batch][heads * dim]. Returns 0, or -1 for a head_dim over MAX_HEAD_DIM. */
INLINE int decode_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                            int64_t v_stride, void *key_cache, void *value_cache, const int64_t *slot_mapping,
                            const int64_t *block_tables, int64_t max_blocks, const int64_t *seq_lens, int64_t block_size,
                            int64_t window, float scale, float *out, int64_t batch, int64_t heads, int64_t kv_heads,
                            int64_t dim, int threads, int bf16) {
    if (dim > MAX_HEAD_DIM) return -1;
    for (int64_t b = 0; k && b < batch; b++) {
        const int64_t slot = slot_mapping[b] * kv_heads * dim;
        for (int64_t j = 0; j < kv_heads * dim; j++) {
            store_cache(key_cache, slot + j, k[b * k_stride + j], bf16);
            store_cache(value_cache, slot + j, v[b * v_stride + j], bf16);
        }
    }
    const int64_t group = heads / kv_heads;
    int64_t work = 0;
    for (int64_t b = 0; b < batch; b++) work += seq_lens[b] * heads * dim;
#pragma omp parallel for num_threads(threads) schedule(static) if (work >= PARALLEL_WORK)
    for (int64_t index = 0; index < batch * heads; index++) {
        const int64_t b = index / heads, h = index % heads, kv = h / group;
        const float *query = q + b * q_stride + h * dim;
        const int64_t *table = block_tables + b * max_blocks;
        const int64_t length = seq_lens[b], first = (window > 0 && length > window) ? length - window : 0;
        float acc[MAX_HEAD_DIM] __attribute__((aligned(64)));
        for (int64_t j = 0; j < dim; j++) acc[j] = 0.0f;
        float running_max = -INFINITY, total = 0.0f;
        for (int64_t start = first; start < length; start += KEY_CHUNK) {
            const int64_t count = length - start < KEY_CHUNK ? length - start : KEY_CHUNK;
            float scores[KEY_CHUNK] __attribute__((aligned(64)));
            int64_t offsets[KEY_CHUNK];
            float chunk_max = -INFINITY;
            for (int64_t i = 0; i < count; i++) {
                const int64_t position = start + i;
                const int64_t slot = table[position / block_size] * block_size + position % block_size;
                offsets[i] = (slot * kv_heads + kv) * dim;
                scores[i] = cache_dot(query, key_cache, offsets[i], dim, bf16) * scale;
                chunk_max = scores[i] > chunk_max ? scores[i] : chunk_max;
            }
            const float new_max = chunk_max > running_max ? chunk_max : running_max;
            const float rescale = expf(running_max - new_max); /* 0 for the first chunk */
            __m512 max_vector = _mm512_set1_ps(new_max), sum = _mm512_setzero_ps();
            for (int64_t i = 0; i < count; i += 16) {
                __mmask16 m = tail_mask(count - i);
                __m512 p = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + i), max_vector)));
                _mm512_store_ps(scores + i, p);
                sum = _mm512_add_ps(sum, p);
            }
            total = total * rescale + _mm512_reduce_add_ps(sum);
            for (int64_t j = 0; j < dim; j += 16) {
                __mmask16 m = tail_mask(dim - j);
                __m512 a = _mm512_mul_ps(_mm512_maskz_load_ps(m, acc + j), _mm512_set1_ps(rescale));
                for (int64_t i = 0; i < count; i++)
                    a = _mm512_fmadd_ps(_mm512_set1_ps(scores[i]), load_cache(value_cache, offsets[i] + j, m, bf16), a);
                _mm512_mask_store_ps(acc + j, m, a);
            }
            running_max = new_max;
        }
        float *o = out + b * heads * dim + h * dim;
        const float inverse = 1.0f / total;
        for (int64_t j = 0; j < dim; j++) o[j] = acc[j] * inverse;
    }
    return 0;
}

/* The attention above, specialised for each cache dtype (a constant `bf16` in each inlined copy). */
int chat_decode_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                          int64_t v_stride, void *key_cache, void *value_cache, const int64_t *slot_mapping,
                          const int64_t *block_tables, int64_t max_blocks, const int64_t *seq_lens, int64_t block_size,
                          int64_t window, float scale, float *out, int64_t batch, int64_t heads, int64_t kv_heads,
                          int64_t dim, int threads, int bf16) {
    if (bf16)
        return decode_attention(q, q_stride, k, k_stride, v, v_stride, key_cache, value_cache, slot_mapping, block_tables,
                                max_blocks, seq_lens, block_size, window, scale, out, batch, heads, kv_heads, dim, threads, 1);
    return decode_attention(q, q_stride, k, k_stride, v, v_stride, key_cache, value_cache, slot_mapping, block_tables,
                            max_blocks, seq_lens, block_size, window, scale, out, batch, heads, kv_heads, dim, threads, 0);
}

int chat_int4_matmul(const float *x, const uint8_t *w, const void *scale_low, int half, float *y, int64_t M, int64_t N,
                     int64_t K, int64_t group, int threads);
int chat_int8_matmul(const float *x, const int8_t *w, const float *scale, const float *low, int64_t group, float *y,
                     int64_t M, int64_t N, int64_t K, int threads);
int chat_bf16_matmul(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads);

/* One recorded operation of chat_run_decoder; what each field holds depends on `kind` (see the cases below).
   Buffers are [rows][width] row-major; the step's row count is given to the run, not recorded. */
typedef struct {
    int64_t kind;
    const float *in;
    float *out;
    const void *a, *b;
    void *c, *d;
    int64_t n[8];
    float f;
} chat_op;

enum { OP_RMS_NORM = 1, OP_INT4 = 2, OP_INT8 = 3, OP_ROPE = 4, OP_ATTENTION = 5, OP_SILU_MUL = 6, OP_BF16 = 7, OP_COLUMNS = 8 };

/* What changes from step to step: the rows, the rotary rows, where the new keys go and what each sequence reads. */
typedef struct {
    int64_t rows;
    const float *cos, *signed_sin;   /* [rows][head_dim] */
    const int64_t *slot_mapping;     /* [rows] */
    const int64_t *block_tables;     /* [rows][max_blocks] */
    int64_t max_blocks;
    const int64_t *seq_lens;         /* [rows] */
} chat_step;

INLINE void add_bias(float *y, const float *bias, int64_t rows, int64_t width) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < width; j++) y[r * width + j] += bias[j];
}

/* Returns 0, or the (1-based) index of the operation that failed, negated. */
int chat_run_decoder(const chat_op *ops, int64_t count, const chat_step *step, int threads) {
    const int64_t rows = step->rows;
    for (int64_t i = 0; i < count; i++) {
        const chat_op *op = ops + i;
        int status = 0;
        switch (op->kind) {
        case OP_RMS_NORM: /* a weight, b residual or NULL, c residual out, n0 width, f eps */
            chat_rms_norm(op->in, (const float *)op->b, (const float *)op->a, op->out, (float *)op->c, rows, op->n[0], op->f, threads);
            break;
        case OP_INT4: /* a packed weight, b scale/low, c bias or NULL, n0 N, n1 K, n2 group, n3 float16 scales */
            status = chat_int4_matmul(op->in, (const uint8_t *)op->a, op->b, (int)op->n[3], op->out, rows, op->n[0], op->n[1], op->n[2], threads);
            if (op->c) add_bias(op->out, (const float *)op->c, rows, op->n[0]);
            break;
        case OP_INT8: /* a packed weight, b scale, c bias or NULL, d minima or NULL, n0 N, n1 K, n2 inputs per scale (0: one per row) */
            status = chat_int8_matmul(op->in, (const int8_t *)op->a, (const float *)op->b, (const float *)op->d, op->n[2], op->out,
                                      rows, op->n[0], op->n[1], threads);
            if (op->c) add_bias(op->out, (const float *)op->c, rows, op->n[0]);
            break;
        case OP_BF16: /* a packed weight, c bias or NULL, n0 N, n1 K */
            status = chat_bf16_matmul(op->in, (const uint16_t *)op->a, op->out, rows, op->n[0], op->n[1], threads);
            if (op->c) add_bias(op->out, (const float *)op->c, rows, op->n[0]);
            break;
        case OP_ROPE: /* n0 input row stride, n1 heads rotated, n2 head_dim */
            chat_rope(op->in, op->n[0], step->cos, step->signed_sin, op->out, rows, op->n[1], op->n[2], threads);
            break;
        case OP_ATTENTION: /* in rotated q then k rows (stride n0), a values (row stride n1), c/d key/value caches,
                              n2 heads, n3 kv heads, n4 head_dim, n5 block size, n6 window or 0, n7 bfloat16 caches;
                              f scale */
            status = chat_decode_attention(op->in, op->n[0], op->in + op->n[2] * op->n[4], op->n[0], (const float *)op->a, op->n[1],
                                           op->c, op->d, step->slot_mapping, step->block_tables, step->max_blocks, step->seq_lens,
                                           op->n[5], op->n[6], op->f, op->out, rows, op->n[2], op->n[3], op->n[4], threads,
                                           (int)op->n[7]);
            break;
        case OP_COLUMNS: /* in rows of n0 floats into the first n0 columns of out's rows of n1 (a fused layer's part) */
            for (int64_t r = 0; r < rows; r++) memcpy(op->out + r * op->n[1], op->in + r * op->n[0], sizeof(float) * (size_t)op->n[0]);
            break;
        case OP_SILU_MUL: /* n0 width */
            chat_silu_mul(op->in, op->out, rows, op->n[0], threads);
            break;
        default:
            status = -1;
        }
        if (status) return -(int)(i + 1);
    }
    return 0;
}
