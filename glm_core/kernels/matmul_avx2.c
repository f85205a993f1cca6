/* Products for AVX2 CPUs, where torch's kernels are slower than memory (decode: a row or a few) or the CPU's
 * arithmetic (prompts: many rows) allows. Built by glm_core/native.py on first use; plain C + OpenMP (the process's
 * libgomp, so torch's thread count applies). Activations are bf16 (fp32 for a GGUF Q8_0 tensor's product, on any
 * CPU with AVX2), outputs fp32. bf16 and int8 weights multiply the activations widened exactly, sums in fp32 (Q8_0:
 * codes widened exactly, products and sums in fp32); int4 weights multiply them quantized to int8 (the section
 * after the tiles). The last section dequantizes int4 and int8 weights to bf16 for torch's GEMMs, on any CPU with
 * AVX2. Where torch runs its AVX-512 path, the bf16 decode product and the GGUF loops take 512-bit code (target
 * attributes: the file is built for AVX2). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [rows, k] bf16 -> fp32, and the sums of each group of `group` columns [rows, k / group] */
static void widen(const uint16_t *x, float *xf, float *group_sums, int rows, int k, int group) {
    for (int m = 0; m < rows; m++) {
        for (int i = 0; i < k; i++) xf[(size_t)m * k + i] = bf16_to_f32(x[(size_t)m * k + i]);
        for (int g = 0; g < k / group; g++) {
            float s = 0.f;
            for (int i = 0; i < group; i++) s += xf[(size_t)m * k + g * group + i];
            group_sums[m * (k / group) + g] = s;
        }
    }
}

/* Output rows 8i..8i+7 of a group from their bf16 (scale, zero) pairs: w = code * scale + offset with offset =
 * zero - 8 scale; for the high nibbles (i >= 2, read as 16 x code, masked in place) the scale is divided by 16. */
static inline void int4_scale_offset(const uint32_t *pairs, int i, __m256 *scale, __m256 *offset) {
    __m256i p = _mm256_loadu_si256((const __m256i *)(pairs + 8 * i));
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
    *offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s,
                               _mm256_castsi256_ps(_mm256_and_si256(p, _mm256_set1_epi32((int)0xFFFF0000u))));
    *scale = i >= 2 ? _mm256_mul_ps(s, _mm256_set1_ps(1.f / 16)) : s;
}

/* One block of 32 output rows for ROWS (1 or 2) activation rows. The weight is torch's AVX2 int4 layout
 * (_convert_weight_to_int4pack_for_cpu): per block [k][16] bytes, the low nibble of byte j row j, the high nibble
 * row 16 + j. scales_zeros [k / group][n][2] bf16: w = (code - 8) * scale + zero = code * scale + (zero - 8 scale).
 * Codes are summed against x per group, then scaled. Bytes are widened to 32-bit lanes as they are loaded and the
 * high nibble is masked in place (16 * code, the sum scaled by 1/16 after): one shuffle per 8 bytes, the port
 * AVX2 CPUs have fewest of (the first version split nibbles before widening: 7 shuffles per 16 bytes, 1.4x slower). */
#define INT4_BLOCK(ROWS)                                                                                        \
    static void int4_block_##ROWS(const uint8_t *w, const uint32_t *sz, const float *xf, const float *gsum,   \
                                  float *y, int n, int k, int group, int block) {                               \
        const __m256i low4 = _mm256_set1_epi32(0x0F), high4 = _mm256_set1_epi32(0xF0);                        \
        __m256 out[ROWS][4];                                                                                   \
        for (int m = 0; m < ROWS; m++)                                                                         \
            for (int i = 0; i < 4; i++) out[m][i] = _mm256_setzero_ps();                                       \
        const uint8_t *codes = w + (size_t)block * k * 16;                                                     \
        for (int g = 0; g < k / group; g++) {                                                                  \
            __m256 acc[ROWS][4];  /* rows 0-7, 8-15, 16 * (rows 16-23), 16 * (rows 24-31) */                   \
            for (int m = 0; m < ROWS; m++)                                                                     \
                for (int i = 0; i < 4; i++) acc[m][i] = _mm256_setzero_ps();                                   \
            for (int kk = g * group; kk < (g + 1) * group; kk++) {                                             \
                const uint8_t *at = codes + (size_t)kk * 16;                                                   \
                /* 4 KB ahead: a Xeon's prefetcher left this stream at 6 GB/s from memory, 17 with this */     \
                _mm_prefetch((const char *)(at + 4096), _MM_HINT_T0);                                          \
                __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)at));                       \
                __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(at + 8)));                 \
                __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low4));                                    \
                __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low4));                                    \
                __m256 w2 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, high4));                                   \
                __m256 w3 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, high4));                                   \
                for (int m = 0; m < ROWS; m++) {                                                               \
                    __m256 xb = _mm256_broadcast_ss(xf + (size_t)m * k + kk);                                  \
                    acc[m][0] = _mm256_fmadd_ps(w0, xb, acc[m][0]);                                            \
                    acc[m][1] = _mm256_fmadd_ps(w1, xb, acc[m][1]);                                            \
                    acc[m][2] = _mm256_fmadd_ps(w2, xb, acc[m][2]);                                            \
                    acc[m][3] = _mm256_fmadd_ps(w3, xb, acc[m][3]);                                            \
                }                                                                                              \
            }                                                                                                  \
            for (int i = 0; i < 4; i++) {                                                                      \
                __m256 scale, offset;                                                                          \
                int4_scale_offset(sz + (size_t)g * n + (size_t)block * 32, i, &scale, &offset);                \
                for (int m = 0; m < ROWS; m++) {                                                               \
                    __m256 xs = _mm256_set1_ps(gsum[m * (k / group) + g]);                                     \
                    out[m][i] = _mm256_fmadd_ps(scale, acc[m][i], _mm256_fmadd_ps(offset, xs, out[m][i]));     \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int m = 0; m < ROWS; m++)                                                                         \
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + (size_t)m * n + block * 32 + 8 * i, out[m][i]);   \
    }
INT4_BLOCK(1)
INT4_BLOCK(2)

/* y [rows, n] fp32 = x [rows, k] bf16 @ W.T, W int4 as above; n a multiple of 32, k of group. 0, or -1 when out
 * of memory. */
int int4_matmul(const uint16_t *x, const uint8_t *w, const uint16_t *scales_zeros, float *y, int rows, int n, int k,
                int group) {
    float *xf = malloc(sizeof(float) * ((size_t)rows * k + (size_t)rows * (k / group)));
    if (!xf) return -1;
    float *gsum = xf + (size_t)rows * k;
    widen(x, xf, gsum, rows, k, group);
    const uint32_t *sz = (const uint32_t *)scales_zeros;
    for (int m = 0; m < rows; m += 2) {
        int pair = rows - m >= 2;
#pragma omp parallel for schedule(static)
        for (int block = 0; block < n / 32; block++) {
            if (pair)
                int4_block_2(w, sz, xf + (size_t)m * k, gsum + m * (k / group), y + (size_t)m * n, n, k, group, block);
            else
                int4_block_1(w, sz, xf + (size_t)m * k, gsum + m * (k / group), y + (size_t)m * n, n, k, group, block);
        }
    }
    free(xf);
    return 0;
}

/* Dot products of ROWS_W weight rows (bf16, row-major, k a multiple of 16) with one fp32 row split into its even
 * and odd columns: a bf16 pair loaded as one 32-bit lane gives the even column's fp32 by a shift and the odd
 * one's by a mask, so no widening shuffle is needed. Each row is prefetched BF16_PREFETCH bytes ahead: one core's
 * few streams do not keep memory busy (a 27392 x 4096 weight streamed from memory on a 2-core AMX Xeon held to AVX2:
 * 8.8 ms without, 8.2 with; 4096 x 13696 4.1 and 3.7). */
#define ROWS_W 4
#define BF16_PREFETCH 1024
static void bf16_rows(const uint16_t *w, const float *x_even, const float *x_odd, float *y, int k) {
    const __m256i high16 = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 even[ROWS_W], odd[ROWS_W];
    for (int r = 0; r < ROWS_W; r++) even[r] = odd[r] = _mm256_setzero_ps();
    for (int i = 0; i < k; i += 16) {
        __m256 xe = _mm256_loadu_ps(x_even + i / 2), xo = _mm256_loadu_ps(x_odd + i / 2);
        for (int r = 0; r < ROWS_W; r++) {
            _mm_prefetch((const char *)(w + (size_t)r * k + i) + BF16_PREFETCH, _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * k + i));
            even[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, even[r]);
            odd[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high16)), xo, odd[r]);
        }
    }
    for (int r = 0; r < ROWS_W; r++) y[r] = hsum(_mm256_add_ps(even[r], odd[r]));
}

