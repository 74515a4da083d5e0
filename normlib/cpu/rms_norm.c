/*
 * Fused RMSNorm for the CPU: forward (optionally with the residual add) and backward, each one
 * pass over memory per row. normlib/cpu/native.py compiles this file on first use into a Python
 * extension module, `_rms_norm`; the math and its symbols (rstd, c1) are those of
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
 *
 * Threads: the rows are split into equal contiguous ranges, one per thread. Built with OpenMP,
 * the threads are PyTorch's own: native.py links this file against the OpenMP runtime PyTorch has
 * already loaded, so a parallel region reuses PyTorch's waiting threads (a few microseconds)
 * instead of creating threads per call (25-60 us on the course machine). Without OpenMP
 * (another compiler, or a PyTorch without it) it starts pthreads per call. Each thread accumulates
 * dgamma over its rows into its own row of `dgamma_parts`, so the sum is deterministic for a given
 * thread count and needs no atomics.
 *
 * Why a Python extension and not ctypes: a ctypes call with eleven arguments costs ~1.1 us, as
 * much as PyTorch's whole LayerNorm call on a small tensor; a METH_FASTCALL function costs ~0.1 us.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 256

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
 * has_float16() tells Python to send float16 to the PyTorch fallback. */
#ifdef __FLT16_MAX__
#define HAVE_FLOAT16 1
static inline float load_f16(const _Float16 *p, int64_t i) { return (float)p[i]; }
static inline void store_f16(_Float16 *p, int64_t i, float v) { p[i] = (_Float16)v; }
#else
#define HAVE_FLOAT16 0
#endif

/* ---- threads ---------------------------------------------------------------------------------- */

typedef void (*rows_fn)(const void *args, int64_t row_begin, int64_t row_end, int thread);

#ifdef _OPENMP
/* Declared here rather than through <omp.h>, which not every compiler installation ships. */
int omp_get_thread_num(void);
int omp_get_num_threads(void);

/* Runs fn over rows [0, rows) split across up to `threads` threads; returns the number used
 * (OpenMP may grant fewer than asked, e.g. inside another parallel region). */
static int parallel_rows(rows_fn fn, const void *args, int64_t rows, int threads) {
    if (threads > rows) threads = (int)rows;
    if (threads <= 1) {
        fn(args, 0, rows, 0);
        return 1;
    }
    int used = threads;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        if (t == 0) used = count;
        fn(args, rows * t / count, rows * (t + 1) / count, t);
    }
    return used;
}
#else
#include <pthread.h>

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
#endif

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
    }                                                                                               \
                                                                                                    \
    /* dgamma = the per-thread float32 sums added in thread order, rounded once */                 \
    static void store_dgamma_##SUFFIX(void *out, const float *parts, int threads, int64_t n) {     \
        for (int64_t j = 0; j < n; j++) {                                                           \
            float total = parts[j];                                                                 \
            for (int t = 1; t < threads; t++) total += parts[(int64_t)t * n + j];                   \
            store_##SUFFIX((T *)out, j, total);                                                     \
        }                                                                                           \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(bf16_t, bf16)
#if HAVE_FLOAT16
DEFINE_KERNELS(_Float16, f16)
#else
#define forward_rows_f16 forward_rows_f32 /* never picked: Python checks has_float16() */
#define backward_rows_f16 backward_rows_f32
#define store_dgamma_f16 store_dgamma_f32
#endif

/* ---- the Python module ---------------------------------------------------------------------- */

enum { STORAGE_F32 = 0, STORAGE_BF16 = 1, STORAGE_F16 = 2 };

static rows_fn pick(long storage, rows_fn f32, rows_fn bf16, rows_fn f16) {
    return storage == STORAGE_F32 ? f32 : storage == STORAGE_BF16 ? bf16 : f16;
}

/* Below this many elements the kernel runs without releasing the GIL: a release and re-acquire
 * costs about as much as normalizing a few thousand elements. */
#define GIL_RELEASE_ELEMENTS 32768

static int run(rows_fn fn, const void *args, int64_t rows, int64_t n, int threads) {
    int used;
    if (rows * n < GIL_RELEASE_ELEMENTS) return parallel_rows(fn, args, rows, threads);
    Py_BEGIN_ALLOW_THREADS
    used = parallel_rows(fn, args, rows, threads);
    Py_END_ALLOW_THREADS
    return used;
}

/* Arguments are Python ints (storage code, data pointers with 0 for NULL, sizes, thread count),
 * except the one at index `float_at` (-1: none), which is read as a double. Python (native.py)
 * has checked shapes, dtypes and contiguity; this layer only converts. */
static int convert(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, Py_ssize_t float_at,
                   const char *name, int64_t *values, double *float_value) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, expected, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if (i == float_at) {
            *float_value = PyFloat_AsDouble(args[i]);
            if (*float_value == -1.0 && PyErr_Occurred()) return -1;
            continue;
        }
        values[i] = PyLong_AsLongLong(args[i]);
        if (values[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

#define POINTER(v) ((void *)(intptr_t)(v))

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
    const int64_t rows = v[7], n = v[8];
    int threads = (int)v[10];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    float *parts = NULL;
    if (v[6] && n > 0) {
        parts = (float *)calloc((size_t)threads * (size_t)n, sizeof(float));
        if (!parts) return PyErr_NoMemory();
    }
    backward_args_t a = {POINTER(v[1]), POINTER(v[2]), POINTER(v[3]), POINTER(v[4]),
                         POINTER(v[5]), parts, n, (float)eps};
    const long storage = (long)v[0];
    rows_fn fn = pick(storage, backward_rows_f32, backward_rows_bf16, backward_rows_f16);
    const int used = run(fn, &a, rows, n, threads);
    if (parts) {
        if (storage == STORAGE_F32) store_dgamma_f32(POINTER(v[6]), parts, used, n);
        else if (storage == STORAGE_BF16) store_dgamma_bf16(POINTER(v[6]), parts, used, n);
        else store_dgamma_f16(POINTER(v[6]), parts, used, n);
        free(parts);
    }
    return PyLong_FromLong(used);
}

static PyObject *py_has_float16(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(HAVE_FLOAT16);
}

static PyObject *py_threading(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
#ifdef _OPENMP
    return PyUnicode_FromString("openmp");
#else
    return PyUnicode_FromString("pthreads");
#endif
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))py_forward, METH_FASTCALL, "RMSNorm forward on raw pointers."},
    {"backward", (PyCFunction)(void (*)(void))py_backward, METH_FASTCALL, "RMSNorm backward on raw pointers."},
    {"has_float16", py_has_float16, METH_NOARGS, "Whether this build stores float16."},
    {"threading", py_threading, METH_NOARGS, "'openmp' (PyTorch's threads) or 'pthreads'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rms_norm", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rms_norm(void) { return PyModule_Create(&module); }
