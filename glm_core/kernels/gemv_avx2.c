/* Decode products (a few rows of activations) for AVX2 CPUs, where torch's kernels are slower than memory allows.
 * Built by glm_core/native.py on first use; plain C + OpenMP (the process's libgomp, so torch's thread count
 * applies). Activations are bf16, sums fp32, outputs fp32. */
#include <immintrin.h>
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
        const __m256i high16 = _mm256_set1_epi32((int)0xFFFF0000u);                                            \
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
            const uint32_t *pairs = sz + (size_t)g * n + (size_t)block * 32;                                   \
            for (int i = 0; i < 4; i++) {                                                                      \
                __m256i p = _mm256_loadu_si256((const __m256i *)(pairs + 8 * i));                              \
                __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));                                  \
                __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(p, high16));                                \
                __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero);                            \
                if (i >= 2) scale = _mm256_mul_ps(scale, _mm256_set1_ps(1.f / 16));                            \
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
 * one's by a mask, so no widening shuffle is needed. */
#define ROWS_W 4
static void bf16_rows(const uint16_t *w, const float *x_even, const float *x_odd, float *y, int k) {
    const __m256i high16 = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 even[ROWS_W], odd[ROWS_W];
    for (int r = 0; r < ROWS_W; r++) even[r] = odd[r] = _mm256_setzero_ps();
    for (int i = 0; i < k; i += 16) {
        __m256 xe = _mm256_loadu_ps(x_even + i / 2), xo = _mm256_loadu_ps(x_odd + i / 2);
        for (int r = 0; r < ROWS_W; r++) {
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
