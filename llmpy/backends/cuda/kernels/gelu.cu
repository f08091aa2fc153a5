// GELU, tanh form: forward, and the backward applied in place to the gradient of the product that fed it.
#include "common.cuh"

// (gelu() itself is in common.cuh: kernels/fp8.cu's fused quantizer forms the same values)

// d gelu(x) / dx
__device__ __forceinline__ float gelu_grad(float v) {
    const float th = tanhf(GELU_SCALE * (v + 0.044715f * v * v * v));
    return 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * v * v);
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
        d.v[k] = from_f<T>(gelu_grad(to_f(x.v[k])) * to_f(d.v[k]));
    }
    store16(dinp + i, d);
}

// gelu_backward_inplace on dinp (rows, C), fused with the column sums of its result (the bias gradient of the
// product that fed the GELU): one read of dinp fewer than the two kernels. The sums are colsum_partial's, over the
// same bf16-rounded values in the same order (bitwise the same partials); grid (cdiv(C / N, 32), chunks), 256
// threads, then colsum_finalize (matmul.cu). C % N == 0, 16-byte aligned rows. The load step only loads (so
// colsum_slab keeps four rows of loads in flight); the add step computes, stores and sums.
// redo (rows, C) or null: also writes gelu(inp) there, gelu_forward's values (recompute 1 reforms the GELU output
// for the weight gradient of the product it fed; here from the inp already loaded: one read of inp fewer).
template <class T> struct GeluRow { Pack<T> x, d; T* at; T* redo_at; };
template <class T>
__global__ void gelu_backward_colsum(float* part, T* dinp, const T* inp, T* redo, int rows, int C,
                                     int rows_per_chunk) {
    constexpr int N = Pack<T>::N;
    colsum_slab<T, 1>(part, C, C, rows, rows_per_chunk,
                      [&](int n, int c0) {
                          const long long i = (long long)n * C + c0;
                          return GeluRow<T>{load16_cs(inp + i), load16(dinp + i), dinp + i,
                                            redo ? redo + i : nullptr};
                      },
                      [](GeluRow<T> r, float (&acc)[1][N]) {
                          if (r.redo_at) {
                              Pack<T> o;
#pragma unroll
                              for (int k = 0; k < N; k++) o.v[k] = from_f<T>(gelu(to_f(r.x.v[k])));
                              store16(r.redo_at, o);
                          }
#pragma unroll
                          for (int k = 0; k < N; k++) {
                              r.d.v[k] = from_f<T>(gelu_grad(to_f(r.x.v[k])) * to_f(r.d.v[k]));
                              acc[0][k] += to_f(r.d.v[k]);
                          }
                          store16(r.at, r.d);
                      });
}
