/* gptkit's CPU kernels for decoding: matrix-vector products at memory speed, and a whole GPT-2
 * decoding step (one new token per sequence) in one call; weights in fp32, int8 with one scale
 * per output row (gptkit/generate/cpu/quantize.py's Int8Linear), or int4 in groups with a bf16
 * scale and zero each (Int4Linear; the layout: gptkit/generate/cpu/int4.py).
 *
 * gptkit/generate/cpu/build.py compiles this file on first use (cc -O3 -march=native -fopenmp) and
 * calls it through ctypes. Decoding reads every weight once per token, so its speed is the speed at
 * which the weights stream from memory; in PyTorch the ~30 small operations per layer between the
 * products also cost about a fifth of a step, because each runs with caches that the weights have
 * just flushed. `gptkit_decode` does the same arithmetic as gptkit.model.GPT.forward (its reference,
 * tested to agree) with one parallel region per step.
 *
 * Products: W (out x n, row-major) is read once, in blocks of BLOCK_ROWS rows shared out between the
 * threads, one row after the other (one sequential read, which the hardware prefetchers follow
 * best); each weight vector, once in a register, is multiplied with up to TILE rows of x, and a row
 * stays in the core's cache for the next TILE rows of x. Each output adds up partial sums kept in
 * vectors of LANES (GCC/Clang vector extensions become AVX-512, AVX2 or NEON code, whatever the
 * machine has). int8 weights are widened to fp32 in registers and the row's scale is applied to
 * its sum, the activations stay fp32. int4 weights: on AVX512-VNNI machines the activations are
 * quantised to int8 (per 64 inputs) and meet the 4-bit codes in integer dot products (vpdpbusd);
 * elsewhere the weights are looked up in a table of their group's 16 values (a vector permute on
 * AVX-512) and the activations stay fp32. One thread computes each output, in an order that depends
 * on neither the number of threads nor the number of rows of x.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Weight rows read as one block. Not the number of rows of x (sequences), which is any: up to how
 * many the kernel is used is measured in Python (KERNEL_MAX_ROWS in gptkit/generate/cpu/linear.py). */
#define BLOCK_ROWS 8
#define LANES 16 /* total() adds up 16 */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));

/* The sum of v's lanes, pairwise: lane l plus lane l + 8, then l + 4, l + 2, l + 1 (whole halves at
 * a time, so that compilers do not go through memory) */
static inline float total(vec v) {
    vec8 a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (char *)&v + sizeof a, sizeof b);
    a += b;
    vec4 c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (char *)&a + sizeof c, sizeof d);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
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

static float dot(const float *w, const float *x, long n) {
    float s = 0;
    for (long i = 0; i < n; i++) s += w[i] * x[i];
    return s;
}

/* Rows of x multiplied by each weight vector while it is in registers, and int4 blocks read per
 * loop turn (independent sums for one row of x). AVX-512 has the 32 registers for more of both. */
#if defined(__AVX512F__)
#define TILE 4
#define UNROLL 2
#else
#define TILE 2
#define UNROLL 1
#endif

/* Partial sums per row of x and weight row, each over every PARTS(int8)-th vector of the row: enough
 * independent multiply-adds to hide their latency. fp32 keeps 2, so that pair_tile's 2 x TILE x 2
 * sums and its vectors fit AVX-512's 32 registers (with 4 the compiler moved sums to the stack and 8
 * rows of x took 1.6-1.9x as long, GPT-2 124M, 2 threads); int8, at four weights per fp32's byte of
 * memory, needs 4 to keep up with memory from one row of x. */
#define PARTS(int8) ((int8) ? 4 : 2)

/* The sum of a row's `parts` partial sums, in the one order every tile uses */
static inline float total_of(const vec *acc, int parts) {
    vec sum = acc[0];
    for (int a = 1; a < parts; a++) sum += acc[a];
    return total(sum);
}

/* y[r] = w . x[r] for the T (a constant where inlined) rows of x (n apart) and one weight row w (int8
 * without its scale); each row of x is summed in the same order whatever T is. */
static inline __attribute__((always_inline)) void dense_tile(const void *w, int int8, long n, const float *x,
                                                             int T, float *y) {
    const int parts = PARTS(int8);
    vec acc[TILE][4];
    for (int r = 0; r < TILE; r++)
        for (int a = 0; a < 4; a++) acc[r][a] = (vec){0};
    long i = 0;
    for (; i + parts * LANES <= n; i += parts * LANES)
        for (int a = 0; a < parts; a++) {
            vec v = load_w(w, int8, i + a * LANES);
            for (int r = 0; r < T; r++) acc[r][a] += v * load(x + r * n + i + a * LANES);
        }
    for (; i + LANES <= n; i += LANES) {
        vec v = load_w(w, int8, i);
        for (int r = 0; r < T; r++) acc[r][0] += v * load(x + r * n + i);
    }
    for (int r = 0; r < T; r++) {
        float s = total_of(acc[r], parts);
        for (long j = i; j < n; j++) s += weight(w, int8, j) * x[r * n + j];
        y[r] = s;
    }
}

