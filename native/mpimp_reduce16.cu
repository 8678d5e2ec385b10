// CUDA kernels of mpimp's 16-bit reductions (sum, max, min on bfloat16 and float16).
//
// Check that it compiles (tests/test_native_ops.py does this where nvcc exists):
//     nvcc --ptx -o /tmp/mpimp_reduce16.ptx native/mpimp_reduce16.cu
// At run time mpimp/native_ops.py compiles it with CuPy (cupy.RawModule) on first use.
//
// Same arithmetic as native/mpimp_reduce16.c: both operands widened to fp32, combined,
// rounded once to the 16-bit format (round to nearest, ties to even, NaN preserved,
// overflow to inf); max/min propagate NaN.  Self-contained (no cuda_fp16.h), so NVRTC
// needs no include path.  Each kernel is io[i] = in[i] (op) io[i] over n elements, with a
// grid-stride loop: any launch configuration covers any n.

typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x0040u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (u16)(x >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = ((u32)(h & 0x8000u)) << 16;
    u32 exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
    float f = (float)mant * 5.9604644775390625e-8f;
    return __uint_as_float(__float_as_uint(f) | sign);
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u16 sign = (u16)((x >> 16) & 0x8000u);
    u32 ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u | (u16)((ax >> 13) & 0x3ffu);
    if (ax >= 0x477ff000u) return sign | 0x7c00u;
    if (ax < 0x38800000u) {
        float r = __fadd_rn(__uint_as_float(ax), 0.5f);  // rounds to a multiple of 2^-24
        return sign | (u16)(__float_as_uint(r) - 0x3f000000u);
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u);
    return sign | (u16)(ax >> 13);
}

#define MPIMP_KERNELS(NAME, TO32, FROM32)                                              \
    extern "C" __global__ void mpimp_##NAME##_sum(const u16 *in, u16 *io, long long n) { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;       \
             i += (long long)blockDim.x * gridDim.x)                                     \
            io[i] = FROM32(__fadd_rn(TO32(in[i]), TO32(io[i])));                         \
    }                                                                                    \
    extern "C" __global__ void mpimp_##NAME##_max(const u16 *in, u16 *io, long long n) { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;       \
             i += (long long)blockDim.x * gridDim.x) {                                   \
            float a = TO32(in[i]), b = TO32(io[i]);                                      \
            if (a != a || (!(b != b) && a > b)) io[i] = in[i];                           \
        }                                                                                \
    }                                                                                    \
    extern "C" __global__ void mpimp_##NAME##_min(const u16 *in, u16 *io, long long n) { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;       \
             i += (long long)blockDim.x * gridDim.x) {                                   \
            float a = TO32(in[i]), b = TO32(io[i]);                                      \
            if (a != a || (!(b != b) && a < b)) io[i] = in[i];                           \
        }                                                                                \
    }

MPIMP_KERNELS(bf16, bf16_to_f32, f32_to_bf16)
MPIMP_KERNELS(f16, f16_to_f32, f32_to_f16)
