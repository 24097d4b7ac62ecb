/* The CPU expert kernel: one fused call per MoE layer for the experts held in system RAM.
 *
 * out[t] = sum_s weights[t,s] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t,s], for ids in [0, E).
 *
 * Weights stay in GGUF blocks (raw bytes as the file stores them). Activations are rounded to int8 once
 * per 32 values (dx = amax / 127, codes rounded to nearest even: glmtg/kernels/gguf/activation.py's math),
 * so every weight block meets the activation in integer dot products; the intermediate silu(g) * u is
 * rounded the same way before down.
 *
 * The row dot products: dots_avx2.h (AVX2 intrinsics, AVX-512 VNNI's dpbusd where the target has it)
 * when the build targets AVX2, else dots_scalar.h (plain C). The build (build.py) targets the building
 * machine (-march=native) unless told otherwise, so the path is chosen when the kernel is compiled;
 * glmtg_cpu_moe_isa() says which.
 *
 * Work: one OpenMP parallel region per call; tasks are (expert, block of ROWS rows): a task reads its
 * rows once and applies each to every token routed to that expert, so each selected expert's bytes are
 * read once per call whatever the number of tokens.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dots_scalar.h"
#ifdef __AVX2__
#include "dots_avx2.h"
#endif

enum { F_Q8_0 = 0, F_Q4_0 = 1, F_Q5_0 = 2, F_Q4_K = 3, F_Q6_K = 4, F_Q5_1 = 5, F_IQ4_NL = 6 };

#define ROWS 16 /* rows per task: enough work to amortize scheduling, small enough to balance 2..64 threads */

/* Rounds n values (n a multiple of 32) to int8 per group of 32: dx = amax / 127, codes = nearest-even of
 * v * (127 / amax), clamped to +-127; sums = each group's code sum (formats with offsets use it). */
static void quantize_group(const float *v, int8_t *q, float *dx, int32_t *sums) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int j = 0; j < 32; j++) {
        float r = nearbyintf(v[j] * inv);
        r = fminf(fmaxf(r, -127.0f), 127.0f);
        q[j] = (int8_t)r;
        s += q[j];
    }
    *dx = amax / 127.0f;
    *sums = s;
}

typedef float (*dot_fn)(const uint8_t *, const int8_t *, const float *, const int32_t *, int);

#ifdef __AVX2__
#define DOT(f) dot_##f##_avx2
#else
#define DOT(f) dot_##f##_scalar
#endif

static dot_fn dot_of(int fmt) {
    switch (fmt) {
        case F_Q8_0: return DOT(q8_0);
        case F_Q4_0: return DOT(q4_0);
        case F_Q5_0: return DOT(q5_0);
        case F_Q4_K: return DOT(q4_k);
        case F_Q6_K: return DOT(q6_k);
        case F_Q5_1: return DOT(q5_1);
        case F_IQ4_NL: return DOT(iq4_nl);
        default: return NULL;
    }
}

/* Which dot products this build uses (the compiler's target decides: see build.py). */
const char *glmtg_cpu_moe_isa(void) {
#if defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return "avx2+avx512vnni";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "scalar";
#endif
}

static long row_bytes(int fmt, int n) {
    switch (fmt) {
        case F_Q8_0: return (long)n / 32 * 34;
        case F_Q4_0: return (long)n / 32 * 18;
        case F_Q5_0: return (long)n / 32 * 22;
        case F_Q4_K: return (long)n / 256 * 144;
        case F_Q6_K: return (long)n / 256 * 210;
        case F_Q5_1: return (long)n / 32 * 24;
        case F_IQ4_NL: return (long)n / 32 * 18;
        default: return -1;
    }
}

