/* Small batched matrix products for the dense layers of K stacked models, AVX-512 only, for
 * randkit.cv's vectorized runner on the CPU.
 *
 * Written by hand because no library does this well here: torch's CPU matmul goes to MKL,
 * which runs its AVX2 code on AMD processors even where they have AVX-512, and on the
 * stacked digits MLP's shapes (5 models, 64 rows, 64-256-128-10) this kernel measured 2.5x
 * faster than torch.bmm/baddbmm (see randkit/cv/native_matmul.py). On a CPU without
 * AVX-512 the module reports so and the caller keeps torch.bmm.
 *
 * gemm: for every model k,
 *     C[k] = epilogue(bias[k] + A[k] @ B[k])
 * A[k] is M x R with any strides (a transposed view is fine), B[k] is R x N with unit
 * column stride or, for a Linear layer's weight, given transposed (N x R, unit stride along
 * R: packed per column tile inside the kernel), C[k] is M x N with unit column stride; bias
 * (N per model) is optional.
 * The epilogue is either nothing, relu (max(0, v), a NaN stays NaN as in torch.relu), or a
 * mask: 0 where mask <= 0, else v (torch's threshold_backward(v, mask, 0), which keeps v
 * where mask is NaN; mask has C's layout). Each output is one thread's sum over r in order, so results do not depend on the
 * thread count.
 *
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_KERNELS 1
#define AVX512 __attribute__((target("avx512f,fma")))
#else
#define HAVE_KERNELS 0
#endif

enum { EPILOGUE_NONE = 0, EPILOGUE_RELU = 1, EPILOGUE_MASK = 2 };

typedef struct {
    const float *a, *b, *bias, *mask;
    float *c;
    int64_t models, m, n, r;
    int64_t a_row, a_col, a_model; /* A's strides, in floats */
    int64_t b_row, b_model, c_row, c_model, bias_model;
    int epilogue;
} Gemm;

#define ROWS_PER_JOB 16 /* rows of C per job: jobs small enough to share 2 threads evenly */
#define COLUMNS 32      /* columns of C per tile: two 16-float vectors */

#if HAVE_KERNELS
/* Rows [m0, m0 + ROWS) x columns [n0, n0 + 32) of model k, B's rows of 32 starting at b
 * (b_row apart: B itself, or a packed panel of it). The 2 * ROWS sums stay in
 * registers (ROWS = 8: 16 of the 32 vector registers) while the R products are added; the
 * unroll pragmas matter: without them gcc kept the sums on the stack (measured 2.7x slower). */
#define TILE(ROWS)                                                                              \
    AVX512 static void tile##ROWS(const Gemm *g, const float *b, int64_t b_row, int64_t k,    \
                                  int64_t m0, int64_t n0) {                                     \
        const float *a = g->a + k * g->a_model + m0 * g->a_row;                                 \
        float *c = g->c + k * g->c_model + m0 * g->c_row + n0;                                  \
        const int64_t left = g->n - n0, r_count = g->r, a_row = g->a_row, a_col = g->a_col;     \
        const int64_t c_row = g->c_row;                                                         \
        const __mmask16 lo = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);              \
        const __mmask16 hi = left >= 32   ? 0xFFFF                                              \
                             : left > 16 ? (__mmask16)((1u << (left - 16)) - 1)                 \
                                         : 0;                                                   \
        __m512 sum_lo[ROWS], sum_hi[ROWS];                                                      \
        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++) {                                \
            sum_lo[i] = _mm512_setzero_ps();                                                    \
            sum_hi[i] = _mm512_setzero_ps();                                                    \
        }                                                                                       \
        for (int64_t r = 0; r < r_count; r++) {                                                 \
            const __m512 b_lo = _mm512_maskz_loadu_ps(lo, b + r * b_row);                       \
            const __m512 b_hi = _mm512_maskz_loadu_ps(hi, b + r * b_row + 16);                  \
            _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++) {                            \
                const __m512 a_ir = _mm512_set1_ps(a[i * a_row + r * a_col]);                   \
                sum_lo[i] = _mm512_fmadd_ps(a_ir, b_lo, sum_lo[i]);                             \
                sum_hi[i] = _mm512_fmadd_ps(a_ir, b_hi, sum_hi[i]);                             \
            }                                                                                   \
        }                                                                                       \
        __m512 bias_lo = _mm512_setzero_ps(), bias_hi = _mm512_setzero_ps();                    \
        if (g->bias) {                                                                          \
            bias_lo = _mm512_maskz_loadu_ps(lo, g->bias + k * g->bias_model + n0);              \
            bias_hi = _mm512_maskz_loadu_ps(hi, g->bias + k * g->bias_model + n0 + 16);         \
        }                                                                                       \
        const __m512 zero = _mm512_setzero_ps();                                                \
        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++) {                                \
            __m512 v_lo = _mm512_add_ps(bias_lo, sum_lo[i]);                                    \
            __m512 v_hi = _mm512_add_ps(bias_hi, sum_hi[i]);                                    \
            if (g->epilogue == EPILOGUE_RELU) { /* max(0, NaN) is NaN: the second operand */   \
                v_lo = _mm512_max_ps(zero, v_lo);                                               \
                v_hi = _mm512_max_ps(zero, v_hi);                                               \
            } else if (g->epilogue == EPILOGUE_MASK) {                                          \
                const float *mask = g->mask + k * g->c_model + (m0 + i) * c_row + n0;           \
                const __m512 m_lo = _mm512_maskz_loadu_ps(lo, mask);                            \
                const __m512 m_hi = _mm512_maskz_loadu_ps(hi, mask + 16);                       \
                v_lo = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_lo, zero, _CMP_NLE_UQ), v_lo);   \
                v_hi = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_hi, zero, _CMP_NLE_UQ), v_hi);   \
            }                                                                                   \
            _mm512_mask_storeu_ps(c + i * c_row, lo, v_lo);                                     \
            _mm512_mask_storeu_ps(c + i * c_row + 16, hi, v_hi);                                \
        }                                                                                       \
    }
