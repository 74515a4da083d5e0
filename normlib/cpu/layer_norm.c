/*
 * Fused residual add + LayerNorm for the CPU, forward and backward, each one pass over memory per
 * row. normlib/cpu/native.py compiles this file on first use into the Python extension
 * `_layer_norm`; _kernels.h holds the loops over rows, the threads and the Python module around
 * the two row functions below. The math and its symbols are those of normlib/layer_norm.py, with
 * h = x + residual the row that is normalized:
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
 *
 * Walks per row (the first from memory, the rest from cache): forward 3 (h and its shifted sum;
 * squared deviations; y), backward 3 (shifted sum; squared deviations with the two sums of the
 * gradient; dx with this row's share of dgamma and dbeta).
 */

#define PARAMETER_GRADIENTS 2 /* dgamma, then dbeta */
#include "_kernels.h"

#define DEFINE_ROWS(T, SUFFIX)                                                                      \
    /* One row of h = x + residual and of y. */                                                     \
    static void forward_row_##SUFFIX(const T *x, const T *residual, T *h, const T *gamma,           \
                                     const T *beta, T *y, int64_t n, float eps) {                   \
        if (n == 0) return;                                                                         \
        /* h is rounded to the storage type before its statistics, as in the unfused pair; the      \
         * mean is kept as shift + offset (see the comment at the top) */                           \
        store_##SUFFIX(h, 0, load_##SUFFIX(x, 0) + load_##SUFFIX(residual, 0));                     \
        const float shift = load_##SUFFIX(h, 0);                                                    \
        float sum = 0.0f;                                                                           \
        _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; j++) {                    \
            store_##SUFFIX(h, j, load_##SUFFIX(x, j) + load_##SUFFIX(residual, j));                 \
            sum += load_##SUFFIX(h, j) - shift;                                                     \
        }                                                                                           \
        const float offset = sum / (float)n;                                                        \
        float squares = 0.0f;                                                                       \
        _Pragma("omp simd reduction(+ : squares)") for (int64_t j = 0; j < n; j++) {                \
            const float d = (load_##SUFFIX(h, j) - shift) - offset;                                 \
            squares += d * d;                                                                       \
        }                                                                                           \
        const float rstd = 1.0f / sqrtf(squares / (float)n + eps);                                  \
        _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                                         \
            store_##SUFFIX(y, j, ((load_##SUFFIX(h, j) - shift) - offset) * rstd                    \
                                     * load_##SUFFIX(gamma, j) + load_##SUFFIX(beta, j));           \
    }                                                                                               \
                                                                                                    \
    /* One row of dx (with dh added where has_dh) and this row's share of dgamma and dbeta; x is    \
     * h, what the forward normalized. The flags are constants at every call site (_kernels.h). */  \
    static inline __attribute__((always_inline)) void backward_row_##SUFFIX(                        \
        const T *x, const T *dy, const T *dh, const T *gamma, T *dx, float *dgamma, float *dbeta,   \
        int64_t n, float eps, const int has_dh, const int has_dx, const int has_dparams) {          \
        if (n == 0) return;                                                                         \
        const float shift = load_##SUFFIX(x, 0);                                                    \
        float sum = 0.0f;                                                                           \
        _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; j++)                      \
            sum += load_##SUFFIX(x, j) - shift;                                                     \
        const float offset = sum / (float)n;                                                        \
        float squares = 0.0f, sum_wdy = 0.0f, sum_d_wdy = 0.0f;                                     \
        _Pragma("omp simd reduction(+ : squares, sum_wdy, sum_d_wdy)")                              \
        for (int64_t j = 0; j < n; j++) {                                                           \
            const float d = (load_##SUFFIX(x, j) - shift) - offset;                                 \
            const float wdy = load_##SUFFIX(gamma, j) * load_##SUFFIX(dy, j);                       \
            squares += d * d;                                                                       \
            sum_wdy += wdy;                                                                         \
            sum_d_wdy += d * wdy;                                                                   \
        }                                                                                           \
        const float rstd = 1.0f / sqrtf(squares / (float)n + eps);                                  \
        const float c1 = sum_wdy / (float)n, c2 = rstd * sum_d_wdy / (float)n;                      \
        _Pragma("omp simd") for (int64_t j = 0; j < n; j++) {                                       \
            const float xhat = ((load_##SUFFIX(x, j) - shift) - offset) * rstd;                     \
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
    }

INSTANTIATE_KERNELS(DEFINE_ROWS)

/* forward(storage, x, residual, h, gamma, beta, y, rows, n, eps, threads) */
#define FORWARD_REQUIRED (ARG_X | ARG_RESIDUAL | ARG_H | ARG_GAMMA | ARG_BETA | ARG_Y)
#define FORWARD_OPTIONAL 0
/* backward(storage, dy, x = h, gamma, rows, n, eps, threads), and what is asked for of dh, dx,
 * and dgamma with dbeta (both or neither) */
#define BACKWARD_REQUIRED (ARG_DY | ARG_X | ARG_GAMMA)
#define BACKWARD_OPTIONAL (ARG_DH | ARG_DX | ARG_DGAMMA | ARG_DBETA)

DEFINE_MODULE(_layer_norm, "add + LayerNorm")
