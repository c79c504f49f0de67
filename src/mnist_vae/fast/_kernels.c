/* Fused CPU loops for the training step in fused.py; kernels.py holds the same computations in
 * torch ops, used where this extension was not built and to test it.
 *
 * Why: in torch each elementwise step is its own pass over memory with its own dispatch, and
 * torch.exp/expm1/softplus are not vectorised on every CPU. One activation layer took 5-8 such
 * passes; here it is one loop that the compiler vectorises (-O3), with exp and log written as
 * the usual range reduction and polynomial (Cephes' coefficients, about 1 float32 ulp) because
 * the C library's versions are not vectorised without -ffast-math.
 *
 * Every function takes the addresses of contiguous float32 (or uint64) buffers that the
 * Python side has checked; shapes are rows x cols with a bias of cols.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
/* Lets gcc compute both sides of a ?: and select, as a vector loop must; nothing here reads the
 * floating-point exception flags that this gives up. */
#pragma GCC optimize("no-trapping-math")
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* One build for every x86-64 CPU, with AVX-512 and AVX2 versions chosen when loaded. */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

/* The loops split their rows (Adam its parameters, weight_grad_adam its tiles) between threads. Built with
 * -fopenmp on Linux, this module then needs libgomp.so.1; torch has loaded its own copy by then, and
 * the loader reuses it, so these threads are torch's intra-op threads, as many as
 * torch.get_num_threads(), never more. A small loop stays on one thread, as waking the others costs
 * more than they save; how small depends on the work an element takes. A loop that evaluates an
 * exponential or a logarithm for each element (an activation layer with its dropout bits, the loss) shares
 * from PARALLEL_MIN_EXP elements; the backward pass through a layer's activation and bias (a product by the
 * factor, a column sum, and a copy written transposed or in bfloat16: three or four memory streams an
 * element) from PARALLEL_MIN_BACKWARD; Adam's update, a square root and two divisions
 * a parameter, from PARALLEL_MIN_ADAM parameters; and weight_grad_adam, rows multiply-adds and Adam's update
 * a parameter, from PARALLEL_MIN multiply-adds, torch's grain size. None of them changes a bit with the
 * number of threads. */
#define PARALLEL_MIN 32768
#define PARALLEL_MIN_EXP 4096
#define PARALLEL_MIN_BACKWARD 8192
#define PARALLEL_MIN_ADAM 8192
static int parallel = 1; /* set_parallel(0): one thread, where torch's OpenMP runtime is not ours */

static void my_share(long n, long *begin, long *end) { /* this thread's part of 0..n */
#ifdef _OPENMP
    long thread = omp_get_thread_num(), threads = omp_get_num_threads();
#else
    long thread = 0, threads = 1;
#endif
    *begin = n * thread / threads;
    *end = n * (thread + 1) / threads;
}

#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f     /* ln 2 = LN2_HI + LN2_LO, LN2_HI exact in few bits */
#define LN2_LO -2.12194440e-4f

/* e^x - 1 = 2^k (1 + m) - 1 with m = e^r - 1, x = k ln2 + r, |r| <= ln2 / 2. */
static inline float exp_reduced(float x, float *k_out) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* Round to nearest: adding 1.5 * 2^23 pushes the fraction out of a float's mantissa. */
    float k = (x * LOG2E + 12582912.0f) - 12582912.0f;
    float r = x - k * LN2_HI - k * LN2_LO;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    *k_out = k;
    return r + r * r * q;
}

static inline float pow2(float k) { /* 2^k for integral k in [-126, 127] */
    union { int32_t i; float f; } u;
    u.i = ((int32_t)k + 127) << 23;
    return u.f;
}

static inline float exp_f(float x) {
    float k, m = exp_reduced(x, &k);
    return (m + 1.0f) * pow2(k);
}

static inline float expm1_f(float x) { /* exact near 0, where e^x - 1 would cancel */
    float k, m = exp_reduced(x, &k);
    return k == 0.0f ? m : (m + 1.0f) * pow2(k) - 1.0f;
}

static inline float log_scaled(float w, float n) { /* log(w 2^n) for w in [1, 2] and integral n */
    int big = w > 1.41421356f;
    float x = (big ? 0.5f * w : w) - 1.0f, e = n + (big ? 1.0f : 0.0f), z = x * x;
    float y = 7.0376836292e-2f;
    y = y * x - 1.1514610310e-1f;
    y = y * x + 1.1676998740e-1f;
    y = y * x - 1.2420140846e-1f;
    y = y * x + 1.4249322787e-1f;
    y = y * x - 1.6668057665e-1f;
    y = y * x + 2.0000714765e-1f;
    y = y * x - 2.4999993993e-1f;
    y = y * x + 3.3333331174e-1f;
    y = y * x * z + LN2_LO * e - 0.5f * z;
    return x + y + LN2_HI * e;
}

static inline float log_1_to_2(float w) { return log_scaled(w, 0.0f); } /* log w for w in [1, 2] */

static inline float log_f(float v) { /* log v for a positive normal float v, as v = w 2^n with w in [1, 2) */
    union { float f; int32_t i; } u = {v};
    float n = (float)((u.i >> 23) - 127);
    u.i = (u.i & 0x007fffff) | 0x3f800000;
    return log_scaled(u.f, n);
}

static inline float sigmoid_f(float x) { /* 1/(1 + e^-x), from e^-|x| in (0, 1], which cannot overflow */
    float e = exp_f(x > 0.0f ? -x : x);
    return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

/* log(1 + e) for e in [0, 1] to full relative precision, also where 1 + e rounds (Goldberg's correction);
 * the loss does without it, as there an absolute error of half an ulp of 1 is as good as exact. */
static inline float log1p_0_to_1(float e) {
    float w = 1.0f + e;
    return w == 1.0f ? e : log_1_to_2(w) * (e / (w - 1.0f));
}

/* bfloat16, the products' operands with --precision bf16: the upper half of a float32, rounded to the nearest,
 * ties to even, as torch's conversion rounds (NaN to torch's NaN), so that a loop writing bfloat16 gives the
 * bits that .bfloat16() of its float32 result gives. */
static inline float bf16_float(uint16_t h) {
    union { uint32_t i; float f; } u;
    u.i = (uint32_t)h << 16;
    return u.f;
}

static inline uint16_t float_bf16(float f) {
    union { float f; uint32_t i; } u = {f};
    uint32_t rounded = (u.i + 0x7fffu + ((u.i >> 16) & 1u)) >> 16;
    return (u.i & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)rounded;
}

/* The activations of activation_rows, by the number the Python side passes. */
enum { ELU = 0, TANH = 1, RELU = 2 };

/* The dropout test of kernels.py: a unit is kept when its 16-bit uniform is >= threshold. `kind`, `masked`,
 * `store` (whether the factor is written) and `bf16` are constants after inlining, so that each case is its own
 * loop: a load of bits[i] that might be skipped cannot be vectorised without AVX-512's masked loads. With
 * `bf16` the layer reads its input a16 and writes h in bfloat16 (h16), and in float32 too where `a` is given. */
static inline __attribute__((always_inline)) void activation_rows(
        int kind, int masked, int store, int bf16, float *restrict a, const uint16_t *restrict a16,
        uint16_t *restrict h16, const float *restrict bias, float *restrict factor, const int16_t *restrict bits,
        int16_t threshold, float scale, long rows, long cols) {
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < cols; c++) {
            long i = r * cols + c;
            float x = (bf16 ? bf16_float(a16[i]) : a[i]) + bias[c], h, f;
            float m = masked ? (bits[i] >= threshold ? scale : 0.0f) : scale;
            if (kind == TANH) { /* 2 sigmoid(2x) - 1, as model.tanh_; factor = m (1 - tanh^2) */
                float t = 2.0f / (1.0f + exp_f(-2.0f * x)) - 1.0f;
                h = t * m;
                f = m * (1.0f - t * t);
            } else if (kind == RELU) { /* max(x, 0); factor = m where x > 0, else 0 */
                h = (x > 0.0f ? x : 0.0f) * m;
                f = x > 0.0f ? m : 0.0f;
            } else { /* elu; factor = m elu'(x) */
                float e = x > 0.0f ? x : expm1_f(x);
                h = e * m;
                f = (x > 0.0f ? 1.0f : e + 1.0f) * m;
            }
            if (bf16) {
                h16[i] = float_bf16(h);
                if (a)
                    a[i] = h;
            } else {
                a[i] = h;
            }
            if (store)
                factor[i] = f;
        }
}

/* The loops of one activation: with or without a dropout mask, with or without the factor, and in
 * bfloat16 (a16 given, training only: with the factor). */
