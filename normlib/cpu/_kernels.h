/*
 * The machinery the fused CPU kernels share, so that rms_norm.c and layer_norm.c hold only their
 * math: storage types loaded as float32 and stored rounded, the loops over rows, rows split across
 * threads, the per-thread sums of the parameter gradients, and the Python module with its
 * arguments passed by name. Each .c file writes, per storage type T (float, bf16_t, _Float16),
 *
 *   forward_row(x, residual, h, gamma, beta, y, n, eps)       one row of y (and of h = x + residual)
 *   backward_row(x, dy, dh, gamma, dx, dgamma, dbeta, n, eps,  one row of dx, and this row's share
 *                has_dh, has_dx, has_dparams)                  of the parameter gradients
 *
 * and then DEFINE_MODULE (at the bottom), which builds the rest around them. native.py compiles
 * each .c file into its own Python extension.
 *
 * Threads: the rows are split into equal contiguous ranges, one per thread. Built with OpenMP,
 * the threads are PyTorch's own: native.py links the extension against the OpenMP runtime PyTorch
 * has already loaded, so a parallel region reuses PyTorch's waiting threads (1-2 us, in
 * results/cpu/native_build_and_threads.json) instead of creating threads per call. Without OpenMP
 * (another compiler, or a PyTorch without it) it starts pthreads per call. Parameter gradients are
 * accumulated per thread into rows of a float32 buffer and summed in thread order: deterministic
 * for a given thread count, no atomics.
 *
 * Why a Python extension and not ctypes: on a small tensor the whole op takes a few microseconds,
 * and a ctypes call with a dozen arguments costs about ten times a METH_FASTCALL call.
 */

#ifndef NORMLIB_KERNELS_H
#define NORMLIB_KERNELS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef PARAMETER_GRADIENTS
/* how many (n,) parameter gradients the backward sums: 1 (dgamma) or 2 (dgamma, dbeta) */
#error "define PARAMETER_GRADIENTS before including _kernels.h"
#endif

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

/* Per-thread float32 sums, (threads, stride) with the sums in columns [0, n), added in thread
 * order and rounded to the storage type once. */
#define DEFINE_STORE_SUMS(T, SUFFIX)                                                                \
    static void store_sums_##SUFFIX(void *out, const float *parts, int threads, int64_t n,          \
                                    int64_t stride) {                                               \
        for (int64_t j = 0; j < n; j++) {                                                           \
            float total = parts[j];                                                                 \
            for (int t = 1; t < threads; t++) total += parts[(int64_t)t * stride + j];              \
            store_##SUFFIX((T *)out, j, total);                                                     \
        }                                                                                           \
    }
DEFINE_STORE_SUMS(float, f32)
DEFINE_STORE_SUMS(bf16_t, bf16)
#if HAVE_FLOAT16
DEFINE_STORE_SUMS(_Float16, f16)
#endif

enum { STORAGE_F32 = 0, STORAGE_BF16 = 1, STORAGE_F16 = 2 };

static void store_sums(int64_t storage, void *out, const float *parts, int threads, int64_t n,
                       int64_t stride) {
    if (storage == STORAGE_F32) store_sums_f32(out, parts, threads, n, stride);
    else if (storage == STORAGE_BF16) store_sums_bf16(out, parts, threads, n, stride);
#if HAVE_FLOAT16
    else store_sums_f16(out, parts, threads, n, stride);
#endif
}

/* INSTANTIATE_KERNELS(DEFINE) writes DEFINE(T, SUFFIX) once per storage type; without _Float16 the
 * f16 entries fall back to the f32 ones, which are never picked (Python checks has_float16()). */
#if HAVE_FLOAT16
#define INSTANTIATE_KERNELS(DEFINE) DEFINE(float, f32) DEFINE(bf16_t, bf16) DEFINE(_Float16, f16)
#else
#define INSTANTIATE_KERNELS(DEFINE) DEFINE(float, f32) DEFINE(bf16_t, bf16)
#define forward_rows_f16 forward_rows_f32
#define backward_rows_f16 backward_rows_f32
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

