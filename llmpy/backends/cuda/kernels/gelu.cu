// GELU, tanh form: forward, and the backward applied in place to the gradient of the product that fed it.
#include "common.cuh"

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)

__device__ __forceinline__ float gelu(float x) {
    const float u = GELU_SCALE * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

// out = gelu(inp): 16 bytes per thread (one element per thread left the loads too small to keep HBM busy: 3.5x
// slower on an H200); the last n % Pack<T>::N elements one per thread. 16-byte aligned arrays.
template <class T>
__global__ void gelu_forward(T* out, const T* inp, long long n) {
    constexpr int N = Pack<T>::N;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x, packs = n / N;
    if (t < packs) {
        Pack<T> x = load16_cs(inp + t * N), o;
#pragma unroll
        for (int k = 0; k < N; k++) o.v[k] = from_f<T>(gelu(to_f(x.v[k])));
        store16(out + t * N, o);
    } else if (t - packs < n - packs * N) {
        const long long i = packs * N + (t - packs);
        out[i] = from_f<T>(gelu(to_f(inp[i])));
    }
}

// dinp = gelu'(inp) * dinp in place, 16 bytes per thread (n % Pack<T>::N == 0): the GELU backward applied to
// the output of the product that formed dinp (cheaper than cuBLASLt's DGELU epilogue, measured on an H200)
template <class T>
__global__ void gelu_backward_inplace(T* dinp, const T* inp, long long n) {
    constexpr int N = Pack<T>::N;
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i >= n) return;
    Pack<T> x = load16(inp + i), d = load16(dinp + i);
#pragma unroll
    for (int k = 0; k < N; k++) {
        float v = to_f(x.v[k]);
        float th = tanhf(GELU_SCALE * (v + 0.044715f * v * v * v));
        float g = 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * v * v);
        d.v[k] = from_f<T>(g * to_f(d.v[k]));
    }
    store16(dinp + i, d);
}
