/* int4, int8, bf16 and GGUF products on CPUs with AMX (see glm_core/native.py). The last two sections are int4's
 * decode (a few rows), in AVX-512 without AMX. The others: a prompt's rows, or a batch of decoding rows, multiply
 * weights dequantized to bf16 (bf16 ones copied) by AMX's bf16 tile product, with fp32 sums. Each thread takes 32
 * output columns at a time and dequantizes them CHUNK inner indices at a time into a buffer that stays in L1, which
 * every block of 32 rows then multiplies: the weights are read once, and no dequantized copy goes through memory (or
 * L2: a whole dequantized panel there cost as much again as making it). The weights' values are exactly those of
 * int4_dequantize_bf16 and int8_dequantize_bf16 (matmul_avx2.c): only the order of the sums differs from the
 * dequantize-then-GEMM path.
 *
 * Tiles: 4 sums of 16 x 16 fp32, 2 left operands of 16 rows x 32 bf16, 2 right operands of 16 pairs of rows
 * (AMX's "VNNI" layout: row j holds, for each of 16 columns, the pair (2j, 2j + 1) of the product's inner index).
 * int4 (stored a row of 64 columns per inner index) pairs two such rows into the right operand; x's rows are
 * the left one. int8, bf16 and GGUF (stored a row per output column) are the left operand as they are, and x,
 * paired once, the right one: the sums are out.T's. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* 0 once the kernel may use AMX: Linux hands out the tile state only to processes that ask for it */
int amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

static void configure_tiles(void) {
    tile_config config;
    memset(&config, 0, sizeof config);   /* every byte: a partly uninitialized config faults in ldtilecfg */
    config.palette = 1;
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.bytes_per_row[t] = 64;
    _tile_loadconfig(&config);
}

#define CHUNK 256   /* inner indices dequantized at a time: 2 x 16 columns x 256 bf16 = 16 KB */

typedef struct weights weights;
struct weights {
    const void *w;                /* int4: torch's AVX-512 layout; int8 and bf16: [n][ldw]; GGUF: blocks [n][k / 32] */
    const void *scales;           /* int4: bf16 [k / group][n][2] (scale, zero); int8: bf16 [n]; bf16: none; GGUF:
                                   * fp32 [n][k / 32] (Q8_0) or [n][k / 32][2] (Q4_1: scale, min) */
    int n, k, group, ldw;         /* GGUF: group is the kind (GGUF_Q8_0, GGUF_Q4_1) */
    int row_major;                /* a row per output column (int8, bf16, GGUF): the chunk is the left operand */
    void (*chunk)(const weights *W, uint16_t *chunk, int p, int k0, int k1);   /* writes the chunk's tiles */
};

/* int4: columns [32 p, 32 p + 32) of W, inner indices [k0, k1), in torch's AVX-512 layout (blocks of 64 rows, each
 * [k][32] bytes, the low nibble of byte j row j, the high nibble row 32 + j) as two right operands
 * [2][(k1 - k0) / 2][16][2] bf16: w = (code - 8) * scale + zero, rounded once to fp32 and once to bf16. Each step pairs
 * the codes of k and k + 1 byte by byte: one fma and half a conversion make a weight. */
