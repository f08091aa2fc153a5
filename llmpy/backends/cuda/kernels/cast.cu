// Infrastructure, no NumPy twin: out = T(in), round to nearest (loading fp32 weights into the bf16 compute copy).
#include "common.cuh"

template <class T>
__global__ void cast_from_f32(T* out, const float* in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_f<T>(in[i]);
}
