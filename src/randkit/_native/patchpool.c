/* A small-patch convolution followed by non-overlapping max pooling, for K stacked models,
 * forward and weight gradient, for randkit.cv's vectorized runner on the CPU.
 *
 * Written by hand because no library does this well on the CPU (see randkit/cv/conv_pool.py
 * for the measurements): oneDNN runs the grouped 1-input-channel convolution slowly, and its
 * full-size output costs more in memory traffic than in arithmetic. Here nothing but the
 * pooled output is ever written: for each pooled pixel the Q convolution outputs of its
 * window are computed in registers and reduced at once, and the backward routes each pooled
 * gradient to the one window position that held the maximum.
 *
 * Layouts (float32, contiguous):
 *   patches (K, Q, N, T)  T = in_channels * kh * kw input numbers of each convolution output,
 *                         grouped by the position q of that output in its pooling window,
 *                         N = batch * pooled height * pooled width;
 *   weight  (K, T, C)     each model's kernel, transposed; bias (K, C) or none;
 *   out, grad (N, K, C)   the pooled values, models side by side (channels-last (B, K*C, H, W));
 *   position (N, K, C)    uint8, the window position q of the first maximum (a NaN wins, as
 *                         in torch's max_pool2d);
 *   grad_weight (K, T, C).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_WINDOW 16 /* positions in a pooling window */
#define MAX_PATCH 27  /* in_channels * kh * kw */
/* Channels are taken in blocks of one vector: 16 floats with AVX-512, 8 with AVX2, 4 with
 * SSE2. GCC vector extensions of each width; each instruction set's copy of the kernels
 * uses its own width (a 16-float vector lowered onto AVX2 measured 20x slower). */
#define LANES 16 /* channels must be a multiple of the widest block */
typedef float vfloat16 __attribute__((vector_size(64)));
typedef int32_t vint16 __attribute__((vector_size(64)));
typedef uint8_t vbyte16 __attribute__((vector_size(16)));
typedef float vfloat8 __attribute__((vector_size(32)));
typedef int32_t vint8 __attribute__((vector_size(32)));
typedef uint8_t vbyte8 __attribute__((vector_size(8)));
typedef float vfloat4 __attribute__((vector_size(16)));
typedef int32_t vint4 __attribute__((vector_size(16)));
typedef uint8_t vbyte4 __attribute__((vector_size(4)));

/* Unaligned loads and stores, as macros so that each copy compiles its own. */
#define LOAD(v, p) memcpy(&(v), (p), sizeof(v))
#define STORE(p, v) memcpy((p), &(v), sizeof(v))

/* best and where take value v of window position q where it beats best (the first maximum
 * wins; a NaN wins, as in torch's max_pool2d). */
#define TAKE(v, q, VI)                                                                       \
    do {                                                                                     \
        const VI take = ((v) > best) | ((v) != (v));                                         \
        best = (__typeof__(best))(((VI)(v) & take) | ((VI)best & ~take));                    \
        where = (where & ~take) | (((VI){0} + (int32_t)(q)) & take);                         \
    } while (0)

/* The kernels, defined once per instruction set (see choose_kernels). */
#define KERNELS(SUFFIX, TARGET, VF, VI, VB, W)                                                                \
/* Pooled rows [lo, hi) of model k, channels in blocks of W: the Q window outputs of a     \
 * block stay in registers while the T patch numbers are multiplied in. */                     \