/* Keep v in a register: without it, compilers load a vector of x again from memory (the cache) for
 * each weight row it multiplies, which leaves the multiply-adds of a tile waiting on loads. */
#if defined(__AVX512F__) && defined(__GNUC__) /* a vec is one register only with AVX-512 */
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* dense_tile for two weight rows, w and w + stride bytes (y[r] and y[TILE + r]): each vector of x,
 * once loaded, serves both rows (8 rows of x: 0.75 loads per multiply-add instead of 1.25), once x
 * has PAIR_FROM rows or more; a single row of x is bound by memory alone, and one weight row at a
 * time (a single sequential read) streams it fastest. The sums are added in dense_tile's order, so
 * a row of x gets the same numbers alone or in a batch.
 *
 * Here the core computes about as long as it waits for memory, and the hardware prefetchers alone
 * did not overlap the two: the next two rows are asked for as these are read, and the rows
 * PREFETCH_FAR ahead into L2 (GPT-2 124M's products for 8 rows of x, 2 threads: 20-22 ms against
 * 34-42 ms without either and 26 ms with the first alone; from 2 rows of x on this way is the
 * faster: a step of 4 sequences 21 ms against 34 one weight row at a time, int8 13.5 against 22).
 * Prefetching never faults, so the rows past a matrix's end are asked for too. */
#define PAIR_FROM 2
#define PREFETCH_FAR 8
static inline __attribute__((always_inline)) void pair_tile(const char *w, long stride, int int8, long n,
                                                            const float *x, int T, float *y) {
    const int parts = PARTS(int8);
    const long size = int8 ? 1 : sizeof(float), line = 64;
    vec acc[2][TILE][4];
    for (int k = 0; k < 2; k++)
        for (int r = 0; r < TILE; r++)
            for (int a = 0; a < 4; a++) acc[k][r][a] = (vec){0};
    long i = 0;
    for (; i + parts * LANES <= n; i += parts * LANES) {
        for (long b = 0; b < parts * LANES * size; b += line) {
            __builtin_prefetch(w + 2 * stride + i * size + b);
            __builtin_prefetch(w + 3 * stride + i * size + b);
            __builtin_prefetch(w + PREFETCH_FAR * stride + i * size + b, 0, 2);
            __builtin_prefetch(w + (PREFETCH_FAR + 1) * stride + i * size + b, 0, 2);
        }
        for (int a = 0; a < parts; a++) {
            vec v0 = load_w(w, int8, i + a * LANES), v1 = load_w(w + stride, int8, i + a * LANES);
            IN_REGISTER(v0);
            IN_REGISTER(v1);
            for (int r = 0; r < T; r++) {
                vec xr = load(x + r * n + i + a * LANES);
                IN_REGISTER(xr);
                acc[0][r][a] += v0 * xr;
                acc[1][r][a] += v1 * xr;
            }
        }
    }
    for (; i + LANES <= n; i += LANES) {
        vec v0 = load_w(w, int8, i), v1 = load_w(w + stride, int8, i);
        for (int r = 0; r < T; r++) {
            vec xr = load(x + r * n + i);
            acc[0][r][0] += v0 * xr;
            acc[1][r][0] += v1 * xr;
        }
    }
    for (int k = 0; k < 2; k++)
        for (int r = 0; r < T; r++) {
            float s = total_of(acc[k][r], parts);
            for (long j = i; j < n; j++) s += weight(w + k * stride, int8, j) * x[r * n + j];
            y[k * TILE + r] = s;
        }
}

/* call(T) for T rows of x (1 <= T <= TILE), as a constant: each T is compiled on its own */
#if TILE == 4
#define BY_TILE(T, call) \
    switch (T) { \
    case 1: call(1); break; \
    case 2: call(2); break; \
    case 3: call(3); break; \
    default: call(4); break; \
    }
#else
#define BY_TILE(T, call) \
    switch (T) { \
    case 1: call(1); break; \
    default: call(2); break; \
    }
#endif

static inline __attribute__((always_inline)) void dense_dots(const void *w, int int8, long n, const float *x,
                                                             long T, float *y) {
#define FP32(t) dense_tile(w, 0, n, x, t, y)
#define INT8(t) dense_tile(w, 1, n, x, t, y)
    if (int8) {
        BY_TILE(T, INT8)
    } else {
        BY_TILE(T, FP32)
    }
#undef FP32
#undef INT8
}

static inline __attribute__((always_inline)) void pair_dots(const char *w, long stride, int int8, long n,
                                                            const float *x, long T, float *y) {
#define FP32(t) pair_tile(w, stride, 0, n, x, t, y)
#define INT8(t) pair_tile(w, stride, 1, n, x, t, y)
    if (int8) {
        BY_TILE(T, INT8)
    } else {
        BY_TILE(T, FP32)
    }
#undef FP32
#undef INT8
}

/* int4: INT4_BLOCK weights in 16 bytes, byte j holding weight j (low 4 bits) and j + 16 (high 4
 * bits); a row padded to whole blocks. gptkit/generate/cpu/int4.py packs them (a test reads this). */
