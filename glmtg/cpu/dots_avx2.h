/* AVX2 row dot products of the CPU expert kernel (moe_kernel.c); same arguments and results as
 * dots_scalar.h's, up to the order of the fp32 additions.
 *
 * Per group of 32 values: the weight codes are unpacked to 32 bytes (unsigned, or signed where the format
 * centres them) and multiplied with the activation's int8 codes into int32 lanes (exact: maddubs' int16
 * pair sums stay below 2^15 for these ranges, or VNNI's dpbusd where the build targets it). Eight
 * groups' lanes are then summed across into one vector of eight group sums (sum8), which meets the
 * eight groups' scales (weight scale x activation dx) in one fp32 multiply-add: per group, the scalar
 * work would otherwise cost as much as the integer dot itself. One horizontal sum per row.
 */
#ifndef GLMTG_DOTS_AVX2_H
#define GLMTG_DOTS_AVX2_H
#include <immintrin.h>
#include <stdint.h>

#ifdef __F16C__
#define HALF(p) _cvtsh_ss((uint16_t)((p)[0] | ((p)[1] << 8)))
#else
#define HALF(p) half_to_float(p)
#endif

/* unsigned bytes u (< 128 here) times signed bytes s, summed in fours into int32 lanes */
static inline __m256i udot(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* signed bytes w times signed bytes s: |w| unsigned against s with w's sign (exact for all int8) */
static inline __m256i sdot(__m256i w, __m256i s) {
    return udot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles (values 0..15) then high nibbles (values 16..31) */
static inline __m256i nibbles32(const uint8_t *qs) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

static inline __m256i load32(const int8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* v[0..7] int32 vectors -> their eight lane sums, in order */
static inline __m256i sum8(const __m256i *v) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

static inline __m256 load8i(const int32_t *p) {
    return _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* The 32-wide formats: eight blocks of `size` bytes at a time, then the rest one by one. `codes(b, x)`
 * gives a block's int32 lanes; `offset` (0, 8, 16) is what the format subtracts from its codes. */
#define DOT32(size, offset, codes)                                                              \
    __m256 acc = _mm256_setzero_ps(), offs = _mm256_setzero_ps();                               \
    float tail = 0.0f;                                                                          \
    int g = 0;                                                                                  \
    for (; g + 8 <= ng; g += 8) {                                                               \
        __m256i v[8];                                                                           \
        float d[8];                                                                             \
        for (int j = 0; j < 8; j++) {                                                           \
            const uint8_t *b = row + (size) * (g + j);                                          \
            d[j] = HALF(b);                                                                     \
            v[j] = codes(b, xq + 32 * (g + j));                                                 \
        }                                                                                       \
        __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(d), _mm256_loadu_ps(dx + g));             \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(v)), scale, acc);                         \
        if (offset) offs = _mm256_fmadd_ps(load8i(xs + g), scale, offs);                        \
    }                                                                                           \
    for (; g < ng; g++) {                                                                       \
        const uint8_t *b = row + (size) * g;                                                    \
        float scale = HALF(b) * dx[g];                                                          \
        __m256i v = codes(b, xq + 32 * g);                                                      \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(scale), acc);               \
        tail += scale * (float)xs[g];                                                           \
    }                                                                                           \
    return hsum(acc) - (float)(offset) * (hsum(offs) + tail);

static inline __m256i codes_q8_0(const uint8_t *b, const int8_t *x) {
    return sdot(load32((const int8_t *)(b + 2)), load32(x));
}

static inline __m256i codes_q4_0(const uint8_t *b, const int8_t *x) { return udot(nibbles32(b + 2), load32(x)); }

/* 32 bits -> 32 bytes, 0x10 where the bit is set (q5_0's fifth bit, value j's bit j) */
static inline __m256i fifth_bits(const uint8_t *p) {
    const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                              0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    uint32_t qh;
    memcpy(&qh, p, 4);  /* little-endian, as x86 */
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread);  /* byte j <- byte j / 8 of qh */
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

static inline __m256i codes_q5_0(const uint8_t *b, const int8_t *x) {
    return udot(_mm256_or_si256(nibbles32(b + 6), fifth_bits(b + 2)), load32(x));
}

static float dot_q8_0_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    DOT32(34, 0, codes_q8_0)
}

static float dot_q4_0_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    DOT32(18, 8, codes_q4_0)
}

static float dot_q5_0_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    DOT32(22, 16, codes_q5_0)
}

static inline __m256i codes_q5_1(const uint8_t *b, const int8_t *x) {
    return udot(_mm256_or_si256(nibbles32(b + 8), fifth_bits(b + 4)), load32(x));
}