/* Returns 0, or 1 for an unknown format, 2 when scratch memory cannot be had. The caller checks shapes. */
int glmtg_cpu_moe(const float *x, int T, int H, int I, int E, int k, const uint8_t *gate, const uint8_t *up,
                  const uint8_t *down, const int64_t *ids, const float *weights, int fgu, int fd, int nthreads,
                  float *out) {
    dot_fn dgu = dot_of(fgu), dd = dot_of(fd);
    if (!dgu || !dd) return 1;
    const long rbh = row_bytes(fgu, H), rbi = row_bytes(fd, I);
    const int ngh = H / 32, ngi = I / 32, tk = T * k;

    /* Pairs (token, slot) routed here, grouped by expert (a counting sort, slot order kept). */
    int *start = calloc((size_t)E + 1, sizeof(int)), *pos = malloc(sizeof(int) * (size_t)(tk ? tk : 1));
    int *tok = malloc(sizeof(int) * (size_t)(tk ? tk : 1)), *act = malloc(sizeof(int) * (size_t)(E ? E : 1));
    int8_t *xq = malloc((size_t)T * H + 1);
    float *xdx = malloc(sizeof(float) * ((size_t)T * ngh + 1));
    int32_t *xsum = malloc(sizeof(int32_t) * ((size_t)T * ngh + 1));
    if (!start || !pos || !tok || !act || !xq || !xdx || !xsum) {
        free(start); free(pos); free(tok); free(act); free(xq); free(xdx); free(xsum);
        return 2;
    }
    for (int p = 0; p < tk; p++)
        if (ids[p] >= 0 && ids[p] < E) start[ids[p] + 1]++;
    int nact = 0;
    for (int e = 0; e < E; e++) {
        if (start[e + 1]) act[nact++] = e;
        start[e + 1] += start[e];
    }
    const int P = start[E];
    int *fill = calloc((size_t)E + 1, sizeof(int));
    float *G = malloc(sizeof(float) * ((size_t)P * I + 1)), *U = malloc(sizeof(float) * ((size_t)P * I + 1));
    int8_t *aq = malloc((size_t)P * I + 1);
    float *adx = malloc(sizeof(float) * ((size_t)P * ngi + 1)), *Y = malloc(sizeof(float) * ((size_t)P * H + 1));
    int32_t *asum = malloc(sizeof(int32_t) * ((size_t)P * ngi + 1));
    int rc = 0;
    if (!fill || !G || !U || !aq || !adx || !Y || !asum) {
        rc = 2;
        goto done;
    }
    for (int p = 0; p < tk; p++) {
        if (ids[p] >= 0 && ids[p] < E) {
            int e = (int)ids[p], q = start[e] + fill[e]++;
            tok[q] = p / k;
            pos[p] = q;
        } else {
            pos[p] = -1;
        }
    }
    const int hb = (I + ROWS - 1) / ROWS, db = (H + ROWS - 1) / ROWS;

#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (long g = 0; g < (long)T * ngh; g++) quantize_group(x + 32 * g, xq + 32 * g, xdx + g, xsum + g);

        /* gate and up: each task reads ROWS rows of one expert's gate and up once for all its tokens */
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < (long)nact * hb; task++) {
            int e = act[task / hb], r0 = (int)(task % hb) * ROWS, r1 = r0 + ROWS < I ? r0 + ROWS : I;
            for (int r = r0; r < r1; r++) {
                const uint8_t *gr = gate + ((long)e * I + r) * rbh, *ur = up + ((long)e * I + r) * rbh;
                for (int q = start[e]; q < start[e + 1]; q++) {
                    long t = tok[q];
                    G[(long)q * I + r] = dgu(gr, xq + t * H, xdx + t * ngh, xsum + t * ngh, ngh);
                    U[(long)q * I + r] = dgu(ur, xq + t * H, xdx + t * ngh, xsum + t * ngh, ngh);
                }
            }
        }

        /* silu(g) * u in fp32 (torch's silu: g / (1 + exp(-g))), rounded to int8 per 32 for down */
#pragma omp for schedule(static)
        for (long g = 0; g < (long)P * ngi; g++) {
            float a[32];
            const float *gv = G + 32 * g, *uv = U + 32 * g;
            for (int j = 0; j < 32; j++) a[j] = gv[j] / (1.0f + expf(-gv[j])) * uv[j];
            quantize_group(a, aq + 32 * g, adx + g, asum + g);
        }

