/* Gaussian noise from a counter-based generator (Philox4x32-10, Salmon et al. 2011) with a
 * Box-Muller transform, for randkit.randomize on the CPU.
 *
 * Written by hand because no library does this job: torch's CPU generator is a serial
 * mt19937, NumPy's are no faster, and neither is keyed by a counter. Here normal number i is a
 * pure function of (seed, i), so blocks are independent and the loops below vectorize
 * (figures in docs/benchmarks.md).
 *
 * Every operation is plain IEEE single precision (no FMA contraction, no fast-math, own
 * polynomials instead of libm), so every build and every instruction set gives the same bits,
 * and randkit/randomize/philox.py reproduces them with torch operations.
 *
 * Layout: Philox call c (counter c, key = seed) gives four 32-bit words w0..w3; the calls are
 * taken in blocks of 64. In block b, with j = c - 64 b, the outputs are
 *   out[256 b + j]       = r(w0) cos(2 pi t(w1))     out[256 b + 64 + j]  = r(w0) sin(2 pi t(w1))
 *   out[256 b + 128 + j] = r(w2) cos(2 pi t(w3))     out[256 b + 192 + j] = r(w2) sin(2 pi t(w3))
 * with r(w) = sqrt(-2 log(((w >> 8) + 1) 2^-24)) and t(w) = (w >> 8) 2^-24.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 64

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
/* One build runs everywhere: the loader picks the widest clone the CPU supports. */
#define WIDEST_VECTORS \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WIDEST_VECTORS
#endif

static inline float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* log(u) for u in (0, 1] (Cephes logf's polynomial). Branch-free so that it vectorizes. */
static inline float log_unit(float u) {
    uint32_t bits = as_bits(u);
    int32_t e = (int32_t)(bits >> 23) - 126;  /* u = m 2^e, m in [1/2, 1) */
    float m = as_float((bits & 0x007fffffu) | 0x3f000000u);
    int32_t small = m < 0.70710678118654752440f;  /* then m doubles and e drops by one */
    e -= small;
    float x = as_float(as_bits(m) + ((uint32_t)small << 23)) - 1.0f;
    float z = x * x;
    float y = 7.0376836292E-2f;
    y = y * x - 1.1514610310E-1f;
    y = y * x + 1.1676998740E-1f;
    y = y * x - 1.2420140846E-1f;
    y = y * x + 1.4249322787E-1f;
    y = y * x - 1.6668057665E-1f;
    y = y * x + 2.0000714765E-1f;
    y = y * x - 2.4999993993E-1f;
    y = y * x + 3.3333331174E-1f;
    y = y * x * z;
    float fe = (float)e;
    y = y + -2.12194440e-4f * fe;
    y = y - 0.5f * z;
    x = x + y;
    return x + 0.693359375f * fe;
}

/* Box-Muller on BLOCK pairs of words; the angle is reduced to a quarter turn so that short
 * Taylor polynomials are exact to float precision. */
static inline void box_muller(const uint32_t *wr, const uint32_t *wt, float *cos_out,
                              float *sin_out) {
    for (int j = 0; j < BLOCK; j++) {
        float u = (float)((int32_t)(wr[j] >> 8) + 1) * 5.9604644775390625e-8f;
        float t = (float)(int32_t)(wt[j] >> 8) * 5.9604644775390625e-8f;
        float radius = __builtin_sqrtf(-2.0f * log_unit(u));
        int32_t quarter = (int32_t)(t * 4.0f + 0.5f);
        float a = (t - (float)quarter * 0.25f) * 6.28318530717958647692f;
        float a2 = a * a;
        float s = a * (1.0f + a2 * (-1.6666667163e-1f + a2 * (8.3333337680e-3f +
                       a2 * (-1.9841270114e-4f + a2 * 2.7557314297e-6f))));
        float c = 1.0f + a2 * (-0.5f + a2 * (4.1666667908e-2f + a2 * (-1.3888889225e-3f +
                       a2 * 2.4801587642e-5f)));
        /* Rotate by the quarter turns: swap on odd quarters, then flip the signs. */
        uint32_t swap = 0u - (uint32_t)(quarter & 1);
        uint32_t sb = as_bits(s), cb = as_bits(c);
        float sn = as_float(((cb & swap) | (sb & ~swap)) ^ ((uint32_t)(quarter & 2) << 30));
        float cs = as_float(((sb & swap) | (cb & ~swap)) ^ ((uint32_t)((quarter + 1) & 2) << 30));
        cos_out[j] = radius * cs;
        sin_out[j] = radius * sn;
    }
}

enum { MODE_FILL = 0, MODE_ADD = 1, MODE_MULTIPLY = 2 };

/* out[i] = z_i (fill), x_i + level z_i (add) or x_i (1 + level z_i) (multiply), optionally
 * clipped to [0, 1], for i in [first, first + n). out may alias x. */
WIDEST_VECTORS
static void gaussian_kernel(float *out, const float *x, int64_t first, int64_t n, uint64_t seed,
                            int mode, float level, int clip) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float buf[4 * BLOCK];
    uint32_t w0[BLOCK], w1[BLOCK], w2[BLOCK], w3[BLOCK];
    int64_t end = first + n;
    for (int64_t start = first - first % (4 * BLOCK); start < end; start += 4 * BLOCK) {
        int64_t call0 = start / 4;
        for (int j = 0; j < BLOCK; j++) {
            uint64_t counter = (uint64_t)(call0 + j);
            uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
            uint32_t a = k0, b = k1;
            for (int round = 0; round < 10; round++) {
                uint64_t p0 = (uint64_t)0xD2511F53u * c0;
                uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
                uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ a;
                uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ b;
                c1 = (uint32_t)p1;
                c3 = (uint32_t)p0;
                c0 = n0;
                c2 = n2;
                a += 0x9E3779B9u;
                b += 0xBB67AE85u;
            }
            w0[j] = c0; w1[j] = c1; w2[j] = c2; w3[j] = c3;
        }
        box_muller(w0, w1, buf, buf + BLOCK);
        box_muller(w2, w3, buf + 2 * BLOCK, buf + 3 * BLOCK);
        int64_t lo = start < first ? first : start;
        int64_t hi = start + 4 * BLOCK < end ? start + 4 * BLOCK : end;
        const float *z = buf + (lo - start);
        float *o = out + (lo - first);
        const float *xi = x + (lo - first);
        int64_t count = hi - lo;
        if (mode == MODE_FILL) {
            for (int64_t i = 0; i < count; i++) o[i] = z[i];
        } else if (mode == MODE_ADD) {
            for (int64_t i = 0; i < count; i++) o[i] = xi[i] + level * z[i];
        } else {
            for (int64_t i = 0; i < count; i++) o[i] = xi[i] * (1.0f + level * z[i]);
        }
        if (clip) {
            for (int64_t i = 0; i < count; i++) {
                float v = o[i];
                v = v < 0.0f ? 0.0f : v;
                o[i] = v > 1.0f ? 1.0f : v;
            }
        }
    }
}