/* ---- the arguments, by name ----------------------------------------------------------------- */

/* Everything a forward or backward call takes; Python passes each by name (the names of the fields)
 * and leaves out, or passes 0 for, the pointers an op does not use, which are then NULL. Python
 * (native.py) has checked shapes, dtypes and contiguity: every tensor is a contiguous (rows, n) or
 * (n,) array of the one storage type. */
typedef struct {
    int64_t storage;      /* STORAGE_F32, STORAGE_BF16 or STORAGE_F16 */
    const void *x;        /* (rows, n) the input; in the backward what was normalized (x, or h) */
    const void *residual; /* (rows, n), or NULL: no residual add */
    void *h;              /* (rows, n) output h = x + residual; NULL without a residual */
    const void *gamma;    /* (n,) weight; all ones when the op has none */
    const void *beta;     /* (n,) bias; all zeros when the op has none (LayerNorm only) */
    void *y;              /* (rows, n) output */
    const void *dy;       /* (rows, n) gradient of y */
    const void *dh;       /* (rows, n) gradient arriving on h, or NULL */
    void *dx;             /* (rows, n) output, or NULL when no input needs a gradient */
    void *dgamma;         /* (n,) output, or NULL when no parameter needs a gradient */
    void *dbeta;          /* (n,) output, written with dgamma (LayerNorm only) */
    int64_t rows, n;
    float eps;
    int64_t threads; /* how many threads to use at most */
    float *parts;    /* not an argument: the backward's per-thread float32 sums (see run_backward) */
} row_norm_args_t;

enum {
    ARG_STORAGE = 1 << 0, ARG_X = 1 << 1, ARG_RESIDUAL = 1 << 2, ARG_H = 1 << 3, ARG_GAMMA = 1 << 4,
    ARG_BETA = 1 << 5, ARG_Y = 1 << 6, ARG_DY = 1 << 7, ARG_DH = 1 << 8, ARG_DX = 1 << 9,
    ARG_DGAMMA = 1 << 10, ARG_DBETA = 1 << 11, ARG_ROWS = 1 << 12, ARG_N = 1 << 13,
    ARG_EPS = 1 << 14, ARG_THREADS = 1 << 15,
    /* what every call needs */
    ARG_SIZES = ARG_STORAGE | ARG_ROWS | ARG_N | ARG_EPS | ARG_THREADS,
};

typedef enum { AS_INT, AS_POINTER, AS_FLOAT } argument_kind_t;

static const struct {
    const char *name;
    int bit;
    argument_kind_t kind;
    size_t offset;
} ARGUMENTS[] = {
#define ARGUMENT(FIELD, BIT, KIND) {#FIELD, BIT, KIND, offsetof(row_norm_args_t, FIELD)}
    ARGUMENT(storage, ARG_STORAGE, AS_INT),    ARGUMENT(x, ARG_X, AS_POINTER),
    ARGUMENT(residual, ARG_RESIDUAL, AS_POINTER), ARGUMENT(h, ARG_H, AS_POINTER),
    ARGUMENT(gamma, ARG_GAMMA, AS_POINTER),    ARGUMENT(beta, ARG_BETA, AS_POINTER),
    ARGUMENT(y, ARG_Y, AS_POINTER),            ARGUMENT(dy, ARG_DY, AS_POINTER),
    ARGUMENT(dh, ARG_DH, AS_POINTER),          ARGUMENT(dx, ARG_DX, AS_POINTER),
    ARGUMENT(dgamma, ARG_DGAMMA, AS_POINTER),  ARGUMENT(dbeta, ARG_DBETA, AS_POINTER),
    ARGUMENT(rows, ARG_ROWS, AS_INT),          ARGUMENT(n, ARG_N, AS_INT),
    ARGUMENT(eps, ARG_EPS, AS_FLOAT),          ARGUMENT(threads, ARG_THREADS, AS_INT),
#undef ARGUMENT
};
#define ARGUMENT_COUNT (sizeof ARGUMENTS / sizeof ARGUMENTS[0])

