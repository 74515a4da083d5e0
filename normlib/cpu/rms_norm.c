/*
 * Fused RMSNorm for the CPU: forward (optionally with the residual add) and backward, each one
 * pass over memory per row. normlib/cpu/native.py compiles this file on first use into the Python
 * extension `_rms_norm`; _kernels.h holds what it shares with layer_norm.c (storage types,
 * threads, argument conversion). The math and its symbols (rstd, c1) are those of
 * normlib/rms_norm.py:
 *
 *   rstd = 1 / sqrt(mean_j(x_j^2) + eps)        y_j = x_j * rstd * gamma_j
 *   wdy_j = gamma_j * dy_j                      c1 = mean_j(x_j * rstd * wdy_j)
 *   dx_j = rstd * (wdy_j - x_j * rstd * c1)     dgamma_j = sum over rows of dy_j * x_j * rstd
 *
 * Every tensor is a contiguous (rows, n) or (n,) array of one storage type (float32, bfloat16 or
 * float16). All arithmetic is float32, and values are rounded to the storage type once, when
 * stored.
 *
 * Why each row is walked twice: the statistics (rstd, c1) need the whole row before the first
 * output can be written. A row is at most a few tens of KiB, so the second walk reads it from the
 * L1/L2 cache, and main memory sees each byte once.
 */

#include "_kernels.h"

/* ---- kernels, written once and instantiated per storage type -------------------------------- */

typedef struct {
    const void *x;        /* (rows, n) input */
    const void *residual; /* (rows, n) or NULL: if given, h = x + residual is normalized */
    void *h;              /* (rows, n) output h, or NULL */
    const void *gamma;    /* (n,) weight; all ones when the op has no weight */
    void *y;              /* (rows, n) output */
    int64_t n;            /* row length */
    float eps;
} forward_args_t;

typedef struct {
    const void *dy;      /* (rows, n) gradient of y */
    const void *dh;      /* (rows, n) gradient arriving on h, or NULL */
    const void *x;       /* (rows, n) what was normalized (x, or h for the residual op) */
    const void *gamma;   /* (n,) */
    void *dx;            /* (rows, n) output, or NULL when no input needs a gradient */
    float *dgamma_parts; /* (threads, n) zero-filled float32 sums, or NULL: no gradient for gamma */
    int64_t n;
    float eps;
} backward_args_t;

/* The backward recomputes rstd from x instead of reading one saved by the forward: the sum of
 * squares rides along in the walk that computes sum_j x_j * wdy_j, so it costs no memory traffic,
 * and the forward then allocates nothing but its outputs (on small tensors an allocation costs
 * about a microsecond, a third of PyTorch's whole LayerNorm call). */
