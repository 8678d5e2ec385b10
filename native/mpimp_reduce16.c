/* MPI reduction operators (sum, max, min) on bfloat16 and float16 buffers.
 *
 * Build (mpimp does this itself at first use, into a per-user cache directory):
 *     mpicc -O3 -fPIC -shared -o libmpimp_reduce16.so native/mpimp_reduce16.c
 *
 * Problem: MPI has no 16-bit floating-point types, and summing bfloat16 gradients in
 * bfloat16 loses most of their bits.  Each operator here widens both operands to fp32,
 * combines them and rounds the result once to the 16-bit format (round to nearest,
 * ties to even; NaN stays NaN, overflow becomes inf).  For two 16-bit operands the fp32
 * sum rounded to 16 bits equals the exactly rounded sum (24 >= 2*11 + 2 bits, so the
 * double rounding is innocuous).  Max and min propagate NaN like torch.maximum.
 *
 * The buffers travel as MPI_UINT16_T (2-byte elements); mpimp/native_ops.py loads this
 * library with ctypes, calls mpimp_reduce16_op(i) for i = kind * 3 + op
 * (kind 0 = bfloat16, 1 = float16; op 0 = sum, 1 = max, 2 = min) and wraps the handle
 * with mpi4py's MPI.Op.fromhandle.  Must not be compiled with -ffast-math (the rounding
 * relies on IEEE round-to-nearest-even arithmetic).
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define MPIMP_REDUCE16_VERSION "mpimp-reduce16 2"

#define MPIMP_CHECK(call)                                                           \
    do {                                                                            \
        int err_ = (call);                                                          \
        if (err_ != MPI_SUCCESS) {                                                  \
            int rank_ = -1;                                                         \
            MPI_Comm_rank(MPI_COMM_WORLD, &rank_);                                  \
            fprintf(stderr, "r%d | %s:%d: %s failed with MPI error %d\n", rank_,     \
                    __FILE__, __LINE__, #call, err_);                               \
            MPI_Abort(MPI_COMM_WORLD, err_);                                        \
        }                                                                           \
    } while (0)

/* ------------------------------------------------------------------ conversions */

static inline float bits_to_f32(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x = f32_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);   /* round to nearest, ties to even; carries into inf */
    return (uint16_t)(x >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (mant << 13));   /* inf, NaN */
    if (exp != 0) return bits_to_f32(sign | ((exp + 112u) << 23) | (mant << 13));
    /* zero or subnormal: mant * 2^-24, exact in fp32 */
    float f = (float)mant * 5.9604644775390625e-8f;
    return bits_to_f32(f32_to_bits(f) | sign);
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_to_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((ax >> 13) & 0x3ffu);  /* NaN */
    if (ax >= 0x477ff000u) return sign | 0x7c00u;   /* >= 65520 rounds to inf (ties to even) */
    if (ax < 0x38800000u) {
        /* below 2^-14: subnormal.  Adding 0.5 makes the FPU round |f| to a multiple of
         * 2^-24 (ties to even); the low mantissa bits are then the f16 mantissa, and a
         * carry to 1024 is exactly the smallest normal encoding. */
        float r = bits_to_f32(ax) + 0.5f;
        return sign | (uint16_t)(f32_to_bits(r) - 0x3f000000u);
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u);  /* rebias exponent (-112 << 23) and round */
    return sign | (uint16_t)(ax >> 13);
}

/* ------------------------------------------------------------------ kernels */

#define DEFINE_KERNELS(NAME, TO32, FROM32)                                          \
    static void NAME##_sum(const uint16_t *in, uint16_t *io, int64_t n) {          \
        for (int64_t i = 0; i < n; i++) io[i] = FROM32(TO32(in[i]) + TO32(io[i])); \
    }                                                                               \
    static void NAME##_max(const uint16_t *in, uint16_t *io, int64_t n) {          \
        for (int64_t i = 0; i < n; i++) {                                           \
            float a = TO32(in[i]), b = TO32(io[i]);                                 \
            if (a != a) io[i] = in[i];                                              \
            else if (!(b != b) && a > b) io[i] = in[i];                             \
        }                                                                           \
    }                                                                               \
    static void NAME##_min(const uint16_t *in, uint16_t *io, int64_t n) {          \
        for (int64_t i = 0; i < n; i++) {                                           \
            float a = TO32(in[i]), b = TO32(io[i]);                                 \
            if (a != a) io[i] = in[i];                                              \
            else if (!(b != b) && a < b) io[i] = in[i];                             \
        }                                                                           \
    }