/* The names, interned when the module is imported: the keyword names at a Python call site are
 * interned too, so a name is found by comparing pointers. */
static PyObject *argument_names[ARGUMENT_COUNT];

static int intern_argument_names(void) {
    for (size_t k = 0; k < ARGUMENT_COUNT; k++) {
        if (!argument_names[k]) argument_names[k] = PyUnicode_InternFromString(ARGUMENTS[k].name);
        if (!argument_names[k]) return -1;
    }
    return 0;
}

static size_t find_argument(PyObject *name) {
    for (size_t k = 0; k < ARGUMENT_COUNT; k++)
        if (name == argument_names[k]) return k;
    if (!PyUnicode_Check(name)) return ARGUMENT_COUNT;
    for (size_t k = 0; k < ARGUMENT_COUNT; k++)
        if (PyUnicode_CompareWithASCIIString(name, ARGUMENTS[k].name) == 0) return k;
    return ARGUMENT_COUNT;
}

/* Fills *a from keyword arguments: each of `required` must be given, each of `optional` may be. */
static int parse(const char *function, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                 int required, int optional, row_norm_args_t *a) {
    memset(a, 0, sizeof *a);
    if (nargs != 0) {
        PyErr_Format(PyExc_TypeError, "%s() takes its arguments by name only, got %zd positional",
                     function, nargs);
        return -1;
    }
    int given = 0;
    const Py_ssize_t count = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        const size_t k = find_argument(name);
        if (k == ARGUMENT_COUNT || !(ARGUMENTS[k].bit & (required | optional))) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", function,
                         name);
            return -1;
        }
        given |= ARGUMENTS[k].bit;
        char *field = (char *)a + ARGUMENTS[k].offset;
        if (ARGUMENTS[k].kind == AS_FLOAT) {
            const double value = PyFloat_AsDouble(args[i]);
            if (value == -1.0 && PyErr_Occurred()) return -1;
            *(float *)field = (float)value;
            continue;
        }
        const long long value = PyLong_AsLongLong(args[i]);
        if (value == -1 && PyErr_Occurred()) return -1;
        if (ARGUMENTS[k].kind == AS_POINTER) *(void **)field = (void *)(intptr_t)value;
        else *(int64_t *)field = value;
    }
    for (size_t k = 0; k < ARGUMENT_COUNT; k++) {
        if ((required & ~given) & ARGUMENTS[k].bit) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", function,
                         ARGUMENTS[k].name);
            return -1;
        }
    }
    const int stored = a->storage == STORAGE_F32 || a->storage == STORAGE_BF16
                       || (a->storage == STORAGE_F16 && HAVE_FLOAT16);
    if (!stored) {
        PyErr_Format(PyExc_ValueError, "%s(): storage must be a code this build stores, got %lld",
                     function, (long long)a->storage);
        return -1;
    }
    if (a->rows < 0 || a->n < 0) {
        PyErr_Format(PyExc_ValueError, "%s(): rows and n must be >= 0, got %lld and %lld", function,
                     (long long)a->rows, (long long)a->n);
        return -1;
    }
    if (!a->residual != !a->h) {
        PyErr_Format(PyExc_ValueError, "%s(): residual and h are given together or not at all",
                     function);
        return -1;
    }
    return 0;
}

/* ---- the loops over rows, around each .c file's forward_row and backward_row ----------------- */

/* PARAMETER_GRADIENTS, which each .c file defines, is how many (n,) sums the backward keeps per
 * thread: 1 (dgamma) or 2 (dgamma, then dbeta). */