#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < (long)nact * db; task++) {
            int e = act[task / db], r0 = (int)(task % db) * ROWS, r1 = r0 + ROWS < H ? r0 + ROWS : H;
            for (int r = r0; r < r1; r++) {
                const uint8_t *dr = down + ((long)e * H + r) * rbi;
                for (int q = start[e]; q < start[e + 1]; q++)
                    Y[(long)q * H + r] = dd(dr, aq + (long)q * I, adx + (long)q * ngi, asum + (long)q * ngi, ngi);
            }
        }

        /* weighted sum over each token's slots, in slot order (slots routed elsewhere add nothing) */
#pragma omp for schedule(static)
        for (long i = 0; i < (long)T * H; i++) {
            long t = i / H, h = i % H;
            float acc = 0.0f;
            for (int s = 0; s < k; s++) {
                int q = pos[t * k + s];
                if (q >= 0) acc += weights[t * k + s] * Y[(long)q * H + h];
            }
            out[i] = acc;
        }
    }
done:
    free(start); free(pos); free(tok); free(act); free(xq); free(xdx); free(xsum);
    free(fill); free(G); free(U); free(aq); free(adx); free(Y); free(asum);
    return rc;
}

/* The arguments of one layer's call as a CUDA host node (glmtg/cpu/host_node.py mirrors this struct with
 * ctypes and checks its layout against glmtg_cpu_moe_node_layout). The pointers are the pinned host buffers
 * the stream copies into and out of, and the layer's stacks in the host arena; a captured graph bakes the
 * struct's address in, so the Python side keeps it alive as long as the layer. */
typedef struct {
    const float *x;         /* [T, H] */
    const int64_t *ids;     /* [T, k] stack slots, -1 (or any id outside [0, E)): held elsewhere */
    const float *weights;   /* [T, k] */
    float *out;             /* [T, H] */
    const uint8_t *gate, *up, *down;
    int32_t T, H, I, E, k, fgu, fd, nthreads;
    int32_t rc;             /* written by each call: glmtg_cpu_moe's return code */
} glmtg_moe_node_args;

/* cudaHostFn_t's signature: runs glmtg_cpu_moe on the struct's buffers. No CUDA calls (CUDA forbids them in
 * host functions) and no Python. A failure cannot be reported to the stream, so it leaves NaN in out (the
 * step's result shows it) and its code in rc. */
void glmtg_cpu_moe_node(void *p) {
    glmtg_moe_node_args *a = (glmtg_moe_node_args *)p;
    int rc = glmtg_cpu_moe(a->x, a->T, a->H, a->I, a->E, a->k, a->gate, a->up, a->down, a->ids, a->weights,
                           a->fgu, a->fd, a->nthreads, a->out);
    a->rc = rc;
    if (rc != 0)
        for (long i = 0; i < (long)a->T * a->H; i++) a->out[i] = NAN;
}

/* The struct's layout for the Python mirror's check: sizeof, then the offset of each field in declaration
 * order (x, ids, weights, out, gate, up, down, T, H, I, E, k, fgu, fd, nthreads, rc). Returns the count
 * written (at most n). */
int glmtg_cpu_moe_node_layout(int64_t *v, int n) {
    const int64_t all[] = {
        sizeof(glmtg_moe_node_args),
        offsetof(glmtg_moe_node_args, x), offsetof(glmtg_moe_node_args, ids),
        offsetof(glmtg_moe_node_args, weights), offsetof(glmtg_moe_node_args, out),
        offsetof(glmtg_moe_node_args, gate), offsetof(glmtg_moe_node_args, up),
        offsetof(glmtg_moe_node_args, down), offsetof(glmtg_moe_node_args, T),
        offsetof(glmtg_moe_node_args, H), offsetof(glmtg_moe_node_args, I),
        offsetof(glmtg_moe_node_args, E), offsetof(glmtg_moe_node_args, k),
        offsetof(glmtg_moe_node_args, fgu), offsetof(glmtg_moe_node_args, fd),
        offsetof(glmtg_moe_node_args, nthreads), offsetof(glmtg_moe_node_args, rc),
    };
    int m = (int)(sizeof(all) / sizeof(all[0]));
    for (int i = 0; i < m && i < n; i++) v[i] = all[i];
    return m;
}