#define INT4_BLOCK 32
/* Bytes ahead that the int4 products ask the memory for: the hardware prefetchers alone left a core
 * waiting for int4 rows (GPT-2 124M's matrices one after the other, 1 thread: 23% less time with 256
 * or 1024). */
#define INT4_AHEAD 256
_Static_assert(INT4_BLOCK == 2 * LANES, "one int4 block is two vectors");


/* A group's table: its 16 values q * scale + zero, from its bf16 (scale, zero) pair. q * scale is
 * exact (4 bits times 8), so the sum is the one rounding, as in int4.py's dequantize. The pair is
 * read as one 32-bit word in every lane and each half moved to the top (a bf16 is an fp32's top
 * half): x86 broadcasts 32 bits from memory as a plain load, where spreading a 16-bit value or a
 * register takes the shuffle unit, which the lookups keep busy. Made in registers for each group as
 * the row is read (a table per row in memory cost 5-20% more time). load_int4(p, table, lo, hi)
 * gives the 32 weights of the block at p: lo = weights 0..15, hi = 16..31. */
static inline float from_bf16(unsigned short h) {
    unsigned int u = (unsigned int)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX512F__)
typedef __m512 table_t;
static inline table_t int4_table(const unsigned short *pair) {
    float word; /* as a float, so that the compiler broadcasts it from memory */
    memcpy(&word, pair, sizeof word);
    __m512i both = _mm512_castps_si512(_mm512_set1_ps(word));
    const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(both, 16));
    __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(both, _mm512_set1_epi32((int)0xffff0000u)));
    return _mm512_add_ps(_mm512_mul_ps(codes, scale), zero);
}
static inline void load_int4(const unsigned char *p, table_t table, vec *lo, vec *hi) {
    __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); /* the permute reads bits 0-3 */
    *lo = (vec)_mm512_permutexvar_ps(e, table);
    *hi = (vec)_mm512_permutexvar_ps(_mm512_srli_epi32(e, 4), table);
}
#elif defined(__AVX2__)
typedef struct {
    __m256 low, high; /* codes 0-7 and 8-15 */
} table_t;
static inline table_t int4_table(const unsigned short *pair) {
    float word;
    memcpy(&word, pair, sizeof word);
    __m256i both = _mm256_castps_si256(_mm256_set1_ps(word));
    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(both, 16));
    __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(both, _mm256_set1_epi32((int)0xffff0000u)));
    table_t t = {_mm256_add_ps(_mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), scale), zero),
                 _mm256_add_ps(_mm256_mul_ps(_mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), scale), zero)};
    return t;
}
static inline __m256 lookup8(__m256i e, table_t t) {
    __m256 a = _mm256_permutevar8x32_ps(t.low, e), b = _mm256_permutevar8x32_ps(t.high, e);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(e, 28))); /* by bit 3 */
}
static inline void load_int4(const unsigned char *p, table_t t, vec *lo, vec *hi) {
    __m256 v[4];
    for (int h = 0; h < 2; h++) {
        __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h)));
        v[h] = lookup8(e, t);
        v[2 + h] = lookup8(_mm256_srli_epi32(e, 4), t);
    }
    memcpy(lo, v, sizeof *lo);
    memcpy(hi, v + 2, sizeof *hi);
}
#else
typedef struct {
    float v[16];
} table_t;
static inline table_t int4_table(const unsigned short *pair) {
    table_t t;
    float scale = from_bf16(pair[0]), zero = from_bf16(pair[1]);
    for (int q = 0; q < 16; q++) t.v[q] = q * scale + zero;
    return t;
}
static inline void load_int4(const unsigned char *p, table_t t, vec *lo, vec *hi) {
    float a[LANES], b[LANES];
    for (int l = 0; l < LANES; l++) {
        a[l] = t.v[p[l] & 15];
        b[l] = t.v[p[l] >> 4];
    }
    *lo = load(a);
    *hi = load(b);
}
#endif

/* y[r] = w . x[r] for the T (a constant where inlined) rows of x (n apart) and one int4 weight row w
 * whose groups' (scale, zero) pairs are sz; groups of INT4_BLOCK << shift weights. */
