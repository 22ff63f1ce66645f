/* gptkit's CPU kernels for decoding: matrix-vector products at memory speed, and a whole GPT-2
 * decoding step (one new token per sequence) in one call; weights in fp32, or int8 with one scale
 * per output row (gptkit/generate/cpu/quantize.py's Int8Linear).
 *
 * gptkit/generate/cpu/build.py compiles this file on first use (cc -O3 -march=native -fopenmp) and
 * calls it through ctypes. Decoding reads every weight once per token, so its speed is the speed at
 * which the weights stream from memory; in PyTorch the ~30 small operations per layer between the
 * products also cost about a fifth of a step, because each runs with caches that the weights have
 * just flushed. `gptkit_decode` does the same arithmetic as gptkit.model.GPT.forward (its reference,
 * tested to agree) with one parallel region per step.
 *
 * Products: W (out x n, row-major) is read once, in blocks of BLOCK_ROWS rows shared out between the
 * threads; a block is multiplied with every row of x while it is in the core's cache. Each output
 * adds up 4 x LANES partial sums kept in vectors (GCC/Clang vector extensions become AVX-512, AVX2
 * or NEON code, whatever the machine has). int8 weights are widened to fp32 in registers and the
 * row's scale is applied to its sum: the activations stay fp32. One thread computes each output, so
 * the results do not depend on the number of threads.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Weight rows read as one block. Not the number of rows of x (sequences), which is any: up to how
 * many the kernel is used is measured in Python (KERNEL_MAX_ROWS in gptkit/generate/cpu/linear.py). */
#define BLOCK_ROWS 8
#define LANES 16
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

static inline float total(vec v) { /* pairwise: log2(LANES) vector additions */
    float t[LANES];
    memcpy(t, &v, sizeof t);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) t[l] += t[l + width];
    return t[0];
}

/* LANES int8 weights widened to fp32. Compilers scalarise the portable version (a conversion loop
 * or __builtin_convertvector), 2-3x slower than streaming int8 from memory, so x86 gets intrinsics. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vec load_int8(const signed char *p) {
    return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline vec load_int8(const signed char *p) {
    __m256 half[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))),
                      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))))};
    vec v;
    memcpy(&v, half, sizeof v);
    return v;
}
#else
static inline vec load_int8(const signed char *p) {
    float f[LANES];
    for (int l = 0; l < LANES; l++) f[l] = p[l];
    return load(f);
}
#endif

/* Element i of a weight row: fp32, or int8 (`int8` is a constant where these are inlined, so each
 * call site compiles to one kind of load). */
static inline vec load_w(const void *w, int int8, long i) {
    return int8 ? load_int8((const signed char *)w + i) : load((const float *)w + i);
}

static inline float weight(const void *w, int int8, long i) {
    return int8 ? ((const signed char *)w)[i] : ((const float *)w)[i];
}

/* y[r] = w[r] . x for the BLOCK_ROWS rows starting at w (int8 rows without their scales), one row after
 * the other: the block is one sequential read, which the hardware prefetchers follow best (reading
 * the rows side by side instead halves the speed of int8 rows of 768 bytes). Four partial sums per
 * row keep the multiply-adds independent. */
static inline void dot_rows(const void *w, int int8, long n, const float *x, float *y) {
    for (int r = 0; r < BLOCK_ROWS; r++) {
        long row = r * n, i = 0;
        vec acc[4] = {0};
        for (; i + 4 * LANES <= n; i += 4 * LANES)
            for (int a = 0; a < 4; a++) {
                long at = i + a * LANES;
                acc[a] += load_w(w, int8, row + at) * load(x + at);
            }
        for (; i + LANES <= n; i += LANES) acc[0] += load_w(w, int8, row + i) * load(x + i);
        float s = total(acc[0] + acc[1] + acc[2] + acc[3]);
        for (; i < n; i++) s += weight(w, int8, row + i) * x[i];
        y[r] = s;
    }
}

static float dot(const float *w, const float *x, long n) {
    float s = 0;
    for (long i = 0; i < n; i++) s += w[i] * x[i];
    return s;
}

/* part[r] = w[o + r] . x for the `rows` rows from row o */
static inline void block(const void *w, int int8, long o, long rows, long n, const float *x, float *part) {
    long size = int8 ? 1 : sizeof(float);
    if (rows == BLOCK_ROWS) {
        dot_rows((const char *)w + o * n * size, int8, n, x, part);
        return;
    }
    for (long r = 0; r < rows; r++) {
        float s = 0;
        for (long i = 0; i < n; i++) s += weight(w, int8, (o + r) * n + i) * x[i];
        part[r] = s;
    }
}