#define DEFINE_ROW_LOOPS(T, SUFFIX)                                                                 \
    static void forward_rows_##SUFFIX(const void *p, int64_t begin, int64_t end, int thread) {      \
        (void)thread;                                                                               \
        const row_norm_args_t *a = (const row_norm_args_t *)p;                                      \
        const int64_t n = a->n;                                                                     \
        for (int64_t row = begin; row < end; row++) {                                               \
            const int64_t at = row * n;                                                             \
            const T *residual = a->residual ? (const T *)a->residual + at : NULL;                   \
            T *h = a->h ? (T *)a->h + at : NULL;                                                    \
            forward_row_##SUFFIX((const T *)a->x + at, residual, h, (const T *)a->gamma,            \
                                 (const T *)a->beta, (T *)a->y + at, n, a->eps);                    \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    /* Each call passes its flags as constants, so the compiler emits one branch-free vectorized    \
     * loop per combination. */                                                                     \
    static void backward_rows_##SUFFIX(const void *p, int64_t begin, int64_t end, int thread) {     \
        const row_norm_args_t *a = (const row_norm_args_t *)p;                                      \
        const int64_t n = a->n;                                                                     \
        const T *gamma = (const T *)a->gamma;                                                       \
        float *dgamma = a->parts ? a->parts + (int64_t)thread * PARAMETER_GRADIENTS * n : NULL;     \
        float *dbeta = dgamma && PARAMETER_GRADIENTS == 2 ? dgamma + n : NULL;                      \
        for (int64_t row = begin; row < end; row++) {                                               \
            const int64_t at = row * n;                                                             \
            const T *x = (const T *)a->x + at, *dy = (const T *)a->dy + at;                         \
            const T *dh = a->dh ? (const T *)a->dh + at : NULL;                                     \
            T *dx = a->dx ? (T *)a->dx + at : NULL;                                                 \
            if (dx && dh && dgamma)                                                                 \
                backward_row_##SUFFIX(x, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 1, 1, 1);     \
            else if (dx && dh)                                                                      \
                backward_row_##SUFFIX(x, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 1, 1, 0);     \
            else if (dx && dgamma)                                                                  \
                backward_row_##SUFFIX(x, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 0, 1, 1);     \
            else if (dx)                                                                            \
                backward_row_##SUFFIX(x, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 0, 1, 0);     \
            else if (dgamma)                                                                        \
                backward_row_##SUFFIX(x, dy, dh, gamma, dx, dgamma, dbeta, n, a->eps, 0, 0, 1);     \
        }                                                                                           \
    }

/* ---- the Python side -------------------------------------------------------------------------- */

static rows_fn pick(int64_t storage, rows_fn f32, rows_fn bf16, rows_fn f16) {
    return storage == STORAGE_F32 ? f32 : storage == STORAGE_BF16 ? bf16 : f16;
}

/* Below this many elements the kernel runs without releasing the GIL: a release and re-acquire
 * costs about as much as normalizing a few thousand elements. */
#define GIL_RELEASE_ELEMENTS 32768

static int run(rows_fn fn, const row_norm_args_t *a) {
    int used;
    if (a->rows * a->n < GIL_RELEASE_ELEMENTS) return parallel_rows(fn, a, a->rows, (int)a->threads);
    Py_BEGIN_ALLOW_THREADS
    used = parallel_rows(fn, a, a->rows, (int)a->threads);
    Py_END_ALLOW_THREADS
    return used;
}

/* The backward's driver: `count` per-thread float32 sums of n values each (the parameter
 * gradients) are zero-filled in a->parts when dgamma is asked for, fn runs over the rows, and each
 * sum is then written to dgamma (and dbeta) in the storage type. Returns the number of threads
 * used, or NULL with MemoryError. */
static PyObject *run_backward(rows_fn fn, row_norm_args_t *a, int count) {
    if (a->threads < 1) a->threads = 1;
    if (a->threads > MAX_THREADS) a->threads = MAX_THREADS;
    void *const outputs[2] = {a->dgamma, a->dbeta};
    const int64_t n = a->n;
    a->parts = NULL;
    if (a->dgamma && n > 0) {
        a->parts = (float *)calloc((size_t)a->threads * (size_t)count * (size_t)n, sizeof(float));
        if (!a->parts) return PyErr_NoMemory();
    }
    const int used = run(fn, a);
    if (a->parts) {
        for (int k = 0; k < count; k++)
            store_sums(a->storage, outputs[k], a->parts + k * n, used, n, count * n);
        free(a->parts);
        a->parts = NULL;
    }
    return PyLong_FromLong(used);
}