static inline __attribute__((always_inline)) void int4_tile(const unsigned char *w, const unsigned short *sz,
                                                            int shift, long n, const float *x, int T,
                                                            float *y) {
    vec acc[TILE][2 * UNROLL];
    for (int r = 0; r < TILE; r++)
        for (int a = 0; a < 2 * UNROLL; a++) acc[r][a] = (vec){0};
    long full = n / INT4_BLOCK, k = 0;
    for (; k + UNROLL <= full; k += UNROLL) {
        table_t first = int4_table(sz + 2 * (k >> shift));
        for (int u = 0; u < UNROLL; u++) {
            vec lo, hi;
            long at = (k + u) * INT4_BLOCK;
            if (u == 0) __builtin_prefetch(w + at / 2 + INT4_AHEAD);
            int same = ((k + u) >> shift) == (k >> shift);
            load_int4(w + at / 2, same ? first : int4_table(sz + 2 * ((k + u) >> shift)), &lo, &hi);
            for (int r = 0; r < T; r++) {
                acc[r][2 * u] += lo * load(x + r * n + at);
                acc[r][2 * u + 1] += hi * load(x + r * n + at + LANES);
            }
        }
    }
    for (; k < full; k++) {
        vec lo, hi;
        long at = k * INT4_BLOCK;
        load_int4(w + at / 2, int4_table(sz + 2 * (k >> shift)), &lo, &hi);
        for (int r = 0; r < T; r++) {
            acc[r][0] += lo * load(x + r * n + at);
            acc[r][1] += hi * load(x + r * n + at + LANES);
        }
    }
    const unsigned short *last = sz + 2 * (full >> shift); /* the group of the last, partial block */
    float scale = from_bf16(last[0]), zero = from_bf16(last[1]);
    for (int r = 0; r < T; r++) {
        vec sum = acc[r][0];
        for (int a = 1; a < 2 * UNROLL; a++) sum += acc[r][a];
        float s = total(sum);
        for (long i = full * INT4_BLOCK; i < n; i++) {
            long j = i - full * INT4_BLOCK;
            unsigned char byte = w[full * INT4_BLOCK / 2 + j % 16];
            s += ((j < 16 ? byte & 15 : byte >> 4) * scale + zero) * x[r * n + i];
        }
        y[r] = s;
    }
}

static inline __attribute__((always_inline)) void int4_dots(const unsigned char *w, const unsigned short *sz,
                                                            int shift, long n, const float *x, long T,
                                                            float *y) {
#define INT4(t) int4_tile(w, sz, shift, n, x, t, y)
    BY_TILE(T, INT4)
#undef INT4
}

/* int4 with int8 activations (AVX512-VNNI), as llama.cpp multiplies its 4-bit weights: unpacking
 * codes to fp32 (above) bound the products by the shuffle unit, not by memory. Each row of x is
 * quantised once per product (by every thread: a few microseconds, no barrier) to int8 in chunks of
 * XCHUNK inputs with one fp32 scale each, its largest size / 127 (x * 127 / largest, rounded to
 * nearest even: int4.py's quantize_activations does the same), and a chunk's 64 codes (one 32-byte
 * load) meet its 64 int8 values in one vpdpbusd (u8 x s8 -> s32). Each group's zero point is
 * multiplied by the group's sum of the quantised values, so a product is exactly the dequantised
 * weights times the dequantised activations, up to fp32 rounding; that sum is more accurate than
 * the fp32 activations' sum (the error is then sum(w * dx), not sum((w - zero) * dx), and w is
 * centred on zero where w - zero is not). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define INT4_VNNI 1
#define XCHUNK 64
_Static_assert(XCHUNK == 2 * INT4_BLOCK, "a chunk is two int4 blocks");

/* Row x (n values) as chunks of int8 (q: 64 a chunk, stored in the order the codes unpack: inputs
 * 0-15, 32-47, 16-31, 48-63), their scales (sx) and each group's sum of the int8 values times their
 * scale (gsum: groups of 32 << shift inputs). */
static void quantise_row(const float *x, long n, int shift, signed char *q, float *sx, float *gsum,
                         long chunks, long groups) {
    for (long g = 0; g < groups; g++) gsum[g] = 0;
    for (long c = 0; c < chunks; c++) {
        float part[XCHUNK] = {0};
        long len = n - c * XCHUNK < XCHUNK ? n - c * XCHUNK : XCHUNK;
        memcpy(part, x + c * XCHUNK, len * sizeof(float));
        __m512 v[4], big = _mm512_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm512_loadu_ps(part + 16 * k);
            big = _mm512_max_ps(big, _mm512_abs_ps(v[k]));
        }
        float amax = _mm512_reduce_max_ps(big), inv = amax > 0 ? 127.0f / amax : 0.0f;
        sx[c] = amax / 127.0f;
        __m512i i[4];
        for (int k = 0; k < 4; k++) i[k] = _mm512_cvtps_epi32(_mm512_mul_ps(v[k], _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(q + c * XCHUNK), _mm512_cvtepi32_epi8(i[0]));
        _mm_storeu_si128((__m128i *)(q + c * XCHUNK + 16), _mm512_cvtepi32_epi8(i[2]));
        _mm_storeu_si128((__m128i *)(q + c * XCHUNK + 32), _mm512_cvtepi32_epi8(i[1]));
        _mm_storeu_si128((__m128i *)(q + c * XCHUNK + 48), _mm512_cvtepi32_epi8(i[3]));
        int s0 = _mm512_reduce_add_epi32(_mm512_add_epi32(i[0], i[1]));
        int s1 = _mm512_reduce_add_epi32(_mm512_add_epi32(i[2], i[3]));
        if (shift == 0) {
            gsum[2 * c] += sx[c] * (float)s0;
            if (2 * c + 1 < groups) gsum[2 * c + 1] += sx[c] * (float)s1;
        } else
            gsum[(c << 1) >> shift] += sx[c] * (float)(s0 + s1);
    }
}

/* The scales of a chunk's 16 sums: its group's, or with groups of 32 inputs, the first group's in
 * lanes 0-3 and 8-11 and the second's in lanes 4-7 and 12-15 (the codes' order, see below). */