/* q5_1 has its own offset per block (m), so not DOT32: the eight blocks' m meet their code sums as a vector */
static float dot_q5_1_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    __m256 acc = _mm256_setzero_ps(), offs = _mm256_setzero_ps();
    float tail = 0.0f;
    int g = 0;
    for (; g + 8 <= ng; g += 8) {
        __m256i v[8];
        float d[8], m[8];
        for (int j = 0; j < 8; j++) {
            const uint8_t *b = row + 24 * (g + j);
            d[j] = HALF(b);
            m[j] = HALF(b + 2);
            v[j] = codes_q5_1(b, xq + 32 * (g + j));
        }
        __m256 dxv = _mm256_loadu_ps(dx + g);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(v)), _mm256_mul_ps(_mm256_loadu_ps(d), dxv), acc);
        offs = _mm256_fmadd_ps(load8i(xs + g), _mm256_mul_ps(_mm256_loadu_ps(m), dxv), offs);
    }
    for (; g < ng; g++) {
        const uint8_t *b = row + 24 * g;
        __m256i v = codes_q5_1(b, xq + 32 * g);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(HALF(b) * dx[g]), acc);
        tail += HALF(b + 2) * dx[g] * (float)xs[g];
    }
    return hsum(acc) + hsum(offs) + tail;
}

/* iq4_nl: the nibbles index the 16 int8 levels with one byte shuffle (the table in both 128-bit lanes) */
static inline __m256i codes_iq4_nl(const uint8_t *b, const int8_t *x) {
    const __m128i t = _mm_loadu_si128((const __m128i *)IQ4NL_LEVELS);
    return sdot(_mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles32(b + 2)), load32(x));
}

static float dot_iq4_nl_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    DOT32(18, 0, codes_iq4_nl)
}

static float dot_q4_k_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    __m256 acc = _mm256_setzero_ps(), offs = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int sb = 0; sb < ng / 8; sb++) {
        const uint8_t *b = row + 144 * sb, *sc = b + 4, *qs = b + 16;
        const int8_t *x = xq + 256 * sb;
        int32_t scale[8], min[8];  /* 6-bit fields: 0..3 plain, 4..7 split over the low and high bytes */
        for (int j = 0; j < 4; j++) {
            scale[j] = sc[j] & 63;
            min[j] = sc[j + 4] & 63;
            scale[j + 4] = (sc[j + 8] & 15) | ((sc[j] >> 6) << 4);
            min[j + 4] = (sc[j + 8] >> 4) | ((sc[j + 4] >> 6) << 4);
        }
        __m256i v[8];
        for (int c = 0; c < 4; c++) {  /* 32 bytes: sub-blocks 2c (low nibbles) and 2c + 1 (high) */
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            v[2 * c] = udot(_mm256_and_si256(q, m4), load32(x + 64 * c));
            v[2 * c + 1] = udot(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), load32(x + 64 * c + 32));
        }
        __m256 dxv = _mm256_loadu_ps(dx + 8 * sb);
        __m256 s = _mm256_mul_ps(_mm256_mul_ps(load8i(scale), _mm256_set1_ps(HALF(b))), dxv);
        __m256 m = _mm256_mul_ps(_mm256_mul_ps(load8i(min), _mm256_set1_ps(HALF(b + 2))), dxv);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(v)), s, acc);
        offs = _mm256_fmadd_ps(load8i(xs + 8 * sb), m, offs);
    }
    return hsum(acc) - hsum(offs);
}

static float dot_q6_k_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    (void)xs;
    __m256 acc = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), c32 = _mm256_set1_epi8(32);
    for (int sb = 0; sb < ng / 8; sb++) {
        const uint8_t *b = row + 210 * sb;
        __m256i v[8];
        for (int n = 0; n < 2; n++) {  /* two halves of 128 values */
            const uint8_t *ql = b + 64 * n;
            const int8_t *sc = (const int8_t *)(b + 192) + 8 * n;
            __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
            __m256i low[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                              _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                              _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
            for (int i = 0; i < 4; i++) {  /* quarter i: activation group 8 sb + 4 n + i */
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * i), m3);
                __m256i w = _mm256_sub_epi8(_mm256_or_si256(low[i], _mm256_slli_epi16(high, 4)), c32);
                __m256i x = load32(xq + 32 * (8 * sb + 4 * n + i));
                /* int16 pair sums; the two 16-value sub-blocks (the 128-bit halves) get their own scales */
                __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[2 * i + 1]), _mm_set1_epi16(sc[2 * i]));
                v[4 * n + i] = _mm256_madd_epi16(p, scales);
            }
        }
        __m256 s = _mm256_mul_ps(_mm256_loadu_ps(dx + 8 * sb), _mm256_set1_ps(HALF(b + 208)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(v)), s, acc);
    }
    return hsum(acc);
}

#endif