static inline float gelu(float x) { /* the tanh approximation GPT-2 was trained with */
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

enum { SET = 0, ADD = 1, GELU = 2 }; /* y = xW^T + b; y += xW^T + b; y = gelu(xW^T + b) */

/* y (m x out) from x (m x n), w (out x n: fp32, or int8 when `scale` holds its out row scales) and
 * b (out values or NULL); called inside a parallel region */
static void products(const float *x, const void *w, const float *scale, const float *b, float *y, long m,
                     long n, long out, int mode) {
    long blocks = (out + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp for schedule(static)
    for (long k = 0; k < blocks; k++) {
        long o = k * BLOCK_ROWS, rows = out - o < BLOCK_ROWS ? out - o : BLOCK_ROWS;
        float part[BLOCK_ROWS];
        for (long row = 0; row < m; row++) {
            float *yr = y + row * out + o;
            const float *xr = x + row * n;
            if (scale)
                block(w, 1, o, rows, n, xr, part);
            else
                block(w, 0, o, rows, n, xr, part);
            for (long r = 0; r < rows; r++) {
                float v = part[r] * (scale ? scale[o + r] : 1.0f) + (b ? b[o + r] : 0.0f);
                yr[r] = mode == ADD ? yr[r] + v : mode == GELU ? gelu(v) : v;
            }
        }
    }
}

/* x (m x n) @ w^T (* scale) + b -> y (m x out), all contiguous: a Linear layer for a few rows */
void gptkit_matvec(const float *x, const void *w, const float *scale, const float *b, float *y, long m,
                   long n, long out, int threads) {
#pragma omp parallel num_threads(threads)
    products(x, w, scale, b, y, m, n, out, SET);
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, long m, long n, float eps) {
#pragma omp for schedule(static)
    for (long row = 0; row < m; row++) {
        const float *xr = x + row * n;
        float mean = 0, var = 0;
        for (long i = 0; i < n; i++) mean += xr[i];
        mean /= n;
        for (long i = 0; i < n; i++) var += (xr[i] - mean) * (xr[i] - mean);
        float inv = 1.0f / sqrtf(var / n + eps);
        for (long i = 0; i < n; i++) y[row * n + i] = (xr[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
    }
}

/* One query per sequence and head: store its key and value at `pos` in the cache (B x H x L x D),
 * then attend over keys pad[b] .. pos (the padding in front of sequence b is never seen). */
static void attend(const float *qkv, float *kc, float *vc, float *y, float *scores, long B, long C,
                   long H, long L, long pos, const long long *pad) {
    long D = C / H;
    float scale = 1.0f / sqrtf((float)D);
#pragma omp for schedule(static)
    for (long bh = 0; bh < B * H; bh++) {
        long b = bh / H, h = bh % H, first = pad ? pad[b] : 0;
        const float *q = qkv + b * 3 * C + h * D;
        float *k = kc + bh * L * D, *v = vc + bh * L * D, *s = scores + bh * L, *out = y + b * C + h * D;
        memcpy(k + pos * D, qkv + b * 3 * C + C + h * D, D * sizeof(float));
        memcpy(v + pos * D, qkv + b * 3 * C + 2 * C + h * D, D * sizeof(float));
        float top = -INFINITY, sum = 0;
        for (long j = first; j <= pos; j++) {
            s[j] = dot(k + j * D, q, D) * scale;
            top = s[j] > top ? s[j] : top;
        }
        for (long j = first; j <= pos; j++) {
            s[j] = expf(s[j] - top);
            sum += s[j];
        }
        for (long d = 0; d < D; d++) out[d] = 0;
        for (long j = first; j <= pos; j++) {
            float p = s[j] / sum;
            for (long d = 0; d < D; d++) out[d] += p * v[j * D + d];
        }
    }
}

/* Per layer, the 18 pointers LAYER_POINTERS in gptkit/generate/cpu/decode.py lays out (a test holds
 * this list equal to it): LayerNorms as (weight, bias), matrices as (weight, row scales or NULL for
 * fp32, bias), then the cached keys and values. */
enum { LN1_W, LN1_B, ATTN_W, ATTN_S, ATTN_B, ATTN_PROJ_W, ATTN_PROJ_S, ATTN_PROJ_B, LN2_W, LN2_B, FC_W,
       FC_S, FC_B, MLP_PROJ_W, MLP_PROJ_S, MLP_PROJ_B, K_CACHE, V_CACHE, LAYER_FIELDS };

/* One decoding step for B sequences: x (B x C) holds the new tokens' embeddings (token + position)
 * and is overwritten; their keys and values go to position `pos` of every layer's cache (L
 * positions); logits (B x vocab) come out. F: the MLP's width; pad: B left-padding lengths, or
 * NULL; eps: the LayerNorms' epsilon. Returns 0, or -1 if scratch memory could not be had. */
int gptkit_decode(float *x, void *const *layers, int n_layer, long B, long C, long F, long H, long L,
                  long pos, const long long *pad, const float *lnf_w, const float *lnf_b, const void *head,
                  const float *head_scale, long vocab, float *logits, float eps, int threads) {
    float *h = malloc(sizeof(float) * B * C), *qkv = malloc(sizeof(float) * B * 3 * C),
          *wide = malloc(sizeof(float) * B * F), *scores = malloc(sizeof(float) * B * H * L);
    int ok = h && qkv && wide && scores;
    if (ok) {
#pragma omp parallel num_threads(threads)
        for (int i = 0; i < n_layer; i++) {
            void *const *p = layers + i * LAYER_FIELDS;
            layer_norm(x, p[LN1_W], p[LN1_B], h, B, C, eps);
            products(h, p[ATTN_W], p[ATTN_S], p[ATTN_B], qkv, B, C, 3 * C, SET);
            attend(qkv, p[K_CACHE], p[V_CACHE], h, scores, B, C, H, L, pos, pad);
            products(h, p[ATTN_PROJ_W], p[ATTN_PROJ_S], p[ATTN_PROJ_B], x, B, C, C, ADD);
            layer_norm(x, p[LN2_W], p[LN2_B], h, B, C, eps);
            products(h, p[FC_W], p[FC_S], p[FC_B], wide, B, C, F, GELU);
            products(wide, p[MLP_PROJ_W], p[MLP_PROJ_S], p[MLP_PROJ_B], x, B, F, C, ADD);
            if (i == n_layer - 1) {
                layer_norm(x, lnf_w, lnf_b, h, B, C, eps);
                products(h, head, head_scale, NULL, logits, B, C, vocab, SET);
            }
        }
    }
    free(h), free(qkv), free(wide), free(scores);
    return ok ? 0 : -1;
}