/* y [rows, n] fp32 = x [rows, k] bf16 @ W.T, W bf16 [n, k] row-major; n a multiple of 4, k of 16. 0, or -1 when out
 * of memory. */
int bf16_matmul(const uint16_t *x, const uint16_t *w, float *y, int rows, int n, int k) {
    float *split = malloc(sizeof(float) * (size_t)rows * k);
    if (!split) return -1;
    for (int m = 0; m < rows; m++)
        for (int i = 0; i < k; i++) split[(size_t)m * k + (i % 2) * (k / 2) + i / 2] = bf16_to_f32(x[(size_t)m * k + i]);
#pragma omp parallel for schedule(static)
    for (int quad = 0; quad < n / ROWS_W; quad++)
        for (int m = 0; m < rows; m++) {
            const float *xm = split + (size_t)m * k;
            bf16_rows(w + (size_t)quad * ROWS_W * k, xm, xm + k / 2, y + (size_t)m * n + quad * ROWS_W, k);
        }
    free(split);
    return 0;
}

/* The same product for a few rows (decode) on CPUs with AVX-512 bf16 (torch on its AVX-512 path): vdpbf16ps
 * multiplies 32 bf16 pairs exactly and adds them to 16 fp32 sums. Eight weight rows are read at once, each prefetched
 * as above (a 2-core AMX Xeon read a 27392 x 4096 weight at 21.7 GB/s a row at a time, 27.8 eight at a time, 29.4
 * with the prefetch; oneDNN's packed product 25.8). */
#define BF16_DECODE_ROWS_W 8
#define BF16_DECODE_MAX_ROWS 4   /* native.BF16_DECODE_MAX_ROWS */
#define BF16_AVX512 __attribute__((target("avx512f,avx512bf16")))

BF16_AVX512 static inline __attribute__((always_inline)) void bf16_decode_block(
        const uint16_t *x, const uint16_t *w, float *y, int rows, int n, int k) {
    __m512 acc[BF16_DECODE_MAX_ROWS][BF16_DECODE_ROWS_W];
    for (int m = 0; m < rows; m++)
        for (int r = 0; r < BF16_DECODE_ROWS_W; r++) acc[m][r] = _mm512_setzero_ps();
    for (int i = 0; i < k; i += 32) {
        __m512bh xv[BF16_DECODE_MAX_ROWS];
        for (int m = 0; m < rows; m++) xv[m] = (__m512bh)_mm512_loadu_si512(x + (size_t)m * k + i);
        for (int r = 0; r < BF16_DECODE_ROWS_W; r++) {
            const uint16_t *p = w + (size_t)r * k + i;
            _mm_prefetch((const char *)p + BF16_PREFETCH, _MM_HINT_T0);
            __m512bh wv = (__m512bh)_mm512_loadu_si512(p);
            for (int m = 0; m < rows; m++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, xv[m]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int r = 0; r < BF16_DECODE_ROWS_W; r++) y[(size_t)m * n + r] = _mm512_reduce_add_ps(acc[m][r]);
}

/* y [rows, n] fp32 = x [rows, k] bf16 @ W.T, W bf16 [n, k] row-major: rows 1..BF16_DECODE_MAX_ROWS, n a multiple of
 * 8, k of 32 (native.decodes_bf16 checks). */
BF16_AVX512 void bf16_decode(const uint16_t *x, const uint16_t *w, float *y, int rows, int n, int k) {
#pragma omp parallel for schedule(static)
    for (int block = 0; block < n / BF16_DECODE_ROWS_W; block++) {
        const uint16_t *wb = w + (size_t)block * BF16_DECODE_ROWS_W * k;
        float *yb = y + block * BF16_DECODE_ROWS_W;
        switch (rows) {   /* each a loop of constant trip counts, its sums in registers */
        case 1: bf16_decode_block(x, wb, yb, 1, n, k); break;
        case 2: bf16_decode_block(x, wb, yb, 2, n, k); break;
        case 3: bf16_decode_block(x, wb, yb, 3, n, k); break;
        default: bf16_decode_block(x, wb, yb, BF16_DECODE_MAX_ROWS, n, k);
        }
    }
}

/* Dot products of ROWS_W int8 weight rows (row stride ldw) with one fp32 row of k columns, times each row's
 * scale: bytes widened to 32-bit lanes as they are loaded, the tail past the last 16 columns one at a time. */
static void int8_rows(const int8_t *w, int ldw, const float *scales, const float *x, float *y, int k) {
    __m256 lo[ROWS_W], hi[ROWS_W];
    for (int r = 0; r < ROWS_W; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    int body = k / 16 * 16;
    for (int i = 0; i < body; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        for (int r = 0; r < ROWS_W; r++) {
            const int8_t *at = w + (size_t)r * ldw + i;
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)at)));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(at + 8))));
            lo[r] = _mm256_fmadd_ps(w0, x0, lo[r]);
            hi[r] = _mm256_fmadd_ps(w1, x1, hi[r]);
        }
    }
    for (int r = 0; r < ROWS_W; r++) {
        float sum = hsum(_mm256_add_ps(lo[r], hi[r]));
        for (int i = body; i < k; i++) sum += (float)w[(size_t)r * ldw + i] * x[i];
        y[r] = sum * scales[r];
    }
}

/* y [rows, n] fp32 = x [rows, k] bf16 @ (scale * q).T, q int8 [n, ldw >= k] row-major, scales bf16 [n]; n a multiple
 * of 4. 0, or -1 when out of memory. */
int int8_matmul(const uint16_t *x, const int8_t *w, const uint16_t *scales, float *y, int rows, int n, int k,
                int ldw) {
    float *xf = malloc(sizeof(float) * ((size_t)rows * k + n));
    if (!xf) return -1;
    float *scale = xf + (size_t)rows * k;
    for (size_t i = 0; i < (size_t)rows * k; i++) xf[i] = bf16_to_f32(x[i]);
    for (int i = 0; i < n; i++) scale[i] = bf16_to_f32(scales[i]);
#pragma omp parallel for schedule(static)
    for (int quad = 0; quad < n / ROWS_W; quad++)
        for (int m = 0; m < rows; m++)
            int8_rows(w + (size_t)quad * ROWS_W * ldw, ldw, scale + quad * ROWS_W, xf + (size_t)m * k,
                      y + (size_t)m * n + quad * ROWS_W, k);
    free(xf);
    return 0;
}

/* GGUF block tensors, kept as stored (quant.GGUFLinear), against fp32 activations. Q8_0: int8 codes [n][k], one fp32
 * scale per block of 32 columns [n][k / 32]; w = scale x code. Q4_1: 4-bit codes [n][k / 32][16] in GGUF's order (byte
 * j of a block: column j in its low nibble, column j + 16 in its high one), fp32 (scale, min) pairs [n][k / 32][2];
 * w = scale x code + min. GGUF_W weight rows against up to GGUF_X activation rows (row stride k) a pass: each block's
 * codes widened to fp32 once, their sum of products with each row in fp32, times the block's scale into the row's
 * total (Q4_1: plus min x the block's sum of activations, summed apart). Independent totals keep the FMA units busy
 * with a single activation row (decode). */
#define GGUF_W 2
#define GGUF_X 4
#define GGUF_PREFETCH 4096   /* bytes of codes ahead, into L2: the codes stream from memory */
enum { GGUF_Q8_0 = 0, GGUF_Q4_1 = 1 };

/* the 32 codes of a block as 4 x 8 fp32 */
static inline void gguf_widen(int kind, const uint8_t *codes, __m256 v[4]) {
    __m128i a, b;
    if (kind == GGUF_Q8_0) {
        __m256i q = _mm256_loadu_si256((const __m256i *)codes);
        __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        return;
    }
    __m128i q = _mm_loadu_si128((const __m128i *)codes), nibble = _mm_set1_epi8(0x0f);
    a = _mm_and_si128(q, nibble);                       /* columns 0..15 */
    b = _mm_and_si128(_mm_srli_epi16(q, 4), nibble);    /* columns 16..31 */
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
}

static inline int gguf_block_bytes(int kind) { return kind == GGUF_Q8_0 ? 32 : 16; }
static inline int gguf_block_scales(int kind) { return kind == GGUF_Q8_0 ? 1 : 2; }

/* x_sums [rows][k / 32]: each block's sum of activations (Q4_1's min term). Inlined with `rows` a constant
 * (gguf_rows): the totals then stay in registers (a variable count kept them in memory, 2.5x slower). */
