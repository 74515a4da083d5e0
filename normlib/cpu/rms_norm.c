/*
 * Fused RMSNorm for the CPU: forward (optionally with the residual add) and backward, each one
 * pass over memory per row. Compiled on first use by normlib/cpu/native.py and called through
 * ctypes; the math and its symbols (rstd, c1) are those of normlib/rms_norm.py:
 *
 *   rstd = 1 / sqrt(mean_j(x_j^2) + eps)        y_j = x_j * rstd * gamma_j
 *   wdy_j = gamma_j * dy_j                      c1 = mean_j(x_j * rstd * wdy_j)
 *   dx_j = rstd * (wdy_j - x_j * rstd * c1)     dgamma_j = sum over rows of dy_j * x_j * rstd
 *
 * Every input is a contiguous (rows, n) array of one storage type (float32, bfloat16 or float16);
 * all arithmetic is float32, and values are rounded to the storage type once, when stored.
 * gamma arrives as float32 (the caller converts the small weight once).
 *
 * Why each row is walked twice: the statistics (rstd, c1) need the whole row before the first
 * output can be written. A row is at most a few tens of KiB, so the second walk reads it from the
 * L1/L2 cache, and main memory sees each byte once.
 *
 * Threads: the rows are split into equal contiguous ranges, one per thread (pthreads, created per
 * call; the caller asks for one thread when the work is too small to repay ~20 us of thread
 * start-up). Each thread accumulates dgamma over its rows into its own row of `dgamma_parts`, so
 * the sum is deterministic for a given thread count and needs no atomics.
 */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 64

/* ---- storage types: load as float32, store rounded ------------------------------------------ */

typedef uint16_t bf16_t; /* the upper half of a float32 */

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline void store_f32(float *p, int64_t i, float v) { p[i] = v; }

static inline float load_bf16(const bf16_t *p, int64_t i) {
    uint32_t bits = (uint32_t)p[i] << 16;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}
static inline void store_bf16(bf16_t *p, int64_t i, float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    /* round to nearest, ties to even, as torch does; a NaN stays a (quiet) NaN */
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (bits >> 16) | 0x40u;
    p[i] = (bf16_t)(((bits & 0x7FFFFFFFu) > 0x7F800000u) ? quiet_nan : rounded);
}

/* _Float16 needs GCC >= 12 or Clang >= 15 on x86-64; older compilers build without float16, and
 * normlib_has_float16() tells Python to send float16 to the PyTorch fallback. */
#ifdef __FLT16_MAX__
#define HAVE_FLOAT16 1
static inline float load_f16(const _Float16 *p, int64_t i) { return (float)p[i]; }
static inline void store_f16(_Float16 *p, int64_t i, float v) { p[i] = (_Float16)v; }
#else
#define HAVE_FLOAT16 0
#endif

/* ---- threads ---------------------------------------------------------------------------------- */

typedef void (*rows_fn)(const void *args, int64_t row_begin, int64_t row_end, int thread);

typedef struct {
    rows_fn fn;
    const void *args;
    int64_t row_begin, row_end;
    int thread;
} task_t;

static void *run_task(void *p) {
    task_t *t = (task_t *)p;
    t->fn(t->args, t->row_begin, t->row_end, t->thread);
    return NULL;
}

/* Runs fn over rows [0, rows) split across `threads` threads; returns the number used. */
static int parallel_rows(rows_fn fn, const void *args, int64_t rows, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    task_t tasks[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        tasks[t] = (task_t){fn, args, rows * t / threads, rows * (t + 1) / threads, t};
    }
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&handles[t], NULL, run_task, &tasks[t]) == 0;
    }
    run_task(&tasks[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(handles[t], NULL);
        else run_task(&tasks[t]); /* could not start a thread: do its rows here */
    }
    return threads;
}

/* ---- kernels, written once and instantiated per storage type -------------------------------- */

typedef struct {
    const void *x;        /* (rows, n) input */
    const void *residual; /* (rows, n) or NULL: if given, h = x + residual is normalized */
    void *h;              /* (rows, n) output h, or NULL */
    const float *gamma;   /* (n,) weight as float32; all ones when the op has no weight */
    void *y;              /* (rows, n) output */
    float *rstd;          /* (rows,) output, saved for the backward */
    int64_t n;            /* row length */
    float eps;
} forward_args_t;

typedef struct {
    const void *dy;      /* (rows, n) gradient of y */
    const void *dh;      /* (rows, n) gradient arriving on h, or NULL */
    const void *x;       /* (rows, n) what was normalized (x, or h for the residual op) */
    const float *rstd;   /* (rows,) from the forward */
    const float *gamma;  /* (n,) float32 */
    void *dx;            /* (rows, n) output, or NULL when no input needs a gradient */
    float *dgamma_parts; /* (threads, n) zero-filled, or NULL when the weight needs no gradient */
    int64_t n;
} backward_args_t;

