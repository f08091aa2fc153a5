// GELU, tanh form: forward, and the backward applied in place to the gradient of the product that fed it.
#include "common.cuh"

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)

template <class T>
__global__ void gelu_forward(T* out, const T* inp, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(inp[i]);
    float u = GELU_SCALE * (x + 0.044715f * x * x * x);
    out[i] = from_f<T>(0.5f * x * (1.0f + tanhf(u)));
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