/* Large tensors are split over OpenMP threads at 256-number boundaries (the numbers do not
 * depend on the split). The extension links the libgomp that torch has already loaded, so
 * these are torch's own intra-op threads, which torch.set_num_threads sets: a second pool
 * would fight torch's spinning workers for the same cores. */
static void gaussian_parallel(float *out, const float *x, int64_t n, uint64_t seed, int mode,
                              float level, int clip) {
#ifdef _OPENMP
    if (n >= 65536 && omp_get_max_threads() > 1) {
        int64_t blocks = (n + 4 * BLOCK - 1) / (4 * BLOCK);
#pragma omp parallel
        {
            int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
            int64_t lo = blocks * me / threads * 4 * BLOCK;
            int64_t hi = blocks * (me + 1) / threads * 4 * BLOCK;
            hi = hi < n ? hi : n;
            if (hi > lo)
                gaussian_kernel(out + lo, mode == MODE_FILL ? x : x + lo, lo, hi - lo, seed, mode,
                                level, clip);
        }
        return;
    }
#endif
    gaussian_kernel(out, x, 0, n, seed, mode, level, clip);
}

/* gaussian(out_address, x_address, n, seed, mode, level, clip): addresses of float32
 * buffers of n elements (x_address 0 for mode 0); the GIL is released while it runs. */
static PyObject *gaussian(PyObject *self, PyObject *args) {
    unsigned long long out_address, x_address, seed;
    long long n;
    int mode, clip;
    float level;
    if (!PyArg_ParseTuple(args, "KKLKifp", &out_address, &x_address, &n, &seed, &mode, &level,
                          &clip))
        return NULL;
    if (n < 0 || mode < MODE_FILL || mode > MODE_MULTIPLY || out_address == 0 ||
        (mode != MODE_FILL && x_address == 0)) {
        PyErr_SetString(PyExc_ValueError, "gaussian: bad arguments");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    gaussian_parallel((float *)(uintptr_t)out_address, (const float *)(uintptr_t)x_address,
                      (int64_t)n, (uint64_t)seed, mode, level, clip);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gaussian", gaussian, METH_VARARGS,
     "gaussian(out, x, n, seed, mode, level, clip): Philox4x32-10 Box-Muller noise"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox", NULL, -1, methods};

PyMODINIT_FUNC PyInit__philox(void) { return PyModule_Create(&module); }