static inline __attribute__((always_inline)) void gguf_rows_of(
        int kind, const uint8_t *w, const float *scales, const float *x, const float *x_sums, float *y, int rows,
        int ldy, int k) {
    int blocks = k / 32, bytes = gguf_block_bytes(kind), per = gguf_block_scales(kind);
    __m256 acc[GGUF_W][GGUF_X];
    float mins[GGUF_W][GGUF_X] = {{0}};
    for (int r = 0; r < GGUF_W; r++)
        for (int m = 0; m < rows; m++) acc[r][m] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        for (int r = 0; r < GGUF_W; r++) {
            const uint8_t *at = w + ((size_t)r * blocks + b) * bytes;
            const float *s = scales + ((size_t)r * blocks + b) * per;
            _mm_prefetch((const char *)at + GGUF_PREFETCH, _MM_HINT_T1);
            __m256 v[4];
            gguf_widen(kind, at, v);
            __m256 scale = _mm256_set1_ps(s[0]);
            for (int m = 0; m < rows; m++) {
                const float *xb = x + (size_t)m * k + 32 * b;
                __m256 s01 = _mm256_mul_ps(v[0], _mm256_loadu_ps(xb));
                __m256 s23 = _mm256_mul_ps(v[2], _mm256_loadu_ps(xb + 16));
                s01 = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xb + 8), s01);
                s23 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xb + 24), s23);
                acc[r][m] = _mm256_fmadd_ps(scale, _mm256_add_ps(s01, s23), acc[r][m]);
                if (per == 2) mins[r][m] += s[1] * x_sums[(size_t)m * blocks + b];
            }
        }
    }
    for (int r = 0; r < GGUF_W; r++)
        for (int m = 0; m < rows; m++) y[(size_t)m * ldy + r] = hsum(acc[r][m]) + mins[r][m];
}

/* The same with 512-bit vectors, for CPUs with AVX-512 (gguf_matmul's `wide`): each 16 codes of a block widened to
 * 16 fp32 in 3 instructions (zero-extend the bytes to 32 bits from memory; the low nibble looked up in a table of 0..15
 * by vpermps, which reads only an index's low 4 bits; the high one shifted down first), Q8_0's by sign extension
 * and conversion: half the instructions per weight of the 256-bit loop, whose arithmetic, not memory, bounded it. */
#define GGUF_AVX512 __attribute__((target("avx512f")))

GGUF_AVX512 static inline void gguf_widen16(int kind, const uint8_t *codes, __m512 v[2], __m512 values) {
    if (kind == GGUF_Q8_0) {
        v[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
        v[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16))));
        return;
    }
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes));
    v[0] = _mm512_permutexvar_ps(q, values);                        /* columns 0..15: low nibbles */
    v[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), values);  /* columns 16..31 */
}

GGUF_AVX512 static inline __attribute__((always_inline)) void gguf_rows_avx512_of(
        int kind, const uint8_t *w, const float *scales, const float *x, const float *x_sums, float *y, int rows,
        int ldy, int k) {
    int blocks = k / 32, bytes = gguf_block_bytes(kind), per = gguf_block_scales(kind);
    __m512 acc[GGUF_W][GGUF_X];
    float mins[GGUF_W][GGUF_X] = {{0}};
    __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int r = 0; r < GGUF_W; r++)
        for (int m = 0; m < rows; m++) acc[r][m] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        for (int r = 0; r < GGUF_W; r++) {
            const uint8_t *at = w + ((size_t)r * blocks + b) * bytes;
            const float *s = scales + ((size_t)r * blocks + b) * per;
            _mm_prefetch((const char *)at + GGUF_PREFETCH, _MM_HINT_T1);
            __m512 v[2];
            gguf_widen16(kind, at, v, values);
            __m512 scale = _mm512_set1_ps(s[0]);
            for (int m = 0; m < rows; m++) {
                const float *xb = x + (size_t)m * k + 32 * b;
                __m512 sum = _mm512_fmadd_ps(v[1], _mm512_loadu_ps(xb + 16), _mm512_mul_ps(v[0], _mm512_loadu_ps(xb)));
                acc[r][m] = _mm512_fmadd_ps(scale, sum, acc[r][m]);
                if (per == 2) mins[r][m] += s[1] * x_sums[(size_t)m * blocks + b];
            }
        }
    }
    for (int r = 0; r < GGUF_W; r++)
        for (int m = 0; m < rows; m++) y[(size_t)m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]) + mins[r][m];
}

static void gguf_rows(int kind, const uint8_t *w, const float *scales, const float *x, const float *x_sums, float *y,
                      int rows, int ldy, int k) {
    switch (rows) {
    case 1: gguf_rows_of(kind, w, scales, x, x_sums, y, 1, ldy, k); break;
    case 2: gguf_rows_of(kind, w, scales, x, x_sums, y, 2, ldy, k); break;
    case 3: gguf_rows_of(kind, w, scales, x, x_sums, y, 3, ldy, k); break;
    default: gguf_rows_of(kind, w, scales, x, x_sums, y, GGUF_X, ldy, k);
    }
}

GGUF_AVX512 static void gguf_rows_avx512(int kind, const uint8_t *w, const float *scales, const float *x,
                                         const float *x_sums, float *y, int rows, int ldy, int k) {
    switch (rows) {
    case 1: gguf_rows_avx512_of(kind, w, scales, x, x_sums, y, 1, ldy, k); break;
    case 2: gguf_rows_avx512_of(kind, w, scales, x, x_sums, y, 2, ldy, k); break;
    case 3: gguf_rows_avx512_of(kind, w, scales, x, x_sums, y, 3, ldy, k); break;
    default: gguf_rows_avx512_of(kind, w, scales, x, x_sums, y, GGUF_X, ldy, k);
    }
}

/* y [rows, n] fp32 = x [rows, k] fp32 @ W.T for a GGUF block tensor W [n, k] (above); n a multiple of GGUF_W, k of
 * 32; `wide`: the 512-bit loop (the CPU has AVX-512F). 0, or -1 when out of memory. */
int gguf_matmul(int kind, const float *x, const uint8_t *w, const float *scales, float *y, int rows, int n, int k,
                int wide) {
    int blocks = k / 32;
    float *x_sums = malloc(sizeof(float) * ((size_t)rows * blocks + 1));
    if (!x_sums) return -1;
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < blocks; b++) {
            float sum = 0.f;
            for (int i = 0; i < 32; i++) sum += x[(size_t)m * k + 32 * b + i];
            x_sums[(size_t)m * blocks + b] = sum;
        }
    size_t row_bytes = (size_t)blocks * gguf_block_bytes(kind), row_scales = (size_t)blocks * gguf_block_scales(kind);
#pragma omp parallel for schedule(static)
    for (int j = 0; j < n; j += GGUF_W)
        for (int m = 0; m < rows; m += GGUF_X) {
            int pass = rows - m < GGUF_X ? rows - m : GGUF_X;
            const uint8_t *wj = w + (size_t)j * row_bytes;
            const float *sj = scales + (size_t)j * row_scales, *xm = x + (size_t)m * k;
            const float *sums = x_sums + (size_t)m * blocks;
            float *yj = y + (size_t)m * n + j;
            if (wide) gguf_rows_avx512(kind, wj, sj, xm, sums, yj, pass, n, k);
            else gguf_rows(kind, wj, sj, xm, sums, yj, pass, n, k);
        }
    free(x_sums);
    return 0;
}

static inline __m128i f32_to_bf16(__m256 v);

/* Rows start..stop-1 of a GGUF block tensor as fp32 [stop - start][k]: exactly the weights (scale x code [+ min],
 * one rounding, as GGUF's own dequantization); with bf16 set, as bf16, those weights rounded to nearest even (a
 * prompt's bf16 GEMM at int8 / int4). */
void gguf_dequantize(int kind, const uint8_t *w, const float *scales, void *out, int start, int stop, int k, int bf16) {
    int blocks = k / 32, bytes = gguf_block_bytes(kind), per = gguf_block_scales(kind);
#pragma omp parallel for schedule(static)
    for (int j = start; j < stop; j++)
        for (int b = 0; b < blocks; b++) {
            const uint8_t *at = w + ((size_t)j * blocks + b) * bytes;
            const float *s = scales + ((size_t)j * blocks + b) * per;
            __m256 v[4];
            gguf_widen(kind, at, v);
            __m256 scale = _mm256_set1_ps(s[0]), low = _mm256_set1_ps(per == 2 ? s[1] : 0.f);
            size_t at_out = (size_t)(j - start) * k + 32 * b;
            for (int i = 0; i < 4; i++) {   /* mul then add (no FMA): scale x code is exact, the add rounds once */
                __m256 x = _mm256_add_ps(_mm256_mul_ps(scale, v[i]), low);
                if (bf16)
                    _mm_storeu_si128((__m128i *)((uint16_t *)out + at_out + 8 * i), f32_to_bf16(x));
                else
                    _mm256_storeu_ps((float *)out + at_out + 8 * i, x);
            }
        }
}

/* Several activation rows: each block of 32 output columns is decoded a tile of k at a time into fp32 [tile_k][32]
 * that stays in L1 while every row multiplies it, so decoding is paid once per TILED_ROW_CHUNK rows instead of
 * once per row (pair). The chunk bounds the activations a block reads to what L2 holds across blocks. */