static inline __m512 vnni_scales(const unsigned short *sz, int shift, long c, long groups) {
    float word;
    __m512 pair;
    if (shift == 0) {
        long g1 = 2 * c + 1 < groups ? 2 * c + 1 : groups - 1;
        memcpy(&word, sz + 4 * c, sizeof word);
        pair = _mm512_set1_ps(word);
        memcpy(&word, sz + 2 * g1, sizeof word);
        pair = _mm512_mask_mov_ps(pair, 0xf0f0, _mm512_set1_ps(word));
    } else {
        memcpy(&word, sz + 2 * ((c << 1) >> shift), sizeof word);
        pair = _mm512_set1_ps(word);
    }
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(pair), 16));
}

/* A chunk's 64 codes from its 32 bytes: low nibbles in bytes 0-31, high nibbles times 16 in bytes
 * 32-63 (one and: shifting them down would take another instruction per chunk; int4_vnni_tile
 * divides their sums by 16 at the end, exactly) */
static inline __m512i chunk_codes(__m256i raw) {
    const __m512i nibbles = _mm512_inserti64x4(_mm512_set1_epi8(0x0f), _mm256_set1_epi8((char)0xf0), 1);
    return _mm512_and_si512(_mm512_broadcast_i64x4(raw), nibbles);
}

/* acc[r] += chunk c's products with row r of x, times their scales */
static inline __attribute__((always_inline)) void vnni_chunk(__m512i codes, __m512 scale,
                                                             const signed char *xq, const float *sx,
                                                             long chunks, long c, int T, __m512 *acc) {
    for (int r = 0; r < T; r++) {
        __m512i x8 = _mm512_loadu_si512(xq + (r * chunks + c) * XCHUNK);
        __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, x8));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(sx[r * chunks + c])), acc[r]);
    }
}

/* y[r] = w . x[r] for T rows of quantised x. Codes: a chunk's 32 bytes broadcast to both halves of a
 * zmm, low nibbles kept in the lower half, high nibbles (times 16) in the upper, so lanes 8-15 of each
 * sum are 16 times too large until the end. */
