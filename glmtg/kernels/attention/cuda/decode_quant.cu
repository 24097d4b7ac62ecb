// Split-KV decode attention over a quantized KV cache (q8_0, q4_0, fp8 for K and V), head_dim 128,
// 16 query rows (GQA group x new tokens) per warp: one warp per (slice, sequence and KV head, row tile).
// Groups of more than 16 rows (48/2: 24) take several row tiles, which read the same slice (the second
// read mostly from L2).
//
// Why CUDA and not Triton: the mma B operand for P @ V pairs two *tokens* per register, while the
// cache stores a token's head dims side by side. Triton transposes 8-bit V tiles through shared
// memory byte by byte (64 LDS.U8 per 16-token tile), which made its q8_0 loop latency-bound.
// Here the head-dim order of each mma is chosen so that every thread's operands come from one
// contiguous 16- or 32-byte piece of a row: loaded straight from global memory into registers
// (no shared memory), paired across tokens by byte permutes, converted by bit tricks.
//
//   QK^T: k-step s, B element (k = 8h + 2t + e, token n = lane / 4) holds head dim 32t + 4s + 2h + e
//         (q4_0: value 4(s/2) + 16(s%2) + h + 2e of block t, matching one LOP3 per two nibbles).
//         Thread (g, t) reads bytes [32t, 32t + 32) of token g's row: block t, one scale.
//   P V:  n-tile j, column c of the B operand holds head dim 16c + j: thread (g = lane / 4) reads
//         bytes [16g, 16g + 16) of tokens 2t, 2t+1, 2t+8, 2t+9; its outputs are head dims
//         [32t, 32t + 32) of rows g and g + 8, stored contiguously.
//
// Partial outputs (normalised) and log2-domain log-sum-exps go to the same buffers as the Triton
// kernel's, and its merge kernel combines them; slicing follows the Triton kernel's _slicing.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int kHeadDim = 128;
constexpr int kTile = 16;   // tokens per step: one m16n8k16 k-step of P @ V
constexpr int kRows = 16;   // query rows per warp (the mma's M); partial buffers: kRows x grid z

enum Format { kQ8_0 = 1, kQ4_0 = 2, kFp8 = 3 };

struct Params {
    const void* q;
    const uint8_t* k;
    const uint8_t* v;
    const void* k_scale;
    const void* v_scale;
    float* partial_o;
    float* partial_lse;
    const int* lengths;
    const int* page_table;
    long long stride_qb, stride_qs, stride_qh;     // elements of q
    long long stride_kp, stride_kh, stride_kn;     // bytes
    long long stride_vp, stride_vh, stride_vn;
    long long stride_ksp, stride_ksh, stride_ksn;  // elements of the scale tensors
    long long stride_vsp, stride_vsh, stride_vsn;
    long long stride_pt_b;
    float scale_log2;
    int capacity;
    int num_splits;
    int sq;
    int group;
    int num_kv_heads;
    int page_shift;  // log2(page size) of a paged cache
    int q_bf16;
};

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));
    return r;
}

__device__ __forceinline__ uint32_t hsub2(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// Two e4m3 codes (low 16 bits of w, or high with hi) -> two exact fp16 values.
__device__ __forceinline__ uint32_t e4m3x2(uint32_t w, bool hi) {
    uint32_t r;
    uint16_t h = hi ? (uint16_t)(w >> 16) : (uint16_t)(w & 0xFFFF);
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(h));
    return r;
}