#define TILED_ROW_CHUNK 252   /* whole groups of MICRO_ROWS */
#define MICRO_ROWS 6
/* ... and fewer for long rows: the chunk's activations every block reads again stay within 6 MB, well inside a
 * 16 MB L3 (4096 x 13696 int4, 512 rows: 252-row chunks of 13.8 MB ran 428 ms, 126-row ones 338) */
#define TILED_CHUNK_FLOATS (3 << 19)
struct tiled_weight {
    int kind;               /* 0: int4 (torch's AVX2 layout, above), 1: int8 [n][k], 2: bf16 [n][k] */
    const void *w;
    const uint32_t *scales_zeros;  /* int4: bf16 (scale, zero) pairs [k / group][n] */
    const float *scales;           /* int8: per output column, applied to the finished sums */
    int n, k, group;               /* k: the weight's row length (int8: padded), the activations' too */
};

/* columns of k a tile holds: one int4 group, else 128 (32 x 128 fp32: 16 KB of L1) */
static inline int tile_width(const struct tiled_weight *wt) { return wt->kind == 0 ? wt->group : 128; }

/* int4: w = code * scale + offset, one rounding; k0..k0+kk within one group */
static void decode_int4(const struct tiled_weight *wt, int block, int k0, int kk, float *tile) {
    const __m256i low4 = _mm256_set1_epi32(0x0F), high4 = _mm256_set1_epi32(0xF0);
    __m256 scale[4], offset[4];
    for (int i = 0; i < 4; i++)
        int4_scale_offset(wt->scales_zeros + (size_t)(k0 / wt->group) * wt->n + (size_t)block * 32, i, &scale[i],
                          &offset[i]);
    const uint8_t *codes = (const uint8_t *)wt->w + ((size_t)block * wt->k + k0) * 16;
    for (int i = 0; i < kk; i++, codes += 16) {
        __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)codes));
        __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8)));
        float *t = tile + i * 32;
        _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, low4)), scale[0], offset[0]));
        _mm256_storeu_ps(t + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, low4)), scale[1], offset[1]));
        _mm256_storeu_ps(t + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, high4)), scale[2], offset[2]));
        _mm256_storeu_ps(t + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, high4)), scale[3], offset[3]));
    }
}


/* 8 x 8 transpose: r[j] holds 8 columns of weight row j, tile row i gets column i of the 8 rows */
static inline void store_transposed(__m256 r[8], float *tile) {
    __m256 t[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {
        r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        _mm256_storeu_ps(tile + j * 32, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
        _mm256_storeu_ps(tile + (j + 4) * 32, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
    }
}

/* int8 (codes as floats, scaled after the sums) and bf16 (exact in fp32): row-major weights transposed 8 x 8 into
 * the tile; columns past n are zero. kk a multiple of 8. */
static void decode_rows(const struct tiled_weight *wt, int block, int k0, int kk, float *tile) {
    for (int c0 = 0; c0 < 32; c0 += 8) {
        int valid = wt->n - (block * 32 + c0);
        valid = valid < 0 ? 0 : valid > 8 ? 8 : valid;
        size_t first = (size_t)(block * 32 + c0) * wt->k + k0;
        for (int i = 0; i < kk; i += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) {
                if (j >= valid) {
                    r[j] = _mm256_setzero_ps();
                } else if (wt->kind == 1) {
                    const int8_t *at = (const int8_t *)wt->w + first + (size_t)j * wt->k + i;
                    r[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)at)));
                } else {
                    const uint16_t *at = (const uint16_t *)wt->w + first + (size_t)j * wt->k + i;
                    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)at));
                    r[j] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                }
            }
            store_transposed(r, tile + i * 32 + c0);
        }
    }
}

/* ROWS rows of acc [rows][32] += x @ tile [kk][32], 16 columns at a time, x one packed group of activation rows
 * (pack_rows: [k][MICRO_ROWS], columns k0..k0+kk): the tile's vectors are loaded once for ROWS broadcast activations
 * (up to 6: 12 accumulators, 2 weight vectors and a broadcast fill the 16 registers), read from consecutive
 * addresses (rows k apart would share L1 sets when k is a power of two). */
#define TILE_ROWS(ROWS)                                                                                         \
    static void tile_rows_##ROWS(const float *tile, const float *x, float *acc, int k0, int kk) {               \
        for (int half = 0; half < 2; half++) {                                                                 \
            __m256 a[ROWS][2];                                                                                 \
            for (int r = 0; r < ROWS; r++) {                                                                   \
                a[r][0] = _mm256_loadu_ps(acc + r * 32 + half * 16);                                           \
                a[r][1] = _mm256_loadu_ps(acc + r * 32 + half * 16 + 8);                                       \
            }                                                                                                  \
            for (int i = 0; i < kk; i++) {                                                                     \
                __m256 w0 = _mm256_loadu_ps(tile + i * 32 + half * 16);                                        \
                __m256 w1 = _mm256_loadu_ps(tile + i * 32 + half * 16 + 8);                                    \
                for (int r = 0; r < ROWS; r++) {                                                               \
                    __m256 xb = _mm256_broadcast_ss(x + (size_t)(k0 + i) * MICRO_ROWS + r);                   \
                    a[r][0] = _mm256_fmadd_ps(w0, xb, a[r][0]);                                                \
                    a[r][1] = _mm256_fmadd_ps(w1, xb, a[r][1]);                                                \
                }                                                                                              \
            }                                                                                                  \
            for (int r = 0; r < ROWS; r++) {                                                                   \
                _mm256_storeu_ps(acc + r * 32 + half * 16, a[r][0]);                                           \
                _mm256_storeu_ps(acc + r * 32 + half * 16 + 8, a[r][1]);                                      \
            }                                                                                                  \
        }                                                                                                      \
    }
TILE_ROWS(1)
TILE_ROWS(2)
TILE_ROWS(3)
TILE_ROWS(4)
TILE_ROWS(5)
TILE_ROWS(6)

/* acc [rows][32] += x (packed rows, columns k0..k0+kk) @ tile [kk][32] */
static void tile_matmul(const float *tile, const float *x, float *acc, int rows, int k, int k0, int kk) {
    static void (*const by_rows[])(const float *, const float *, float *, int, int) = {
        tile_rows_1, tile_rows_2, tile_rows_3, tile_rows_4, tile_rows_5, tile_rows_6};
    for (int m = 0; m < rows; m += MICRO_ROWS) {
        int take = rows - m < MICRO_ROWS ? rows - m : MICRO_ROWS;
        by_rows[take - 1](tile, x + (size_t)m * k, acc + (size_t)m * 32, k0, kk);
    }
}

/* One block of 32 output columns for `rows` activation rows, packed */
static void tiled_block(const struct tiled_weight *wt, const float *packed, float *y, int rows, int block, float *tile,
                        float *acc) {
    int tile_k = tile_width(wt);
    memset(acc, 0, sizeof(float) * (size_t)rows * 32);
    for (int k0 = 0; k0 < wt->k; k0 += tile_k) {
        int kk = wt->k - k0 < tile_k ? wt->k - k0 : tile_k;
        if (wt->kind == 0)
            decode_int4(wt, block, k0, kk, tile);
        else
            decode_rows(wt, block, k0, kk, tile);
        tile_matmul(tile, packed, acc, rows, wt->k, k0, kk);
    }
    int cols = wt->n - block * 32 < 32 ? wt->n - block * 32 : 32;
    for (int m = 0; m < rows; m++) {
        float *out = y + (size_t)m * wt->n + block * 32;
        const float *sums = acc + (size_t)m * 32;
        for (int c = 0; c < cols; c++) out[c] = wt->scales ? sums[c] * wt->scales[block * 32 + c] : sums[c];
    }
}

/* Calls run(job, m, take, block, scratch) for every block of 32 output columns and chunk of up to `chunk` rows from
 * m, the blocks shared out among the threads, each with its own scratch (scratch_bytes, 64-byte aligned); 0, or -1
 * when out of memory */
