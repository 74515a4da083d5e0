/*
 * Fused RMSNorm for the CPU: forward (optionally with the residual add) and backward, each one
 * pass over memory per row. normlib/cpu/native.py compiles this file on first use into the Python
 * extension `_rms_norm`; _kernels.h holds the loops over rows, the threads and the Python module
 * around the two row functions below. The math and its symbols (rstd, c1) are those of
 * normlib/rms_norm.py, with x the row that is normalized (h = x + residual for the residual op):
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
 *
 * The backward recomputes rstd from x instead of reading one saved by the forward: the sum of
 * squares rides along in the walk that computes sum_j x_j * wdy_j, so it costs no memory traffic,
 * and the forward then allocates nothing but its outputs (on small tensors an allocation costs as
 * much as a sizeable part of the whole op).
 */

#define PARAMETER_GRADIENTS 1 /* dgamma */
#include "_kernels.h"

#define DEFINE_ROWS(T, SUFFIX)                                                                      \
    /* One row of y, and of h = x + residual when residual is given (else residual and h are        \
     * NULL); beta is not used. */                                                                  \
    static void forward_row_##SUFFIX(const T *x, const T *residual, T *h, const T *gamma,           \
                                     const T *beta, T *y, int64_t n, float eps) {                   \
        (void)beta;                                                                                 \
        float sum_squares = 0.0f;                                                                   \
        if (residual) { /* h is rounded to the storage type before its statistics */                \
            _Pragma("omp simd reduction(+ : sum_squares)") for (int64_t j = 0; j < n; j++) {        \
                store_##SUFFIX(h, j, load_##SUFFIX(x, j) + load_##SUFFIX(residual, j));             \
                const float v = load_##SUFFIX(h, j);                                                \
                sum_squares += v * v;                                                               \
            }                                                                                       \
            x = h;                                                                                  \
        } else {                                                                                    \
            _Pragma("omp simd reduction(+ : sum_squares)") for (int64_t j = 0; j < n; j++) {        \
                const float v = load_##SUFFIX(x, j);                                                \
                sum_squares += v * v;                                                               \
            }                                                                                       \
        }                                                                                           \
        float rstd = 1.0f / sqrtf(sum_squares / (float)n + eps);                                    \
        _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                         \
            store_##SUFFIX(y, j, load_##SUFFIX(x, j) * rstd * load_##SUFFIX(gamma, j));             \
    }                                                                                               \
                                                                                                    \
    /* One row of dx (with dh added where has_dh) and this row's share of dgamma; dbeta is not      \
     * used. The flags are constants at every call site (_kernels.h). */                            \
    static inline __attribute__((always_inline)) void backward_row_##SUFFIX(                        \
        const T *x, const T *dy, const T *dh, const T *gamma, T *dx, float *dgamma, float *dbeta,   \
        int64_t n, float eps, const int has_dh, const int has_dx, const int has_dparams) {          \
        (void)dbeta;                                                                                \
        /* walk 1: both row sums, sum_j x_j^2 (for rstd) and dot = sum_j x_j * wdy_j */             \
        float sum_squares = 0.0f, dot = 0.0f;                                                       \
        _Pragma("omp simd reduction(+ : sum_squares, dot)") for (int64_t j = 0; j < n; j++) {       \
            const float v = load_##SUFFIX(x, j);                                                    \
            sum_squares += v * v;                                                                   \
            dot += v * load_##SUFFIX(gamma, j) * load_##SUFFIX(dy, j);                              \
        }                                                                                           \
        const float rstd = 1.0f / sqrtf(sum_squares / (float)n + eps);                              \
        /* walk 2: dx_j = rstd * wdy_j - x_j * rstd^2 * c1, with rstd^2 * c1 = rstd^3 dot / n,      \
         * and this row's share of dgamma_j, dy_j * x_j * rstd */                                   \
        const float x_coefficient = rstd * rstd * rstd * dot / (float)n;                            \
        _Pragma("omp simd") for (int64_t j = 0; j < n; j++) {                                       \
            const float v = load_##SUFFIX(x, j), d = load_##SUFFIX(dy, j);                          \
            if (has_dparams) dgamma[j] += v * d * rstd;                                             \
            if (has_dx) {                                                                           \
                float dx_j = rstd * load_##SUFFIX(gamma, j) * d - x_coefficient * v;                \
                if (has_dh) dx_j += load_##SUFFIX(dh, j);                                           \
                store_##SUFFIX(dx, j, dx_j);                                                        \
            }                                                                                       \
        }                                                                                           \
    }

INSTANTIATE_KERNELS(DEFINE_ROWS)

/* forward(storage, x, gamma, y, rows, n, eps, threads), and residual with h for the residual op */
#define FORWARD_REQUIRED (ARG_X | ARG_GAMMA | ARG_Y)
#define FORWARD_OPTIONAL (ARG_RESIDUAL | ARG_H)
/* backward(storage, dy, x, gamma, rows, n, eps, threads), and what is asked for of dh, dx, dgamma */
#define BACKWARD_REQUIRED (ARG_DY | ARG_X | ARG_GAMMA)
#define BACKWARD_OPTIONAL (ARG_DH | ARG_DX | ARG_DGAMMA)

DEFINE_MODULE(_rms_norm, "RMSNorm")
