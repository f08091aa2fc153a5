// Rotary position embedding in place on the q and k parts of a packed qkv (B, T, (NH + 2K) hs), Meta's pairing
// (x[2i], x[2i+1]) rotated by the angle of position t and frequency i; v is left alone.
#include "common.cuh"

// One thread per 16-byte pack of a row's first R = (NH + K) hs channels (N elements = N/2 pairs of one head, as
// hs % N == 0). table (maxT, hs/2, 2) fp32 holds cos, sin of (t, i) at t*hs + 2i: a pack at head offset d reads
// the N floats table[t*hs + d ..] (16-byte aligned too). sign = -1 gives the transposed (inverse) rotation.
template <class T>
__device__ __forceinline__ void rope_rotate(T* qkv, const float* table, int BT, int T_, int W, int R, int hs, int pos,
                                            float sign) {
    constexpr int N = Pack<T>::N;
    const int packs = R / N;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)BT * packs) return;
    const int bt = (int)(i / packs), c = (int)(i % packs) * N, d = c % hs, t = bt % T_ + pos;
    T* p = qkv + (long long)bt * W + c;
    const float4* cs4 = reinterpret_cast<const float4*>(table + (long long)t * hs + d);
    float cs[N];
#pragma unroll
    for (int k = 0; k < N / 4; k++) {
        float4 f = cs4[k];
        cs[4 * k] = f.x; cs[4 * k + 1] = f.y; cs[4 * k + 2] = f.z; cs[4 * k + 3] = f.w;
    }
    Pack<T> x = load16(p), y;
#pragma unroll
    for (int k = 0; k < N; k += 2) {
        const float co = cs[k], si = sign * cs[k + 1], x0 = to_f(x.v[k]), x1 = to_f(x.v[k + 1]);
        y.v[k] = from_f<T>(x0 * co - x1 * si);
        y.v[k + 1] = from_f<T>(x0 * si + x1 * co);
    }
    store16(p, y);
}

// y0 = x0 cos - x1 sin, y1 = x0 sin + x1 cos at positions pos..pos+T-1. qkv (BT, W), W = (NH + 2K) hs.
template <class T>
__global__ void rope_forward(T* qkv, const float* table, int BT, int T_, int W, int R, int hs, int pos) {
    rope_rotate(qkv, table, BT, T_, W, R, hs, pos, 1.0f);
}

// dx0 = g0 cos + g1 sin, dx1 = -g0 sin + g1 cos at positions 0..T-1, in place on dqkv (BT, W).
template <class T>
__global__ void rope_backward(T* dqkv, const float* table, int BT, int T_, int W, int R, int hs) {
    rope_rotate(dqkv, table, BT, T_, W, R, hs, 0, -1.0f);
}
