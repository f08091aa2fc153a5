// Token + position embedding and its deterministic backward.
#include "common.cuh"

// out (B,T,C) = wte[tok] + wpe[t], or wte[tok] when wpe is null (no position table: Llama); one thread per
// 16-byte pack. C % Pack<T>::N == 0.
template <class T>
__global__ void encoder_forward(T* out, const int* tok, const T* wte, const T* wpe, int BT, int T_, int C) {
    constexpr int N = Pack<T>::N;
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i >= (long long)BT * C) return;
    int bt = (int)(i / C), c = (int)(i % C), t = bt % T_;
    Pack<T> a = load16(wte + (long long)tok[bt] * C + c);
    if (wpe == nullptr) {
        store16(out + i, a);
        return;
    }
    Pack<T> b = load16(wpe + (long long)t * C + c), o;
#pragma unroll
    for (int k = 0; k < N; k++) o.v[k] = from_f<T>(to_f(a.v[k]) + to_f(b.v[k]));
    store16(out + i, o);
}

// A packed model's embedding (held in bf16) under --dtype fp32: out (B,T,C) fp32 = wte[tok] (+ wpe[t]), each bf16
// widened exactly, then the fp32 add; one thread per 8 columns, C % 8 == 0. A kernel, not array expressions: a
// decode step captured into a CUDA graph must own every byte it touches (temporaries freed after the capture go
// to the next allocation, which a replay would then overwrite).
__global__ void encoder_forward_widen(float* out, const int* tok, const bf16* wte, const float* wpe, int BT, int T_,
                                      int C) {
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= (long long)BT * C) return;
    int bt = (int)(i / C), c = (int)(i % C), t = bt % T_;
    Pack<bf16> a = load16(wte + (long long)tok[bt] * C + c);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float v = __bfloat162float(a.v[k]);
        if (wpe != nullptr) v += wpe[(long long)t * C + c + k];
        out[i + k] = v;
    }
}

// dwpe[t,c] += sum_b dout[b,t,c], the batch summed in order b = 0..B-1 (one thread per (t,c)).
template <class T>
__global__ void encoder_backward_wpe(T* dwpe, const T* dout, int B, int T_, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T_ * C) return;
    float acc = 0.0f;
    for (int b = 0; b < B; b++) acc += to_f(dout[(long long)b * T_ * C + i]);
    dwpe[i] = from_f<T>(to_f(dwpe[i]) + acc);
}

// dwte[v] += sum of dout rows whose token is v. The host sorts positions by token (stable), so segment s holds
// the positions order[seg[s]..seg[s+1]) of one token, ascending: each block sums its segment in that order
// (deterministic, no atomics). Grid = max segments; blocks past *nseg exit. Threads stride over channels.
template <class T>
__global__ void encoder_backward_wte(T* dwte, const T* dout, const int* tok, const int* order, const int* seg,
                                     const int* nseg, int C) {
    int s = blockIdx.x;
    if (s >= *nseg) return;
    int lo = seg[s], hi = seg[s + 1];
    long long v = tok[order[lo]];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = lo; j < hi; j++) acc += to_f(dout[(long long)order[j] * C + c]);
        dwte[v * C + c] = from_f<T>(to_f(dwte[v * C + c]) + acc);
    }
}