DEFINE_KERNELS(bf16, bf16_to_f32, f32_to_bf16)
DEFINE_KERNELS(f16, f16_to_f32, f32_to_f16)

typedef void (*kernel_t)(const uint16_t *, uint16_t *, int64_t);
static const kernel_t GENERIC[6] = {bf16_sum, bf16_max, bf16_min, f16_sum, f16_max, f16_min};

/* x86-64: the sums again with AVX2 (and F16C for float16: exact IEEE conversions with
 * round-to-nearest-even, the same results as the portable code), picked at run time. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MPIMP_SIMD 1

__attribute__((target("avx2"))) static void bf16_sum_avx2(const uint16_t *in, uint16_t *io, int64_t n) {
    for (int64_t i = 0; i < n; i++) io[i] = f32_to_bf16(bf16_to_f32(in[i]) + bf16_to_f32(io[i]));
}

__attribute__((target("avx2,f16c"))) static void f16_sum_f16c(const uint16_t *in, uint16_t *io, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i)));
        __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(io + i)));
        __m128i r = _mm256_cvtps_ph(_mm256_add_ps(a, b), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(io + i), r);
    }
    f16_sum(in + i, io + i, n - i);
}

static int simd_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
#define MPIMP_SIMD 0
static int simd_available(void) { return 0; }
#endif

static kernel_t KERNELS[6] = {bf16_sum, bf16_max, bf16_min, f16_sum, f16_max, f16_min};

static void select_kernels(void) {
#if MPIMP_SIMD
    if (simd_available()) {
        KERNELS[0] = bf16_sum_avx2;
        KERNELS[3] = f16_sum_f16c;
    }
#endif
}

/* n = number of 16-bit elements in len items of datatype dt */
static int64_t element_count(int *len, MPI_Datatype *dt) {
    int size = 0;
    MPIMP_CHECK(MPI_Type_size(*dt, &size));
    if (size % 2 != 0) {
        fprintf(stderr, "mpimp-reduce16: datatype of %d bytes is not a multiple of 16 bits\n", size);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    return (int64_t)(*len) * (size / 2);
}

#define DEFINE_USER_FN(IDX)                                                         \
    static void user_fn_##IDX(void *in, void *io, int *len, MPI_Datatype *dt) {     \
        KERNELS[IDX]((const uint16_t *)in, (uint16_t *)io, element_count(len, dt)); \
    }
DEFINE_USER_FN(0)
DEFINE_USER_FN(1)
DEFINE_USER_FN(2)
DEFINE_USER_FN(3)
DEFINE_USER_FN(4)
DEFINE_USER_FN(5)
static MPI_User_function *const USER_FNS[6] = {user_fn_0, user_fn_1, user_fn_2,
                                               user_fn_3, user_fn_4, user_fn_5};

/* ------------------------------------------------------------------ exported */

const char *mpimp_reduce16_version(void) { return MPIMP_REDUCE16_VERSION; }

/* Pick the SIMD kernels where the CPU has them; returns 1 if it did.  Called by the loader. */
int mpimp_reduce16_init(void) {
    select_kernels();
    return KERNELS[0] != bf16_sum;
}

/* Apply operator idx directly (no MPI): io[i] = in[i] (op) io[i].  generic = 1 forces the
 * portable kernels (to test them against the SIMD ones).  Returns 0, or -1 for a bad idx. */
int mpimp_reduce16_apply(int idx, const void *in, void *io, int64_t n, int generic) {
    if (idx < 0 || idx >= 6) return -1;
    (generic ? GENERIC : KERNELS)[idx]((const uint16_t *)in, (uint16_t *)io, n);
    return 0;
}

/* Create the commutative MPI operator idx; returns its handle as an integer (0 on a bad idx). */
intptr_t mpimp_reduce16_op(int idx) {
    MPI_Op op = MPI_OP_NULL;
    if (idx < 0 || idx >= 6) return 0;
    MPIMP_CHECK(MPI_Op_create(USER_FNS[idx], 1, &op));
    return (intptr_t)op;
}