static void int4_chunk(const weights *W, uint16_t *chunk, int p, int k0, int k1) {
    int rows = k1 - k0, shift = 4 * (p % 2);   /* these 32 columns are one nibble of their block's 32 bytes */
    const uint8_t *codes = (const uint8_t *)W->w + (size_t)(p / 2) * W->k * 32;
    const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    const __m512i first8 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i last8 = _mm512_add_epi32(first8, _mm512_set1_epi32(8));
    __m512 scale[4], zero[4];   /* [2 t + h]: columns 8 h .. 8 h + 7 of tile t, each twice (k and k + 1) */
    for (int g0 = k0; g0 < k1; g0 = (g0 / W->group + 1) * W->group) {
        for (int t = 0; t < 2; t++) {
            const uint16_t *pairs = (const uint16_t *)W->scales
                                    + ((size_t)(g0 / W->group) * W->n + p * 32 + t * 16) * 2;
            __m512i both = _mm512_loadu_si512(pairs);
            __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(both, 16));
            __m512 z = _mm512_castsi512_ps(_mm512_and_si512(both, _mm512_set1_epi32((int)0xFFFF0000)));
            scale[2 * t] = _mm512_permutexvar_ps(first8, s), scale[2 * t + 1] = _mm512_permutexvar_ps(last8, s);
            zero[2 * t] = _mm512_permutexvar_ps(first8, z), zero[2 * t + 1] = _mm512_permutexvar_ps(last8, z);
        }
        int g1 = (g0 / W->group + 1) * W->group;
        for (int kk = g0; kk < k1 && kk < g1; kk += 2) {
            __m256i both[2];   /* codes - 8 of k and k + 1, in column order */
            for (int i = 0; i < 2; i++) {
                const uint8_t *row = codes + (size_t)(kk + i) * 32;
                _mm_prefetch((const char *)row + 8192, _MM_HINT_T0);   /* 1.5x: the stream stalls at every chunk */
                __m256i c = _mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)row), shift);
                both[i] = _mm256_sub_epi8(_mm256_and_si256(c, low4), eight);
            }
            /* per 128-bit lane (columns 0-15, then 16-31): columns 0-7 paired with k + 1's, then columns 8-15 */
            __m256i first = _mm256_unpacklo_epi8(both[0], both[1]), last = _mm256_unpackhi_epi8(both[0], both[1]);
            for (int t = 0; t < 2; t++) {
                __m128i a = t ? _mm256_extracti128_si256(first, 1) : _mm256_castsi256_si128(first);
                __m128i b = t ? _mm256_extracti128_si256(last, 1) : _mm256_castsi256_si128(last);
                __m512 va = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), scale[2 * t], zero[2 * t]);
                __m512 vb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), scale[2 * t + 1],
                                            zero[2 * t + 1]);
                _mm512_storeu_si512(chunk + (size_t)t * rows * 16 + (size_t)(kk - k0) * 16,
                                    (__m512i)_mm512_cvtne2ps_pbh(vb, va));
            }
        }
    }
}

/* int8: columns [32 p, 32 p + 32) of W int8 [n][ldw] with bf16 scales [n], inner indices [k0, k1), as two left
 * operands [2][(k1 - k0) / 32][16][32] bf16: w = q * scale rounded once to bf16 */
static void int8_chunk(const weights *W, uint16_t *chunk, int p, int k0, int k1) {
    int rows = k1 - k0;
    for (int c = 0; c < 32; c++) {
        const int8_t *src = (const int8_t *)W->w + (size_t)(p * 32 + c) * W->ldw;
        uint32_t bits = (uint32_t)((const uint16_t *)W->scales)[p * 32 + c] << 16;
        __m512 scale = _mm512_castsi512_ps(_mm512_set1_epi32((int)bits));
        uint16_t *dst = chunk + (size_t)(c / 16) * rows * 16 + (c % 16) * 32;
        for (int kk = k0; kk < k1; kk += 32) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(src + kk));
            _mm_prefetch((const char *)(src + kk + CHUNK), _MM_HINT_T0);   /* this row's next chunk */
            __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
            _mm512_storeu_si512(dst + (size_t)(kk - k0) * 16,
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(high, scale), _mm512_mul_ps(low, scale)));
        }
    }
}

/* bf16: columns [32 p, 32 p + 32) of W bf16 [n][ldw], inner indices [k0, k1), as int8_chunk's left operands, copied
 * (a tile read from W itself would take 16 rows 2 ldw bytes apart, which share an L1 set when ldw is a multiple of
 * 2048, as x_tiles says) */
