/*
 * Fused residual add + LayerNorm for the CPU, forward and backward, each one pass over memory per
 * row. normlib/cpu/native.py compiles this file on first use into the Python extension
 * `_layer_norm`; _kernels.h holds what it shares with rms_norm.c. The math and its symbols are
 * those of normlib/layer_norm.py, with h = x + residual the row that is normalized:
 *
 *   mean = mean_j(h_j)     rstd = 1 / sqrt(mean_j((h_j - mean)^2) + eps)
 *   xhat_j = (h_j - mean) * rstd                y_j = xhat_j * gamma_j + beta_j
 *   wdy_j = gamma_j * dy_j     c1 = mean_j(wdy_j)     c2 = mean_j(xhat_j * wdy_j)
 *   dh_j += rstd * (wdy_j - c1 - xhat_j * c2)   dgamma_j = sum over rows of dy_j * xhat_j
 *                                               dbeta_j = sum over rows of dy_j
 *
 * Why (PyTorch has a fused LayerNorm): the unfused pair "h = x + residual; layer_norm(h)" writes h
 * and reads it back, and its backward adds the gradient arriving on h in a pass of its own; fused,
 * each byte crosses the memory bus once per direction.
 *
 * The variance is computed from deviations, in a second walk over the row once the mean is known
 * (the row is then in the L1/L2 cache): sum(h^2)/n - mean^2 in float32 loses every digit on rows
 * such as 1e4 + N(0, 1). The mean itself is kept as shift + offset, shift the row's first value
 * and offset the mean of h_j - shift: on such rows neither the sum (which would reach 1e7) nor the
 * mean (whose float32 ulp at 1e4 is 1e-3) is rounded at the row's magnitude, and h_j - shift is
 * exact for nearby values. The backward recomputes the statistics the same way rather than
 * reading saved ones, so the forward allocates nothing but its outputs.
 */

#include "_kernels.h"

typedef struct {
    const void *x;        /* (rows, n) input */
    const void *residual; /* (rows, n) */
    void *h;              /* (rows, n) output h = x + residual */
    const void *gamma;    /* (n,) weight; all ones when the op has none */
    const void *beta;     /* (n,) bias; all zeros when the op has none */
    void *y;              /* (rows, n) output */
    int64_t n;
    float eps;
} forward_args_t;

typedef struct {
    const void *dy;      /* (rows, n) gradient of y */
    const void *dh;      /* (rows, n) gradient arriving on h, or NULL */
    const void *h;       /* (rows, n) what was normalized */
    const void *gamma;   /* (n,) */
    void *dx;            /* (rows, n) output, or NULL when no input needs a gradient */
    float *parts;        /* (threads, 2n) zero-filled float32: dgamma sums, then dbeta sums; or NULL */
    int64_t n;
    float eps;
} backward_args_t;

/* Walks per row (the first from memory, the rest from cache): forward 3 (h and its shifted sum;
 * squared deviations; y), backward 3 (shifted sum; squared deviations with the two sums of the
 * gradient; dx with this row's share of dgamma and dbeta). */
