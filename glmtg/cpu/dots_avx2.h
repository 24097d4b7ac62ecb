/* AVX2 row dot products of the CPU expert kernel (moe_kernel.c); same arguments and results as
 * dots_scalar.h's, up to the order of the fp32 additions.
 *
 * Per group of 32 values: the weight codes are unpacked to 32 bytes (unsigned, or signed where the format
 * centres them), multiplied with the activation's int8 codes into int32 lanes (exact: maddubs' int16
 * pair sums stay below 2^15 for these ranges, or VNNI's dpbusd where the build targets it), and the
 * lanes are scaled and accumulated in fp32 vectors; one horizontal sum per row.
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

static float dot_q8_0_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    (void)xs;
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const uint8_t *b = row + 34 * g;
        __m256i s = sdot(load32((const int8_t *)(b + 2)), load32(xq + 32 * g));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(HALF(b) * dx[g]), acc);
    }
    return hsum(acc);
}

static float dot_q4_0_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;  /* the codes' offset 8 meets the activation's code sums */
    for (int g = 0; g < ng; g++) {
        const uint8_t *b = row + 18 * g;
        float scale = HALF(b) * dx[g];
        __m256i s = udot(nibbles32(b + 2), load32(xq + 32 * g));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale), acc);
        off += scale * (float)(8 * xs[g]);
    }
    return hsum(acc) - off;
}

/* 32 bits -> 32 bytes, 0x10 where the bit is set (q5_0's fifth bit, value j's bit j) */
static inline __m256i fifth_bits(uint32_t qh) {
    const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                              0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread);  /* byte j <- byte j / 8 of qh */
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

static float dot_q5_0_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int g = 0; g < ng; g++) {
        const uint8_t *b = row + 22 * g;
        uint32_t qh;
        memcpy(&qh, b + 2, 4);  /* little-endian, as x86 */
        float scale = HALF(b) * dx[g];
        __m256i w = _mm256_or_si256(nibbles32(b + 6), fifth_bits(qh));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(udot(w, load32(xq + 32 * g))), _mm256_set1_ps(scale), acc);
        off += scale * (float)(16 * xs[g]);
    }
    return hsum(acc) - off;
}

static float dot_q4_k_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int sb = 0; sb < ng / 8; sb++) {
        const uint8_t *b = row + 144 * sb, *sc = b + 4, *qs = b + 16;
        float d = HALF(b), dmin = HALF(b + 2);
        for (int c = 0; c < 4; c++) {  /* 32 bytes: sub-blocks 2c (low nibbles) and 2c + 1 (high) */
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            for (int h = 0; h < 2; h++) {
                int j = 2 * c + h, g = 8 * sb + j, scale, min;
                if (j < 4) {
                    scale = sc[j] & 63;
                    min = sc[j + 4] & 63;
                } else {
                    scale = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
                    min = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
                }
                __m256i s = udot(h ? hi : lo, load32(xq + 32 * g));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * dx[g] * (float)scale), acc);
                off += dmin * dx[g] * (float)(min * xs[g]);
            }
        }
    }
    return hsum(acc) - off;
}

static float dot_q6_k_avx2(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    (void)xs;
    __m256 acc = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), c32 = _mm256_set1_epi8(32);
    for (int sb = 0; sb < ng / 8; sb++) {
        const uint8_t *b = row + 210 * sb;
        float d = HALF(b + 208);
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
                int g = 8 * sb + 4 * n + i;
                __m256i x = load32(xq + 32 * g);
                /* int16 pair sums; the two 16-value sub-blocks (the 128-bit halves) get their own scales */
                __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[2 * i + 1]), _mm_set1_epi16(sc[2 * i]));
                __m256i s = _mm256_madd_epi16(p, scales);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * dx[g]), acc);
            }
        }
    }
    return hsum(acc);
}

#endif