TILE(8)
TILE(4)
TILE(1)

static void row_tiles(const Gemm *g, const float *b, int64_t b_row, int64_t k, int64_t m0,
                      int64_t end, int64_t n0) {
    int64_t m = m0;
    for (; m + 8 <= end; m += 8) tile8(g, b, b_row, k, m, n0);
    for (; m + 4 <= end; m += 4) tile4(g, b, b_row, k, m, n0);
    for (; m < end; m++) tile1(g, b, b_row, k, m, n0);
}

static void gemm_job(const Gemm *g, int64_t job, int64_t row_jobs, int64_t column_tiles) {
    const int64_t k = job / (row_jobs * column_tiles), rest = job % (row_jobs * column_tiles);
    /* a thread's consecutive jobs share one column tile of B, which stays in L1 */
    const int64_t n0 = (rest / row_jobs) * COLUMNS, m0 = (rest % row_jobs) * ROWS_PER_JOB;
    const int64_t end = m0 + ROWS_PER_JOB < g->m ? m0 + ROWS_PER_JOB : g->m;
    row_tiles(g, g->b + k * g->b_model + n0, g->b_row, k, m0, end, n0);
}

AVX512 static void transpose16(const float *in, float *out, int64_t in_row, int64_t out_row);

/* B given transposed (N rows of R, b_row apart; a Linear layer's weight): each job packs the
 * 32 rows of one column tile into ``pack`` (R x 32) by 16 x 16 register transposes, then runs
 * every row of C against it while it is in L1. Instead of transposing the whole weight first:
 * one pass over it fewer, and no separate call (measured: 19 us a transpose inside the digits
 * MLP's steps). */
static void gemm_packed_job(const Gemm *g, int64_t job, int64_t column_tiles, float *pack) {
    const int64_t k = job / column_tiles, n0 = (job % column_tiles) * COLUMNS;
    const int64_t width = g->n - n0 < COLUMNS ? g->n - n0 : COLUMNS, r_count = g->r;
    const float *w = g->b + k * g->b_model + n0 * g->b_row;
    for (int64_t h = 0; h < width; h += 16) {
        int64_t r = 0;
        if (width - h >= 16)
            for (; r + 16 <= r_count; r += 16)
                transpose16(w + h * g->b_row + r, pack + r * COLUMNS + h, g->b_row, COLUMNS);
        for (; r < r_count; r++) /* what 16 x 16 blocks leave, one number at a time */
            for (int64_t j = h; j < width && j < h + 16; j++)
                pack[r * COLUMNS + j] = w[j * g->b_row + r];
    }
    row_tiles(g, pack, COLUMNS, k, 0, g->m, n0);
}

/* A 16 x 16 block: 16 rows in registers, transposed by 32-bit, 64-bit, 128-bit and 256-bit
 * interleaves. */
AVX512 static void transpose16(const float *in, float *out, int64_t in_row, int64_t out_row) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(in + i * in_row);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
        const __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(out + i * out_row, r[i]);
}