#define DEFINE_KERNELS(T, SUFFIX)                                                                  \
    static void forward_rows_##SUFFIX(const void *p, int64_t begin, int64_t end, int thread) {    \
        (void)thread;                                                                               \
        const forward_args_t *a = (const forward_args_t *)p;                                      \
        const int64_t n = a->n;                                                                     \
        for (int64_t row = begin; row < end; row++) {                                               \
            const T *x = (const T *)a->x + row * n;                                                 \
            T *y = (T *)a->y + row * n;                                                             \
            if (a->residual) { /* h is rounded to the storage type before its statistics */        \
                const T *res = (const T *)a->residual + row * n;                                   \
                T *h = (T *)a->h + row * n;                                                         \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                \
                    store_##SUFFIX(h, j, load_##SUFFIX(x, j) + load_##SUFFIX(res, j));              \
                x = h;                                                                              \
            }                                                                                       \
            float sum_squares = 0.0f;                                                               \
            _Pragma("omp simd reduction(+ : sum_squares)") for (int64_t j = 0; j < n; j++) {       \
                float v = load_##SUFFIX(x, j);                                                      \
                sum_squares += v * v;                                                               \
            }                                                                                       \
            float rstd = 1.0f / sqrtf(sum_squares / (float)n + a->eps);                             \
            a->rstd[row] = rstd;                                                                    \
            _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                    \
                store_##SUFFIX(y, j, load_##SUFFIX(x, j) * rstd * a->gamma[j]);                     \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    static void backward_rows_##SUFFIX(const void *p, int64_t begin, int64_t end, int thread) {   \
        const backward_args_t *a = (const backward_args_t *)p;                                     \
        const int64_t n = a->n;                                                                     \
        float *dgamma = a->dgamma_parts ? a->dgamma_parts + (int64_t)thread * n : NULL;            \
        for (int64_t row = begin; row < end; row++) {                                               \
            const T *x = (const T *)a->x + row * n;                                                 \
            const T *dy = (const T *)a->dy + row * n;                                               \
            const float rstd = a->rstd[row];                                                        \
            /* one walk for both row sums: dgamma's contribution and sum_j x_j * wdy_j */           \
            float dot = 0.0f; /* sum_j x_j * wdy_j = n * c1 / rstd */                               \
            if (dgamma) {                                                                           \
                _Pragma("omp simd reduction(+ : dot)") for (int64_t j = 0; j < n; j++) {           \
                    const float x_dy = load_##SUFFIX(x, j) * load_##SUFFIX(dy, j);                  \
                    dgamma[j] += x_dy * rstd;                                                       \
                    dot += x_dy * a->gamma[j];                                                      \
                }                                                                                   \
            } else if (a->dx) {                                                                     \
                _Pragma("omp simd reduction(+ : dot)") for (int64_t j = 0; j < n; j++)             \
                    dot += load_##SUFFIX(x, j) * a->gamma[j] * load_##SUFFIX(dy, j);                \
            }                                                                                       \
            if (!a->dx) continue;                                                                   \
            /* dx_j = rstd * wdy_j - x_j * rstd^2 * c1, and rstd^2 * c1 = rstd^3 * dot / n */       \
            const float x_coefficient = rstd * rstd * rstd * dot / (float)n;                        \
            T *dx = (T *)a->dx + row * n;                                                           \
            if (a->dh) {                                                                            \
                const T *dh = (const T *)a->dh + row * n;                                           \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                \
                    store_##SUFFIX(dx, j, rstd * a->gamma[j] * load_##SUFFIX(dy, j)                 \
                                              - x_coefficient * load_##SUFFIX(x, j)                 \
                                              + load_##SUFFIX(dh, j));                              \
            } else {                                                                                \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                \
                    store_##SUFFIX(dx, j, rstd * a->gamma[j] * load_##SUFFIX(dy, j)                 \
                                              - x_coefficient * load_##SUFFIX(x, j));               \
            }                                                                                       \
        }                                                                                           \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(bf16_t, bf16)
#if HAVE_FLOAT16
DEFINE_KERNELS(_Float16, f16)
#else
#define forward_rows_f16 forward_rows_f32 /* never picked: Python checks normlib_has_float16() */
#define backward_rows_f16 backward_rows_f32
#endif

/* ---- entry points (ctypes) ------------------------------------------------------------------ */

enum { STORAGE_F32 = 0, STORAGE_BF16 = 1, STORAGE_F16 = 2 };

static rows_fn pick(int storage, rows_fn f32, rows_fn bf16, rows_fn f16) {
    return storage == STORAGE_F32 ? f32 : storage == STORAGE_BF16 ? bf16 : f16;
}

int normlib_has_float16(void) { return HAVE_FLOAT16; }

int normlib_rms_norm_forward(int storage, const void *x, const void *residual, void *h,
                             const float *gamma, void *y, float *rstd, int64_t rows, int64_t n,
                             float eps, int threads) {
    forward_args_t args = {x, residual, h, gamma, y, rstd, n, eps};
    rows_fn fn = pick(storage, forward_rows_f32, forward_rows_bf16, forward_rows_f16);
    return parallel_rows(fn, &args, rows, threads);
}

/* Returns the number of threads used: the caller sums that many rows of dgamma_parts. */
int normlib_rms_norm_backward(int storage, const void *dy, const void *dh, const void *x,
                              const float *rstd, const float *gamma, void *dx, float *dgamma_parts,
                              int64_t rows, int64_t n, int threads) {
    backward_args_t args = {dy, dh, x, rstd, gamma, dx, dgamma_parts, n};
    rows_fn fn = pick(storage, backward_rows_f32, backward_rows_bf16, backward_rows_f16);
    return parallel_rows(fn, &args, rows, threads);
}