TARGET static void forward_rows##SUFFIX(const float *patches, const float *weight, const float *bias, \
                         float *out, uint8_t *position, int64_t k, int64_t models, int64_t q_count, \
                         int64_t n_count, int64_t t_count, int64_t channels, int64_t lo,       \
                         int64_t hi) {                                                         \
    const float *w = weight + k * t_count * channels;                                          \
    for (int64_t n = lo; n < hi; n++) {                                                        \
        const float *p = patches + (k * q_count * n_count + n) * t_count;                      \
        const int64_t q_step = n_count * t_count; /* from one window position to the next */   \
        for (int64_t c0 = 0; c0 < channels; c0 += W) {                                     \
            VF best;                                                                       \
            VI where = (VI){0};                                                            \
            if (q_count == 4) { /* 2x2 pooling written out, so that its sums stay in registers */ \
                VF v0 = {0}, v1 = {0}, v2 = {0}, v3 = {0};                                 \
                for (int64_t t = 0; t < t_count; t++) {                                        \
                    VF wt;                                                                 \
                    LOAD(wt, w + t * channels + c0);                                           \
                    v0 += p[t] * wt;                                                           \
                    v1 += p[q_step + t] * wt;                                                  \
                    v2 += p[2 * q_step + t] * wt;                                              \
                    v3 += p[3 * q_step + t] * wt;                                              \
                }                                                                              \
                best = v0;                                                                     \
                TAKE(v1, 1, VI);                                                                   \
                TAKE(v2, 2, VI);                                                                   \
                TAKE(v3, 3, VI);                                                                   \
            } else {                                                                           \
                VF value[MAX_WINDOW] = {0};                                                    \
                for (int64_t q = 0; q < q_count; q++) value[q] = (VF){0};                  \
                for (int64_t t = 0; t < t_count; t++) {                                        \
                    VF wt;                                                                 \
                    LOAD(wt, w + t * channels + c0);                                           \
                    for (int64_t q = 0; q < q_count; q++) value[q] += p[q * q_step + t] * wt;  \
                }                                                                              \
                best = value[0];                                                               \
                for (int64_t q = 1; q < q_count; q++) TAKE(value[q], q, VI);                       \
            }                                                                                  \
            if (bias) {                                                                        \
                VF b;                                                                      \
                LOAD(b, bias + k * channels + c0);                                             \
                best += b;                                                                     \
            }                                                                                  \
            STORE(out + (n * models + k) * channels + c0, best);                               \
            const VB narrow = __builtin_convertvector(where, VB);                     \
            memcpy(position + (n * models + k) * channels + c0, &narrow, sizeof narrow);         \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Weight gradient of model k from pooled rows [lo, hi) into partial (T, channels): each       \
 * pooled gradient goes to the patch of the window position that held the maximum. */          \
TARGET static void backward_rows##SUFFIX(const float *patches, const uint8_t *position, const float *grad, \
                          float *partial, int64_t k, int64_t models, int64_t q_count,          \
                          int64_t n_count, int64_t t_count, int64_t channels, int64_t lo,      \
                          int64_t hi) {                                                        \
    const int64_t q_step = n_count * t_count;                                                  \
    for (int64_t c0 = 0; c0 < channels; c0 += W) {                                         \
        VF acc[MAX_PATCH];                                                                 \
        for (int64_t t = 0; t < t_count; t++) acc[t] = (VF){0};                            \
        for (int64_t n = lo; n < hi; n++) {                                                    \
            VF g;                                                                          \
            LOAD(g, grad + (n * models + k) * channels + c0);                                  \
            const uint8_t *pos = position + (n * models + k) * channels + c0;                  \
            VB narrow;                                                                  \
            memcpy(&narrow, pos, sizeof narrow);                                           \
            const VI won = __builtin_convertvector(narrow, VI);                            \
            const float *p = patches + (k * q_count * n_count + n) * t_count;                  \
            for (int64_t q = 0; q < q_count; q++) {                                            \
                const VI mine = won == ((VI){0} + (int32_t)q);                             \
                const VF routed = (VF)((VI)g & mine);                                \
                for (int64_t t = 0; t < t_count; t++) acc[t] += p[q * q_step + t] * routed;    \
            }                                                                                  \
        }                                                                                      \
        for (int64_t t = 0; t < t_count; t++) STORE(partial + t * channels + c0, acc[t]);      \
    }                                                                                          \
}

/* Each instruction set gets its own compiled copy, chosen once at import. (gcc's
 * target_clones compiles these vector types element by element: 10x slower, measured.) */
#if defined(__GNUC__) && defined(__x86_64__)
KERNELS(_v4, __attribute__((target("arch=x86-64-v4"))), vfloat16, vint16, vbyte16, 16)
KERNELS(_v3, __attribute__((target("arch=x86-64-v3"))), vfloat8, vint8, vbyte8, 8)
#endif
KERNELS(_base, , vfloat4, vint4, vbyte4, 4)

typedef void (*ForwardRows)(const float *, const float *, const float *, float *, uint8_t *,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t);
typedef void (*BackwardRows)(const float *, const uint8_t *, const float *, float *, int64_t,
                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
static ForwardRows forward_rows = forward_rows_base;
static BackwardRows backward_rows = backward_rows_base;

static int supports_v4(void) {
#if defined(__GNUC__) && defined(__x86_64__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static int supports_v3(void) {
#if defined(__GNUC__) && defined(__x86_64__)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Use the copy for instruction set "v4", "v3" or "base"; returns the name in use. The
 * widest the CPU supports is chosen at import; tests pin the others to check them too. */
static const char *use_kernels(const char *isa) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (strcmp(isa, "v4") == 0 && supports_v4()) {
        forward_rows = forward_rows_v4;
        backward_rows = backward_rows_v4;
        return "v4";
    }
    if (strcmp(isa, "v3") == 0 && supports_v3()) {
        forward_rows = forward_rows_v3;
        backward_rows = backward_rows_v3;
        return "v3";
    }
#endif
    if (strcmp(isa, "base") == 0) {
        forward_rows = forward_rows_base;
        backward_rows = backward_rows_base;
        return "base";
    }
    return NULL;
}

static void choose_kernels(void) {
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
#endif
    if (!use_kernels("v4") && !use_kernels("v3")) use_kernels("base");
}

/* kernels(isa): pin the copy for "v4", "v3" or "base"; returns False where the CPU lacks it. */
static PyObject *kernels(PyObject *self, PyObject *args) {
    const char *isa;
    if (!PyArg_ParseTuple(args, "s", &isa)) return NULL;
    return PyBool_FromLong(use_kernels(isa) != NULL);
}

typedef struct {
    unsigned long long patches, weight, bias, out, position, grad, grad_weight;
    long long models, q_count, n_count, t_count, channels;
} Args;

static int check(const Args *a) {
    if (a->models < 1 || a->q_count < 1 || a->q_count > MAX_WINDOW || a->n_count < 0 ||
        a->t_count < 1 || a->t_count > MAX_PATCH || a->channels < LANES ||
        a->channels % LANES != 0) {
        PyErr_SetString(PyExc_ValueError, "patchpool: bad sizes");
        return 0;
    }
    return 1;
}

/* forward(patches, weight, bias, out, position, K, Q, N, T, C): addresses and sizes as
 * above (bias 0 for none); the GIL is released while it runs. */
static PyObject *forward(PyObject *self, PyObject *args) {
    Args a = {0};
    if (!PyArg_ParseTuple(args, "KKKKKLLLLL", &a.patches, &a.weight, &a.bias, &a.out,
                          &a.position, &a.models, &a.q_count, &a.n_count, &a.t_count,
                          &a.channels) ||
        !check(&a))
        return NULL;
    const float *patches = (const float *)(uintptr_t)a.patches;
    const float *weight = (const float *)(uintptr_t)a.weight;
    const float *bias = (const float *)(uintptr_t)a.bias;
    float *out = (float *)(uintptr_t)a.out;
    uint8_t *position = (uint8_t *)(uintptr_t)a.position;
    const int64_t models = a.models, n_count = a.n_count, chunk = 64;
    const int64_t chunks = (n_count + chunk - 1) / chunk;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (models * chunks > 1)
#endif
    for (int64_t job = 0; job < models * chunks; job++) {
        const int64_t k = job / chunks, lo = (job % chunks) * chunk;
        const int64_t hi = lo + chunk < n_count ? lo + chunk : n_count;
        forward_rows(patches, weight, bias, out, position, k, models, a.q_count, n_count,
                     a.t_count, a.channels, lo, hi);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* backward(patches, position, grad, grad_weight, K, Q, N, T, C): the rows of each model
 * are split in SPLITS parts summed at the end, so that 2 threads share K = 5 models evenly. */
#define SPLITS 8
static PyObject *backward(PyObject *self, PyObject *args) {
    Args a = {0};
    if (!PyArg_ParseTuple(args, "KKKKLLLLL", &a.patches, &a.position, &a.grad, &a.grad_weight,
                          &a.models, &a.q_count, &a.n_count, &a.t_count, &a.channels) ||
        !check(&a))
        return NULL;
    const float *patches = (const float *)(uintptr_t)a.patches;
    const uint8_t *position = (const uint8_t *)(uintptr_t)a.position;
    const float *grad = (const float *)(uintptr_t)a.grad;
    float *grad_weight = (float *)(uintptr_t)a.grad_weight;
    const int64_t models = a.models, n_count = a.n_count, size = a.t_count * a.channels;
    float *partial = PyMem_RawMalloc(sizeof(float) * (size_t)(models * SPLITS * size));
    if (!partial) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t job = 0; job < models * SPLITS; job++) {
        const int64_t k = job / SPLITS, part = job % SPLITS;
        backward_rows(patches, position, grad, partial + job * size, k, models, a.q_count,
                      n_count, a.t_count, a.channels, n_count * part / SPLITS,
                      n_count * (part + 1) / SPLITS);
    }
    for (int64_t k = 0; k < models; k++)
        for (int64_t i = 0; i < size; i++) {
            float sum = 0.0f;
            for (int64_t part = 0; part < SPLITS; part++)
                sum += partial[(k * SPLITS + part) * size + i];
            grad_weight[k * size + i] = sum;
        }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(partial);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS,
     "forward(patches, weight, bias, out, position, K, Q, N, T, C): pooled patch products"},
    {"backward", backward, METH_VARARGS,
     "backward(patches, position, grad, grad_weight, K, Q, N, T, C): weight gradient"},
    {"kernels", kernels, METH_VARARGS,
     "kernels(isa): use the copy for 'v4', 'v3' or 'base'; False where the CPU lacks it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_patchpool", NULL, -1, methods};

PyMODINIT_FUNC PyInit__patchpool(void) {
    choose_kernels();
    return PyModule_Create(&module);
}