typedef void (*block_job)(const void *job, int m, int rows, int block, void *scratch);
static int for_blocks(block_job run, const void *job, int rows, int blocks, int chunk, size_t scratch_bytes) {
    int failed = 0;
#pragma omp parallel
    {
        void *scratch = aligned_alloc(64, (scratch_bytes + 64) / 64 * 64);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
        for (int m = 0; m < rows; m += chunk) {
            int take = rows - m < chunk ? rows - m : chunk;
#pragma omp for schedule(static)
            for (int block = 0; block < blocks; block++)
                if (scratch) run(job, m, take, block, scratch);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* rows a chunk takes: whole micro-kernel groups, at most `most`, and no more than `keep` bytes of activations */
static int chunk_rows(size_t row_bytes, size_t keep, int group, int most) {
    int chunk = (int)(keep / row_bytes) / group * group;
    return chunk < group ? group : chunk > most ? most : chunk;
}

struct tiled_job {
    const struct tiled_weight *wt;
    const float *packed;
    float *y;
};

static void tiled_job_block(const void *job, int m, int rows, int block, void *scratch) {
    const struct tiled_job *j = job;
    tiled_block(j->wt, j->packed + (size_t)m * j->wt->k, j->y + (size_t)m * j->wt->n, rows, block, scratch,
                (float *)scratch + (size_t)tile_width(j->wt) * 32);
}

/* x [rows, k] bf16 -> fp32 in groups of MICRO_ROWS rows, each [k_padded][MICRO_ROWS] (a group's activations for
 * one column side by side); rows and columns past the input's are zero. NULL when out of memory. */
static float *pack_rows(const uint16_t *x, int rows, int k, int k_padded) {
    size_t groups = (size_t)(rows + MICRO_ROWS - 1) / MICRO_ROWS;
    float *packed = calloc(groups * k_padded * MICRO_ROWS, sizeof(float));
    if (!packed) return NULL;
    for (int m = 0; m < rows; m++) {
        float *group = packed + (size_t)(m / MICRO_ROWS) * k_padded * MICRO_ROWS + m % MICRO_ROWS;
        for (int i = 0; i < k; i++) group[(size_t)i * MICRO_ROWS] = bf16_to_f32(x[(size_t)m * k + i]);
    }
    return packed;
}

static int tiled_product(const struct tiled_weight *wt, const uint16_t *x, float *y, int rows, int k) {
    float *packed = pack_rows(x, rows, k, wt->k);
    if (!packed) return -1;
    int chunk = chunk_rows(sizeof(float) * wt->k, sizeof(float) * TILED_CHUNK_FLOATS, MICRO_ROWS, TILED_ROW_CHUNK);
    struct tiled_job job = {wt, packed, y};
    int rc = for_blocks(tiled_job_block, &job, rows, (wt->n + 31) / 32, chunk,
                        sizeof(float) * ((size_t)tile_width(wt) + chunk) * 32);
    free(packed);
    return rc;
}

/* y [rows, n] fp32 = x [rows, k] bf16 @ W.T through tiles, W int4 as int4_matmul's; 0, or -1 when out of memory */
int int4_matmul_tiled(const uint16_t *x, const uint8_t *w, const uint16_t *scales_zeros, float *y, int rows, int n,
                      int k, int group) {
    struct tiled_weight wt = {0, w, (const uint32_t *)scales_zeros, NULL, n, k, group};
    return tiled_product(&wt, x, y, rows, k);
}

/* the same, W int8 as int8_matmul's (scaled after the sums): n any, ldw a multiple of 16 */
int int8_matmul_tiled(const uint16_t *x, const int8_t *w, const uint16_t *scales, float *y, int rows, int n, int k,
                      int ldw) {
    float *scale = malloc(sizeof(float) * n);
    if (!scale) return -1;
    for (int i = 0; i < n; i++) scale[i] = bf16_to_f32(scales[i]);
    struct tiled_weight wt = {1, w, NULL, scale, n, ldw, 0};
    int rc = tiled_product(&wt, x, y, rows, k);
    free(scale);
    return rc;
}

/* the same, W bf16 as bf16_matmul's: n any, k a multiple of 8 */
int bf16_matmul_tiled(const uint16_t *x, const uint16_t *w, float *y, int rows, int n, int k) {
    struct tiled_weight wt = {2, w, NULL, NULL, n, k, 0};
    return tiled_product(&wt, x, y, rows, k);
}

/* ---- Several rows of int4 against activations quantized to int8 (the layers GLM Studio quantizes itself) ----
 * Each activation row is quantized per block of 32 columns (scale max|x| / 127, rounded to nearest even: the
 * arithmetic of llama.cpp's Q8_0), and codes (0..15) multiply it with vpmaddubsw, 32 byte products a cycle on a
 * Zen 2: twice its FMA rate. A block's 16-bit sums (16 products of at most 15 x 127 each) fit without saturating,
 * so they are widened once per block. A row goes through the same operations whatever the number of rows, so its
 * product is bit for bit the same alone or in a batch of two or more. */
#define Q8_ROWS 4   /* rows a micro-kernel takes: 8 16-bit accumulators, 2 weight vectors, a broadcast */
struct int4_weight {
    const uint8_t *w;                /* torch's AVX2 layout, as int4_matmul's */
    const uint32_t *scales_zeros;    /* bf16 (scale, zero) pairs [k / group][n] */
    int n, k, group;
};

/* Activations: a group of Q8_ROWS rows is [k / 4][Q8_ROWS][4] int8, its block scales [k / 32][Q8_ROWS], and the sums
 * of its dequantized values per weight group [k / group][Q8_ROWS] (for the zero term) */
struct q8_rows {
    int8_t *q;
    float *scales, *sums;
    int k, group;
};

static inline const int8_t *q8_quads(const struct q8_rows *x, int m) {
    return x->q + (size_t)(m / Q8_ROWS) * x->k * Q8_ROWS + (m % Q8_ROWS) * 4;
}
static inline const float *q8_scales(const struct q8_rows *x, int m) {
    return x->scales + (size_t)(m / Q8_ROWS) * (x->k / 32) * Q8_ROWS + m % Q8_ROWS;
}
static inline const float *q8_sums(const struct q8_rows *x, int m) {
    return x->sums + (size_t)(m / Q8_ROWS) * (x->k / x->group) * Q8_ROWS + m % Q8_ROWS;
}

/* x [rows, k] bf16 quantized and packed as above (rows past the input's zero); -1 when out of memory */
static int quantize_rows(const uint16_t *x, int rows, int k, int group, struct q8_rows *out) {
    size_t groups = (size_t)(rows + Q8_ROWS - 1) / Q8_ROWS;
    out->k = k, out->group = group;
    out->q = calloc(groups * k * Q8_ROWS, 1);
    out->scales = calloc(groups * Q8_ROWS * ((size_t)k / 32 + k / group), sizeof(float));
    if (!out->q || !out->scales) {
        free(out->q), free(out->scales);
        return -1;
    }
    out->sums = out->scales + groups * Q8_ROWS * (k / 32);
#pragma omp parallel for schedule(static)   /* rows write apart: the embedded model's products are short */
    for (int m = 0; m < rows; m++) {
        int8_t *q = (int8_t *)q8_quads(out, m);
        float *scales = (float *)q8_scales(out, m), *sums = (float *)q8_sums(out, m);
        for (int b = 0; b < k / 32; b++) {
            const __m256i *at = (const __m256i *)(x + (size_t)m * k + b * 32);
            __m256 v[4], top = _mm256_setzero_ps();
            for (int j = 0; j < 2; j++) {
                __m256i h = _mm256_loadu_si256(at + j);
                v[2 * j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
                v[2 * j + 1] =
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
            }
            for (int j = 0; j < 4; j++) top = _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[j]));
            float lanes[8], amax = 0.f;
            _mm256_storeu_ps(lanes, top);
            for (int j = 0; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
            float inv = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
            int32_t codes[32], sum = 0;
            for (int j = 0; j < 4; j++)   /* rounds to nearest even, the default mode */
                _mm256_storeu_si256((__m256i *)(codes + 8 * j),
                                    _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv))));
            for (int i = 0; i < 32; i++) {
                q[(size_t)(b * 8 + i / 4) * Q8_ROWS * 4 + i % 4] = (int8_t)codes[i];
                sum += codes[i];
            }
            scales[b * Q8_ROWS] = scale;
            sums[(b * 32 / group) * Q8_ROWS] += scale * (float)sum;
        }
    }
    return 0;
}

/* One group of a block's codes as a tile [group / 4][32 columns][4] (4 consecutive columns of k per output
 * column: the operand vpmaddubsw wants against a broadcast quad of activations), by byte interleaves of torch's
 * layout; and the group's scale and offset per column (w = code * scale + offset) */