static inline __attribute__((always_inline)) void int4_vnni_tile(const unsigned char *w,
                                                                 const unsigned short *sz, int shift,
                                                                 long stride, const signed char *xq,
                                                                 const float *sx, const float *gsum,
                                                                 long chunks, long groups, int T, float *y) {
    __m512 acc0[TILE], acc1[TILE];
    for (int r = 0; r < TILE; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    long full = stride / 32, c = 0;
    for (; c + 2 <= full; c += 2) {
        __builtin_prefetch(w + 32 * c + INT4_AHEAD);
        __m512i a = chunk_codes(_mm256_loadu_si256((const __m256i *)(w + 32 * c)));
        __m512i b = chunk_codes(_mm256_loadu_si256((const __m256i *)(w + 32 * c + 32)));
        vnni_chunk(a, vnni_scales(sz, shift, c, groups), xq, sx, chunks, c, T, acc0);
        vnni_chunk(b, vnni_scales(sz, shift, c + 1, groups), xq, sx, chunks, c + 1, T, acc1);
    }
    for (; c < chunks; c++) {
        __m256i raw = c < full ? _mm256_loadu_si256((const __m256i *)(w + 32 * c))
                               : _mm256_maskz_loadu_epi8(0xffff, w + 32 * c); /* a last, lone block */
        vnni_chunk(chunk_codes(raw), vnni_scales(sz, shift, c, groups), xq, sx, chunks, c, T, acc0);
    }
    const __m512 unscale = _mm512_castsi512_ps(_mm512_inserti64x4(
        _mm512_castps_si512(_mm512_set1_ps(1.0f)), _mm256_castps_si256(_mm256_set1_ps(1.0f / 16)), 1));
    __m512 zacc[TILE];
    for (int r = 0; r < T; r++) zacc[r] = _mm512_mul_ps(_mm512_add_ps(acc0[r], acc1[r]), unscale);
    for (long g = 0; g < groups; g += 16) {
        __mmask16 k = groups - g >= 16 ? 0xffff : (__mmask16)((1u << (groups - g)) - 1);
        __m512 zero = _mm512_castsi512_ps(
            _mm512_and_si512(_mm512_maskz_loadu_epi32(k, sz + 2 * g), _mm512_set1_epi32((int)0xffff0000u)));
        for (int r = 0; r < T; r++)
            zacc[r] = _mm512_fmadd_ps(zero, _mm512_maskz_loadu_ps(k, gsum + r * groups + g), zacc[r]);
    }
    for (int r = 0; r < T; r++) y[r] = total((vec)zacc[r]);
}

static inline __attribute__((always_inline)) void int4_vnni_dots(const unsigned char *w,
                                                                 const unsigned short *sz, int shift,
                                                                 long stride, const signed char *xq,
                                                                 const float *sx, const float *gsum,
                                                                 long chunks, long groups, long T, float *y) {
#define INT4(t) int4_vnni_tile(w, sz, shift, stride, xq, sx, gsum, chunks, groups, t, y)
    BY_TILE(T, INT4)
#undef INT4
}
#endif

/* GELU's tanh, LANES at a time: libm's tanhf, one value per call, took a tenth of an int4 step (GPT-2
 * 124M: 36,864 values). Cephes' tanhf in vectors: below 0.625 in size its odd polynomial, above it
 * 1 - 2 / (exp(2|u|) + 1), with exp from Cephes' expf (2^n times a polynomial in the rest); both
 * within 2 units in the last place of tanhf. Beyond 9 in size, tanh is 1 in fp32. */
typedef int ivec __attribute__((vector_size(LANES * sizeof(int))));

static inline vec splat(float f) { return (vec){0} + f; }

static inline vec pick(ivec mask, vec a, vec b) { /* a where mask is set, else b */
    return (vec)(((ivec)a & mask) | ((ivec)b & ~mask));
}

static inline vec exp_vec(vec x) { /* e^x for -80 <= x <= 88 (2^n times the rest stays a normal float) */
    vec n = (x * splat(1.44269504088896341f) + splat(0x1.8p23f)) - splat(0x1.8p23f); /* round(x / ln 2) */
    x = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
    vec p = splat(1.9875691500e-4f);
    p = p * x + splat(1.3981999507e-3f);
    p = p * x + splat(8.3334519073e-3f);
    p = p * x + splat(4.1665795894e-2f);
    p = p * x + splat(1.6666665459e-1f);
    p = p * x + splat(5.0000001201e-1f);
    p = p * x * x + x + splat(1.0f);
    return (vec)((ivec)p + (__builtin_convertvector(n, ivec) << 23)); /* times 2^n */
}

static inline vec tanh_vec(vec u) {
    ivec sign = (ivec)u & ((ivec){0} + (int)0x80000000u);
    vec a = (vec)((ivec)u ^ sign), z = u * u; /* |u| */
    vec small = splat(-5.70498872745e-3f);
    small = small * z + splat(2.06390887954e-2f);
    small = small * z - splat(5.37397155531e-2f);
    small = small * z + splat(1.33314422036e-1f);
    small = small * z - splat(3.33332819422e-1f);
    small = small * z * u + u;
    a = pick(a > splat(9.0f), splat(9.0f), a);
    vec large = (vec)((ivec)(splat(1.0f) - splat(2.0f) / (exp_vec(a + a) + splat(1.0f))) | sign);
    return pick(a < splat(0.625f), small, large);
}

/* y = gelu(y) for `count` values, the tanh approximation GPT-2 was trained with; shared out between
 * the threads inside a parallel region */
static void gelu(float *y, long count) {
    long chunks = (count + LANES - 1) / LANES;
#pragma omp for schedule(static)
    for (long c = 0; c < chunks; c++) {
        float part[LANES] = {0};
        long len = count - c * LANES < LANES ? count - c * LANES : LANES;
        memcpy(part, y + c * LANES, len * sizeof(float));
        vec x = load(part);
        vec t = tanh_vec(splat(0.7978845608028654f) * (x + splat(0.044715f) * x * x * x));
        x = splat(0.5f) * x * (splat(1.0f) + t);
        memcpy(y + c * LANES, &x, len * sizeof(float));
    }
}

enum { SET = 0, ADD = 1 }; /* y = xW^T + b; y += xW^T + b */

static inline void put(float *y, float v, int mode) { *y = mode == ADD ? *y + v : v; }

/* products() for fp32 or int8 weights and PAIR_FROM rows of x or more: two weight rows at a time (a
 * function of its own, so that the compiler's choices for the other cases stay as they were) */
static __attribute__((noinline)) void pair_products(const float *x, const void *w, const float *row_scale, const float *b, float *y,
                                                  long m, long n, long out, int mode) {
    long blocks = (out + BLOCK_ROWS - 1) / BLOCK_ROWS, stride = row_scale ? n : n * 4;
#pragma omp for schedule(static)
    for (long k = 0; k < blocks; k++) {
        long end = (k + 1) * BLOCK_ROWS < out ? (k + 1) * BLOCK_ROWS : out;
        for (long o = k * BLOCK_ROWS; o < end; o += 2) {
            int pair = end - o >= 2;
            const char *wo = (const char *)w + o * stride;
            for (long row = 0; row < m; row += TILE) {
                long rows = m - row < TILE ? m - row : TILE;
                float part[2 * TILE];
                if (pair)
                    pair_dots(wo, stride, row_scale != NULL, n, x + row * n, rows, part);
                else
                    dense_dots(wo, row_scale != NULL, n, x + row * n, rows, part);
                for (int q = 0; q <= pair; q++)
                    for (long r = 0; r < rows; r++) {
                        float v = part[q * TILE + r] * (row_scale ? row_scale[o + q] : 1.0f);
                        put(y + (row + r) * out + o + q, v + (b ? b[o + q] : 0.0f), mode);
                    }
            }
        }
    }
}

/* y (m x out) from x (m x n), w (out x n) and b (out values or NULL); called inside a parallel region.
 * w is fp32 (scale NULL, group 0), int8 with `scale` holding its out row scales (group 0), or int4
 * codes (out rows of ceil(n / INT4_BLOCK) blocks) in groups of `group` inputs with `scale` holding
 * their bf16 (scale, zero) pairs (out x groups). Each weight row is read once for all rows of x, in
 * blocks of BLOCK_ROWS rows shared out between the threads. */
static void products(const float *x, const void *w, const void *scale, long group, const float *b, float *y,
                     long m, long n, long out, int mode) {
    const float *row_scale = group ? NULL : scale;
    long groups = group ? (n + group - 1) / group : 0, blocks = (out + BLOCK_ROWS - 1) / BLOCK_ROWS;
    long stride = group ? (n + INT4_BLOCK - 1) / INT4_BLOCK * (INT4_BLOCK / 2) : row_scale ? n : n * 4;
    int shift = 0;
    while ((INT4_BLOCK << shift) < group) shift++;
    if (!group && m >= PAIR_FROM) {
        pair_products(x, w, row_scale, b, y, m, n, out, mode);
        return;
    }
#if INT4_VNNI
    /* this thread's copy of x quantised (without memory for it, the fp32 lookups below) */
    long chunks = (n + XCHUNK - 1) / XCHUNK;
    size_t bytes = m * chunks * (XCHUNK + sizeof(float)) + m * groups * sizeof(float);
    signed char *xq = group ? malloc(bytes) : NULL;
    float *sx = xq ? (float *)(xq + m * chunks * XCHUNK) : NULL, *gsum = sx ? sx + m * chunks : NULL;
    for (long r = 0; xq && r < m; r++)
        quantise_row(x + r * n, n, shift, xq + r * chunks * XCHUNK, sx + r * chunks, gsum + r * groups, chunks,
                     groups);
#endif
    /* Blocks handed out as threads come free: in a server, HTTP threads take a core for moments,
     * and with fixed halves the other thread waited at the end of every product for the one that
     * lost its core (one sequence, `gptkit serve`: 19-21 ms a step against 23-24). The pair
     * products keep fixed halves: their prefetches run ahead into the thread's own rows (8
     * sequences alone: 30.9 ms a step against 35.8 handed out). */
#pragma omp for schedule(dynamic, 4)
    for (long k = 0; k < blocks; k++)
        for (long o = k * BLOCK_ROWS; o < out && o < (k + 1) * BLOCK_ROWS; o++) {
            const char *wo = (const char *)w + o * stride;
            const unsigned short *sz = group ? (const unsigned short *)scale + 2 * o * groups : NULL;
            for (long row = 0; row < m; row += TILE) {
                long rows = m - row < TILE ? m - row : TILE;
                float part[TILE];
#if INT4_VNNI
                if (xq)
                    int4_vnni_dots((const unsigned char *)wo, sz, shift, stride, xq + row * chunks * XCHUNK,
                                   sx + row * chunks, gsum + row * groups, chunks, groups, rows, part);
                else
#endif
                if (group)
                    int4_dots((const unsigned char *)wo, sz, shift, n, x + row * n, rows, part);
                else
                    dense_dots(wo, row_scale != NULL, n, x + row * n, rows, part);
                for (long r = 0; r < rows; r++) {
                    float v = part[r] * (row_scale ? row_scale[o] : 1.0f) + (b ? b[o] : 0.0f);
                    put(y + (row + r) * out + o, v, mode);
                }
            }
        }
#if INT4_VNNI
    free(xq);
#endif
}

/* The inputs per int8 scale of the activations in int4 products, or 0 where they stay fp32 (the
 * tests pick their reference by it) */
int gptkit_int4_activation_block(void) {
#if INT4_VNNI
    return XCHUNK;
#else
    return 0;
#endif
}

/* x (m x n) @ w^T + b -> y (m x out), all contiguous: a Linear layer for a few rows; w and scale as
 * products() takes them (fp32, int8 or int4 by `scale` and `group`) */
void gptkit_matvec(const float *x, const void *w, const void *scale, const float *b, float *y, long m, long n,
                   long out, int group, int threads) {
#pragma omp parallel num_threads(threads)
    products(x, w, scale, group, b, y, m, n, out, SET);
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

/* q . k over a head's D values: in vectors where D is whole vectors (GPT-2's 64), else one by one
 * (a float sum in C's order is one chain of dependent additions, 4 cycles each) */
static inline float head_dot(const float *k, const float *q, long D) {
    if (D % LANES) return dot(k, q, D);
    vec acc = (vec){0};
    for (long i = 0; i < D; i += LANES) acc += load(k + i) * load(q + i);
    return total(acc);
}

#define HEAD_VECTORS 8 /* heads up to 8 vectors wide sum the values in registers */

/* One query per sequence and head: store its key and value at `pos` in the cache (B x H x L x D),
 * then attend over keys pad[b] .. pos (the padding in front of sequence b is never seen). */
static void attend(const float *qkv, float *kc, float *vc, float *y, float *scores, long B, long C,
                   long H, long L, long pos, const long long *pad) {
    long D = C / H, chunks = D % LANES || D > HEAD_VECTORS * LANES ? 0 : D / LANES;
    float scale = 1.0f / sqrtf((float)D);
#pragma omp for schedule(static)
    for (long bh = 0; bh < B * H; bh++) {
        long b = bh / H, h = bh % H, first = pad ? pad[b] : 0;
        const float *q = qkv + b * 3 * C + h * D;
        float *k = kc + bh * L * D, *v = vc + bh * L * D, *s = scores + bh * L, *out = y + b * C + h * D;
        memcpy(k + pos * D, qkv + b * 3 * C + C + h * D, D * sizeof(float));
        memcpy(v + pos * D, qkv + b * 3 * C + 2 * C + h * D, D * sizeof(float));
        float top = -INFINITY;
        for (long j = first; j <= pos; j++) {
            s[j] = head_dot(k + j * D, q, D) * scale;
            top = s[j] > top ? s[j] : top;
        }
        /* e^(s - top) in vectors from the first key on (so the same whatever the padding in front),
         * the rest one by one; e^-80 (1.8e-35) stands in for anything smaller, invisible beside e^0 */
        vec sums = (vec){0};
        long j = first;
        for (; j + LANES <= pos + 1; j += LANES) {
            vec e = load(s + j) - splat(top);
            e = exp_vec(pick(e < splat(-80.0f), splat(-80.0f), e));
            memcpy(s + j, &e, sizeof e);
            sums += e;
        }
        float sum = total(sums);
        for (; j <= pos; j++) {
            s[j] = expf(s[j] - top);
            sum += s[j];
        }
        float inv = 1.0f / sum;
        if (chunks) {
            vec acc[HEAD_VECTORS];
            for (long c = 0; c < chunks; c++) acc[c] = (vec){0};
            for (j = first; j <= pos; j++) {
                vec p = splat(s[j] * inv);
                for (long c = 0; c < chunks; c++) acc[c] += p * load(v + j * D + c * LANES);
            }
            memcpy(out, acc, D * sizeof(float));
        } else {
            for (long d = 0; d < D; d++) out[d] = 0;
            for (j = first; j <= pos; j++) {
                float p = s[j] * inv;
                for (long d = 0; d < D; d++) out[d] += p * v[j * D + d];
            }
        }
    }
}

/* Per layer, the 18 pointers LAYER_POINTERS in gptkit/generate/cpu/decode.py lays out (a test holds
 * this list equal to it): LayerNorms as (weight, bias), matrices as (weight, its scales or NULL for
 * fp32, bias), then the cached keys and values. */
enum { LN1_W, LN1_B, ATTN_W, ATTN_S, ATTN_B, ATTN_PROJ_W, ATTN_PROJ_S, ATTN_PROJ_B, LN2_W, LN2_B, FC_W,
       FC_S, FC_B, MLP_PROJ_W, MLP_PROJ_S, MLP_PROJ_B, K_CACHE, V_CACHE, LAYER_FIELDS };

/* One decoding step for B sequences: x (B x C) holds the new tokens' embeddings (token + position)
 * and is overwritten; their keys and values go to position `pos` of every layer's cache (L
 * positions); logits (B x vocab) come out. group: the int4 group size of every matrix, 0 for fp32
 * and int8; F: the MLP's width; pad: B left-padding lengths, or NULL; eps: the LayerNorms'
 * epsilon. Returns 0, or -1 if scratch memory could not be had. */
int gptkit_decode(float *x, void *const *layers, int n_layer, int group, long B, long C, long F, long H,
                  long L, long pos, const long long *pad, const float *lnf_w, const float *lnf_b,
                  const void *head, const void *head_scale, long vocab, float *logits, float eps,
                  int threads) {
    float *h = malloc(sizeof(float) * B * C), *qkv = malloc(sizeof(float) * B * 3 * C),
          *wide = malloc(sizeof(float) * B * F), *scores = malloc(sizeof(float) * B * H * L);
    int ok = h && qkv && wide && scores;
    if (ok) {
#pragma omp parallel num_threads(threads)
        for (int i = 0; i < n_layer; i++) {
            void *const *p = layers + i * LAYER_FIELDS;
            layer_norm(x, p[LN1_W], p[LN1_B], h, B, C, eps);
            products(h, p[ATTN_W], p[ATTN_S], group, p[ATTN_B], qkv, B, C, 3 * C, SET);
            attend(qkv, p[K_CACHE], p[V_CACHE], h, scores, B, C, H, L, pos, pad);
            products(h, p[ATTN_PROJ_W], p[ATTN_PROJ_S], group, p[ATTN_PROJ_B], x, B, C, C, ADD);
            layer_norm(x, p[LN2_W], p[LN2_B], h, B, C, eps);
            products(h, p[FC_W], p[FC_S], group, p[FC_B], wide, B, C, F, SET);
            gelu(wide, B * F);
            products(wide, p[MLP_PROJ_W], p[MLP_PROJ_S], group, p[MLP_PROJ_B], x, B, F, C, ADD);
            if (i == n_layer - 1) {
                layer_norm(x, lnf_w, lnf_b, h, B, C, eps);
                products(h, head, head_scale, group, NULL, logits, B, C, vocab, SET);
            }
        }
    }
    free(h), free(qkv), free(wide), free(scores);
    return ok ? 0 : -1;
}