#define DEFINE_KERNELS(T, SUFFIX)                                                                  \
    static void forward_rows_##SUFFIX(const void *p, int64_t begin, int64_t end, int thread) {    \
        (void)thread;                                                                               \
        const forward_args_t *a = (const forward_args_t *)p;                                      \
        const int64_t n = a->n;                                                                     \
        const T *gamma = (const T *)a->gamma, *beta = (const T *)a->beta;                           \
        for (int64_t row = begin; row < end; row++) {                                               \
            const T *x = (const T *)a->x + row * n, *res = (const T *)a->residual + row * n;        \
            T *h = (T *)a->h + row * n, *y = (T *)a->y + row * n;                                   \
            if (n == 0) continue;                                                                   \
            /* h is rounded to the storage type before its statistics, as in the unfused pair;    \
             * the mean is kept as shift + offset (see the comment at the top) */                  \
            store_##SUFFIX(h, 0, load_##SUFFIX(x, 0) + load_##SUFFIX(res, 0));                      \
            const float shift = load_##SUFFIX(h, 0);                                                \
            float sum = 0.0f;                                                                       \
            _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; j++) {               \
                store_##SUFFIX(h, j, load_##SUFFIX(x, j) + load_##SUFFIX(res, j));                  \
                sum += load_##SUFFIX(h, j) - shift;                                                 \
            }                                                                                       \
            const float offset = sum / (float)n;                                                    \
            float squares = 0.0f;                                                                   \
            _Pragma("omp simd reduction(+ : squares)") for (int64_t j = 0; j < n; j++) {           \
                const float d = (load_##SUFFIX(h, j) - shift) - offset;                             \
                squares += d * d;                                                                   \
            }                                                                                       \
            const float rstd = 1.0f / sqrtf(squares / (float)n + a->eps);                           \
            _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                    \
                store_##SUFFIX(y, j, ((load_##SUFFIX(h, j) - shift) - offset) * rstd               \
                                         * load_##SUFFIX(gamma, j) + load_##SUFFIX(beta, j));       \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    /* One row of the backward. The flags are constants at every call site, so the compiler      \
     * emits one branch-free vectorized loop per combination. */                                  \
    static inline __attribute__((always_inline)) void backward_row_##SUFFIX(                      \
        const T *h, const T *dy, const T *dh, const T *gamma, T *dx, float *dgamma, float *dbeta, \
        int64_t n, float eps, const int has_dh, const int has_dx, const int has_dparams) {        \
        if (n == 0) return;                                                                         \
        const float shift = load_##SUFFIX(h, 0);                                                    \
        float sum = 0.0f;                                                                           \
        _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; j++)                     \
            sum += load_##SUFFIX(h, j) - shift;                                                     \
        const float offset = sum / (float)n;                                                        \
        float squares = 0.0f, sum_wdy = 0.0f, sum_d_wdy = 0.0f;                                     \
        _Pragma("omp simd reduction(+ : squares, sum_wdy, sum_d_wdy)")                             \
        for (int64_t j = 0; j < n; j++) {                                                           \
            const float d = (load_##SUFFIX(h, j) - shift) - offset;                                 \
            const float wdy = load_##SUFFIX(gamma, j) * load_##SUFFIX(dy, j);                       \
            squares += d * d;                                                                       \
            sum_wdy += wdy;                                                                         \
            sum_d_wdy += d * wdy;                                                                   \
        }                                                                                           \
        const float rstd = 1.0f / sqrtf(squares / (float)n + eps);                                  \
        const float c1 = sum_wdy / (float)n, c2 = rstd * sum_d_wdy / (float)n;                      \
        _Pragma("omp simd") for (int64_t j = 0; j < n; j++) {                                      \
            const float xhat = ((load_##SUFFIX(h, j) - shift) - offset) * rstd;                    \
            const float g = load_##SUFFIX(dy, j);                                                   \
            if (has_dparams) {                                                                      \
                dgamma[j] += g * xhat;                                                              \
                dbeta[j] += g;                                                                      \
            }                                                                                       \
            if (has_dx) {                                                                           \
                float v = rstd * (load_##SUFFIX(gamma, j) * g - c1 - xhat * c2);                    \
                if (has_dh) v += load_##SUFFIX(dh, j);                                              \
                store_##SUFFIX(dx, j, v);                                                           \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    static void backward_rows_##SUFFIX(const void *p, int64_t begin, int64_t end, int thread) {   \
        const backward_args_t *a = (const backward_args_t *)p;                                     \
        const int64_t n = a->n;                                                                     \
        const T *gamma = (const T *)a->gamma;                                                       \
        float *dgamma = a->parts ? a->parts + (int64_t)thread * 2 * n : NULL;                      \
        float *dbeta = dgamma ? dgamma + n : NULL;                                                  \
        for (int64_t row = begin; row < end; row++) {                                               \
            const T *h = (const T *)a->h + row * n, *dy = (const T *)a->dy + row * n;               \
            const T *dh = a->dh ? (const T *)a->dh + row * n : NULL;                                \
            T *dx = a->dx ? (T *)a->dx + row * n : NULL;                                            \
            if (dx && dh && dgamma)                                                                 \
                backward_row_##SUFFIX(h, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 1, 1, 1);     \
            else if (dx && dh)                                                                      \
                backward_row_##SUFFIX(h, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 1, 1, 0);     \
            else if (dx && dgamma)                                                                  \
                backward_row_##SUFFIX(h, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 0, 1, 1);     \
            else if (dx)                                                                            \
                backward_row_##SUFFIX(h, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 0, 1, 0);     \
            else if (dgamma)                                                                        \
                backward_row_##SUFFIX(h, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 0, 0, 1);     \
        }                                                                                           \
    }

INSTANTIATE_KERNELS(DEFINE_KERNELS)

/* forward(storage, x, residual, h, gamma, beta, y, rows, n, eps, threads) -> threads used */
static PyObject *py_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[11];
    double eps = 0.0;
    if (convert(args, nargs, 11, 9, "forward", v, &eps) < 0) return NULL;
    forward_args_t a = {POINTER(v[1]), POINTER(v[2]), POINTER(v[3]), POINTER(v[4]), POINTER(v[5]),
                        POINTER(v[6]), v[8], (float)eps};
    rows_fn fn = pick((long)v[0], forward_rows_f32, forward_rows_bf16, forward_rows_f16);
    return PyLong_FromLong(run(fn, &a, v[7], v[8], (int)v[10]));
}

/* backward(storage, dy, dh, h, gamma, dx, dgamma, dbeta, rows, n, eps, threads) -> threads used;
 * dgamma and dbeta (n,) are both written or both skipped (0), in the storage type. */
static PyObject *py_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[12];
    double eps = 0.0;
    if (convert(args, nargs, 12, 10, "backward", v, &eps) < 0) return NULL;
    backward_args_t a = {POINTER(v[1]), POINTER(v[2]), POINTER(v[3]), POINTER(v[4]),
                         POINTER(v[5]), NULL, v[9], (float)eps};
    const long storage = (long)v[0];
    rows_fn fn = pick(storage, backward_rows_f32, backward_rows_bf16, backward_rows_f16);
    void *const outputs[2] = {POINTER(v[6]), POINTER(v[7])};
    return run_with_sums(fn, &a, &a.parts, storage, outputs, 2, v[8], v[9], (int)v[11]);
}

DEFINE_MODULE(_layer_norm, "add + LayerNorm")