static void bf16_chunk(const weights *W, uint16_t *chunk, int p, int k0, int k1) {
    int rows = k1 - k0;
    for (int c = 0; c < 32; c++) {
        const uint16_t *src = (const uint16_t *)W->w + (size_t)(p * 32 + c) * W->ldw;
        uint16_t *dst = chunk + (size_t)(c / 16) * rows * 16 + (c % 16) * 32;
        for (int kk = k0; kk < k1; kk += 32) {
            _mm_prefetch((const char *)(src + kk + CHUNK), _MM_HINT_T0);   /* this row's next chunk */
            _mm512_storeu_si512(dst + (size_t)(kk - k0) * 16, _mm512_loadu_si512(src + kk));
        }
    }
}

/* GGUF block tensors (quant.GGUFLinear, the kinds of matmul_avx2.c's gguf_matmul): columns [32 p, 32 p + 32),
 * inner indices [k0, k1), as int8_chunk's left operands: w = scale x code (+ min), one rounding to fp32 (mul then add,
 * as gguf_dequantize), then to bf16. Q4_1's low nibbles are a block's columns 0-15, its high ones 16-31. */
enum { GGUF_Q8_0 = 0, GGUF_Q4_1 = 1 };   /* as matmul_avx2.c's (native.GGUF_KINDS) */
static void gguf_chunk(const weights *W, uint16_t *chunk, int p, int k0, int k1) {
    int rows = k1 - k0, blocks = W->k / 32, q4 = W->group == GGUF_Q4_1, bytes = q4 ? 16 : 32;
    for (int c = 0; c < 32; c++) {
        const uint8_t *codes = (const uint8_t *)W->w + (size_t)(p * 32 + c) * blocks * bytes;
        const float *scales = (const float *)W->scales + (size_t)(p * 32 + c) * blocks * (q4 ? 2 : 1);
        uint16_t *dst = chunk + (size_t)(c / 16) * rows * 16 + (c % 16) * 32;
        for (int b = k0 / 32; b < k1 / 32; b++) {
            const uint8_t *at = codes + (size_t)b * bytes;
            _mm_prefetch((const char *)(at + CHUNK / 32 * bytes), _MM_HINT_T0);   /* this row's next chunk */
            __m512 low, high;
            if (q4) {
                __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)at));
                low = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)));
                high = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            } else {
                low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)at)));
                high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(at + 16))));
            }
            __m512 scale = _mm512_set1_ps(scales[b * (q4 ? 2 : 1)]), min = _mm512_set1_ps(q4 ? scales[2 * b + 1] : 0.f);
            low = _mm512_add_ps(_mm512_mul_ps(low, scale), min);
            high = _mm512_add_ps(_mm512_mul_ps(high, scale), min);
            _mm512_storeu_si512(dst + (size_t)(32 * b - k0) * 16, (__m512i)_mm512_cvtne2ps_pbh(high, low));
        }
    }
}

/* out [m][n] fp32 = x W.T, xs being x as tiles (x_tiles, mp rows: a multiple of 16). Per block of 32 rows and per
 * chunk, tiles 4-5 are the left operands and 6-7 the right ones, and sum tile t = left t / 2 x right t % 2: for
 * int4 rows [16 (t / 2)] x columns [16 (t % 2)] of the block, for int8 (out.T's) columns [16 (t / 2)] x rows
 * [16 (t % 2)], stored as it is (a 16 x 16 block of out.T). Between chunks the sums wait in acc ([mp][32]), except
 * when one block of rows keeps them in the tiles throughout. */