__device__ __forceinline__ uint32_t pack_f16(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t splat_f16(__half h) {
    uint32_t u = __half_as_ushort(h);
    return u | (u << 16);
}

__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// int8 codes: byte b -> fp16 bits 0x64 | (b ^ 0x80) = 1152 + b exactly; minus 1152, times the scale.
constexpr uint32_t kMagic = 0x64646464u;
constexpr uint32_t kBias8 = 0x64806480u;   // (1152, 1152)
constexpr uint32_t kBias4 = 0x64086408u;   // (1032, 1032): low nibble q -> 1024 + q, minus 1032 = q - 8
constexpr uint32_t kSixteenth = 0x2C002C00u;  // high nibble: (1024 + 16 q) / 16 - 72 = q - 8
constexpr uint32_t kHiBias4 = 0xD480D480u;    // (-72, -72)

template <int KF, int VF>
struct Tile {
    uint4 k[2][KF == kQ4_0 ? 1 : 2];  // token g and g + 8: 32 bytes (q8_0, fp8) or 16 (q4_0)
    uint4 v[4];                       // tokens 2t, 2t+1, 2t+8, 2t+9: 16 bytes each
    __half k_d[2];                    // q8_0/q4_0 block scale of each K row
    float k_s[4];                     // fp8 row scale of the score columns' tokens 2t, 2t+1, 2t+8, 2t+9
    __half v_d[4];                    // q8_0/q4_0 block scale of each V row
    float v_s[4];                     // fp8 row scale of each V row
};

template <int KF, int VF, bool PAGED>
struct Attention {
    // Rows are packed (the launcher checks): token rows of codes and of scales sit at these pitches,
    // so all of a thread's rows in a tile are one pointer plus immediate offsets, and moving to the
    // next tile is one multiply-add per tensor (runtime strides cost ~150 integer instructions a tile).
    static constexpr int kKPitch = KF == kQ4_0 ? kHeadDim / 2 : kHeadDim;  // bytes per K row
    static constexpr int kVPitch = VF == kQ4_0 ? kHeadDim / 2 : kHeadDim;
    static constexpr int kKsPitch = KF == kFp8 ? 4 : 2 * kHeadDim / 32;   // bytes per K scale row
    static constexpr int kVsPitch = VF == kFp8 ? 4 : 2 * kHeadDim / 32;
    static constexpr int kKsBytes = KF == kFp8 ? 4 : 2;  // bytes per scale element (fp32 or fp16)
    static constexpr int kVsBytes = VF == kFp8 ? 4 : 2;

    const Params& p;
    int b, hkv, g, t, end;
    // This thread's first row of each tensor in the tile at token 0 (contiguous caches) or page 0:
    // K row g (g + 8 is 8 rows on), V row 2t (2t+1, 2t+8, 2t+9 likewise), each at the piece of the
    // row (or scale row) the thread reads; kv_s is K's scale at V's rows (fp8 score columns).
    const uint8_t* k_thr;
    const uint8_t* v_thr;
    const uint8_t* ks_thr;
    const uint8_t* vs_thr;
    const uint8_t* kv_s_thr;

    __device__ __forceinline__ Attention(const Params& params, int b_, int hkv_, int end_)
        : p(params), b(b_), hkv(hkv_), end(end_) {
        const int lane = threadIdx.x & 31;
        g = lane >> 2;
        t = lane & 3;
        const long long page = PAGED ? 0 : b;
        const uint8_t* ks = static_cast<const uint8_t*>(p.k_scale) + (hkv * p.stride_ksh + page * p.stride_ksp) * kKsBytes;
        k_thr = p.k + hkv * p.stride_kh + page * p.stride_kp + k_row_offset(g);
        v_thr = p.v + hkv * p.stride_vh + page * p.stride_vp + v_row_offset(2 * t);
        ks_thr = ks + k_scale_offset(g);
        vs_thr = static_cast<const uint8_t*>(p.v_scale) + (hkv * p.stride_vsh + page * p.stride_vsp) * kVsBytes
                 + v_scale_offset(2 * t);
        kv_s_thr = ks + k_scale_offset(2 * t);
    }

    __device__ __forceinline__ int k_row_offset(int token) const {
        return token * kKPitch + (KF == kQ4_0 ? 16 * t : 32 * t);
    }
    __device__ __forceinline__ int k_scale_offset(int token) const {
        return token * kKsPitch + (KF == kFp8 ? 0 : 2 * t);
    }
    __device__ __forceinline__ int v_row_offset(int token) const {
        return token * kVPitch + (VF == kQ4_0 ? 16 * (g >> 1) : 16 * g);
    }
    __device__ __forceinline__ int v_scale_offset(int token) const {
        return token * kVsPitch + (VF == kFp8 ? 0 : 2 * (g >> 1));
    }

    // Storage page of the 16-token tile at n0 (page sizes are powers of two >= 16, so a tile never
    // straddles pages; 0 for contiguous caches, whose sequence the thread pointers include) and the
    // slot of its first token.
    __device__ __forceinline__ void locate(int n0, long long& page, unsigned& slot0) const {
        if constexpr (PAGED) {
            page = __ldg(p.page_table + b * p.stride_pt_b + (n0 >> p.page_shift));
            slot0 = n0 & ((1 << p.page_shift) - 1);
        } else {
            page = 0;
            slot0 = n0;
        }
    }

    // Loads go straight to registers (the next tile's while this one is computed). Only the slice's
    // last, partial tile clamps its rows (to its last token: always inside the cache, and masked, so
    // what such a row holds never matters; a valid row is finite unless the cached token is not).
    template <bool TAIL>
    __device__ __forceinline__ void load(Tile<KF, VF>& tile, int n0) const {
        long long page;
        unsigned slot0;
        locate(n0, page, slot0);
        const int last = end - 1 - n0;
        // Each tensor: one multiply-add to the tile; the rows are immediate offsets from there.
        const uint8_t* kp = k_thr + page * p.stride_kp + slot0 * kKPitch;
        const uint8_t* vp = v_thr + page * p.stride_vp + slot0 * kVPitch;
        const uint8_t* ksp = ks_thr + page * p.stride_ksp * kKsBytes + slot0 * kKsPitch;
        const uint8_t* vsp = vs_thr + page * p.stride_vsp * kVsBytes + slot0 * kVsPitch;
        const uint8_t* kvsp = kv_s_thr + page * p.stride_ksp * kKsBytes + slot0 * kKsPitch;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            // TAIL: the clamped token's row, as an offset from this thread's first row.
            const int token = min(8 * nt + g, last);
            const uint8_t* row = TAIL ? kp + (token - g) * kKPitch : kp + 8 * nt * kKPitch;
            tile.k[nt][0] = __ldg(reinterpret_cast<const uint4*>(row));
            if constexpr (KF != kQ4_0) {
                tile.k[nt][1] = __ldg(reinterpret_cast<const uint4*>(row + 16));
            }
            if constexpr (KF != kFp8) {
                tile.k_d[nt] = __ldg(reinterpret_cast<const __half*>(
                    TAIL ? ksp + (token - g) * kKsPitch : ksp + 8 * nt * kKsPitch));
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int step = (i & 1) + 8 * (i >> 1);  // tokens 2t, 2t+1, 2t+8, 2t+9
            const int rel = TAIL ? min(2 * t + step, last) - 2 * t : step;
            tile.v[i] = __ldg(reinterpret_cast<const uint4*>(vp + rel * kVPitch));
            if constexpr (VF == kFp8) {
                tile.v_s[i] = __ldg(reinterpret_cast<const float*>(vsp + rel * kVsPitch));
            } else {
                tile.v_d[i] = __ldg(reinterpret_cast<const __half*>(vsp + rel * kVsPitch));
            }
            if constexpr (KF == kFp8) {  // the score columns this thread holds are V's tokens
                tile.k_s[i] = __ldg(reinterpret_cast<const float*>(kvsp + rel * kKsPitch));
            }
        }
    }

    __device__ __forceinline__ void load_any(Tile<KF, VF>& tile, int n0) const {
        if (n0 + kTile <= end) {
            load<false>(tile, n0);
        } else {
            load<true>(tile, n0);
        }
    }

    // K operand of k-steps s = 0..7 for one token row (b0 = k 2t..2t+1, b1 = k 2t+8..2t+9).
    __device__ __forceinline__ void k_operands(const Tile<KF, VF>& tile, int nt, uint32_t b[8][2]) const {
        if constexpr (KF == kQ8_0) {
            const uint32_t d = splat_f16(tile.k_d[nt]);
            const uint32_t w[8] = {tile.k[nt][0].x, tile.k[nt][0].y, tile.k[nt][0].z, tile.k[nt][0].w,
                                   tile.k[nt][1].x, tile.k[nt][1].y, tile.k[nt][1].z, tile.k[nt][1].w};
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                const uint32_t x = w[s] ^ 0x80808080u;
                b[s][0] = hmul2(hsub2(prmt(x, kMagic, 0x4140), kBias8), d);
                b[s][1] = hmul2(hsub2(prmt(x, kMagic, 0x4342), kBias8), d);
            }
        } else if constexpr (KF == kQ4_0) {
            const uint32_t d = splat_f16(tile.k_d[nt]);
            const uint32_t w[4] = {tile.k[nt][0].x, tile.k[nt][0].y, tile.k[nt][0].z, tile.k[nt][0].w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t odd = w[i] >> 8;
                b[2 * i][0] = hmul2(hsub2(and_or(w[i], 0x000F000Fu, 0x64006400u), kBias4), d);
                b[2 * i][1] = hmul2(hsub2(and_or(odd, 0x000F000Fu, 0x64006400u), kBias4), d);
                b[2 * i + 1][0] = hmul2(hfma2(and_or(w[i], 0x00F000F0u, 0x64006400u), kSixteenth, kHiBias4), d);
                b[2 * i + 1][1] = hmul2(hfma2(and_or(odd, 0x00F000F0u, 0x64006400u), kSixteenth, kHiBias4), d);
            }
        } else {
            const uint32_t w[8] = {tile.k[nt][0].x, tile.k[nt][0].y, tile.k[nt][0].z, tile.k[nt][0].w,
                                   tile.k[nt][1].x, tile.k[nt][1].y, tile.k[nt][1].z, tile.k[nt][1].w};
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                b[s][0] = e4m3x2(w[s], false);
                b[s][1] = e4m3x2(w[s], true);
            }
        }
    }

    // V operand of n-tiles j = 0..15 from two token rows x (k = 2t or 2t+8) and y (k + 1).
    __device__ __forceinline__ void v_operands(const Tile<KF, VF>& tile, int pair, uint32_t b[16]) const {
        const uint4 xr = tile.v[2 * pair], yr = tile.v[2 * pair + 1];
        const uint32_t xs[4] = {xr.x, xr.y, xr.z, xr.w};
        const uint32_t ys[4] = {yr.x, yr.y, yr.z, yr.w};
        if constexpr (VF == kQ8_0) {
            const uint32_t d = pack_halves(tile.v_d[2 * pair], tile.v_d[2 * pair + 1]);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t lo = prmt(xs[i], ys[i], 0x5140) ^ 0x80808080u;  // x0 y0 x1 y1
                const uint32_t hi = prmt(xs[i], ys[i], 0x7362) ^ 0x80808080u;  // x2 y2 x3 y3
                b[4 * i + 0] = hmul2(hsub2(prmt(lo, kMagic, 0x4140), kBias8), d);
                b[4 * i + 1] = hmul2(hsub2(prmt(lo, kMagic, 0x4342), kBias8), d);
                b[4 * i + 2] = hmul2(hsub2(prmt(hi, kMagic, 0x4140), kBias8), d);
                b[4 * i + 3] = hmul2(hsub2(prmt(hi, kMagic, 0x4342), kBias8), d);
            }
        } else if constexpr (VF == kQ4_0) {
            // Thread g's 16 head dims are the low (g even) or high (g odd) nibbles of its block.
            const uint32_t d = pack_halves(tile.v_d[2 * pair], tile.v_d[2 * pair + 1]);
            const bool high = g & 1;
            const uint32_t mask = high ? 0x00F000F0u : 0x000F000Fu;
            const uint32_t mul = high ? kSixteenth : 0x3C003C00u;  // 1/16 or 1
            const uint32_t add = high ? kHiBias4 : 0xE408E408u;     // -72 or -1032
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t lo = prmt(xs[i], ys[i], 0x5410);  // x0 x1 y0 y1
                const uint32_t hi = prmt(xs[i], ys[i], 0x7632);  // x2 x3 y2 y3
                b[4 * i + 0] = hmul2(hfma2(and_or(lo, mask, 0x64006400u), mul, add), d);
                b[4 * i + 1] = hmul2(hfma2(and_or(lo >> 8, mask, 0x64006400u), mul, add), d);
                b[4 * i + 2] = hmul2(hfma2(and_or(hi, mask, 0x64006400u), mul, add), d);
                b[4 * i + 3] = hmul2(hfma2(and_or(hi >> 8, mask, 0x64006400u), mul, add), d);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t lo = prmt(xs[i], ys[i], 0x5140);
                const uint32_t hi = prmt(xs[i], ys[i], 0x7362);
                b[4 * i + 0] = e4m3x2(lo, false);
                b[4 * i + 1] = e4m3x2(lo, true);
                b[4 * i + 2] = e4m3x2(hi, false);
                b[4 * i + 3] = e4m3x2(hi, true);
            }
        }
    }

    __device__ __forceinline__ static uint32_t pack_halves(__half lo, __half hi) {
        return (uint32_t)__half_as_ushort(lo) | ((uint32_t)__half_as_ushort(hi) << 16);
    }
};