static void decode_int4_quads(const struct int4_weight *wt, int block, int k0, uint8_t *tile, float *scale,
                              float *offset) {
    const uint32_t *pairs = wt->scales_zeros + (size_t)(k0 / wt->group) * wt->n + (size_t)block * 32;
    for (int c = 0; c < 32; c++) {
        scale[c] = bf16_to_f32((uint16_t)pairs[c]);
        offset[c] = bf16_to_f32((uint16_t)(pairs[c] >> 16)) - 8.f * scale[c];
    }
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const uint8_t *codes = wt->w + ((size_t)block * wt->k + k0) * 16;
    for (int i = 0; i < wt->group / 4; i++, codes += 64, tile += 128) {
        __m128i r0 = _mm_loadu_si128((const __m128i *)codes), r1 = _mm_loadu_si128((const __m128i *)(codes + 16));
        __m128i r2 = _mm_loadu_si128((const __m128i *)(codes + 32)), r3 = _mm_loadu_si128((const __m128i *)(codes + 48));
        __m128i a = _mm_unpacklo_epi8(r0, r1), a2 = _mm_unpackhi_epi8(r0, r1);
        __m128i b = _mm_unpacklo_epi8(r2, r3), b2 = _mm_unpackhi_epi8(r2, r3);
        __m128i c[4] = {_mm_unpacklo_epi16(a, b), _mm_unpackhi_epi16(a, b), _mm_unpacklo_epi16(a2, b2),
                        _mm_unpackhi_epi16(a2, b2)};   /* the bytes of columns 4j..4j+3 and of 16 + those */
        for (int j = 0; j < 4; j++) {
            _mm_storeu_si128((__m128i *)(tile + 16 * j), _mm_and_si128(c[j], low4));
            _mm_storeu_si128((__m128i *)(tile + 64 + 16 * j), _mm_and_si128(_mm_srli_epi16(c[j], 4), low4));
        }
    }
}

/* ROWS rows of acc [rows][32] += x @ tile for one weight group (columns k0..k0 + group of k), 16 columns at a time:
 * per block of 32 columns of k the 16-bit sums are widened, converted and added times (the row's block scale x
 * the column's scale) with one FMA; the group then adds offset x the row's sum */
#define INT4_TILE_ROWS(ROWS)                                                                                    \
    static void int4_tile_rows_##ROWS(const uint8_t *tile, const float *scale, const float *offset,           \
                                      const struct q8_rows *x, int m, float *acc, int k0) {                    \
        const __m256i ones = _mm256_set1_epi16(1);                                                             \
        const int8_t *quads = q8_quads(x, m);                                                                  \
        const float *xscales = q8_scales(x, m), *xsums = q8_sums(x, m);                                        \
        for (int half = 0; half < 2; half++) {                                                                 \
            __m256 ws[2] = {_mm256_loadu_ps(scale + half * 16), _mm256_loadu_ps(scale + half * 16 + 8)};      \
            for (int b = 0; b < x->group / 32; b++) {                                                          \
                __m256i s[ROWS][2];                                                                            \
                for (int r = 0; r < ROWS; r++) s[r][0] = s[r][1] = _mm256_setzero_si256();                     \
                for (int i = 0; i < 8; i++) {                                                                  \
                    const uint8_t *t = tile + (size_t)(b * 8 + i) * 128 + half * 64;                           \
                    __m256i w0 = _mm256_loadu_si256((const __m256i *)t);                                       \
                    __m256i w1 = _mm256_loadu_si256((const __m256i *)(t + 32));                                \
                    const int8_t *xq = quads + (size_t)(k0 / 4 + b * 8 + i) * Q8_ROWS * 4;                     \
                    for (int r = 0; r < ROWS; r++) {                                                           \
                        int32_t four;                                                                          \
                        memcpy(&four, xq + r * 4, 4);                                                          \
                        __m256i a = _mm256_set1_epi32(four);                                                   \
                        s[r][0] = _mm256_add_epi16(s[r][0], _mm256_maddubs_epi16(w0, a));                      \
                        s[r][1] = _mm256_add_epi16(s[r][1], _mm256_maddubs_epi16(w1, a));                      \
                        __asm__("" : "+x"(s[r][0]), "+x"(s[r][1]));   /* a row at a time: nothing spilled */  \
                    }                                                                                          \
                }                                                                                              \
                for (int r = 0; r < ROWS; r++) {                                                               \
                    __m256 xs = _mm256_set1_ps(xscales[(k0 / 32 + b) * Q8_ROWS + r]);                          \
                    for (int j = 0; j < 2; j++) {                                                              \
                        float *out = acc + r * 32 + half * 16 + 8 * j;                                         \
                        __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[r][j], ones));                    \
                        _mm256_storeu_ps(out, _mm256_fmadd_ps(sums, _mm256_mul_ps(xs, ws[j]), _mm256_loadu_ps(out))); \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
            for (int r = 0; r < ROWS; r++) {                                                                   \
                __m256 xsum = _mm256_set1_ps(xsums[(k0 / x->group) * Q8_ROWS + r]);                            \
                for (int j = 0; j < 2; j++) {                                                                  \
                    float *out = acc + r * 32 + half * 16 + 8 * j;                                             \
                    _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_loadu_ps(offset + half * 16 + 8 * j), xsum,   \
                                                          _mm256_loadu_ps(out)));                               \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }
INT4_TILE_ROWS(1)
INT4_TILE_ROWS(2)
INT4_TILE_ROWS(3)
INT4_TILE_ROWS(4)

struct int4_job {
    const struct int4_weight *wt;
    const struct q8_rows *x;
    float *y;
};

/* One block of 32 output columns for rows m..m + rows; scratch: a tile (group x 32 bytes), then the sums [rows][32] */
static void int4_tiled_block(const void *job, int m, int rows, int block, void *scratch) {
    static void (*const by_rows[])(const uint8_t *, const float *, const float *, const struct q8_rows *, int,
                                   float *, int) = {int4_tile_rows_1, int4_tile_rows_2, int4_tile_rows_3,
                                                    int4_tile_rows_4};
    const struct int4_job *j = job;
    const struct int4_weight *wt = j->wt;
    uint8_t *tile = scratch;
    float *acc = (float *)(tile + (size_t)wt->group * 32), scale[32], offset[32];
    memset(acc, 0, sizeof(float) * (size_t)rows * 32);
    for (int k0 = 0; k0 < wt->k; k0 += wt->group) {
        decode_int4_quads(wt, block, k0, tile, scale, offset);
        for (int r = 0; r < rows; r += Q8_ROWS) {
            int take = rows - r < Q8_ROWS ? rows - r : Q8_ROWS;
            by_rows[take - 1](tile, scale, offset, j->x, m + r, acc + (size_t)r * 32, k0);
        }
    }
    for (int r = 0; r < rows; r++)
        memcpy(j->y + (size_t)(m + r) * wt->n + block * 32, acc + (size_t)r * 32, sizeof(float) * 32);
}

/* y [rows, n] fp32 = x [rows, k] bf16, quantized as above, @ W.T, W int4 as int4_matmul's; 0, or -1 when out of
 * memory */
int int4_matmul_int8_activations(const uint16_t *x, const uint8_t *w, const uint16_t *scales_zeros, float *y, int rows,
                                  int n, int k, int group) {
    struct int4_weight wt = {w, (const uint32_t *)scales_zeros, n, k, group};
    struct q8_rows xq;
    if (quantize_rows(x, rows, k, group, &xq)) return -1;
    struct int4_job job = {&wt, &xq, y};
    /* a byte per activation: 4x the rows of fp32 ones in the same bytes */
    int chunk = chunk_rows(k, sizeof(float) * TILED_CHUNK_FLOATS, Q8_ROWS, TILED_ROW_CHUNK);
    int rc = for_blocks(int4_tiled_block, &job, rows, n / 32, chunk, (size_t)group * 32 + sizeof(float) * chunk * 32);
    free(xq.q), free(xq.scales);
    return rc;
}

/* ---- Dequantizing int4 for a GEMM (CPUs where torch's kernels run the products, e.g. AVX-512 with AMX) ----
 * There a prompt's int4 product dequantizes the weight a chunk at a time into bf16 for oneDNN's GEMM, which on an
 * AMX Xeon is fast enough that torch's elementwise dequantization (unpack, subtract, convert, addcmul: a pass over
 * memory each) took as long as the GEMM. This does it in one pass, with the same arithmetic. */

/* 8 fp32 -> bf16, nearest even (no NaN comes from a dequantization) */
static inline __m128i f32_to_bf16(__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

static inline uint16_t f32_to_bf16_one(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

/* out [stop - start][k] bf16 = W[start:stop] for W int8 [n][ldw] row-major with bf16 scales [n]: q * scale is exact
 * in fp32 and rounded once to bf16, as quant.Int8Linear.dequantize's torch.mul does */
void int8_dequantize_bf16(const int8_t *w, const uint16_t *scales, uint16_t *out, int start, int stop, int k, int ldw) {
#pragma omp parallel for schedule(static)
    for (int r = start; r < stop; r++) {
        const int8_t *src = w + (size_t)r * ldw;
        uint16_t *dst = out + (size_t)(r - start) * k;
        float scale = bf16_to_f32(scales[r]);
        __m256 s = _mm256_set1_ps(scale);
        int i = 0;
        for (; i + 8 <= k; i += 8) {
            __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(src + i))));
            _mm_storeu_si128((__m128i *)(dst + i), f32_to_bf16(_mm256_mul_ps(v, s)));
        }
        for (; i < k; i++) dst[i] = f32_to_bf16_one((float)src[i] * scale);
    }
}

/* 16 codes - 8 (int8) of consecutive output rows -> out[0..16) bf16, with those rows' scales and zeros */
static inline void dequantize_16(__m128i q, const float *scale, const float *zero, uint16_t *out) {
    for (int h = 0; h < 2; h++) {
        __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h ? _mm_unpackhi_epi64(q, q) : q));
        v = _mm256_fmadd_ps(v, _mm256_loadu_ps(scale + 8 * h), _mm256_loadu_ps(zero + 8 * h));
        _mm_storeu_si128((__m128i *)(out + 8 * h), f32_to_bf16(v));
    }
}