static int product(const weights *W, const uint16_t *xs, int m, int mp, float *out) {
    int n = W->n, k = W->k, failed = 0;
#pragma omp parallel
    {
        uint16_t *chunk = aligned_alloc(64, CHUNK * 32 * sizeof(uint16_t));
        float *acc = aligned_alloc(64, (size_t)(mp + 16) * 32 * sizeof(float));   /* whole blocks of 32 rows */
        if (chunk == NULL || acc == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        configure_tiles();
        int resident = mp <= 32;
        /* sum tile t of the block of rows from r: where it goes in acc (rows of 32 floats, 128 bytes) */
#define ROWS_OF(t) (W->row_major ? 16 * ((t) % 2) : 16 * ((t) / 2))
#define COLUMNS_OF(t) (W->row_major ? 16 * ((t) / 2) : 16 * ((t) % 2))
#define ACC(t) (acc + (size_t)(r + ROWS_OF(t)) * 32 + COLUMNS_OF(t))
#pragma omp for schedule(static)
        for (int p = 0; p < n / 32; p++) {
            if (chunk == NULL || acc == NULL) continue;
            for (int k0 = 0; k0 < k; k0 += CHUNK) {
                int k1 = k0 + CHUNK < k ? k0 + CHUNK : k, rows = k1 - k0;
                W->chunk(W, chunk, p, k0, k1);
                for (int r = 0; r < mp; r += 32) {
                    if (k0 == 0) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    } else if (!resident) {
                        _tile_loadd(0, ACC(0), 128); _tile_loadd(1, ACC(1), 128);
                        _tile_loadd(2, ACC(2), 128); _tile_loadd(3, ACC(3), 128);
                    }
                    /* x's two tiles of 16 rows and the chunk's two tiles of 16 columns: each 1 KB a step */
                    const uint16_t *x0 = xs + ((size_t)r / 16 * (k / 32) + k0 / 32) * 512, *x1 = x0 + (size_t)k * 16;
                    const uint16_t *w0 = chunk, *w1 = chunk + (size_t)rows * 16;
                    const uint16_t *left0 = W->row_major ? w0 : x0, *left1 = W->row_major ? w1 : x1;
                    const uint16_t *right0 = W->row_major ? x0 : w0, *right1 = W->row_major ? x1 : w1;
                    int two = r + 16 < mp;   /* else x's second tile (int4's left1, int8's right1) is past its end */
                    for (int s = 0; s < rows; s += 32, left0 += 512, left1 += 512, right0 += 512, right1 += 512) {
                        _tile_loadd(4, left0, 64);
                        _tile_loadd(6, right0, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        if (two || W->row_major) {
                            _tile_loadd(5, left1, 64);
                            _tile_dpbf16ps(2, 5, 6);
                        }
                        if (two || !W->row_major) {
                            _tile_loadd(7, right1, 64);
                            _tile_dpbf16ps(1, 4, 7);
                        }
                        if (two) _tile_dpbf16ps(3, 5, 7);
                    }
                    if (!resident || k1 == k) {
                        _tile_stored(0, ACC(0), 128); _tile_stored(1, ACC(1), 128);
                        _tile_stored(2, ACC(2), 128); _tile_stored(3, ACC(3), 128);
                    }
                }
            }
            for (int r = 0; r < m; r++)   /* int8's 16 x 16 blocks are out.T's: each read across */
                for (int c = 0; c < 32; c++) {
                    size_t at = W->row_major ? (size_t)(r / 16 * 16 + c % 16) * 32 + c / 16 * 16 + r % 16
                                        : (size_t)r * 32 + c;
                    out[(size_t)r * n + p * 32 + c] = acc[at];
                }
        }
#undef ACC
#undef COLUMNS_OF
#undef ROWS_OF
        _tile_release();
        free(chunk);
        free(acc);
    }
    return failed ? -1 : 0;
}

/* x [m][k] bf16 as [mp / 16][k / 32] tiles of 1 KB, zeros from row m to mp (a multiple of 16): int4's left operands
 * (16 rows x 32), or int8's right ones (pairs: 16 x 16 dwords, pair j of row i at [j][i]). A tile read straight from x
 * would take 16 rows 2 k bytes apart, which share an L1 set whenever k is a multiple of 2048. */
static uint16_t *x_tiles(const uint16_t *x, int m, int mp, int k, int pairs) {
    uint16_t *tiles = aligned_alloc(64, (size_t)mp * k * sizeof(uint16_t));
    if (tiles == NULL) return NULL;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < mp / 16 * (k / 32); t++) {
        int r = t / (k / 32) * 16, kk = t % (k / 32) * 32;
        uint16_t *tile = tiles + (size_t)t * 512;
        for (int i = 0; i < 16; i++) {
            for (int j = 0; j < 32; j++) {
                uint16_t v = r + i < m ? x[(size_t)(r + i) * k + kk + j] : 0;
                tile[pairs ? (j / 2) * 32 + i * 2 + j % 2 : i * 32 + j] = v;
            }
        }
    }
    return tiles;
}