__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int KF, int VF, bool PAGED>
__device__ __forceinline__ void decode_quant(const Params& p) {
    const int split = blockIdx.x;
    const int bh = blockIdx.y;
    const int b = bh / p.num_kv_heads;
    const int hkv = bh % p.num_kv_heads;
    const int length = min(max(__ldg(p.lengths + b), 0), p.capacity);
    const int per_split = (length + p.num_splits - 1) / p.num_splits;
    const int chunk = (per_split + kTile - 1) / kTile * kTile;
    const int start = split * chunk;
    const int end = min(start + chunk, length);
    if (start >= end) {
        return;  // the merge kernel knows this slice is empty and never reads it
    }
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rows = p.group * p.sq;
    const int row0 = kRows * blockIdx.z;  // groups of more than 16 rows take several warps (grid z)

    // Queries as A operands in the permuted head-dim order of the K operand (see the top comment).
    uint32_t qa[8][4];
    int key_limit[2];  // keys < key_limit[r] are visible to row g + 8r (slice end and causality)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        const int tok = row / p.group;
        const int head = hkv * p.group + row % p.group;
        key_limit[r] = min(end, length - p.sq + tok + 1);
        // 32 consecutive values of the row (64 bytes, 16-byte aligned: the launcher checks).
        const long long base = b * p.stride_qb + tok * p.stride_qs + head * p.stride_qh + 32 * t;
        uint4 raw[4] = {};
        if (row < rows) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                raw[c] = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.q) + base) + c);
            }
        }
        const uint16_t* bits = reinterpret_cast<const uint16_t*>(raw);
        float qv[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            qv[i] = p.q_bf16 ? __bfloat162float(__ushort_as_bfloat16(bits[i])) : __half2float(__ushort_as_half(bits[i]));
        }
