/* Portable row dot products of the CPU expert kernel (moe_kernel.c): one weight row in GGUF blocks
 * against one activation rounded to int8 per 32 values (codes xq, scales dx, code sums xs). Plain C; the
 * reference for the SIMD versions in dots_avx2.h and the path on machines without AVX2.
 */
#ifndef GLMTG_DOTS_SCALAR_H
#define GLMTG_DOTS_SCALAR_H
#include <stdint.h>
#include <string.h>

static inline float half_to_float(const uint8_t *p) {
    uint32_t h = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {  /* zero or subnormal: man * 2^-24, exact in float */
        float f = (float)man * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float dot_q8_0_scalar(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    (void)xs;
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const uint8_t *b = row + 34 * g;
        const int8_t *w = (const int8_t *)(b + 2), *x = xq + 32 * g;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += (int32_t)w[j] * x[j];
        acc += half_to_float(b) * dx[g] * (float)s;
    }
    return acc;
}

static float dot_q4_0_scalar(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const uint8_t *b = row + 18 * g, *qs = b + 2;
        const int8_t *x = xq + 32 * g;
        int32_t s = 0;
        for (int j = 0; j < 16; j++) s += (int32_t)(qs[j] & 15) * x[j] + (int32_t)(qs[j] >> 4) * x[j + 16];
        /* values are code - 8: the offset meets the activation's code sum once */
        acc += half_to_float(b) * dx[g] * (float)(s - 8 * xs[g]);
    }
    return acc;
}

static float dot_q5_0_scalar(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const uint8_t *b = row + 22 * g, *qs = b + 6;
        const int8_t *x = xq + 32 * g;
        uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
            int32_t lo = (qs[j] & 15) | (((qh >> j) & 1) << 4);
            int32_t hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            s += lo * x[j] + hi * x[j + 16];
        }
        acc += half_to_float(b) * dx[g] * (float)(s - 16 * xs[g]);
    }
    return acc;
}

/* q5_1: value = d * code + m (codes 0..31, unsigned): the offset m meets the activation's code sum */
static float dot_q5_1_scalar(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const uint8_t *b = row + 24 * g, *qs = b + 8;
        const int8_t *x = xq + 32 * g;
        uint32_t qh = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
            int32_t lo = (qs[j] & 15) | (((qh >> j) & 1) << 4);
            int32_t hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            s += lo * x[j] + hi * x[j + 16];
        }
        acc += dx[g] * (half_to_float(b) * (float)s + half_to_float(b + 2) * (float)xs[g]);
    }
    return acc;
}

/* iq4_nl's 16 non-linear levels (ggml-common.h's table; glmtg/formats/gguf_blocks.py's IQ4_LEVELS) */
static const int8_t IQ4NL_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* iq4_nl: value = d * level[nibble]; levels are int8, so the dot stays integer per block */
static float dot_iq4_nl_scalar(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    (void)xs;
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const uint8_t *b = row + 18 * g, *qs = b + 2;
        const int8_t *x = xq + 32 * g;
        int32_t s = 0;
        for (int j = 0; j < 16; j++)
            s += (int32_t)IQ4NL_LEVELS[qs[j] & 15] * x[j] + (int32_t)IQ4NL_LEVELS[qs[j] >> 4] * x[j + 16];
        acc += half_to_float(b) * dx[g] * (float)s;
    }
    return acc;
}

static float dot_q4_k_scalar(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    float acc = 0.0f;
    for (int sb = 0; sb < ng / 8; sb++) {
        const uint8_t *b = row + 144 * sb, *sc = b + 4, *qs = b + 16;
        float d = half_to_float(b), dmin = half_to_float(b + 2);
        for (int j = 0; j < 8; j++) {  /* sub-block j = activation group 8 sb + j */
            int scale, min;
            if (j < 4) {
                scale = sc[j] & 63;
                min = sc[j + 4] & 63;
            } else {  /* 6-bit fields split: low 4 bits in bytes 8..11, high 2 in the top of bytes 0..7 */
                scale = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
                min = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
            }
            const uint8_t *q = qs + 32 * (j / 2);
            int g = 8 * sb + j, shift = 4 * (j & 1);
            const int8_t *x = xq + 32 * g;
            int32_t s = 0;
            for (int l = 0; l < 32; l++) s += (int32_t)((q[l] >> shift) & 15) * x[l];
            acc += dx[g] * (d * (float)(scale * s) - dmin * (float)(min * xs[g]));
        }
    }
    return acc;
}

static float dot_q6_k_scalar(const uint8_t *row, const int8_t *xq, const float *dx, const int32_t *xs, int ng) {
    (void)xs;
    float acc = 0.0f;
    for (int sb = 0; sb < ng / 8; sb++) {
        const uint8_t *b = row + 210 * sb;
        float d = half_to_float(b + 208);
        for (int n = 0; n < 2; n++) {  /* two halves of 128 values */
            const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
            const int8_t *sc = (const int8_t *)(b + 192) + 8 * n;
            for (int i = 0; i < 4; i++) {  /* quarter i: activation group 8 sb + 4 n + i */
                const uint8_t *lo = ql + 32 * (i & 1);
                int lshift = 4 * (i >> 1), hshift = 2 * i;
                const int8_t *x = xq + 32 * (8 * sb + 4 * n + i);
                int32_t s0 = 0, s1 = 0;  /* the two 16-value sub-blocks have their own scales */
                for (int l = 0; l < 16; l++)
                    s0 += ((int32_t)(((lo[l] >> lshift) & 15) | (((qh[l] >> hshift) & 3) << 4)) - 32) * x[l];
                for (int l = 16; l < 32; l++)
                    s1 += ((int32_t)(((lo[l] >> lshift) & 15) | (((qh[l] >> hshift) & 3) << 4)) - 32) * x[l];
                acc += d * dx[8 * sb + 4 * n + i] * (float)(sc[2 * i] * s0 + sc[2 * i + 1] * s1);
            }
        }
    }
    return acc;
}

#endif