static int product_of(const weights *W, const uint16_t *x, int m, float *out) {
    int mp = (m + 15) / 16 * 16;
    uint16_t *tiles = x_tiles(x, m, mp, W->k, W->row_major);
    if (tiles == NULL) return -1;
    int rc = product(W, tiles, m, mp, out);
    free(tiles);
    return rc;
}

/* x [m][k] bf16 @ W.T -> out [m][n] fp32, W int4 in torch's AVX-512 layout with bf16 scales and zeros
 * [k / group][n][2]; n a multiple of 64, k of 32, group even. 0, or -1 when out of memory. */
int int4_matmul_amx(const uint16_t *x, int m, const uint8_t *w, const uint16_t *scales_zeros, float *out, int n,
                    int k, int group) {
    weights W = {w, scales_zeros, n, k, group, 0, 0, int4_chunk};
    return product_of(&W, x, m, out);
}

/* x [m][k] bf16 @ W.T -> out [m][n] fp32, W int8 [n][ldw] (ldw >= k) with bf16 scales [n]; n a multiple of 32, k
 * of 32. 0, or -1 when out of memory. */
int int8_matmul_amx(const uint16_t *x, int m, const int8_t *w, const uint16_t *scales, float *out, int n, int k,
                    int ldw) {
    weights W = {w, scales, n, k, 0, ldw, 1, int8_chunk};
    return product_of(&W, x, m, out);
}

/* x [m][k] bf16 @ W.T -> out [m][n] fp32, W a GGUF block tensor of `kind` (codes, fp32 scales: gguf_chunk); n a
 * multiple of 32, k of 32. 0, or -1 when out of memory. */
int gguf_matmul_amx(int kind, const uint16_t *x, int m, const uint8_t *w, const float *scales, float *out, int n,
                    int k) {
    weights W = {w, scales, n, k, kind, 0, 1, gguf_chunk};
    return product_of(&W, x, m, out);
}

/* x [m][k] bf16 @ W.T -> out [m][n] fp32, W bf16 [n][k]; n a multiple of 32, k of 32. 0, or -1 when out of memory. */
int bf16_matmul_amx(const uint16_t *x, int m, const uint16_t *w, float *out, int n, int k) {
    weights W = {w, NULL, n, k, 0, k, 1, bf16_chunk};
    return product_of(&W, x, m, out);
}

/* ---- Decode: a few rows against int4 weights in torch's AVX-512 layout, in AVX-512 without AMX ----
 * x's rows are quantized per block of 32 inner indices to integers, and the codes (0..15) multiply them in exact
 * int32 sums, a block at a time; each block's sums are converted and added times the block's activation scale, each
 * group's then scaled and (zero - 8 scale) x the group's sum of quantized activations added
 * (w = code * scale + (zero - 8 scale)). The high nibbles are multiplied in place as 16 x code, their scale divided
 * by 16 (exact). Each row's arithmetic is the same whatever the other rows: a row's product is bit for bit the same
 * alone or in a batch. Two widths:
 * - int8 (the layers GLM Studio quantizes itself): scale max|x| / 127, nearest even, as the AVX2 product's
 *   quantize_rows (llama.cpp's Q8_0); vpdpbusd, 64 byte products an instruction, over the codes of 4 consecutive inner
 *   indices (32 bytes apart in torch's layout) brought together by one two-table byte permute (vpermt2b).
 * - int16 (official checkpoints' layers, held to the official logits): a power-of-two scale that puts max|x| in
 *   [2^14, 2^15), so every value within 2^7 of the block's largest is exact (bf16 has 8 significant bits) and smaller
 *   ones are rounded to 2^-15 of it; vpdpwssd over pairs of inner indices. */