#pragma unroll
        for (int s = 0; s < 8; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int v0 = KF == kQ4_0 ? 4 * (s >> 1) + 16 * (s & 1) + h : 4 * s + 2 * h;
                const int step = KF == kQ4_0 ? 2 : 1;
                qa[s][r + 2 * h] = pack_f16(qv[v0], qv[v0 + step]);
            }
        }
    }
    const int mask_from = min(key_limit[0], key_limit[1]);  // tiles reaching past this are masked

    using A = Attention<KF, VF, PAGED>;
    A attn(p, b, hkv, end);
    float acc[16][4];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    }
    float m_i[2] = {-INFINITY, -INFINITY};
    float l_i[2] = {0.0f, 0.0f};

    auto attend = [&](const Tile<KF, VF>& tile, int n0) {
        // Two accumulators per score tile: halves the chain of dependent mma instructions.
        float s[2][4], s_odd[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            s_odd[nt][0] = s_odd[nt][1] = s_odd[nt][2] = s_odd[nt][3] = 0.0f;
            uint32_t kb[8][2];
            attn.k_operands(tile, nt, kb);
#pragma unroll
            for (int st = 0; st < 8; st += 2) {
                mma(s[nt], qa[st], kb[st][0], kb[st][1]);
                mma(s_odd[nt], qa[st + 1], kb[st + 1][0], kb[st + 1][1]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nt][i] += s_odd[nt][i];
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float k_scale = KF == kFp8 ? tile.k_s[2 * nt + (i & 1)] * p.scale_log2 : p.scale_log2;
                s[nt][i] *= k_scale;
            }
        }
        if (n0 + kTile > mask_from) {  // warp-uniform: only the slice's last tiles
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int key = n0 + 8 * nt + 2 * t + (i & 1);
                    if (key >= key_limit[i >> 1]) s[nt][i] = -INFINITY;
                }
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float mx = quad_max(fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1])));
            const float m_new = fmaxf(m_i[r], mx);
            const float m_safe = m_new == -INFINITY ? 0.0f : m_new;  // no visible key yet
            alpha[r] = fast_exp2(m_i[r] - m_safe);
            m_i[r] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                s[nt][2 * r] = fast_exp2(s[nt][2 * r] - m_safe);
                s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] - m_safe);
                sum += s[nt][2 * r] + s[nt][2 * r + 1];
            }
            l_i[r] = l_i[r] * alpha[r] + sum;
        }
        // The running maximum rarely moves once a slice is under way: skip the rescale then.
        if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                acc[j][0] *= alpha[0];
                acc[j][1] *= alpha[0];
                acc[j][2] *= alpha[1];
                acc[j][3] *= alpha[1];
            }
        }
        if constexpr (VF == kFp8) {  // the V row scale multiplies the probabilities
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    s[nt][i] *= tile.v_s[2 * nt + (i & 1)];
                }
            }
        }
        const uint32_t pa[4] = {pack_f16(s[0][0], s[0][1]), pack_f16(s[0][2], s[0][3]),
                                pack_f16(s[1][0], s[1][1]), pack_f16(s[1][2], s[1][3])};
        uint32_t vb0[16], vb1[16];
        attn.v_operands(tile, 0, vb0);
        attn.v_operands(tile, 1, vb1);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            mma(acc[j], pa, vb0[j], vb1[j]);
        }
    };

    // Register double buffering: the next tile's loads are in flight while this one is computed.
    Tile<KF, VF> tile_a, tile_b;
    attn.load_any(tile_a, start);
    int n0 = start;
    while (true) {
        if (n0 + kTile < end) attn.load_any(tile_b, n0 + kTile);
        attend(tile_a, n0);
        n0 += kTile;
        if (n0 >= end) break;
        if (n0 + kTile < end) attn.load_any(tile_a, n0 + kTile);
        attend(tile_b, n0);
        n0 += kTile;
        if (n0 >= end) break;
    }

