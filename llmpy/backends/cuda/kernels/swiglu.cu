// SwiGLU on the output of one fused projection: inp (N, 2F) = [up | gate] per row, out (N, F) = up * silu(gate),
// silu(a) = a * sigmoid(a). One thread per 16-byte pack of out (F % Pack<T>::N == 0, so a pack stays in one row).
#include "common.cuh"

// out (N, F); inp (N, 2F); n = N * F.
template <class T>
__global__ void swiglu_forward(T* out, const T* inp, long long n, int F) {
    constexpr int N = Pack<T>::N;
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i >= n) return;
    const long long row = i / F, f = i % F;
    const T* up = inp + row * 2 * F + f;
    Pack<T> u = load16(up), g = load16(up + F), o;
#pragma unroll
    for (int k = 0; k < N; k++) {
        o.v[k] = from_f<T>(swiglu_f(to_f(u.v[k]), to_f(g.v[k])));
    }
    store16(out + i, o);
}

// dinp (N, 2F) overwritten: with s = sigmoid(gate), dup = dout * gate * s, dgate = dout * up * s (1 + gate (1 - s)).
// redo (N, F) or null: also writes swiglu_forward's out there, the same values (recompute 1 reforms the SwiGLU output
// for the weight gradient of the down projection; here from the up and gate already loaded: one read of inp fewer).
template <class T>
__global__ void swiglu_backward(T* dinp, const T* inp, const T* dout, T* redo, long long n, int F) {
    constexpr int N = Pack<T>::N;
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i >= n) return;
    const long long row = i / F, f = i % F, off = row * 2 * F + f;
    Pack<T> u = load16(inp + off), g = load16(inp + off + F), dy = load16(dout + i), du, dg;
    if (redo) {
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < N; k++) {
            o.v[k] = from_f<T>(swiglu_f(to_f(u.v[k]), to_f(g.v[k])));
        }
        store16(redo + i, o);
    }
#pragma unroll
    for (int k = 0; k < N; k++) {
        float a, b;
        swiglu_grad(to_f(u.v[k]), to_f(g.v[k]), to_f(dy.v[k]), a, b);
        du.v[k] = from_f<T>(a);
        dg.v[k] = from_f<T>(b);
    }
    store16(dinp + off, du);
    store16(dinp + off + F, dg);
}