#define DECODE_ROWS 4   /* rows a pass over a block of columns takes: 16 int32 sums; int8, 7 rows in 4 + 3 took 4.1 ms
                         * against 5.2 in passes of 2 (one row 2.4 ms, 27392 x 4096 streamed from memory) */
/* Into L2, 8 KB ahead, every line: one int8 row of 27392 x 4096 read 23.3 GB/s from memory, against 17.2-17.8 into L1
 * (4 KB ahead, as the fp32 kernel these replace; 1-16 KB measured), 18.7-19.4 with one prefetch per 128 bytes,
 * 22.4-22.9 at 12-64 KB. A plain read of the same bytes reaches 27 GB/s; from cache the int8 kernel reads 48-65. */
#define DECODE_PREFETCH 8192
typedef struct {
    void *q;            /* [rows][k] int8 or int16 */
    float *scales;      /* [rows][k / 32] */
    float *sums;        /* [rows][k / group]: sum over the group of the quantized values times their scales */
} quantized_rows;

static int quantize_rows(const uint16_t *x, int rows, int k, int group, int bits, quantized_rows *out) {
    out->q = malloc((size_t)rows * k * (bits / 8));
    out->scales = calloc((size_t)rows * (k / 32 + k / group), sizeof(float));
    if (out->q == NULL || out->scales == NULL) {
        free(out->q), free(out->scales);
        return -1;
    }
    out->sums = out->scales + (size_t)rows * (k / 32);
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < k / 32; b++) {
            const uint16_t *at = x + (size_t)m * k + b * 32;
            __m512 v[2];
            for (int j = 0; j < 2; j++)
                v[j] = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(at + 16 * j))), 16));
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            float inv, scale;
            if (bits == 8) {
                inv = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
            } else {   /* amax = 1.f x 2^e: 2^(14 - e) and its inverse, exact powers of two (subnormals too) */
                __m128 e = _mm_getexp_ss(_mm_setzero_ps(), _mm_set_ss(amax)), one = _mm_set_ss(1.f);
                inv = amax > 0.f ? _mm_cvtss_f32(_mm_scalef_ss(one, _mm_sub_ss(_mm_set_ss(14.f), e))) : 0.f;
                scale = amax > 0.f ? _mm_cvtss_f32(_mm_scalef_ss(one, _mm_sub_ss(e, _mm_set_ss(14.f)))) : 0.f;
            }
            __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v[0], _mm512_set1_ps(inv)));   /* nearest even */
            __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v[1], _mm512_set1_ps(inv)));
            size_t at_q = (size_t)m * k + b * 32;
            if (bits == 8) {
                _mm_storeu_si128((__m128i *)((int8_t *)out->q + at_q), _mm512_cvtepi32_epi8(c0));
                _mm_storeu_si128((__m128i *)((int8_t *)out->q + at_q + 16), _mm512_cvtepi32_epi8(c1));
            } else {
                _mm256_storeu_si256((__m256i *)((int16_t *)out->q + at_q), _mm512_cvtepi32_epi16(c0));
                _mm256_storeu_si256((__m256i *)((int16_t *)out->q + at_q + 16), _mm512_cvtepi32_epi16(c1));
            }
            out->scales[(size_t)m * (k / 32) + b] = scale;
            out->sums[(size_t)m * (k / group) + b * 32 / group] +=
                scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
        }
    return 0;
}