static PyObject *py_threading(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
#ifdef _OPENMP
    return PyUnicode_FromString("openmp");
#else
    return PyUnicode_FromString("pthreads");
#endif
}

static PyObject *py_has_float16(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(HAVE_FLOAT16);
}

/* The module NAME: forward and backward around the .c file's row functions, has_float16 and
 * threading; WHAT names the op in the docstrings. Before it, the .c file defines
 * PARAMETER_GRADIENTS and the arguments each function takes by name: FORWARD_REQUIRED,
 * FORWARD_OPTIONAL, BACKWARD_REQUIRED, BACKWARD_OPTIONAL (ARG_* bits). */
#define DEFINE_MODULE(NAME, WHAT)                                                                   \
    INSTANTIATE_KERNELS(DEFINE_ROW_LOOPS)                                                           \
                                                                                                    \
    static PyObject *py_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs,            \
                                PyObject *kwnames) {                                                \
        (void)self;                                                                                 \
        row_norm_args_t a;                                                                          \
        const int required = ARG_SIZES | FORWARD_REQUIRED;                                          \
        if (parse("forward", args, nargs, kwnames, required, FORWARD_OPTIONAL, &a) < 0)             \
            return NULL;                                                                            \
        rows_fn fn = pick(a.storage, forward_rows_f32, forward_rows_bf16, forward_rows_f16);        \
        return PyLong_FromLong(run(fn, &a));                                                        \
    }                                                                                               \
                                                                                                    \
    static PyObject *py_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs,           \
                                 PyObject *kwnames) {                                               \
        (void)self;                                                                                 \
        row_norm_args_t a;                                                                          \
        const int required = ARG_SIZES | BACKWARD_REQUIRED;                                         \
        if (parse("backward", args, nargs, kwnames, required, BACKWARD_OPTIONAL, &a) < 0)           \
            return NULL;                                                                            \
        if (PARAMETER_GRADIENTS == 2 && !a.dgamma != !a.dbeta) {                                    \
            PyErr_SetString(PyExc_ValueError,                                                       \
                            "backward(): dgamma and dbeta are given together or not at all");       \
            return NULL;                                                                            \
        }                                                                                           \
        rows_fn fn = pick(a.storage, backward_rows_f32, backward_rows_bf16, backward_rows_f16);     \
        return run_backward(fn, &a, PARAMETER_GRADIENTS);                                           \
    }                                                                                               \
                                                                                                    \
    static PyMethodDef methods[] = {                                                                \
        {"forward", (PyCFunction)(void (*)(void))py_forward, METH_FASTCALL | METH_KEYWORDS,         \
         WHAT " forward on raw pointers, arguments by name; returns the threads used."},            \
        {"backward", (PyCFunction)(void (*)(void))py_backward, METH_FASTCALL | METH_KEYWORDS,       \
         WHAT " backward on raw pointers, arguments by name; returns the threads used."},           \
        {"has_float16", py_has_float16, METH_NOARGS, "Whether this build stores float16."},         \
        {"threading", py_threading, METH_NOARGS, "'openmp' (PyTorch's threads) or 'pthreads'."},    \
        {NULL, NULL, 0, NULL},                                                                      \
    };                                                                                              \
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, #NAME, NULL, -1, methods,            \
                                        NULL, NULL, NULL, NULL};                                    \
    PyMODINIT_FUNC PyInit_##NAME(void) {                                                            \
        if (intern_argument_names() < 0) return NULL;                                               \
        return PyModule_Create(&module);                                                            \
    }

#endif /* NORMLIB_KERNELS_H */