/* e^x for x <= 0 (the logits less their row's maximum): x = n ln 2 + r with |r| <= ln 2 / 2,
 * e^r by its Taylor series to r^6, times 2^n (measured against double-precision exp: at most
 * 2.4e-7 relative over [-87, 0]). Below -88.3 the result is clamped at about 4e-39, where
 * torch's would be smaller still: both vanish next to the row's sum, which is at least 1.
 * A NaN comes out as that constant too: the caller checks its rows for NaN and inf. */
AVX512 static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* One row of C logits: its cross-entropy against class t with label smoothing eps, and the
 * gradient of that with respect to the logits (softmax - smoothed one-hot) into grad. A row
 * with a NaN or +inf logit, or with only -inf, gives NaN for both, as torch does. */
AVX512 static float cross_entropy_row(const float *x, int64_t classes, int64_t t, float eps,
                                      float *grad) {
    const __m512 infinity = _mm512_set1_ps(INFINITY);
    __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t c = 0; c < classes; c += 16) {
        const __mmask16 k = lanes(classes - c);
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + c);
        bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v, infinity, _CMP_EQ_OQ);
        top = _mm512_max_ps(top, v);
    }
    const float m = _mm512_reduce_max_ps(top);
    if (bad || m == -INFINITY) {
        for (int64_t c = 0; c < classes; c++) grad[c] = NAN;
        return NAN;
    }
    const __m512 shift = _mm512_set1_ps(m);
    float sum_shifted = 0.0f; /* of x - m: with lse - m below, no cancellation at large m */
    for (int64_t c = 0; c < classes; c += 16) {
        const __mmask16 k = lanes(classes - c);
        const __m512 v = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, x + c), shift);
        const __m512 e = _mm512_maskz_mov_ps(k, exp_nonpositive(v));
        _mm512_mask_storeu_ps(grad + c, k, e);
        total = _mm512_add_ps(total, e);
        sum_shifted += _mm512_reduce_add_ps(v);
    }
    const float sum = _mm512_reduce_add_ps(total), log_sum = logf(sum);
    const __m512 scale = _mm512_set1_ps(1.0f / sum), spread = _mm512_set1_ps(eps / classes);
    for (int64_t c = 0; c < classes; c += 16) {
        const __mmask16 k = lanes(classes - c);
        const __m512 e = _mm512_maskz_loadu_ps(k, grad + c);
        _mm512_mask_storeu_ps(grad + c, k, _mm512_fmsub_ps(e, scale, spread));
    }
    grad[t] += eps - 1.0f;
    const float log_p_t = (x[t] - m) - log_sum;
    if (eps == 0.0f) return -log_p_t;
    return -(1.0f - eps) * log_p_t - eps / classes * (sum_shifted - classes * log_sum);
}

#endif

static int cpu_has_avx512(void) {
#if HAVE_KERNELS
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static int usable = 0;

static PyObject *refuse(void) {
    PyErr_SetString(PyExc_RuntimeError, "densemm: this CPU has no AVX-512");
    return NULL;
}

/* gemm(a, b, c, bias, mask, K, M, N, R, a_row, a_col, a_model, b_row, b_model, c_row,
 *      c_model, bias_model, epilogue, threads, b_transposed): addresses (0 for no bias or
 * mask), sizes and strides in floats as above, the number of threads (torch.get_num_threads():
 * OpenMP's own setting is per calling thread, so a worker thread would not follow torch's),
 * and whether B is given transposed (N x R per model, b_row apart, unit stride along R); the
 * GIL is released while it runs. */
static PyObject *gemm(PyObject *self, PyObject *args) {
    Gemm g = {0};
    unsigned long long a, b, c, bias, mask;
    int threads, b_transposed;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLLLLLLLLiip", &a, &b, &c, &bias, &mask, &g.models,
                          &g.m, &g.n, &g.r, &g.a_row, &g.a_col, &g.a_model, &g.b_row,
                          &g.b_model, &g.c_row, &g.c_model, &g.bias_model, &g.epilogue,
                          &threads, &b_transposed))
        return NULL;
    if (!usable) return refuse();
    if (g.models < 0 || g.m < 0 || g.n < 0 || g.r < 0 || g.epilogue < EPILOGUE_NONE ||
        g.epilogue > EPILOGUE_MASK || (g.epilogue == EPILOGUE_MASK && !mask) || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "densemm.gemm: bad sizes or epilogue");
        return NULL;
    }