/* One block of 64 output columns for ROWS (1 to DECODE_ROWS) rows m.. of x quantized to BITS; y's block [ROWS][n] is
 * written whole. A step takes STEP inner indices: 128 bytes of codes (int8's quads) or 64 (int16's pairs). */
#define INT4_DECODE(BITS, ROWS)                                                                                 \
    static void int4_decode_##BITS##_##ROWS(const uint8_t *codes, const uint32_t *pairs, const quantized_rows *x, \
                                            int m, float *y, int n, int k, int group) {                        \
        enum { STEP = BITS == 8 ? 4 : 2 };                                                                     \
        uint8_t index[64];   /* int8: quad j of column j (first) or 16 + j (second), from k, k + 1 (k01) and    \
                                k + 2, k + 3 (k23); int16: words (k, k + 1) of column j or 16 + j, zero-extended */ \
        for (int j = 0; j < 16; j++)                                                                           \
            for (int t = 0; t < 4; t++)                                                                        \
                index[4 * j + t] = (uint8_t)(BITS == 8 ? 32 * t + j : t % 2 ? 64 : 32 * (t / 2) + j);          \
        const __m512i first = _mm512_loadu_si512(index);                                                       \
        const __m512i second = _mm512_add_epi8(first, _mm512_set1_epi32(BITS == 8 ? 0x10101010 : 0x00100010)); \
        const __m512i low4 = _mm512_set1_epi8(0x0F), none = _mm512_setzero_si512();                            \
        __m512 out[ROWS][4];                                                                                   \
        for (int r = 0; r < ROWS; r++)                                                                         \
            for (int i = 0; i < 4; i++) out[r][i] = _mm512_setzero_ps();                                       \
        for (int g = 0; g < k / group; g++) {                                                                  \
            __m512 acc[ROWS][4];   /* columns 0-15, 16-31, 32-47, 48-63 */                                     \
            for (int r = 0; r < ROWS; r++)                                                                     \
                for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_ps();                                   \
            for (int b = g * group / 32; b < (g + 1) * group / 32; b++) {                                      \
                __m512i sums[ROWS][4];                                                                         \
                for (int r = 0; r < ROWS; r++)                                                                 \
                    for (int i = 0; i < 4; i++) sums[r][i] = _mm512_setzero_si512();                           \
                for (int kk = 32 * b; kk < 32 * b + 32; kk += STEP) {                                          \
                    const uint8_t *at = codes + (size_t)kk * 32;                                               \
                    _mm_prefetch((const char *)(at + DECODE_PREFETCH), _MM_HINT_T1);                           \
                    if (BITS == 8) _mm_prefetch((const char *)(at + DECODE_PREFETCH + 64), _MM_HINT_T1);       \
                    __m512i k01 = _mm512_loadu_si512(at), k23 = BITS == 8 ? _mm512_loadu_si512(at + 64) : none; \
                    __m512i p0 = _mm512_permutex2var_epi8(k01, first, k23);                                    \
                    __m512i p1 = _mm512_permutex2var_epi8(k01, second, k23);                                   \
                    /* nibbles byte by byte: int16's zero high bytes stay zero */                             \
                    __m512i w[4] = {_mm512_and_si512(p0, low4), _mm512_and_si512(p1, low4),                    \
                                    _mm512_andnot_si512(low4, p0), _mm512_andnot_si512(low4, p1)};             \
                    for (int r = 0; r < ROWS; r++) {                                                           \
                        int32_t both;   /* int8's quad or int16's pair of activations */                       \
                        memcpy(&both, (const char *)x->q + ((size_t)(m + r) * k + kk) * (BITS / 8), 4);        \
                        __m512i xb = _mm512_set1_epi32(both);                                                  \
                        for (int i = 0; i < 4; i++)                                                            \
                            sums[r][i] = BITS == 8 ? _mm512_dpbusd_epi32(sums[r][i], w[i], xb)                 \
                                                   : _mm512_dpwssd_epi32(sums[r][i], w[i], xb);                \
                    }                                                                                          \
                }                                                                                              \
                for (int r = 0; r < ROWS; r++) {                                                               \
                    __m512 xs = _mm512_set1_ps(x->scales[(size_t)(m + r) * (k / 32) + b]);                     \
                    for (int i = 0; i < 4; i++)                                                                \
                        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][i]), xs, acc[r][i]);            \
                }                                                                                              \
            }                                                                                                  \
            for (int i = 0; i < 4; i++) {                                                                      \
                __m512i p = _mm512_loadu_si512(pairs + (size_t)g * n + 16 * i);                                \
                __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));                                  \
                __m512 offset = _mm512_fnmadd_ps(                                                              \
                    _mm512_set1_ps(8.f), scale,                                                                \
                    _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xFFFF0000u))));            \
                __m512 sixteenth = _mm512_set1_ps(i >= 2 ? 1.f / 16 : 1.f);   /* high nibbles: 16 x code */  \
                for (int r = 0; r < ROWS; r++) {                                                               \
                    __m512 xsum = _mm512_set1_ps(x->sums[(size_t)(m + r) * (k / group) + g]);                  \
                    out[r][i] = _mm512_fmadd_ps(_mm512_mul_ps(scale, sixteenth), acc[r][i],                    \
                                                _mm512_fmadd_ps(offset, xsum, out[r][i]));                     \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < ROWS; r++)                                                                         \
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + (size_t)(m + r) * n + 16 * i, out[r][i]);         \
    }