static inline __attribute__((always_inline)) void activation_cases(
        int kind, float *restrict a, const uint16_t *restrict a16, uint16_t *restrict h16, const float *restrict bias,
        float *restrict factor, const int16_t *restrict bits, int16_t threshold, float scale, long rows, long cols) {
    if (a16 && bits)
        activation_rows(kind, 1, 1, 1, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
    else if (a16)
        activation_rows(kind, 0, 1, 1, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
    else if (bits && factor)
        activation_rows(kind, 1, 1, 0, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
    else if (bits)
        activation_rows(kind, 1, 0, 0, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
    else if (factor)
        activation_rows(kind, 0, 1, 0, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
    else
        activation_rows(kind, 0, 0, 0, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
}

/* h = act(a + bias) m, in place of a, and factor = m act'(a + bias), the backward pass's multiplier;
 * act is elu, tanh or relu (`kind`); bits == NULL: no dropout; factor == NULL: the forward pass alone
 * (the estimate's), which saves a store per unit. With a16 (bfloat16) the input is a16 and h goes to h16,
 * and to a as well where a is not NULL. Each case is its own vectorised loop. */
VECTOR_CLONES static void activation_dropout(int kind, float *restrict a, const uint16_t *restrict a16,
                                             uint16_t *restrict h16, const float *restrict bias,
                                             float *restrict factor, const int16_t *restrict bits,
                                             int16_t threshold, float scale, long rows, long cols) {
    if (kind == TANH)
        activation_cases(TANH, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
    else if (kind == RELU)
        activation_cases(RELU, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
    else
        activation_cases(ELU, a, a16, h16, bias, factor, bits, threshold, scale, rows, cols);
}

/* The Bernoulli log-likelihood of one pixel y under logit l, y l - softplus(l), with e = e^-|l|:
 * softplus(l) = max(l, 0) + log(1 + e). */
static inline float bernoulli_term(float l, float y, float e) {
    return y * l - ((l > 0.0f ? l : 0.0f) + log_1_to_2(1.0f + e));
}

/* For l = logits + bias: rows_out[r] = sum over the pixels of row r of y l - softplus(l), its Bernoulli
 * log-likelihood, where y is row r % target_rows of `target` (the importance-weighted bound's K draws per
 * image are rows k B + i, for which no repeated copy of the images is made), and
 * d_logits = (sigmoid(l) - y) scale, the gradient of -log p. Each row is summed in LANES partial sums, a
 * vector's worth, then those in order: one thread sums a row, in one order, however many threads there are. */
#define LANES 16
VECTOR_CLONES static void bernoulli_loss(const float *restrict logits, const float *restrict bias,
                                         const float *restrict target, float *restrict rows_out,
                                         float *restrict d_logits, float scale, long target_rows, long first_row,
                                         long rows, long cols) {
    for (long r = 0; r < rows; r++) {
        const float *l_row = logits + r * cols, *y = target + ((first_row + r) % target_rows) * cols;
        float *d = d_logits + r * cols, partial[LANES] = {0.0f}, total = 0.0f;
        long c = 0;
        for (; c + LANES <= cols; c += LANES)
            for (long j = 0; j < LANES; j++) {
                float l = l_row[c + j] + bias[c + j];
                float e = exp_f(l > 0.0f ? -l : l); /* e^-|l| in (0, 1]; sigmoid(l) = 1/w or e/w */
                partial[j] += bernoulli_term(l, y[c + j], e);
                d[c + j] = ((l >= 0.0f ? 1.0f : e) / (1.0f + e) - y[c + j]) * scale;
            }
        for (long j = 0; j < LANES; j++)
            total += partial[j];
        for (; c < cols; c++) {
            float l = l_row[c] + bias[c], e = exp_f(l > 0.0f ? -l : l);
            total += bernoulli_term(l, y[c], e);
            d[c] = ((l >= 0.0f ? 1.0f : e) / (1.0f + e) - y[c]) * scale;
        }
        rows_out[r] = total;
    }
}

/* An 8 x 8 tile of a row-major matrix, written transposed: out[k * out_stride + j] = in[j * in_stride + k]. Eight
 * loads, the shuffles of the usual AVX transpose (interleave pairs of rows, then pairs of those, then swap their
 * 128-bit halves) and eight stores, where a loop of single elements loads and stores every float on its own;
 * written in the compiler's vector extension, so that each build of the module gets its own instructions. */
typedef float v8sf __attribute__((vector_size(32)));
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
typedef int v8si __attribute__((vector_size(32)));
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (v8si){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

static inline __attribute__((always_inline)) void transpose8(const float *restrict in, long in_stride,
                                                              float *restrict out, long out_stride) {
    v8sf r[8], t[8], u[8];
    for (int j = 0; j < 8; j++)
        memcpy(&r[j], in + j * in_stride, sizeof(v8sf));
    for (int j = 0; j < 8; j += 2) { /* rows j, j + 1 interleaved: columns 0 1 4 5, then 2 3 6 7 */
        t[j] = SHUFFLE8(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[j + 1] = SHUFFLE8(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int j = 0; j < 8; j += 4) { /* rows j..j+3 of columns k and k + 4, for k = 0, 1, 2, 3 */
        u[j] = SHUFFLE8(t[j], t[j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[j + 1] = SHUFFLE8(t[j], t[j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[j + 2] = SHUFFLE8(t[j + 1], t[j + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[j + 3] = SHUFFLE8(t[j + 1], t[j + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int k = 0; k < 4; k++) {
        v8sf column = SHUFFLE8(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11),
             column4 = SHUFFLE8(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        memcpy(out + k * out_stride, &column, sizeof(v8sf));
        memcpy(out + (k + 4) * out_stride, &column4, sizeof(v8sf));
    }
}

/* The backward pass through a layer's activation and bias: d *= factor, in place (d(loss)/dh to d(loss)/da;
 * no factor: the last layer, d is d(loss)/da already), and grad_bias = d summed over the rows, each column in
 * row order; and where dt is given, d' written there (cols x dt_rows, these rows its columns), the first operand
 * of the weight gradient's product as oneDNN reads it. Sixteen rows at a time, so that the transposed writes
 * read rows still in the L1 cache. */
static inline __attribute__((always_inline)) void factor_bias_grad_rows(
        int with_factor, int transpose, float *restrict d, const float *restrict factor, float *restrict grad_bias,
        float *restrict dt, long rows, long cols, long dt_rows) {
    for (long c = 0; c < cols; c++)
        grad_bias[c] = 0.0f;
    for (long r0 = 0; r0 < rows; r0 += 16) {
        long r1 = r0 + 16 < rows ? r0 + 16 : rows;
        for (long r = r0; r < r1; r++) {
            float *row = d + r * cols;
            const float *f = with_factor ? factor + r * cols : NULL;
            for (long c = 0; c < cols; c++) {
                if (with_factor)
                    row[c] *= f[c];
                grad_bias[c] += row[c];
            }
        }
        if (transpose) { /* in 8 x 8 tiles, the rows and columns beyond them one at a time */
            long r8 = r0 + (r1 - r0) / 8 * 8, c8 = cols / 8 * 8;
            for (long c = 0; c < c8; c += 8) /* both tiles of a column before the next: whole lines of d' */
                for (long r = r0; r < r8; r += 8)
                    transpose8(d + r * cols + c, cols, dt + c * dt_rows + r, dt_rows);
            if (r8 < r1) /* a pass over every column only where some rows are left over */
                for (long c = 0; c < c8; c++)
                    for (long r = r8; r < r1; r++)
                        dt[c * dt_rows + r] = d[r * cols + c];
            for (long c = c8; c < cols; c++)
                for (long r = r0; r < r1; r++)
                    dt[c * dt_rows + r] = d[r * cols + c];
        }
    }
}

VECTOR_CLONES static void factor_bias_grad(float *restrict d, const float *restrict factor, float *restrict grad_bias,
                                           float *restrict dt, long rows, long cols, long dt_rows) {
    if (factor && dt)
        factor_bias_grad_rows(1, 1, d, factor, grad_bias, dt, rows, cols, dt_rows);
    else if (factor)
        factor_bias_grad_rows(1, 0, d, factor, grad_bias, dt, rows, cols, dt_rows);
    else if (dt)
        factor_bias_grad_rows(0, 1, d, factor, grad_bias, dt, rows, cols, dt_rows);
    else
        factor_bias_grad_rows(0, 0, d, factor, grad_bias, dt, rows, cols, dt_rows);
}

/* factor_bias_grad with --precision bf16: d(loss)/da = d16 factor (d16: the bfloat16 product d(loss)/dh) or
 * d32 (float32: the loss's gradient, the last layer's, with no factor), summed over the rows into grad_bias as
 * factor_bias_grad sums, and written in bfloat16 to out, the operand of the layer's two backward products. */
static inline __attribute__((always_inline)) void factor_bias_grad_bf16_rows(
        int bf16, const uint16_t *restrict d16, const float *restrict d32, const float *restrict factor,
        float *restrict grad_bias, uint16_t *restrict out, long rows, long cols) {
    for (long c = 0; c < cols; c++)
        grad_bias[c] = 0.0f;
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < cols; c++) {
            long i = r * cols + c;
            float d = bf16 ? bf16_float(d16[i]) * factor[i] : d32[i];
            grad_bias[c] += d;
            out[i] = float_bf16(d);
        }
}

VECTOR_CLONES static void factor_bias_grad_bf16(const uint16_t *restrict d16, const float *restrict d32,
                                                const float *restrict factor, float *restrict grad_bias,
                                                uint16_t *restrict out, long rows, long cols) {
    if (d16)
        factor_bias_grad_bf16_rows(1, d16, d32, factor, grad_bias, out, rows, cols);
    else
        factor_bias_grad_bf16_rows(0, d16, d32, factor, grad_bias, out, rows, cols);
}

/* The estimate's log-likelihood, with no gradient: out[r] = sum over pixels of x l - softplus(l), for
 * l = logits + bias of row r and x the image of row r, row r / n of `images` (n draws of z per image, so
 * that no expanded copy of the images is made), each row summed as bernoulli_loss sums it. */
VECTOR_CLONES static void bernoulli_log_p(const float *restrict logits, const float *restrict bias,
                                          const float *restrict images, float *restrict out, long n,
                                          long first_row, long rows, long cols) {
    for (long r = 0; r < rows; r++) {
        const float *l_row = logits + r * cols, *x = images + ((first_row + r) / n) * cols;
        float partial[LANES] = {0.0f}, total = 0.0f;
        long c = 0;
        for (; c + LANES <= cols; c += LANES)
            for (long j = 0; j < LANES; j++) {
                float l = l_row[c + j] + bias[c + j];
                partial[j] += bernoulli_term(l, x[c + j], exp_f(l > 0.0f ? -l : l));
            }
        for (long j = 0; j < LANES; j++)
            total += partial[j];
        for (; c < cols; c++) {
            float l = l_row[c] + bias[c];
            total += bernoulli_term(l, x[c], exp_f(l > 0.0f ? -l : l));
        }
        out[r] = total;
    }
}

/* The gradient of the batch mean of -ELBO with respect to gaussian = [mu, s], from d_z: */
/* d mu = d_z + mu / B, d s = (d_z eps + (std - 1/std) / B) sigmoid(s). */
VECTOR_CLONES static void gaussian_backward(const float *restrict gaussian, const float *restrict eps,
                                            const float *restrict std, const float *restrict d_z,
                                            float *restrict d_gaussian, float inv_batch, long rows, long dim_z) {
    for (long r = 0; r < rows; r++)
        for (long j = 0; j < dim_z; j++) {
            long i = r * dim_z + j, m = r * 2 * dim_z + j;
            d_gaussian[m] = d_z[i] + gaussian[m] * inv_batch;
            d_gaussian[m + dim_z] = (d_z[i] * eps[i] + (std[i] - 1.0f / std[i]) * inv_batch) *
                                    sigmoid_f(gaussian[m + dim_z]);
        }
}

/* The reparameterisation, with k draws per image (the ELBO's one, the importance-weighted bound's K): for
 * each of `images` rows of gaussian = [mu, s], std = softplus(s) + 1e-6 and kl[i] = KL(N(mu, std^2) || N(0, 1)),
 * and for draw d of image i, row r = d images + i: z = mu + std eps and, where log_ratio is given,
 * log_ratio[r] = log p(z) - log q(z|x), the sum over dimensions of (eps^2 - z^2) / 2 + log std (the 2 pi
 * terms cancel). */
VECTOR_CLONES static void gaussian_draws(const float *restrict gaussian, const float *restrict eps,
                                         float *restrict z, float *restrict std_out, float *restrict kl,
                                         float *restrict log_ratio, long images, long k, long dim_z) {
    for (long i = 0; i < images; i++) {
        const float *mu = gaussian + i * 2 * dim_z, *s = mu + dim_z;
        float *std = std_out + i * dim_z, total = 0.0f, log_std = 0.0f;
        for (long j = 0; j < dim_z; j++) {
            float e = exp_f(s[j] > 0.0f ? -s[j] : s[j]);
            std[j] = (s[j] > 0.0f ? s[j] : 0.0f) + log1p_0_to_1(e) + 1e-6f;
            float l = log_f(std[j]); /* std >= 1e-6: normal */
            total += 0.5f * (mu[j] * mu[j] + std[j] * std[j] - 1.0f) - l;
            log_std += l;
        }
        kl[i] = total;
        for (long d = 0; d < k; d++) {
            long r = d * images + i;
            const float *e = eps + r * dim_z;
            float *zr = z + r * dim_z, squares = 0.0f;
            for (long j = 0; j < dim_z; j++) {
                zr[j] = mu[j] + std[j] * e[j];
                squares += e[j] * e[j] - zr[j] * zr[j];
            }
            if (log_ratio)
                log_ratio[r] = 0.5f * squares + log_std;
        }
    }
}

/* For each image i, from the log-likelihood of its K draws (rows r = d images + i) and their log_ratio:
 * l_d = log_px + kl_weight log_ratio, the normalised importance weights v_d = softmax over d of l_d, and
 * log_mean_w[i] = log (1/K) sum_d exp(l_d), with the largest l_d taken out before the exponentials. */
VECTOR_CLONES static void importance_weights(const float *restrict log_px, const float *restrict log_ratio,
                                             float kl_weight, float log_k, float *restrict weights,
                                             float *restrict log_mean_w, long images, long k) {
    for (long i = 0; i < images; i++) {
        float most = -INFINITY, total = 0.0f;
        for (long d = 0; d < k; d++) {
            long r = d * images + i;
            weights[r] = log_px[r] + kl_weight * log_ratio[r];
            most = weights[r] > most ? weights[r] : most;
        }
        for (long d = 0; d < k; d++) { /* exp_f stops at e^-87: a weight below is 0, as float32's e^x is */
            long r = d * images + i;
            weights[r] = weights[r] - most < -87.0f ? 0.0f : exp_f(weights[r] - most);
            total += weights[r];
        }
        for (long d = 0; d < k; d++)
            weights[d * images + i] /= total;
        log_mean_w[i] = most + log_f(total) - log_k; /* total >= 1: the largest term is 1 */
    }
}

/* The bound's gradient with respect to gaussian = [mu, s] of each image, from d_z (the decoder's, rows
 * d images + i), the draws z (rows of z_cols columns, the first dim_z of which are z: a conditional model
 * appends the label) and the weights v, as fused.py's docstring derives it, with w = kl_weight and
 * scale = 1/B. Standard: g = d_z + w v z scale, d mu = sum_d g, d std = sum_d g eps - w scale / std.
 * DReG: g = (1 - w + w v) (d_z + w v (z - eps / std) scale), d mu = sum_d g, d std = sum_d g eps.
 * Then d s = d std sigmoid(s). */
VECTOR_CLONES static void importance_gaussian_backward(
        const float *restrict gaussian, const float *restrict eps, const float *restrict std,
        const float *restrict z, long z_cols, const float *restrict d_z, const float *restrict weights,
        float kl_weight, float scale, int dreg, float *restrict d_gaussian, long images, long k, long dim_z) {
    for (long i = 0; i < images; i++) {
        float *d_mu = d_gaussian + i * 2 * dim_z, *d_std = d_mu + dim_z;
        const float *sd = std + i * dim_z, *s = gaussian + i * 2 * dim_z + dim_z;
        for (long j = 0; j < dim_z; j++)
            d_mu[j] = d_std[j] = 0.0f;
        for (long d = 0; d < k; d++) {
            long r = d * images + i;
            float v = weights[r] * kl_weight * scale, keep = 1.0f - kl_weight + kl_weight * weights[r];
            const float *e = eps + r * dim_z, *zr = z + r * z_cols, *g = d_z + r * dim_z;
            for (long j = 0; j < dim_z; j++) {
                float gj = dreg ? keep * (g[j] + v * (zr[j] - e[j] / sd[j])) : g[j] + v * zr[j];
                d_mu[j] += gj;
                d_std[j] += gj * e[j];
            }
        }
        for (long j = 0; j < dim_z; j++)
            d_std[j] = (dreg ? d_std[j] : d_std[j] - kl_weight * scale / sd[j]) * sigmoid_f(s[j]);
    }
}

#define GOLDEN_GAMMA 0x9e3779b97f4a7c15ULL /* SplitMix64's step between states */

/* SplitMix64 (Steele, Lea & Flood 2014) from state `key`: out[i] is its (i+1)-th output. */
VECTOR_CLONES static void splitmix64(uint64_t *restrict out, uint64_t key, long n) {
    for (long i = 0; i < n; i++) {
        uint64_t z = key + (uint64_t)(i + 1) * GOLDEN_GAMMA;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        out[i] = z ^ (z >> 31);
    }
}

/* Adam's update of n parameters as torch._fused_adam_ computes it on the CPU (torch.optim.Adam(fused=True)):
 * the operations of torch's vector loop in its order, with its fused multiply-adds (no other product here
 * feeds an addition, so the compiler has none to contract), and sqrt and division correctly rounded, so
 * that on a vector of parameters the two agree to the bit (torch's scalar loop over the last few elements
 * of a tensor rounds otherwise, by an ulp). The scalars are torch's, computed in double by the caller and
 * rounded to float as torch rounds them. The first moment is torch's lerp toward the gradient by
 * c1 = 1 - beta1, from the nearer end.
 *
 * Of the three operations that one divider does (a square root, two divisions), the division by the step's
 * constant bc2_sqrt is done without it, by Markstein's correction: with y the correctly rounded reciprocal,
 * the remainder s - bc2_sqrt q of q = s y is exact in a fused multiply-add, and q + remainder y rounds to the
 * correctly rounded quotient (Markstein 1990; Muller et al., Handbook of Floating-Point Arithmetic, on
 * division with an FMA); an infinite s, whose remainder is NaN, keeps q. So the bits are the divider's,
 * which the tests check against torch's Adam, and one of the three operations of the CPU's slowest unit is
 * gone from a loop it bounds where the data are in the cache (docs/speed.md). */
static inline __attribute__((always_inline)) void adam_loop(
        int bf16, float *restrict p, const float *restrict g, const uint16_t *restrict g16, uint16_t *restrict p16,
        float *restrict m, float *restrict v, long n, float c1, float beta2, float c2, float bc2_sqrt, float eps,
        float neg_step_size, float weight_decay) {
    int small = fabsf(c1) < 0.5f;
    float coefficient = small ? c1 : c1 - 1.0f;
    float y = 1.0f / bc2_sqrt;
    for (long i = 0; i < n; i++) {
        float grad = bf16 ? bf16_float(g16[i]) : g[i];
        grad = weight_decay != 0.0f ? fmaf(p[i], weight_decay, grad) : grad;
        float mi = fmaf(coefficient, grad - m[i], small ? m[i] : grad);
        float vi = fmaf(c2 * grad, grad, v[i] * beta2);
        m[i] = mi;
        v[i] = vi;
        float s = sqrtf(vi), q = s * y, remainder = fmaf(-bc2_sqrt, q, s);
        float corrected = remainder == remainder ? fmaf(remainder, y, q) : q; /* s / bc2_sqrt */
        float pi = p[i] + neg_step_size * mi / (corrected + eps);
        p[i] = pi;
        if (bf16)
            p16[i] = float_bf16(pi);
    }
}

/* With g16 (--precision bf16) the gradient is read in bfloat16, as its product gave it, and the updated
 * parameters are also written in bfloat16 to p16, the operand of the next step's products: no pass of
 * their own over either. */
VECTOR_CLONES static void adam(float *restrict p, const float *restrict g, const uint16_t *restrict g16,
                               uint16_t *restrict p16, float *restrict m, float *restrict v, long n, float c1,
                               float beta2, float c2, float bc2_sqrt, float eps, float neg_step_size,
                               float weight_decay) {
    if (g16)
        adam_loop(1, p, g, g16, p16, m, v, n, c1, beta2, c2, bc2_sqrt, eps, neg_step_size, weight_decay);
    else
        adam_loop(0, p, g, g16, p16, m, v, n, c1, beta2, c2, bc2_sqrt, eps, neg_step_size, weight_decay);
}

/* A layer's weight gradient d' x and Adam's update of the weight from it, tile by tile, where the batch has
 * few rows: then the product is cheap and the gradient's trip through memory, written by the product and read
 * back by Adam, is most of its cost; here each tile of the gradient is summed in registers and applied while
 * it is in the L1 cache. Rows o0..o1 of the weight (out x in), d (rows x out) and x (rows x in) row-major. Each
 * element is summed over the rows in their order and the tiles are fixed by the shape alone, so its bits do not
 * depend on how the rows of the weight are split between threads.
 *
 * A tile's sums fill the vector registers but for the few that one row of x and one element of d take: with
 * AVX-512's 32 registers of 16 floats, 4 rows of the weight by 4 vectors (16 sums); with AVX2's 16 registers
 * of 8 floats, 6 rows by 2 vectors (12 sums, 2 loads of x, one broadcast of d). The wide tile on AVX2 would
 * keep half its sums in memory. */
typedef float v16sf __attribute__((vector_size(64)));
typedef float v8sf __attribute__((vector_size(32)));
#define WG_MAX_ROWS 128 /* of d and x; the module's weight_grad_adam_rows, which kernels.py reads */
#define WG_TILE_ROWS(narrow) ((narrow) ? 6 : 4) /* the weight's rows in a tile, which threads share out whole */
#define WG_MAX_BAND (6 * 512) /* the most elements of a band of tiles, either shape */

/* g = the tile of d' x at d (rows x its n_o columns, the tile's rows) and x (rows x its columns, the tile's),
 * each element summed over the rows in their order. The sums are named variables, not an array, so that the
 * compiler keeps them in registers rather than storing them on every row. */
#define WG_SUM_ROW(k, c) s##k##c += d_r[k] * x##c
static inline __attribute__((always_inline)) void weight_grad_tile_4x64(const float *restrict d, long d_stride,
                                                                         const float *restrict x, long x_stride,
                                                                         long rows, float *restrict g, long g_stride) {
    v16sf s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0},
          s20 = {0}, s21 = {0}, s22 = {0}, s23 = {0}, s30 = {0}, s31 = {0}, s32 = {0}, s33 = {0};
    for (long r = 0; r < rows; r++) {
        const float *d_r = d + r * d_stride, *x_r = x + r * x_stride;
        v16sf x0, x1, x2, x3;
        memcpy(&x0, x_r, sizeof(x0));
        memcpy(&x1, x_r + 16, sizeof(x1));
        memcpy(&x2, x_r + 32, sizeof(x2));
        memcpy(&x3, x_r + 48, sizeof(x3));
        WG_SUM_ROW(0, 0); WG_SUM_ROW(0, 1); WG_SUM_ROW(0, 2); WG_SUM_ROW(0, 3);
        WG_SUM_ROW(1, 0); WG_SUM_ROW(1, 1); WG_SUM_ROW(1, 2); WG_SUM_ROW(1, 3);
        WG_SUM_ROW(2, 0); WG_SUM_ROW(2, 1); WG_SUM_ROW(2, 2); WG_SUM_ROW(2, 3);
        WG_SUM_ROW(3, 0); WG_SUM_ROW(3, 1); WG_SUM_ROW(3, 2); WG_SUM_ROW(3, 3);
    }
    v16sf all[16] = {s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33};
    for (int r = 0; r < 4; r++) /* row r of the tile */
        memcpy(g + r * g_stride, all + r * 4, 4 * sizeof(v16sf));
}

static inline __attribute__((always_inline)) void weight_grad_tile_4x16(const float *restrict d, long d_stride,
                                                                         const float *restrict x, long x_stride,
                                                                         long rows, float *restrict g, long g_stride) {
    v16sf s00 = {0}, s10 = {0}, s20 = {0}, s30 = {0};
    for (long r = 0; r < rows; r++) {
        const float *d_r = d + r * d_stride;
        v16sf x0;
        memcpy(&x0, x + r * x_stride, sizeof(x0));
        WG_SUM_ROW(0, 0); WG_SUM_ROW(1, 0); WG_SUM_ROW(2, 0); WG_SUM_ROW(3, 0);
    }
    v16sf all[4] = {s00, s10, s20, s30};
    for (int r = 0; r < 4; r++) /* row r of the tile */
        memcpy(g + r * g_stride, all + r * 1, 1 * sizeof(v16sf));
}

static inline __attribute__((always_inline)) void weight_grad_tile_6x16(const float *restrict d, long d_stride,
                                                                         const float *restrict x, long x_stride,
                                                                         long rows, float *restrict g, long g_stride) {
    v8sf s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0}, s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0}, s40 = {0},
         s41 = {0}, s50 = {0}, s51 = {0};
    for (long r = 0; r < rows; r++) {
        const float *d_r = d + r * d_stride, *x_r = x + r * x_stride;
        v8sf x0, x1;
        memcpy(&x0, x_r, sizeof(x0));
        memcpy(&x1, x_r + 8, sizeof(x1));
        WG_SUM_ROW(0, 0); WG_SUM_ROW(0, 1); WG_SUM_ROW(1, 0); WG_SUM_ROW(1, 1); WG_SUM_ROW(2, 0); WG_SUM_ROW(2, 1);
        WG_SUM_ROW(3, 0); WG_SUM_ROW(3, 1); WG_SUM_ROW(4, 0); WG_SUM_ROW(4, 1); WG_SUM_ROW(5, 0); WG_SUM_ROW(5, 1);
    }
    v8sf all[12] = {s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51};
    for (int r = 0; r < 6; r++) /* row r of the tile */
        memcpy(g + r * g_stride, all + r * 2, 2 * sizeof(v8sf));
}

static inline __attribute__((always_inline)) void weight_grad_tile_6x8(const float *restrict d, long d_stride,
                                                                        const float *restrict x, long x_stride,
                                                                        long rows, float *restrict g, long g_stride) {
    v8sf s00 = {0}, s10 = {0}, s20 = {0}, s30 = {0}, s40 = {0}, s50 = {0};
    for (long r = 0; r < rows; r++) {
        const float *d_r = d + r * d_stride;
        v8sf x0;
        memcpy(&x0, x + r * x_stride, sizeof(x0));
        WG_SUM_ROW(0, 0); WG_SUM_ROW(1, 0); WG_SUM_ROW(2, 0); WG_SUM_ROW(3, 0); WG_SUM_ROW(4, 0); WG_SUM_ROW(5, 0);
    }
    v8sf all[6] = {s00, s10, s20, s30, s40, s50};
    for (int r = 0; r < 6; r++) /* row r of the tile */
        memcpy(g + r * g_stride, all + r * 1, 1 * sizeof(v8sf));
}

/* The tiles of the weight's rows o0..o1 and Adam's update from them, with the wide tiles (4 rows by 4 vectors of
 * 16) or the narrow (6 rows by 2 vectors of 8): a tile of the weight's columns is whole vectors, or one vector,
 * and the last rows and columns, short of a whole tile or vector, are summed from copies padded with 0. Adam
 * takes a band of tiles side by side at once, a tile's rows of up to `band` columns (each band of the gradient
 * stays in the L1 cache): the narrow tiles are short, and one call of adam_loop for each of their rows would cost
 * as much as its arithmetic. Both shapes are inlined and `narrow` is a constant in each caller, so each caller
 * keeps one. */
static inline __attribute__((always_inline)) void weight_grad_adam_tiles(
        int narrow, const float *restrict d, const float *restrict x, long rows, long out, long in, long o0, long o1,
        float *restrict p, float *restrict m, float *restrict v, float c1, float beta2, float c2, float bc2_sqrt,
        float eps, float neg_step_size, float weight_decay) {
    const long tile_rows = WG_TILE_ROWS(narrow), tile_cols = narrow ? 16 : 64, vector = narrow ? 8 : 16,
               band = narrow ? 512 : 64;
    float g[WG_MAX_BAND] __attribute__((aligned(64)));
    float d_edge[WG_MAX_ROWS * WG_TILE_ROWS(1)] __attribute__((aligned(64))),
          x_edge[WG_MAX_ROWS * 16] __attribute__((aligned(64)));
    long in_vectors = in / vector * vector;
    if (in_vectors < in) {
        memset(x_edge, 0, (size_t)(rows * vector) * sizeof(float));
        for (long r = 0; r < rows; r++)
            memcpy(x_edge + r * vector, x + r * in + in_vectors, (size_t)(in - in_vectors) * sizeof(float));
    }
    for (long o = o0; o < o1; o += tile_rows) {
        long n_o = o1 - o < tile_rows ? o1 - o : tile_rows, d_stride = out;
        const float *d_tile = d + o;
        if (n_o < tile_rows) {
            memset(d_edge, 0, (size_t)(rows * tile_rows) * sizeof(float));
            for (long r = 0; r < rows; r++)
                memcpy(d_edge + r * tile_rows, d + r * out + o, (size_t)n_o * sizeof(float));
            d_tile = d_edge;
            d_stride = tile_rows;
        }
        for (long i0 = 0; i0 < in; i0 += band) {
            long i1 = in - i0 < band ? in : i0 + band;
            for (long i = i0; i < i1;) {
                long n_i = i1 - i >= tile_cols ? tile_cols : (i1 - i >= vector ? vector : i1 - i);
                const float *x_tile = n_i < vector ? x_edge : x + i;
                long x_stride = n_i < vector ? vector : in;
                if (narrow && n_i == tile_cols)
                    weight_grad_tile_6x16(d_tile, d_stride, x_tile, x_stride, rows, g + (i - i0), band);
                else if (narrow)
                    weight_grad_tile_6x8(d_tile, d_stride, x_tile, x_stride, rows, g + (i - i0), band);
                else if (n_i == tile_cols)
                    weight_grad_tile_4x64(d_tile, d_stride, x_tile, x_stride, rows, g + (i - i0), band);
                else
                    weight_grad_tile_4x16(d_tile, d_stride, x_tile, x_stride, rows, g + (i - i0), band);
                i += n_i;
            }
            for (long k = 0; k < n_o; k++) {
                long at = (o + k) * in + i0;
                adam_loop(0, p + at, g + k * band, NULL, NULL, m + at, v + at, i1 - i0, c1, beta2, c2, bc2_sqrt, eps,
                          neg_step_size, weight_decay);
            }
        }
    }
}

VECTOR_CLONES static void weight_grad_adam_wide(const float *restrict d, const float *restrict x, long rows, long out,
                                                long in, long o0, long o1, float *restrict p, float *restrict m,
                                                float *restrict v, float c1, float beta2, float c2, float bc2_sqrt,
                                                float eps, float neg_step_size, float weight_decay) {
    weight_grad_adam_tiles(0, d, x, rows, out, in, o0, o1, p, m, v, c1, beta2, c2, bc2_sqrt, eps, neg_step_size,
                           weight_decay);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma")))
#endif
static void weight_grad_adam_narrow(const float *restrict d, const float *restrict x, long rows, long out, long in,
                                    long o0, long o1, float *restrict p, float *restrict m, float *restrict v,
                                    float c1, float beta2, float c2, float bc2_sqrt, float eps, float neg_step_size,
                                    float weight_decay) {
    weight_grad_adam_tiles(1, d, x, rows, out, in, o0, o1, p, m, v, c1, beta2, c2, bc2_sqrt, eps, neg_step_size,
                           weight_decay);
}

/* ---- Python bindings: addresses come as integers from Tensor.data_ptr(). */

/* The BLAS's sgemm that torch.mm calls for float32 on the CPU (MKL's, in torch's own library), set by set_sgemm
 * where kernels.py found it and checked that it gives torch.mm's bits: a product by it here costs the call alone,
 * where torch.mm adds its dispatch, a tenth of a small layer's time. Column-major, as the BLAS takes its operands. */
typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);
static sgemm_fn sgemm = NULL;

/* y = x W' for row-major x (rows x in), W (out x in) and y (rows x out): in the BLAS's column-major terms
 * y' = W x', the operands as torch.mm(x, W.t()) hands them over. */
static void linear(const float *x, const float *w, float *y, int rows, int in, int out) {
    const float one = 1.0f, zero = 0.0f;
    sgemm("T", "N", &out, &rows, &in, &one, w, &in, x, &in, &zero, y, &out);
}

/* dx = d W for row-major d (rows x out), W (out x in) and dx (rows x in), as torch.mm(d, W) asks for it. */
static void input_grad(const float *d, const float *w, float *dx, int rows, int in, int out) {
    const float one = 1.0f, zero = 0.0f;
    sgemm("N", "N", &in, &rows, &out, &one, w, &in, d, &out, &zero, dx, &in);
}

/* A hidden layer's activation (and dropout) on a, in place; 0, or -1 where memory ran out. With `masked`, the
 * mask's bits are SplitMix64's outputs from `key`, as layers.dropout_bits draws them, written into a buffer
 * here: one call instead of two, and no tensor for them in Python. */
static int activation_layer(int kind, unsigned long long a, unsigned long long a16, unsigned long long h16,
                            unsigned long long bias, unsigned long long factor, int masked, unsigned long long key,
                            int threshold, float scale, long rows, long cols) {
    uint64_t *bits = NULL;
    long n_bits = (rows * cols + 3) / 4;
    if (masked && !(bits = malloc((n_bits > 0 ? n_bits : 1) * sizeof(uint64_t))))
        return -1;
    /* factor 0: not written; a16 0: float32 in and out, in a; else bfloat16 in a16 and out in h16, and a 0 or
     * where to write h in float32 too */
    float *h = (float *)(uintptr_t)a, *f = (float *)(uintptr_t)factor;
    const uint16_t *in16 = (const uint16_t *)(uintptr_t)a16;
    uint16_t *out16 = (uint16_t *)(uintptr_t)h16;
#pragma omp parallel if (parallel && rows * cols >= PARALLEL_MIN_EXP)
    {
        long begin, end;
        if (bits) { /* outputs begin.. of SplitMix64 from key are those of the state key + begin gamma */
            my_share(n_bits, &begin, &end);
            splitmix64(bits + begin, key + (uint64_t)begin * GOLDEN_GAMMA, end - begin);
        }
#pragma omp barrier
        my_share(rows, &begin, &end);
        activation_dropout(kind, h ? h + begin * cols : NULL, in16 ? in16 + begin * cols : NULL,
                           out16 ? out16 + begin * cols : NULL, (const float *)(uintptr_t)bias,
                           f ? f + begin * cols : NULL, bits ? (const int16_t *)bits + begin * cols : NULL,
                           (int16_t)threshold, scale, end - begin, cols);
    }
    free(bits);
    return 0;
}

static PyObject *py_activation(PyObject *args, int kind) {
    unsigned long long a, a16, h16, bias, factor, key;
    int masked, threshold;
    float scale;
    long rows, cols;
    if (!PyArg_ParseTuple(args, "KKKKKpKifll", &a, &a16, &h16, &bias, &factor, &masked, &key, &threshold, &scale,
                          &rows, &cols))
        return NULL;
    if (activation_layer(kind, a, a16, h16, bias, factor, masked, key, threshold, scale, rows, cols))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* A hidden layer: a = x W' by sgemm, then the activation layer `kind` (ELU, TANH, RELU) on it, as activation_layer in
 * float32; 0, or -1 where memory ran out. */
static int linear_activation(int kind, unsigned long long x, unsigned long long w, unsigned long long a,
                             unsigned long long bias, unsigned long long factor, int masked, unsigned long long key,
                             int threshold, float scale, int rows, int in, int out) {
    linear((const float *)(uintptr_t)x, (const float *)(uintptr_t)w, (float *)(uintptr_t)a, rows, in, out);
    return activation_layer(kind, a, 0, 0, bias, factor, masked, key, threshold, scale, rows, out);
}

/* linear_activation(kind, x, w, a, bias, factor, masked, key, threshold, scale, rows, in, out): linear_activation
 * above, one call. */
static PyObject *py_linear_activation(PyObject *self, PyObject *args) {
    unsigned long long x, w, a, bias, factor, key;
    int kind, masked, threshold, rows, in, out;
    float scale;
    if (!PyArg_ParseTuple(args, "iKKKKKpKifiii", &kind, &x, &w, &a, &bias, &factor, &masked, &key, &threshold, &scale,
                          &rows, &in, &out))
        return NULL;
    if (!sgemm)
        return PyErr_Format(PyExc_RuntimeError, "linear_activation: no sgemm was set");
    if (kind != ELU && kind != TANH && kind != RELU)
        return PyErr_Format(PyExc_ValueError, "linear_activation: no activation %d", kind);
    if (linear_activation(kind, x, w, a, bias, factor, masked, key, threshold, scale, rows, in, out))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_elu_dropout(PyObject *self, PyObject *args) { return py_activation(args, ELU); }
static PyObject *py_tanh_dropout(PyObject *self, PyObject *args) { return py_activation(args, TANH); }
static PyObject *py_relu_dropout(PyObject *self, PyObject *args) { return py_activation(args, RELU); }

static PyObject *py_bernoulli_loss(PyObject *self, PyObject *args) {
    unsigned long long logits, bias, target, rows_out, d_logits;
    float scale;
    long target_rows, rows, cols;
    if (!PyArg_ParseTuple(args, "KKKKKflll", &logits, &bias, &target, &rows_out, &d_logits, &scale, &target_rows, &rows,
                          &cols))
        return NULL;
#pragma omp parallel if (parallel && rows * cols >= PARALLEL_MIN_EXP)
    {
        long begin, end, offset;
        my_share(rows, &begin, &end);
        offset = begin * cols;
        bernoulli_loss((const float *)(uintptr_t)logits + offset, (const float *)(uintptr_t)bias,
                       (const float *)(uintptr_t)target, (float *)(uintptr_t)rows_out + begin,
                       (float *)(uintptr_t)d_logits + offset, scale, target_rows, begin, end - begin, cols);
    }
    Py_RETURN_NONE;
}

/* The backward loops (factor_bias_grad, factor_bias_grad_bf16) with the rows in blocks of SUM_ROWS, shared among
 * the threads, each block's column sums apart, then the blocks' sums added in block order: the bits depend on the
 * batch, not on the thread count. (Two threads splitting the columns instead write the same cache lines wherever
 * a row's length is not a multiple of 16 floats, which made the loop 6 times slower than on one thread.) Blocks
 * of 32 rows give a batch of 64 a block for each of two threads. */
#define SUM_ROWS 32
typedef struct { /* one loop's operands: float32 d, factor, dt; or bfloat16 d16 (or float32 d32), factor, out */
    int bf16;
    float *d, *dt;
    const float *factor, *d32;
    const uint16_t *d16;
    uint16_t *out;
} Backward;

static void backward_rows(const Backward *a, float *sums, long r0, long r1, long rows, long cols) {
    long at = r0 * cols;
    if (a->bf16)
        factor_bias_grad_bf16(a->d16 ? a->d16 + at : NULL, a->d32 ? a->d32 + at : NULL,
                              a->factor ? a->factor + at : NULL, sums, a->out + at, r1 - r0, cols);
    else
        factor_bias_grad(a->d + at, a->factor ? a->factor + at : NULL, sums, a->dt ? a->dt + r0 : NULL, r1 - r0, cols,
                         rows);
}

static int backward_in_blocks(const Backward *a, float *grad_bias, long rows, long cols) {
    long blocks = rows > SUM_ROWS ? (rows + SUM_ROWS - 1) / SUM_ROWS : 1;
    float *sums = blocks > 1 ? malloc(blocks * cols * sizeof(float)) : grad_bias;
    if (!sums)
        return -1;
#pragma omp parallel if (parallel && blocks > 1 && rows * cols >= PARALLEL_MIN_BACKWARD)
    {
        long begin, end;
        my_share(blocks, &begin, &end);
        for (long b = begin; b < end; b++) {
            long r0 = b * SUM_ROWS, r1 = r0 + SUM_ROWS < rows ? r0 + SUM_ROWS : rows;
            backward_rows(a, sums + b * cols, r0, r1, rows, cols);
        }
    }
    if (blocks > 1) {
        for (long c = 0; c < cols; c++) {
            float total = sums[c];
            for (long b = 1; b < blocks; b++)
                total += sums[b * cols + c];
            grad_bias[c] = total;
        }
        free(sums);
    }
    return 0;
}

static PyObject *py_factor_bias_grad(PyObject *self, PyObject *args) {
    unsigned long long d, factor, grad_bias, dt;
    long rows, cols;
    if (!PyArg_ParseTuple(args, "KKKKll", &d, &factor, &grad_bias, &dt, &rows, &cols))
        return NULL;
    Backward a = {.bf16 = 0, .d = (float *)(uintptr_t)d, .factor = (const float *)(uintptr_t)factor,
                  .dt = (float *)(uintptr_t)dt};
    if (backward_in_blocks(&a, (float *)(uintptr_t)grad_bias, rows, cols))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* factor_bias_grad (d *= factor where factor is not NULL, d summed over the rows into grad_bias), then dx = d W by
 * sgemm where dx is not NULL; 0, or -1 where memory ran out. */
static int linear_backward(float *d, const float *factor, float *grad_bias, const float *w, float *dx, int rows,
                           int in, int out) {
    Backward a = {.bf16 = 0, .d = d, .factor = factor, .dt = NULL};
    if (backward_in_blocks(&a, grad_bias, rows, out))
        return -1;
    if (dx)
        input_grad(d, w, dx, rows, in, out);
    return 0;
}

/* linear_backward(d, factor, grad_bias, w, dx, rows, in, out): linear_backward above, factor and dx 0 for none. */
static PyObject *py_linear_backward(PyObject *self, PyObject *args) {
    unsigned long long d, factor, grad_bias, w, dx;
    int rows, in, out;
    if (!PyArg_ParseTuple(args, "KKKKKiii", &d, &factor, &grad_bias, &w, &dx, &rows, &in, &out))
        return NULL;
    if (!sgemm)
        return PyErr_Format(PyExc_RuntimeError, "linear_backward: no sgemm was set");
    if (linear_backward((float *)(uintptr_t)d, (const float *)(uintptr_t)factor, (float *)(uintptr_t)grad_bias,
                        (const float *)(uintptr_t)w, (float *)(uintptr_t)dx, rows, in, out))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_bernoulli_log_p(PyObject *self, PyObject *args) {
    unsigned long long logits, bias, images, out;
    long n, rows, cols;
    if (!PyArg_ParseTuple(args, "KKKKlll", &logits, &bias, &images, &out, &n, &rows, &cols))
        return NULL;
#pragma omp parallel if (parallel && rows * cols >= PARALLEL_MIN_EXP)
    {
        long begin, end;
        my_share(rows, &begin, &end);
        bernoulli_log_p((const float *)(uintptr_t)logits + begin * cols, (const float *)(uintptr_t)bias,
                        (const float *)(uintptr_t)images, (float *)(uintptr_t)out + begin, n, begin, end - begin,
                        cols);
    }
    Py_RETURN_NONE;
}

static PyObject *py_gaussian_backward(PyObject *self, PyObject *args) {
    unsigned long long gaussian, eps, std, d_z, d_gaussian;
    float inv_batch;
    long rows, dim_z;
    if (!PyArg_ParseTuple(args, "KKKKKfll", &gaussian, &eps, &std, &d_z, &d_gaussian, &inv_batch, &rows, &dim_z))
        return NULL;
    gaussian_backward((const float *)(uintptr_t)gaussian, (const float *)(uintptr_t)eps, (const float *)(uintptr_t)std,
                      (const float *)(uintptr_t)d_z, (float *)(uintptr_t)d_gaussian, inv_batch, rows, dim_z);
    Py_RETURN_NONE;
}

static PyObject *py_gaussian_draws(PyObject *self, PyObject *args) {
    unsigned long long gaussian, eps, z, std, kl, log_ratio;
    long images, k, dim_z;
    if (!PyArg_ParseTuple(args, "KKKKKKlll", &gaussian, &eps, &z, &std, &kl, &log_ratio, &images, &k, &dim_z))
        return NULL;
    gaussian_draws((const float *)(uintptr_t)gaussian, (const float *)(uintptr_t)eps, (float *)(uintptr_t)z,
                   (float *)(uintptr_t)std, (float *)(uintptr_t)kl, (float *)(uintptr_t)log_ratio, images, k, dim_z);
    Py_RETURN_NONE;
}

static PyObject *py_importance_weights(PyObject *self, PyObject *args) {
    unsigned long long log_px, log_ratio, weights, log_mean_w;
    float kl_weight, log_k;
    long images, k;
    if (!PyArg_ParseTuple(args, "KKffKKll", &log_px, &log_ratio, &kl_weight, &log_k, &weights, &log_mean_w, &images,
                          &k))
        return NULL;
    importance_weights((const float *)(uintptr_t)log_px, (const float *)(uintptr_t)log_ratio, kl_weight, log_k,
                       (float *)(uintptr_t)weights, (float *)(uintptr_t)log_mean_w, images, k);
    Py_RETURN_NONE;
}

static PyObject *py_importance_gaussian_backward(PyObject *self, PyObject *args) {
    unsigned long long gaussian, eps, std, z, d_z, weights, d_gaussian;
    long z_cols, images, k, dim_z;
    float kl_weight, scale;
    int dreg;
    if (!PyArg_ParseTuple(args, "KKKKlKKffpKlll", &gaussian, &eps, &std, &z, &z_cols, &d_z, &weights, &kl_weight,
                          &scale, &dreg, &d_gaussian, &images, &k, &dim_z))
        return NULL;
    importance_gaussian_backward((const float *)(uintptr_t)gaussian, (const float *)(uintptr_t)eps,
                                 (const float *)(uintptr_t)std, (const float *)(uintptr_t)z, z_cols,
                                 (const float *)(uintptr_t)d_z, (const float *)(uintptr_t)weights, kl_weight, scale,
                                 dreg, (float *)(uintptr_t)d_gaussian, images, k, dim_z);
    Py_RETURN_NONE;
}

static PyObject *py_splitmix64(PyObject *self, PyObject *args) {
    unsigned long long out, key;
    long n;
    if (!PyArg_ParseTuple(args, "KKl", &out, &key, &n))
        return NULL;
    splitmix64((uint64_t *)(uintptr_t)out, key, n);
    Py_RETURN_NONE;
}

/* Adam on the parameters of one layer, its weight and its bias: (param, grad, exp_avg, exp_avg_sq, n) of each;
 * with a bfloat16 copy of the weight (copy not 0) its gradient is bfloat16 too. */
static PyObject *py_adam(PyObject *self, PyObject *args) {
    unsigned long long t[2][4], copy;
    long n[2];
    float c1, beta2, c2, bc2_sqrt, eps, neg_step_size, weight_decay;
    if (!PyArg_ParseTuple(args, "KKKKlKKKKKlfffffff", &t[0][0], &t[0][1], &t[0][2], &t[0][3], &n[0], &copy,
                          &t[1][0], &t[1][1], &t[1][2], &t[1][3], &n[1], &c1, &beta2, &c2, &bc2_sqrt, &eps,
                          &neg_step_size, &weight_decay))
        return NULL;
    for (int j = 0; j < 2; j++) {
        float *P = (float *)(uintptr_t)t[j][0], *M = (float *)(uintptr_t)t[j][2], *V = (float *)(uintptr_t)t[j][3];
        int bf16 = j == 0 && copy;
        const float *G = bf16 ? NULL : (const float *)(uintptr_t)t[j][1];
        const uint16_t *G16 = bf16 ? (const uint16_t *)(uintptr_t)t[j][1] : NULL;
        uint16_t *P16 = bf16 ? (uint16_t *)(uintptr_t)copy : NULL;
        long size = n[j];
#pragma omp parallel if (parallel && size >= PARALLEL_MIN_ADAM)
        {
            long begin, end;
            my_share((size + 15) / 16, &begin, &end); /* whole cache lines to each thread */
            begin *= 16;
            end = end * 16 < size ? end * 16 : size;
            adam(P + begin, G ? G + begin : NULL, G16 ? G16 + begin : NULL, P16 ? P16 + begin : NULL, M + begin,
                 V + begin, end - begin, c1, beta2, c2, bc2_sqrt, eps, neg_step_size, weight_decay);
        }
    }
    Py_RETURN_NONE;
}

/* Adam's scalars for one step, as kernels.adam_scalars computes them. */
typedef struct {
    float c1, beta2, c2, bc2_sqrt, eps, neg_step_size, weight_decay;
} AdamScalars;

/* The weight gradient of one layer, d' x, and Adam's update of its weight and bias (the bias's gradient already
 * summed), as weight_grad_adam_tiles above: (d, x, rows, weight, exp_avg, exp_avg_sq, out, in) and (bias, grad_bias,
 * exp_avg, exp_avg_sq) of `out` elements, and whether to take the narrow tiles (AVX2's) or the wide (AVX-512's).
 * Threads take whole tiles of the weight's rows. */
static void weight_grad_adam(const float *d, const float *x, long rows, float *w, float *mw, float *vw, long out,
                             long in, float *b, const float *gb, float *mb, float *vb, int narrow,
                             const AdamScalars *s) {
    long tile_rows = WG_TILE_ROWS(narrow), tiles = (out + tile_rows - 1) / tile_rows;
#pragma omp parallel if (parallel && tiles > 1 && rows * out * in >= PARALLEL_MIN)
    {
        long begin, end;
        my_share(tiles, &begin, &end);
        end = end * tile_rows < out ? end * tile_rows : out;
        (narrow ? weight_grad_adam_narrow : weight_grad_adam_wide)(d, x, rows, out, in, begin * tile_rows, end, w, mw,
                                                                   vw, s->c1, s->beta2, s->c2, s->bc2_sqrt, s->eps,
                                                                   s->neg_step_size, s->weight_decay);
    }
    adam(b, gb, NULL, NULL, mb, vb, out, s->c1, s->beta2, s->c2, s->bc2_sqrt, s->eps, s->neg_step_size,
         s->weight_decay);
}

/* weight_grad_adam(d, x, rows, weight, exp_avg, exp_avg_sq, out, in, bias, grad_bias, exp_avg, exp_avg_sq, narrow,
 * *scalars): weight_grad_adam above. */
static PyObject *py_weight_grad_adam(PyObject *self, PyObject *args) {
    unsigned long long d, x, w, mw, vw, b, gb, mb, vb;
    long rows, out, in;
    AdamScalars s;
    int narrow;
    if (!PyArg_ParseTuple(args, "KKlKKKllKKKKpfffffff", &d, &x, &rows, &w, &mw, &vw, &out, &in, &b, &gb, &mb, &vb,
                          &narrow, &s.c1, &s.beta2, &s.c2, &s.bc2_sqrt, &s.eps, &s.neg_step_size, &s.weight_decay))
        return NULL;
    if (rows > WG_MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "weight_grad_adam takes at most %d rows, not %ld", WG_MAX_ROWS, rows);
        return NULL;
    }
    weight_grad_adam((const float *)(uintptr_t)d, (const float *)(uintptr_t)x, rows, (float *)(uintptr_t)w,
                     (float *)(uintptr_t)mw, (float *)(uintptr_t)vw, out, in, (float *)(uintptr_t)b,
                     (const float *)(uintptr_t)gb, (float *)(uintptr_t)mb, (float *)(uintptr_t)vb, narrow, &s);
    Py_RETURN_NONE;
}

/* ---- A whole MLP in one call: a small batch's step is then a few calls from Python, where a call for each layer
 * cost about as much as the layers' own loops. Each layer comes as a tuple of addresses (and sizes) that
 * kernels.MLPInOneCall gathers once for a run's buffers and checks; the work is the layer-by-layer calls', in their
 * order, so the bits are theirs. */

/* mlp_forward(layers, x, keys): for each hidden layer (kind, w, bias, h, factor, threshold, scale, rows, in, out),
 * linear_activation (its dropout from its key in `keys`, None for none); x is the first layer's input, each
 * layer's h the next's. */
static PyObject *py_mlp_forward(PyObject *self, PyObject *args) {
    PyObject *layers, *keys;
    unsigned long long x;
    if (!PyArg_ParseTuple(args, "O!KO!", &PyTuple_Type, &layers, &x, &PyTuple_Type, &keys))
        return NULL;
    if (!sgemm)
        return PyErr_Format(PyExc_RuntimeError, "mlp_forward: no sgemm was set");
    if (PyTuple_GET_SIZE(keys) != PyTuple_GET_SIZE(layers))
        return PyErr_Format(PyExc_ValueError, "mlp_forward: a key for each layer, or None");
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(layers); j++) {
        unsigned long long w, bias, h, factor, key = 0;
        int kind, threshold, rows, in, out;
        float scale;
        PyObject *layer = PyTuple_GET_ITEM(layers, j), *key_object = PyTuple_GET_ITEM(keys, j);
        if (!PyArg_ParseTuple(layer, "iKKKKifiii", &kind, &w, &bias, &h, &factor, &threshold, &scale, &rows, &in, &out))
            return NULL;
        if (kind != ELU && kind != TANH && kind != RELU)
            return PyErr_Format(PyExc_ValueError, "mlp_forward: no activation %d", kind);
        if (key_object != Py_None && (key = PyLong_AsUnsignedLongLong(key_object)) == (unsigned long long)-1
            && PyErr_Occurred())
            return NULL;
        if (linear_activation(kind, x, w, h, bias, factor, key_object != Py_None, key, threshold, scale, rows, in, out))
            return PyErr_NoMemory();
        x = h;
    }
    Py_RETURN_NONE;
}

/* One layer of mlp_backward: its parameters, gradient buffer and Adam's moments, its factor (0: the last layer's,
 * none), its input (0: the first layer's, given apart), and its d, the input gradient of the layer after it (0: the
 * last's). */
typedef struct {
    unsigned long long w, b, gb, mw, vw, mb, vb, factor, input, d;
    int rows, in, out;
} MLPLayer;

/* mlp_backward(layers, d, x, dx, narrow, *scalars): back through an MLP from d, d(loss)/d(its output), each layer of
 * `layers` a tuple (w, bias, grad_bias, exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b, factor, input, d, rows,
 * in, out) as MLPLayer, from the last: linear_backward, whose input gradient goes to the d of the layer before (or
 * to `dx`, where not 0, from the first), then weight_grad_adam on the layer's input (`x` for the first). */
static PyObject *py_mlp_backward(PyObject *self, PyObject *args) {
    PyObject *layers;
    unsigned long long d_out, x, dx;
    int narrow;
    AdamScalars s;
    if (!PyArg_ParseTuple(args, "O!KKKpfffffff", &PyTuple_Type, &layers, &d_out, &x, &dx, &narrow, &s.c1, &s.beta2,
                          &s.c2, &s.bc2_sqrt, &s.eps, &s.neg_step_size, &s.weight_decay))
        return NULL;
    if (!sgemm)
        return PyErr_Format(PyExc_RuntimeError, "mlp_backward: no sgemm was set");
    Py_ssize_t n = PyTuple_GET_SIZE(layers);
    MLPLayer *l = PyMem_Calloc(n > 0 ? n : 1, sizeof(MLPLayer));
    if (!l)
        return PyErr_NoMemory();
    for (Py_ssize_t j = 0; j < n; j++) {
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(layers, j), "KKKKKKKKKKiii", &l[j].w, &l[j].b, &l[j].gb, &l[j].mw,
                              &l[j].vw, &l[j].mb, &l[j].vb, &l[j].factor, &l[j].input, &l[j].d, &l[j].rows, &l[j].in,
                              &l[j].out)) {
            PyMem_Free(l);
            return NULL;
        }
        if (l[j].rows > WG_MAX_ROWS) {
            PyMem_Free(l);
            return PyErr_Format(PyExc_ValueError, "mlp_backward takes at most %d rows, not %d", WG_MAX_ROWS,
                                l[j].rows);
        }
    }
    if (n > 0) {
        l[n - 1].d = d_out;
        l[0].input = x;
    }
    for (Py_ssize_t j = n - 1; j >= 0; j--) {
        if (linear_backward((float *)(uintptr_t)l[j].d, (const float *)(uintptr_t)l[j].factor,
                            (float *)(uintptr_t)l[j].gb, (const float *)(uintptr_t)l[j].w,
                            (float *)(uintptr_t)(j > 0 ? l[j - 1].d : dx), l[j].rows, l[j].in, l[j].out)) {
            PyMem_Free(l);
            return PyErr_NoMemory();
        }
        weight_grad_adam((const float *)(uintptr_t)l[j].d, (const float *)(uintptr_t)l[j].input, l[j].rows,
                         (float *)(uintptr_t)l[j].w, (float *)(uintptr_t)l[j].mw, (float *)(uintptr_t)l[j].vw, l[j].out,
                         l[j].in, (float *)(uintptr_t)l[j].b, (const float *)(uintptr_t)l[j].gb,
                         (float *)(uintptr_t)l[j].mb, (float *)(uintptr_t)l[j].vb, narrow, &s);
    }
    PyMem_Free(l);
    Py_RETURN_NONE;
}

static PyObject *py_factor_bias_grad_bf16(PyObject *self, PyObject *args) {
    unsigned long long d16, d32, factor, grad_bias, out;
    long rows, cols;
    if (!PyArg_ParseTuple(args, "KKKKKll", &d16, &d32, &factor, &grad_bias, &out, &rows, &cols))
        return NULL;
    Backward a = {.bf16 = 1, .d16 = (const uint16_t *)(uintptr_t)d16, .d32 = (const float *)(uintptr_t)d32,
                  .factor = (const float *)(uintptr_t)factor, .out = (uint16_t *)(uintptr_t)out};
    if (backward_in_blocks(&a, (float *)(uintptr_t)grad_bias, rows, cols))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The ELBO's terms of a batch from each image's log p(x|z) and KL, as kernels.elbo_terms says: [-ELBO,
 * -log p(x|z), KL, kl_weight KL - log p(x|z)], batch means, each sum in row order; the arithmetic of the
 * torch ops it replaces, in float32. */
static PyObject *py_elbo_terms(PyObject *self, PyObject *args) {
    unsigned long long log_px, kl, out;
    long rows;
    float kl_weight;
    if (!PyArg_ParseTuple(args, "KKlfK", &log_px, &kl, &rows, &kl_weight, &out))
        return NULL;
    const float *l = (const float *)(uintptr_t)log_px, *k = (const float *)(uintptr_t)kl;
    float *terms = (float *)(uintptr_t)out, reconstruction = 0.0f, divergence = 0.0f;
    for (long r = 0; r < rows; r++) {
        reconstruction += l[r];
        divergence += k[r];
    }
    reconstruction /= (float)rows;
    divergence /= (float)rows;
    terms[0] = divergence - reconstruction;
    terms[1] = -reconstruction;
    terms[2] = divergence;
    terms[3] = kl_weight == 1.0f ? divergence - reconstruction : kl_weight * divergence - reconstruction;
    Py_RETURN_NONE;
}

/* [v, one_hot(label)] row by row, as torch.cat([v, one_hot(labels, n_classes)], 1) gives it: the input of a
 * conditional model's first layers. Row r takes label r % images, the layout of K draws per image. Labels
 * out of range raise ValueError, as one_hot's do. */
static PyObject *py_with_labels(PyObject *self, PyObject *args) {
    unsigned long long v, labels, out;
    long rows, cols, images, n_classes;
    if (!PyArg_ParseTuple(args, "KKKllll", &v, &labels, &out, &rows, &cols, &images, &n_classes))
        return NULL;
    const float *x = (const float *)(uintptr_t)v;
    const int64_t *y = (const int64_t *)(uintptr_t)labels;
    float *o = (float *)(uintptr_t)out;
    for (long i = 0; i < images && i < rows; i++)
        if (y[i] < 0 || y[i] >= n_classes) {
            PyErr_Format(PyExc_ValueError, "a label is %lld, not one of the %ld classes 0 to %ld", (long long)y[i],
                         n_classes, n_classes - 1);
            return NULL;
        }
    for (long r = 0; r < rows; r++) {
        float *row = o + r * (cols + n_classes);
        memcpy(row, x + r * cols, (size_t)cols * sizeof(float));
        memset(row + cols, 0, (size_t)n_classes * sizeof(float));
        row[cols + y[r % images]] = 1.0f;
    }
    Py_RETURN_NONE;
}

/* How far apart two of torch's threads run: the mean time, in nanoseconds, for a write by one to reach the other,
 * from `trips` round trips of one cache line between two threads of one parallel region; 0 where there are not
 * two (no OpenMP, set_parallel(0), or the runtime gave one thread). On a virtual machine the host may run its two
 * CPUs on cores that share a last-level cache or on cores of two dies, and move them between the two from one
 * moment to the next: then every line one thread writes and the other reads crosses between the dies. */
static PyObject *py_core_distance(PyObject *self, PyObject *args) {
    long trips;
    if (!PyArg_ParseTuple(args, "l", &trips))
        return NULL;
    double ns = 0.0;
#ifdef _OPENMP
    static _Alignas(64) volatile long ball; /* whose turn: an odd value is the second thread's */
    static _Alignas(64) volatile int ready;
    if (parallel && trips > 0) {
        ball = 0;
        ready = 0;
#pragma omp parallel num_threads(2)
        if (omp_get_num_threads() == 2) {
            int me = omp_get_thread_num();
            __atomic_add_fetch(&ready, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&ready, __ATOMIC_ACQUIRE) < 2)
                ;
            double start = omp_get_wtime();
            for (long i = 0; i < 2 * trips; i += 2) {
                long mine = i + me;
                while (__atomic_load_n(&ball, __ATOMIC_ACQUIRE) != mine)
                    ;
                __atomic_store_n(&ball, mine + 1, __ATOMIC_RELEASE);
            }
            if (me == 0)
                ns = (omp_get_wtime() - start) * 1e9 / (2.0 * trips);
        }
    }
#endif
    return PyFloat_FromDouble(ns);
}

static PyObject *py_set_sgemm(PyObject *self, PyObject *args) {
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address))
        return NULL;
    sgemm = (sgemm_fn)(uintptr_t)address;
    Py_RETURN_NONE;
}

static PyObject *py_set_parallel(PyObject *self, PyObject *args) {
    if (!PyArg_ParseTuple(args, "p", &parallel))
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"core_distance", py_core_distance, METH_VARARGS, "core_distance(trips): ns for a write to pass between two threads"},
    {"set_parallel", py_set_parallel, METH_VARARGS, "set_parallel(flag): whether big loops may use several threads"},
    {"set_sgemm", py_set_sgemm, METH_VARARGS, "set_sgemm(address): the BLAS sgemm_ that torch.mm calls, or 0"},
    {"linear_activation", py_linear_activation, METH_VARARGS,
     "linear_activation(kind, x, w, a, bias, factor, masked, key, threshold, scale, rows, in, out)"},
    {"linear_backward", py_linear_backward, METH_VARARGS, "linear_backward(d, factor, grad_bias, w, dx, rows, in, out)"},
    {"elu_dropout", py_elu_dropout, METH_VARARGS, "elu_dropout(a, a16, h16, bias, factor, masked, key, threshold, scale, rows, cols)"},
    {"tanh_dropout", py_tanh_dropout, METH_VARARGS, "tanh_dropout(a, a16, h16, bias, factor, masked, key, threshold, scale, rows, cols)"},
    {"relu_dropout", py_relu_dropout, METH_VARARGS, "relu_dropout(a, a16, h16, bias, factor, masked, key, threshold, scale, rows, cols)"},
    {"bernoulli_loss", py_bernoulli_loss, METH_VARARGS,
     "bernoulli_loss(logits, bias, target, rows_out, d_logits, scale, target_rows, rows, cols)"},
    {"factor_bias_grad", py_factor_bias_grad, METH_VARARGS, "factor_bias_grad(d, factor or 0, grad_bias, dt or 0, rows, cols)"},
    {"factor_bias_grad_bf16", py_factor_bias_grad_bf16, METH_VARARGS,
     "factor_bias_grad_bf16(d16, d32, factor, grad_bias, out, rows, cols)"},
    {"bernoulli_log_p", py_bernoulli_log_p, METH_VARARGS, "bernoulli_log_p(logits, bias, images, out, n, rows, cols)"},
    {"gaussian_backward", py_gaussian_backward, METH_VARARGS,
     "gaussian_backward(gaussian, eps, std, d_z, d_gaussian, inv_batch, rows, dim_z)"},
    {"gaussian_draws", py_gaussian_draws, METH_VARARGS,
     "gaussian_draws(gaussian, eps, z, std, kl, log_ratio, images, k, dim_z)"},
    {"importance_weights", py_importance_weights, METH_VARARGS,
     "importance_weights(log_px, log_ratio, kl_weight, log_k, weights, log_mean_w, images, k)"},
    {"importance_gaussian_backward", py_importance_gaussian_backward, METH_VARARGS,
     "importance_gaussian_backward(gaussian, eps, std, z, z_cols, d_z, weights, kl_weight, scale, dreg, d_gaussian, "
     "images, k, dim_z)"},
    {"weight_grad_adam", py_weight_grad_adam, METH_VARARGS,
     "weight_grad_adam(d, x, rows, weight, exp_avg, exp_avg_sq, out, in, bias, grad_bias, exp_avg, exp_avg_sq, narrow, "
     "*scalars)"},
    {"mlp_forward", py_mlp_forward, METH_VARARGS, "mlp_forward(layers, x, keys): an MLP's hidden layers"},
    {"mlp_backward", py_mlp_backward, METH_VARARGS, "mlp_backward(layers, d, x, dx, narrow, *scalars): back through an "
     "MLP, with Adam's update"},
    {"adam", py_adam, METH_VARARGS,
     "adam(weight, grad, exp_avg, exp_avg_sq, n, bfloat16 copy or 0, bias, grad, exp_avg, exp_avg_sq, n, 1 - beta1, "
     "beta2, 1 - beta2, "
     "sqrt(bias_correction2), eps, -lr / bias_correction1, weight_decay)"},
    {"with_labels", py_with_labels, METH_VARARGS, "with_labels(v, labels, out, rows, cols, images, n_classes)"},
    {"elbo_terms", py_elbo_terms, METH_VARARGS, "elbo_terms(log_px, kl, rows, kl_weight, out)"},
    {"splitmix64", py_splitmix64, METH_VARARGS, "splitmix64(out, key, n)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU loops of the training step.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef _OPENMP
    int openmp = 1;
#else
    int openmp = 0;
#endif
    if (m && (PyModule_AddIntConstant(m, "openmp", openmp) < 0 /* 1: the big loops use torch's threads */
              || PyModule_AddIntConstant(m, "weight_grad_adam_rows", WG_MAX_ROWS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
