/*
 * What the fused CPU kernels (rms_norm.c, layer_norm.c) share: storage types loaded as float32 and
 * stored rounded, rows split across threads, and converting the Python arguments. Each .c file
 * includes this header and is built by normlib/cpu/native.py into its own Python extension.
 *
 * Threads: the rows are split into equal contiguous ranges, one per thread. Built with OpenMP,
 * the threads are PyTorch's own: native.py links the extension against the OpenMP runtime PyTorch
 * has already loaded, so a parallel region reuses PyTorch's waiting threads (1-2 us) instead of
 * creating threads per call (25-60 us on the course machine). Without OpenMP (another compiler,
 * or a PyTorch without it) it starts pthreads per call. Weight gradients are accumulated per
 * thread into rows of a float32 buffer and summed in thread order: deterministic for a given
 * thread count, no atomics.
 *
 * Why a Python extension and not ctypes: a ctypes call with eleven arguments costs ~1.1 us, as
 * much as PyTorch's whole LayerNorm call on a small tensor; a METH_FASTCALL function costs ~0.1 us.
 */

#ifndef NORMLIB_KERNELS_H
#define NORMLIB_KERNELS_H

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

/* Per-thread float32 sums, (threads, stride) with the sums in columns [0, n), added in thread
 * order and rounded to the storage type once. */
#define DEFINE_STORE_SUMS(T, SUFFIX)                                                               \
    static void store_sums_##SUFFIX(void *out, const float *parts, int threads, int64_t n,      \
                                    int64_t stride) {                                             \
        for (int64_t j = 0; j < n; j++) {                                                         \
            float total = parts[j];                                                               \
            for (int t = 1; t < threads; t++) total += parts[(int64_t)t * stride + j];            \
            store_##SUFFIX((T *)out, j, total);                                                   \
        }                                                                                         \
    }
DEFINE_STORE_SUMS(float, f32)
DEFINE_STORE_SUMS(bf16_t, bf16)
#if HAVE_FLOAT16
DEFINE_STORE_SUMS(_Float16, f16)
#endif

enum { STORAGE_F32 = 0, STORAGE_BF16 = 1, STORAGE_F16 = 2 };

static void store_sums(long storage, void *out, const float *parts, int threads, int64_t n, int64_t stride) {
    if (storage == STORAGE_F32) store_sums_f32(out, parts, threads, n, stride);
    else if (storage == STORAGE_BF16) store_sums_bf16(out, parts, threads, n, stride);
#if HAVE_FLOAT16
    else store_sums_f16(out, parts, threads, n, stride);
#endif
}

/* Each .c file writes DEFINE_KERNELS(T, SUFFIX) once and instantiates it per storage type with
 * INSTANTIATE_KERNELS(DEFINE_KERNELS); without _Float16 the f16 entries fall back to the f32 ones,
 * which are never picked (Python checks has_float16()). */
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

/* ---- the Python side -------------------------------------------------------------------------- */

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


/* A backward's driver: `count` per-thread float32 sums of n values each (the parameter gradients)
 * are zero-filled in *parts when outputs[0] is given, fn runs over the rows, and each sum is then
 * written to outputs[k] in the storage type. Returns the number of threads used, or NULL with
 * MemoryError. */
static PyObject *run_with_sums(rows_fn fn, const void *args, float **parts, long storage,
                               void *const *outputs, int count, int64_t rows, int64_t n, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    *parts = NULL;
    if (outputs[0] && n > 0) {
        *parts = (float *)calloc((size_t)threads * (size_t)count * (size_t)n, sizeof(float));
        if (!*parts) return PyErr_NoMemory();
    }
    const int used = run(fn, args, rows, n, threads);
    if (*parts) {
        for (int k = 0; k < count; k++) store_sums(storage, outputs[k], *parts + k * n, used, n, count * n);
        free(*parts);
        *parts = NULL;
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

/* The module `NAME` with the functions forward and backward (METH_FASTCALL) that each .c file
 * defines, and has_float16 and threading from above; WHAT names the op in their docstrings. */
#define DEFINE_MODULE(NAME, WHAT)                                                                  \
    static PyMethodDef methods[] = {                                                               \
        {"forward", (PyCFunction)(void (*)(void))py_forward, METH_FASTCALL,                        \
         WHAT " forward on raw pointers."},                                                        \
        {"backward", (PyCFunction)(void (*)(void))py_backward, METH_FASTCALL,                      \
         WHAT " backward on raw pointers."},                                                       \
        {"has_float16", py_has_float16, METH_NOARGS, "Whether this build stores float16."},       \
        {"threading", py_threading, METH_NOARGS, "'openmp' (PyTorch's threads) or 'pthreads'."},  \
        {NULL, NULL, 0, NULL},                                                                     \
    };                                                                                             \
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, #NAME, NULL, -1, methods,         \
                                        NULL, NULL, NULL, NULL};                                   \
    PyMODINIT_FUNC PyInit_##NAME(void) { return PyModule_Create(&module); }

#endif /* NORMLIB_KERNELS_H */