INT4_DECODE(8, 1)
INT4_DECODE(8, 2)
INT4_DECODE(8, 3)
INT4_DECODE(8, 4)
INT4_DECODE(16, 1)
INT4_DECODE(16, 2)
INT4_DECODE(16, 3)
INT4_DECODE(16, 4)

typedef void (*decode_block)(const uint8_t *, const uint32_t *, const quantized_rows *, int, float *, int, int, int);

/* y [rows][n] fp32 = x [rows][k] bf16, quantized to `bits` (8 or 16) as above, @ W.T, W int4 in torch's AVX-512
 * layout with bf16 scales and zeros [k / group][n][2]; n a multiple of 64, group of 32. Rows DECODE_ROWS at a time
 * in each block of columns, which stays in L2 between them. 0, or -1 when out of memory. */
static int int4_decode(const uint16_t *x, const uint8_t *w, const uint16_t *scales_zeros, float *y, int rows, int n,
                       int k, int group, int bits) {
    static const decode_block by_rows[2][DECODE_ROWS] = {
        {int4_decode_8_1, int4_decode_8_2, int4_decode_8_3, int4_decode_8_4},
        {int4_decode_16_1, int4_decode_16_2, int4_decode_16_3, int4_decode_16_4}};
    quantized_rows xq;
    if (quantize_rows(x, rows, k, group, bits, &xq)) return -1;
    const uint32_t *pairs = (const uint32_t *)scales_zeros;
#pragma omp parallel for schedule(static)
    for (int block = 0; block < n / 64; block++) {
        const uint8_t *codes = w + (size_t)block * k * 32;
        for (int m = 0; m < rows; m += DECODE_ROWS) {
            int take = rows - m < DECODE_ROWS ? rows - m : DECODE_ROWS;
            by_rows[bits == 16][take - 1](codes, pairs + block * 64, &xq, m, y + block * 64, n, k, group);
        }
    }
    free(xq.q), free(xq.scales);
    return 0;
}

int int4_decode_int8_activations(const uint16_t *x, const uint8_t *w, const uint16_t *scales_zeros, float *y,
                                 int rows, int n, int k, int group) {
    return int4_decode(x, w, scales_zeros, y, rows, n, k, group, 8);
}

int int4_decode_int16_activations(const uint16_t *x, const uint8_t *w, const uint16_t *scales_zeros, float *y,
                                  int rows, int n, int k, int group) {
    return int4_decode(x, w, scales_zeros, y, rows, n, k, group, 16);
}
