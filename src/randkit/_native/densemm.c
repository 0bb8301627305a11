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
 * column stride, C[k] is M x N with unit column stride; bias (N per model) is optional.
 * The epilogue is either nothing, relu (max(0, v), a NaN stays NaN as in torch.relu), or a
 * mask: 0 where mask <= 0, else v (torch's threshold_backward(v, mask, 0), which keeps v
 * where mask is NaN; mask has C's layout). Each output is one thread's sum over r in order, so results do not depend on the
 * thread count.
 *
 * transpose: out[k] = in[k]^T for (K, R, C) contiguous float32, in 16 x 16 register blocks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
/* Rows [m0, m0 + ROWS) x columns [n0, n0 + 32) of model k. The 2 * ROWS sums stay in
 * registers (ROWS = 8: 16 of the 32 vector registers) while the R products are added; the
 * unroll pragmas matter: without them gcc kept the sums on the stack (measured 2.7x slower). */
#define TILE(ROWS)                                                                              \
    AVX512 static void tile##ROWS(const Gemm *g, int64_t k, int64_t m0, int64_t n0) {          \
        const float *a = g->a + k * g->a_model + m0 * g->a_row;                                 \
        const float *b = g->b + k * g->b_model + n0;                                            \
        float *c = g->c + k * g->c_model + m0 * g->c_row + n0;                                  \
        const int64_t left = g->n - n0, r_count = g->r, a_row = g->a_row, a_col = g->a_col;     \
        const int64_t b_row = g->b_row, c_row = g->c_row;                                       \
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

static void gemm_job(const Gemm *g, int64_t job, int64_t row_jobs, int64_t column_tiles) {
    const int64_t k = job / (row_jobs * column_tiles), rest = job % (row_jobs * column_tiles);
    /* a thread's consecutive jobs share one column tile of B, which stays in L1 */
    const int64_t n0 = (rest / row_jobs) * COLUMNS, m0 = (rest % row_jobs) * ROWS_PER_JOB;
    const int64_t end = m0 + ROWS_PER_JOB < g->m ? m0 + ROWS_PER_JOB : g->m;
    int64_t m = m0;
    for (; m + 8 <= end; m += 8) tile8(g, k, m, n0);
    for (; m + 4 <= end; m += 4) tile4(g, k, m, n0);
    for (; m < end; m++) tile1(g, k, m, n0);
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

static void transpose_job(const float *in, float *out, int64_t rows, int64_t cols,
                          int64_t i0, int64_t j0) {
    if (i0 + 16 <= rows && j0 + 16 <= cols) {
        transpose16(in + i0 * cols + j0, out + j0 * rows + i0, cols, rows);
        return;
    }
    const int64_t i_end = i0 + 16 < rows ? i0 + 16 : rows;
    const int64_t j_end = j0 + 16 < cols ? j0 + 16 : cols;
    for (int64_t j = j0; j < j_end; j++)
        for (int64_t i = i0; i < i_end; i++) out[j * rows + i] = in[i * cols + j];
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
 *      c_model, bias_model, epilogue, threads): addresses (0 for no bias or mask), sizes and
 * strides in floats as above, and the number of threads (torch.get_num_threads(): OpenMP's
 * own setting is per calling thread, so a worker thread would not follow torch's); the GIL
 * is released while it runs. */
static PyObject *gemm(PyObject *self, PyObject *args) {
    Gemm g = {0};
    unsigned long long a, b, c, bias, mask;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLLLLLLLLii", &a, &b, &c, &bias, &mask, &g.models,
                          &g.m, &g.n, &g.r, &g.a_row, &g.a_col, &g.a_model, &g.b_row,
                          &g.b_model, &g.c_row, &g.c_model, &g.bias_model, &g.epilogue,
                          &threads))
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

/* transpose(in, out, K, R, C, threads): out (K, C, R) = in (K, R, C) transposed, both
 * contiguous. */
static PyObject *transpose(PyObject *self, PyObject *args) {
    unsigned long long in_address, out_address;
    long long models, rows, cols;
    int threads;
    if (!PyArg_ParseTuple(args, "KKLLLi", &in_address, &out_address, &models, &rows, &cols,
                          &threads))
        return NULL;
    if (!usable) return refuse();
    if (models < 0 || rows < 0 || cols < 0 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "densemm.transpose: bad sizes");
        return NULL;
    }
#if HAVE_KERNELS
    const float *in = (const float *)(uintptr_t)in_address;
    float *out = (float *)(uintptr_t)out_address;
    const int64_t row_blocks = (rows + 15) / 16, col_blocks = (cols + 15) / 16;
    const int64_t jobs = models * row_blocks * col_blocks;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (jobs > 1)
#endif
    for (int64_t job = 0; job < jobs; job++) {
        const int64_t k = job / (row_blocks * col_blocks), rest = job % (row_blocks * col_blocks);
        transpose_job(in + k * rows * cols, out + k * rows * cols, rows, cols,
                      (rest / col_blocks) * 16, (rest % col_blocks) * 16);
    }
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *available(PyObject *self, PyObject *args) { return PyBool_FromLong(usable); }

static PyMethodDef methods[] = {
    {"gemm", gemm, METH_VARARGS,
     "gemm(a, b, c, bias, mask, K, M, N, R, a_row, a_col, a_model, b_row, b_model, c_row, "
     "c_model, bias_model, epilogue, threads): C = epilogue(bias + A @ B) per model"},
    {"transpose", transpose, METH_VARARGS,
     "transpose(in, out, K, R, C, threads): out = in^T per model"},
    {"available", available, METH_NOARGS, "available(): whether this CPU runs the kernels"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_densemm", NULL, -1, methods};

PyMODINIT_FUNC PyInit__densemm(void) {
    usable = cpu_has_avx512();
    return PyModule_Create(&module);
}