#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");  // the merge kernel waits for our stores itself
#endif
    const long long part = ((long long)bh * p.num_splits + split) * (kRows * gridDim.z);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        const float l = quad_sum(l_i[r]);
        if (row >= rows) continue;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* out = p.partial_o + (part + row) * kHeadDim + 32 * t;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int j = 0; j < 16; j += 4) {
                float4 o = make_float4(acc[j][2 * r + c] * inv, acc[j + 1][2 * r + c] * inv,
                                       acc[j + 2][2 * r + c] * inv, acc[j + 3][2 * r + c] * inv);
                *reinterpret_cast<float4*>(out + 16 * c + j) = o;
            }
        }
        if (t == 0) {
            p.partial_lse[part + row] = l > 0.0f ? m_i[r] + log2f(l) : -INFINITY;
        }
    }
}

}  // namespace

#ifndef GLMTG_MIN_BLOCKS
#define GLMTG_MIN_BLOCKS 8
#endif

#define GLMTG_DECODE_QUANT(KF, VF, PAGED)                                                        \
    extern "C" __global__ void __launch_bounds__(32, GLMTG_MIN_BLOCKS)                          \
        glmtg_decode_quant_k##KF##_v##VF##_p##PAGED(const Params p) {                            \
        decode_quant<KF, VF, PAGED>(p);                                            \
    }

#define GLMTG_DECODE_QUANT_V(KF, PAGED) \
    GLMTG_DECODE_QUANT(KF, 1, PAGED) GLMTG_DECODE_QUANT(KF, 2, PAGED) GLMTG_DECODE_QUANT(KF, 3, PAGED)

GLMTG_DECODE_QUANT_V(1, 0)
GLMTG_DECODE_QUANT_V(2, 0)
GLMTG_DECODE_QUANT_V(3, 0)
GLMTG_DECODE_QUANT_V(1, 1)
GLMTG_DECODE_QUANT_V(2, 1)
GLMTG_DECODE_QUANT_V(3, 1)