#define DEFINE_KERNELS(T, SUFFIX)                                                                  \
    static void forward_rows_##SUFFIX(const void *p, int64_t begin, int64_t end, int thread) {    \
        (void)thread;                                                                               \
        const forward_args_t *a = (const forward_args_t *)p;                                      \
        const int64_t n = a->n;                                                                     \
        const T *gamma = (const T *)a->gamma;                                                       \
        for (int64_t row = begin; row < end; row++) {                                               \
            const T *x = (const T *)a->x + row * n;                                                 \
            T *y = (T *)a->y + row * n;                                                             \
            float sum_squares = 0.0f;                                                               \
            if (a->residual) { /* h is rounded to the storage type before its statistics */        \
                const T *res = (const T *)a->residual + row * n;                                   \
                T *h = (T *)a->h + row * n;                                                         \
                _Pragma("omp simd reduction(+ : sum_squares)") for (int64_t j = 0; j < n; j++) {   \
                    store_##SUFFIX(h, j, load_##SUFFIX(x, j) + load_##SUFFIX(res, j));              \
                    const float v = load_##SUFFIX(h, j);                                            \
                    sum_squares += v * v;                                                           \
                }                                                                                   \
                x = h;                                                                              \
            } else {                                                                                \
                _Pragma("omp simd reduction(+ : sum_squares)") for (int64_t j = 0; j < n; j++) {   \
                    const float v = load_##SUFFIX(x, j);                                            \
                    sum_squares += v * v;                                                           \
                }                                                                                   \
            }                                                                                       \
            float rstd = 1.0f / sqrtf(sum_squares / (float)n + a->eps);                             \
            _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                    \
                store_##SUFFIX(y, j, load_##SUFFIX(x, j) * rstd * load_##SUFFIX(gamma, j));         \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    static void backward_rows_##SUFFIX(const void *p, int64_t begin, int64_t end, int thread) {   \
        const backward_args_t *a = (const backward_args_t *)p;                                     \
        const int64_t n = a->n;                                                                     \
        const T *gamma = (const T *)a->gamma;                                                       \
        float *dgamma = a->dgamma_parts ? a->dgamma_parts + (int64_t)thread * n : NULL;            \
        for (int64_t row = begin; row < end; row++) {                                               \
            const T *x = (const T *)a->x + row * n;                                                 \
            const T *dy = (const T *)a->dy + row * n;                                               \
            const T *dh = a->dh ? (const T *)a->dh + row * n : NULL;                                \
            T *dx = a->dx ? (T *)a->dx + row * n : NULL;                                            \
            /* walk 1: both row sums, sum_j x_j^2 (for rstd) and dot = sum_j x_j * wdy_j */         \
            float sum_squares = 0.0f, dot = 0.0f;                                                   \
            _Pragma("omp simd reduction(+ : sum_squares, dot)") for (int64_t j = 0; j < n; j++) {  \
                const float v = load_##SUFFIX(x, j);                                                \
                sum_squares += v * v;                                                               \
                dot += v * load_##SUFFIX(gamma, j) * load_##SUFFIX(dy, j);                          \
            }                                                                                       \
            const float rstd = 1.0f / sqrtf(sum_squares / (float)n + a->eps);                       \
            /* walk 2: dx_j = rstd * wdy_j - x_j * rstd^2 * c1, with rstd^2 * c1 = rstd^3 dot / n, \
             * and this row's share of dgamma_j, dy_j * x_j * rstd */                              \
            const float x_coefficient = rstd * rstd * rstd * dot / (float)n;                        \
            if (dx && dgamma && dh) {                                                               \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++) {                              \
                    const float v = load_##SUFFIX(x, j), d = load_##SUFFIX(dy, j);                  \
                    dgamma[j] += v * d * rstd;                                                      \
                    store_##SUFFIX(dx, j, rstd * load_##SUFFIX(gamma, j) * d - x_coefficient * v    \
                                              + load_##SUFFIX(dh, j));                              \
                }                                                                                   \
            } else if (dx && dgamma) {                                                              \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++) {                              \
                    const float v = load_##SUFFIX(x, j), d = load_##SUFFIX(dy, j);                  \
                    dgamma[j] += v * d * rstd;                                                      \
                    store_##SUFFIX(dx, j, rstd * load_##SUFFIX(gamma, j) * d - x_coefficient * v);  \
                }                                                                                   \
            } else if (dx && dh) {                                                                  \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++) {                              \
                    const float v = load_##SUFFIX(x, j), d = load_##SUFFIX(dy, j);                  \
                    store_##SUFFIX(dx, j, rstd * load_##SUFFIX(gamma, j) * d - x_coefficient * v    \
                                              + load_##SUFFIX(dh, j));                              \
                }                                                                                   \
            } else if (dx) {                                                                        \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++) {                              \
                    const float v = load_##SUFFIX(x, j), d = load_##SUFFIX(dy, j);                  \
                    store_##SUFFIX(dx, j, rstd * load_##SUFFIX(gamma, j) * d - x_coefficient * v);  \
                }                                                                                   \
            } else if (dgamma) {                                                                    \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                \
                    dgamma[j] += load_##SUFFIX(x, j) * load_##SUFFIX(dy, j) * rstd;                 \
            }                                                                                       \
        }                                                                                           \
    }

INSTANTIATE_KERNELS(DEFINE_KERNELS)

/* forward(storage, x, residual, h, gamma, y, rows, n, eps, threads) -> threads used */
static PyObject *py_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[10];
    double eps = 0.0;
    if (convert(args, nargs, 10, 8, "forward", v, &eps) < 0) return NULL;
    forward_args_t a = {POINTER(v[1]), POINTER(v[2]), POINTER(v[3]), POINTER(v[4]), POINTER(v[5]),
                        v[7], (float)eps};
    rows_fn fn = pick((long)v[0], forward_rows_f32, forward_rows_bf16, forward_rows_f16);
    return PyLong_FromLong(run(fn, &a, v[6], v[7], (int)v[9]));
}

/* backward(storage, dy, dh, x, gamma, dx, dgamma, rows, n, eps, threads) -> threads used;
 * dgamma (n,) is written in the storage type, from float32 sums kept per thread. */
static PyObject *py_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[11];
    double eps = 0.0;
    if (convert(args, nargs, 11, 9, "backward", v, &eps) < 0) return NULL;
    backward_args_t a = {POINTER(v[1]), POINTER(v[2]), POINTER(v[3]), POINTER(v[4]),
                         POINTER(v[5]), NULL, v[8], (float)eps};
    const long storage = (long)v[0];
    rows_fn fn = pick(storage, backward_rows_f32, backward_rows_bf16, backward_rows_f16);
    void *const outputs[1] = {POINTER(v[6])};
    return run_with_sums(fn, &a, &a.dgamma_parts, storage, outputs, 1, v[7], v[8], (int)v[10]);
}

DEFINE_MODULE(_rms_norm, "RMSNorm")