/* out [k][stop - start] bf16 = W[start:stop].T for a W int4 in torch's CPU layout: blocks of block_rows (32 or 64)
 * output rows, each [k][block_rows / 2] bytes, the low nibble of byte j row j, the high nibble row block_rows / 2 + j
 * (_convert_weight_to_int4pack_for_cpu's full blocks on AVX-512 and AVX2); start and stop on block edges.
 * scales_zeros [k / group][n][2] bf16. w = (code - 8) * scale + zero: the product is exact in fp32, so the value is
 * rounded once to fp32 and once to bf16, as quant.Int4Linear.dequantize's addcmul does. */
void int4_dequantize_bf16(const uint8_t *w, const uint16_t *scales_zeros, uint16_t *out, int start, int stop, int n,
                          int k, int group, int block_rows) {
    int cols = stop - start, half = block_rows / 2;
    const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
#pragma omp parallel for schedule(static) collapse(2)
    for (int g = 0; g < k / group; g++)
        for (int block = start / block_rows; block < stop / block_rows; block++) {
            float scale[64], zero[64];
            for (int r = 0; r < block_rows; r++) {
                const uint16_t *pair = scales_zeros + ((size_t)g * n + block * block_rows + r) * 2;
                scale[r] = bf16_to_f32(pair[0]), zero[r] = bf16_to_f32(pair[1]);
            }
            const uint8_t *codes = w + (size_t)block * k * half;
            uint16_t *dst = out + block * block_rows - start;
            for (int kk = g * group; kk < (g + 1) * group; kk++)
                for (int j = 0; j < half; j += 16) {
                    __m128i bytes = _mm_loadu_si128((const __m128i *)(codes + (size_t)kk * half + j));
                    __m128i low = _mm_sub_epi8(_mm_and_si128(bytes, low4), eight);
                    __m128i high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), eight);
                    dequantize_16(low, scale + j, zero + j, dst + (size_t)kk * cols + j);
                    dequantize_16(high, scale + half + j, zero + half + j, dst + (size_t)kk * cols + half + j);
                }
        }
}

/* Decode attention: one new query row per sequence against that sequence's cached keys and values, fp32, every
 * sequence of a step in one call. torch's flash attention parallelizes one row over its key groups only (3 on the
 * embedded model: one of 2 threads reads twice what the other does) and made a 2000-position layer take 310 us where
 * reading its keys and values takes 131-175. Here work items are (sequence, key group, ATTN_CHUNK positions), each
 * giving its heads' largest score, sum of exponentials and weighted sum of values; the items of a head are then
 * combined as log-sum-exp does. Scores are fp32 dot products times `scale`, exp by exp_ps (Cephes' expf: within
 * 2 ulp). */
#define ATTN_CHUNK 256
#define ATTN_MAX_HEADS_PER_GROUP 64
#define ATTN_PREFETCH 16   /* positions ahead read into L1 */

/* exp(x) for x <= 0, below -87.3 taken as -87.3 (about 1e-38: nothing next to exp(0) = 1 of the largest score) */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);   /* x - n ln 2, ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

struct attn_item { int seq, group, start, stop; };

/* Sequence i of `sequences` attends with row rows[i] of q, k and v: views [heads or groups][rows][d], element
 * strides in strides[0..5] (q's between heads and rows, then k's, then v's), d contiguous. Its cache: seqs[4i..4i+3]
 * = (keys address, values address, elements between key groups, length with the new position), positions d floats
 * apart; the new k and v rows are stored at its last position first. out [sequences][heads][d]. d a multiple of 8,
 * heads / groups at most ATTN_MAX_HEADS_PER_GROUP. 0, or -1 when out of memory. */
int decode_attention(const float *q_rows, const float *k_rows, const float *v_rows, const int64_t *strides,
                     const int64_t *rows, const int64_t *seqs, int sequences, int heads, int groups, int d, float scale,
                     float *out) {
    int per = heads / groups, count = 0;
    float *q = malloc(sizeof(float) * (size_t)sequences * heads * d);
    if (!q) return -1;
#define KEYS(i) ((float *)(intptr_t)seqs[4 * (i)])
#define VALUES(i) ((float *)(intptr_t)seqs[4 * (i) + 1])
#define GROUP_STRIDE(i) seqs[4 * (i) + 2]
#define LENGTH(i) ((int)seqs[4 * (i) + 3])
    for (int i = 0; i < sequences; i++) {
        for (int h = 0; h < heads; h++)
            memcpy(q + ((size_t)i * heads + h) * d, q_rows + h * strides[0] + rows[i] * strides[1], sizeof(float) * d);
        for (int g = 0; g < groups; g++) {
            size_t at = (size_t)g * GROUP_STRIDE(i) + (size_t)(LENGTH(i) - 1) * d;
            memcpy(KEYS(i) + at, k_rows + g * strides[2] + rows[i] * strides[3], sizeof(float) * d);
            memcpy(VALUES(i) + at, v_rows + g * strides[4] + rows[i] * strides[5], sizeof(float) * d);
        }
        count += groups * ((LENGTH(i) + ATTN_CHUNK - 1) / ATTN_CHUNK);
    }
    struct attn_item *items = malloc(sizeof(struct attn_item) * count);
    float *partial = malloc(sizeof(float) * (size_t)count * per * (d + 2));   /* per item and head: max, sum, acc[d] */
    if (!items || !partial) { free(items); free(partial); free(q); return -1; }
    count = 0;
    for (int i = 0; i < sequences; i++)
        for (int g = 0; g < groups; g++)
            for (int s = 0; s < LENGTH(i); s += ATTN_CHUNK)
                items[count++] = (struct attn_item){i, g, s, s + ATTN_CHUNK < LENGTH(i) ? s + ATTN_CHUNK : LENGTH(i)};
#pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < count; t++) {
        struct attn_item it = items[t];
        const float *k = KEYS(it.seq) + it.group * GROUP_STRIDE(it.seq);
        const float *v = VALUES(it.seq) + it.group * GROUP_STRIDE(it.seq);
        const float *qg = q + ((size_t)it.seq * heads + (size_t)it.group * per) * d;
        int n = it.stop - it.start;
        float score[ATTN_MAX_HEADS_PER_GROUP][ATTN_CHUNK];
        for (int p = 0; p < n; p++) {
            const float *kp = k + (size_t)(it.start + p) * d;
            for (int j = 0; j < d; j += 16) _mm_prefetch((const char *)(kp + ATTN_PREFETCH * d + j), _MM_HINT_T0);
            for (int h = 0; h < per; h++) {
                __m256 acc = _mm256_setzero_ps();
                for (int j = 0; j < d; j += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + h * d + j), _mm256_loadu_ps(kp + j), acc);
                score[h][p] = hsum(acc) * scale;
            }
        }
        for (int h = 0; h < per; h++) {
            float *part = partial + ((size_t)t * per + h) * (d + 2), top = score[h][0], sum = 0.f;
            for (int p = 1; p < n; p++) top = score[h][p] > top ? score[h][p] : top;
            int p = 0;
            __m256 sums = _mm256_setzero_ps();
            for (; p + 8 <= n; p += 8) {
                __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(score[h] + p), _mm256_set1_ps(top)));
                _mm256_storeu_ps(score[h] + p, e);
                sums = _mm256_add_ps(sums, e);
            }
            sum = hsum(sums);
            for (; p < n; p++) {   /* the tail through the same exp, one lane used */
                float e = _mm256_cvtss_f32(exp_ps(_mm256_set1_ps(score[h][p] - top)));
                score[h][p] = e;
                sum += e;
            }
            part[0] = top;
            part[1] = sum;
            for (int j = 0; j < d; j++) part[2 + j] = 0.f;
        }
        for (int p = 0; p < n; p++) {
            const float *vp = v + (size_t)(it.start + p) * d;
            for (int j = 0; j < d; j += 16) _mm_prefetch((const char *)(vp + ATTN_PREFETCH * d + j), _MM_HINT_T0);
            for (int h = 0; h < per; h++) {
                float *acc = partial + ((size_t)t * per + h) * (d + 2) + 2;
                __m256 w = _mm256_set1_ps(score[h][p]);
                for (int j = 0; j < d; j += 8)
                    _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(w, _mm256_loadu_ps(vp + j), _mm256_loadu_ps(acc + j)));
            }
        }
    }
    /* combine each head's items: weights exp(max_item - max_all) */
    int first = 0;
    for (int i = 0; i < sequences; i++) {
        int chunks = (LENGTH(i) + ATTN_CHUNK - 1) / ATTN_CHUNK;
        for (int g = 0; g < groups; g++, first += chunks)
            for (int h = 0; h < per; h++) {
                float top = -INFINITY, total = 0.f, *o = out + ((size_t)i * heads + (size_t)g * per + h) * d;
                for (int c = 0; c < chunks; c++) {
                    float m = partial[((size_t)(first + c) * per + h) * (d + 2)];
                    top = m > top ? m : top;
                }
                for (int j = 0; j < d; j++) o[j] = 0.f;
                for (int c = 0; c < chunks; c++) {
                    const float *part = partial + ((size_t)(first + c) * per + h) * (d + 2);
                    float w = _mm256_cvtss_f32(exp_ps(_mm256_set1_ps(part[0] - top)));
                    total += w * part[1];
                    for (int j = 0; j < d; j++) o[j] += w * part[2 + j];
                }
                for (int j = 0; j < d; j++) o[j] /= total;
            }
    }
    free(items);
    free(partial);
    free(q);
    return 0;