#if HAVE_KERNELS
    g.a = (const float *)(uintptr_t)a;
    g.b = (const float *)(uintptr_t)b;
    g.c = (float *)(uintptr_t)c;
    g.bias = (const float *)(uintptr_t)bias;
    g.mask = (const float *)(uintptr_t)mask;
    const int64_t row_jobs = (g.m + ROWS_PER_JOB - 1) / ROWS_PER_JOB;
    const int64_t column_tiles = (g.n + COLUMNS - 1) / COLUMNS;
    if (b_transposed) {
        const int64_t jobs = g.models * column_tiles;
        /* one packed panel per thread */
        const int64_t team = threads < jobs ? threads : jobs > 0 ? jobs : 1;
        float *packs = PyMem_RawMalloc(sizeof(float) * (size_t)(team * (g.r + 1) * COLUMNS));
        if (!packs) return PyErr_NoMemory();
        Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(team) if (jobs > 1)
#endif
        for (int64_t job = 0; job < jobs; job++) {
#ifdef _OPENMP
            float *pack = packs + (int64_t)omp_get_thread_num() * (g.r + 1) * COLUMNS;
#else
            float *pack = packs;
#endif
            gemm_packed_job(&g, job, column_tiles, pack);
        }
        Py_END_ALLOW_THREADS
        PyMem_RawFree(packs);
        Py_RETURN_NONE;
    }
    const int64_t jobs = g.models * row_jobs * column_tiles;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (jobs > 1)
#endif
    for (int64_t job = 0; job < jobs; job++) gemm_job(&g, job, row_jobs, column_tiles);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

/* cross_entropy(logits, target, row_weight, losses, counts, grad, K, B, C, eps): for K models
 * of B rows of C logits (contiguous float32), int64 class targets (K, B) and float32 row
 * weights (K, B): losses[k] = sum_b w * ce / max(sum_b w, 1), counts[k] = max(sum_b w, 1),
 * grad (K, B, C) = d ce / d logits per row (unweighted). Raises ValueError for a target
 * outside [0, C). One thread: 320 rows of 10 classes take a few microseconds. */
static PyObject *cross_entropy(PyObject *self, PyObject *args) {
    unsigned long long logits_address, target_address, weight_address, losses_address;
    unsigned long long counts_address, grad_address;
    long long models, rows, classes;
    float eps;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLf", &logits_address, &target_address,
                          &weight_address, &losses_address, &counts_address, &grad_address,
                          &models, &rows, &classes, &eps))
        return NULL;
    if (!usable) return refuse();
    if (models < 0 || rows < 0 || classes < 1) {
        PyErr_SetString(PyExc_ValueError, "densemm.cross_entropy: bad sizes");
        return NULL;
    }
    const float *logits = (const float *)(uintptr_t)logits_address;
    const int64_t *target = (const int64_t *)(uintptr_t)target_address;
    const float *weight = (const float *)(uintptr_t)weight_address;
    float *losses = (float *)(uintptr_t)losses_address;
    float *counts = (float *)(uintptr_t)counts_address;
    float *grad = (float *)(uintptr_t)grad_address;
    for (int64_t i = 0; i < models * rows; i++)
        if (target[i] < 0 || target[i] >= classes) {
            PyErr_Format(PyExc_ValueError, "target %lld is not a class in [0, %lld)",
                         (long long)target[i], classes);
            return NULL;
        }
#if HAVE_KERNELS
    Py_BEGIN_ALLOW_THREADS
    for (int64_t k = 0; k < models; k++) {
        double loss = 0.0, count = 0.0;
        for (int64_t b = 0; b < rows; b++) {
            const int64_t row = k * rows + b;
            const float ce = cross_entropy_row(logits + row * classes, classes, target[row], eps,
                                               grad + row * classes);
            loss += (double)weight[row] * ce;
            count += weight[row];
        }
        counts[k] = count < 1.0 ? 1.0f : (float)count;
        losses[k] = (float)(loss / counts[k]);
    }
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *available(PyObject *self, PyObject *args) { return PyBool_FromLong(usable); }

static PyMethodDef methods[] = {
    {"gemm", gemm, METH_VARARGS,
     "gemm(a, b, c, bias, mask, K, M, N, R, a_row, a_col, a_model, b_row, b_model, c_row, "
     "c_model, bias_model, epilogue, threads, b_transposed): C = epilogue(bias + A @ B)"},
    {"cross_entropy", cross_entropy, METH_VARARGS,
     "cross_entropy(logits, target, row_weight, losses, counts, grad, K, B, C, eps)"},
    {"available", available, METH_NOARGS, "available(): whether this CPU runs the kernels"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_densemm", NULL, -1, methods};

PyMODINIT_FUNC PyInit__densemm(void) {
    usable = cpu_has_avx512();
    return PyModule_Create(&module);
}