#undef KEYS
#undef VALUES
#undef GROUP_STRIDE
#undef LENGTH
}

/* The rest of RMSNorm for fp32 rows, given each row's mean square (torch's, so its sum keeps torch's order): out
 * [rows][n] = weight x (x x r), r = 1 / sqrt(mean_square + eps), every step rounded as torch's elementwise ops round
 * it (add, sqrt, divide, two products: no FMA), so the result is model.RMSNorm's bit for bit in one call where torch
 * takes four more ops, the norm of one decode row costing more in their calls than in arithmetic. */
void rms_norm_scale(const float *x, const float *mean_square, const float *weight, float *out, int rows, int n,
                    float eps) {
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int m = 0; m < rows; m++) {
        const float *xm = x + (size_t)m * n;
        float *om = out + (size_t)m * n;
        __m256 r = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_sqrt_ps(_mm256_set1_ps(mean_square[m] + eps)));
        int j = 0;
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(om + j, _mm256_mul_ps(_mm256_loadu_ps(weight + j),
                                                   _mm256_mul_ps(_mm256_loadu_ps(xm + j), r)));
        float rs = _mm256_cvtss_f32(r);
        for (; j < n; j++) {
            volatile float scaled = xm[j] * rs;   /* two roundings, as torch: no contraction into an FMA */
            om[j] = weight[j] * scaled;
        }
    }
}

/* The layers of a Llama-family model (model_llama.Llama) for a decode step, every product a GGUF block tensor
 * (quant.GGUFLinear), in one call: on the embedded model in fp32 the layers' Python and torch calls between the
 * products (norms, rotary, attention's bookkeeping, SwiGLU, residuals: ~40 a layer) took about as long as the products
 * did. x [rows][hidden] fp32, one new position per row (sequence), updated in place to the last layer's output.
 * layers[LLAMA_FIELDS * l ...] (addresses as int64): input norm weight; qkv kind, codes, scales, bias or 0; dense
 * kind, codes, scales; post-attention norm weight; gate/up kind, codes, scales; down kind, codes, scales. cos, sin
 * [rows][d] (rotate_half's, model_llama.rotate_half). plan [layers][rows][4]: native.decode_attention_plan's. The same
 * arithmetic as the model's blocks, except that the norms' squares are summed in another order than torch's and SiLU
 * takes exp_ps: within fp32's rounding of them. 0, or -1 when out of memory. */
#define LLAMA_FIELDS 15

static void silu_times(const float *gate_up, float *out, int rows, int ffn) {
    for (int m = 0; m < rows; m++) {
        const float *g = gate_up + (size_t)m * 2 * ffn, *u = g + ffn;
        float *o = out + (size_t)m * ffn;
        int j = 0;
        for (; j + 8 <= ffn; j += 8) {   /* silu(x) = x / (1 + exp(-x)), exp taken of -|x| <= 0 */
            __m256 x = _mm256_loadu_ps(g + j);
            __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.f), x)));
            __m256 positive = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            __m256 negative = _mm256_mul_ps(positive, e);   /* x e^x / (1 + e^x) for x < 0 */
            __m256 s = _mm256_blendv_ps(positive, negative, x);
            _mm256_storeu_ps(o + j, _mm256_mul_ps(s, _mm256_loadu_ps(u + j)));
        }
        for (; j < ffn; j++) o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
    }
}

static void rms_norm_rows(const float *x, const float *weight, float *out, int rows, int n, float eps) {
    float mean_square[rows];
    for (int m = 0; m < rows; m++) {
        const float *xm = x + (size_t)m * n;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int j = 0;
        for (; j + 16 <= n; j += 16) {
            __m256 a = _mm256_loadu_ps(xm + j), b = _mm256_loadu_ps(xm + j + 8);
            s0 = _mm256_fmadd_ps(a, a, s0);
            s1 = _mm256_fmadd_ps(b, b, s1);
        }
        float squares = hsum(_mm256_add_ps(s0, s1));
        for (; j < n; j++) squares += xm[j] * xm[j];
        mean_square[m] = squares / n;
    }
    rms_norm_scale(x, mean_square, weight, out, rows, n, eps);
}

/* rotate_half on the heads of one row: x [heads][d] */
static void rotate_heads(float *x, const float *cos, const float *sin, int heads, int d) {
    int half = d / 2;
    for (int h = 0; h < heads; h++) {
        float *xh = x + (size_t)h * d;
        for (int j = 0; j < half; j++) {
            float first = xh[j], second = xh[j + half];
            xh[j] = first * cos[j] - second * sin[j];
            xh[j + half] = second * cos[j + half] + first * sin[j + half];
        }
    }
}

static void add_rows(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

int llama_decode_layers(float *x, const int64_t *layers, int num_layers, const float *cos, const float *sin,
                        const int64_t *plan, int rows, int hidden, int heads, int groups, int d, int ffn, float eps,
                        int wide) {
    int width = (heads + 2 * groups) * d;
    float scale = (float)(1.0 / sqrt((double)d));   /* d ** -0.5 as native.decode_attention passes it */
    float *h = malloc(sizeof(float) * (size_t)rows * hidden), *qkv = malloc(sizeof(float) * (size_t)rows * width),
          *attn = malloc(sizeof(float) * (size_t)rows * heads * d), *y = malloc(sizeof(float) * (size_t)rows * hidden),
          *gate_up = malloc(sizeof(float) * (size_t)rows * 2 * ffn), *act = malloc(sizeof(float) * (size_t)rows * ffn);
    int64_t row_index[rows], strides[6] = {d, width, d, width, d, width};
    int rc = (h && qkv && attn && y && gate_up && act) ? 0 : -1;
    for (int m = 0; m < rows; m++) row_index[m] = m;
    for (int l = 0; l < num_layers && rc == 0; l++) {
        const int64_t *t = layers + (size_t)LLAMA_FIELDS * l;
#define P(i) ((void *)(intptr_t)t[i])
        rms_norm_rows(x, P(0), h, rows, hidden, eps);
        rc |= gguf_matmul((int)t[1], h, P(2), P(3), qkv, rows, width, hidden, wide);
        if (t[4])
            for (int m = 0; m < rows; m++) add_rows(qkv + (size_t)m * width, P(4), width);
        for (int m = 0; m < rows; m++)
            rotate_heads(qkv + (size_t)m * width, cos + (size_t)m * d, sin + (size_t)m * d, heads + groups, d);
        rc |= decode_attention(qkv, qkv + (size_t)heads * d, qkv + (size_t)(heads + groups) * d, strides, row_index,
                               plan + (size_t)l * rows * 4, rows, heads, groups, d, scale, attn);
        rc |= gguf_matmul((int)t[5], attn, P(6), P(7), y, rows, hidden, heads * d, wide);
        add_rows(x, y, (size_t)rows * hidden);
        rms_norm_rows(x, P(8), h, rows, hidden, eps);
        rc |= gguf_matmul((int)t[9], h, P(10), P(11), gate_up, rows, 2 * ffn, hidden, wide);
        silu_times(gate_up, act, rows, ffn);
        rc |= gguf_matmul((int)t[12], act, P(13), P(14), y, rows, hidden, ffn, wide);
        add_rows(x, y, (size_t)rows * hidden);
#undef P
    }
    free(h), free(qkv), free(attn), free(y), free(gate_up), free(act);
    return rc ? -1 : 0;
}
