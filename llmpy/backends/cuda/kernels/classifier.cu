// Fused softmax + cross-entropy over the padded vocabulary: losses, and dlogits written in place of the logits.
// The probabilities are never stored. Columns V..Vp-1 (padding) get no probability and a zero gradient.
#include "common.cuh"

struct MaxSum { float m, s; };  // running max and sum of exp(x - m)

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0f};
    return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ MaxSum block_maxsum(MaxSum v) {
    __shared__ float bm[32], bs[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int o = 16; o > 0; o >>= 1)
        v = combine(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
    __syncthreads();
    if (lane == 0) { bm[warp] = v.m; bs[warp] = v.s; }
    __syncthreads();
    v = lane < nwarps ? MaxSum{bm[lane], bs[lane]} : MaxSum{-INFINITY, 0.0f};
    for (int o = 16; o > 0; o >>= 1)
        v = combine(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
    return v;
}

// One block of 1024 threads per row of logits (rows, Vp). losses[row] = logsumexp(x[:V]) - x[target]. With
// write_dlogits, logits[row] becomes dloss * (softmax(x[:V]) - onehot(target)) and 0 on the padding (dlogit,
// common.cuh). stats (may be null): the row's (max, 1 / sum of exp), from which fp8_classifier_t (fp8.cu) forms the
// same dlogits as the LM head's FP8 copies instead (--dtype fp8). Held to 32
// registers so two rows share an SM (at 40 one block per SM waited alone at its barrier): the same bits; 0.774 ->
// 0.614 ms for 8192 x 50304 in isolation (dev/kernel_variants.py), but ~636 us a call in the d12 step
// before and after (eager profiles, H200, 2026-11-30): no gain there
template <class T>
__global__ void __launch_bounds__(1024, 2) fused_classifier(T* logits, float* losses, const int* targets, float dloss,
                                                            int V, int Vp, int write_dlogits,
                                                            float2* stats) {
    constexpr int N = Pack<T>::N;
    const long long row = blockIdx.x;
    T* x = logits + row * Vp;
    // running (max, sum of exp) a pack at a time: the pack's max first, then one rescale and one exp per element
    // (N + 1 exps per pack instead of 2N: the special-function units were as busy as HBM)
    MaxSum acc = {-INFINITY, 0.0f};
    for (int i = threadIdx.x * N; i < V; i += blockDim.x * N) {
        Pack<T> p = load16(x + i);
        float mx = -INFINITY;
        bool nan = false;
#pragma unroll
        for (int k = 0; k < N; k++)
            if (i + k < V) { const float v = to_f(p.v[k]); mx = fmaxf(mx, v); nan |= v != v; }
        const float m = fmaxf(acc.m, mx);
        if (m == -INFINITY) {  // nothing above -inf yet; a NaN logit must still make the loss NaN
            if (nan) acc.s = __int_as_float(0x7fc00000);
            continue;
        }
        float s = acc.s * __expf(acc.m - m);  // acc.m = -inf: 0
#pragma unroll
        for (int k = 0; k < N; k++)
            if (i + k < V) s += __expf(to_f(p.v[k]) - m);
        acc = {m, s};
    }
    acc = block_maxsum(acc);
    const int tgt = targets[row];
    const float xt = to_f(x[tgt]);  // read before any thread overwrites the row
    __syncthreads();
    const float inv = 1.0f / acc.s;
    if (threadIdx.x == 0) {
        losses[row] = acc.m + logf(acc.s) - xt;
        if (stats != nullptr) stats[row] = make_float2(acc.m, inv);
    }
    if (!write_dlogits) return;
    for (int i = threadIdx.x * N; i < Vp; i += blockDim.x * N) {
        Pack<T> p = load16(x + i), o;
#pragma unroll
        for (int k = 0; k < N; k++) {
            int v = i + k;
            o.v[k] = from_f<T>(dlogit(to_f(p.v[k]), acc.m, inv, v, tgt, V, dloss));
        }
        store16(x + i, o);
    }
}

// acc[0] += scale * sum(losses[0..n)), one block, fixed order (the mean loss over micro-batches)
__global__ void loss_accumulate(float* acc, const float* losses, int n, float scale) {
    __shared__ float buf[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
    s = block_sum(s, buf);
    if (threadIdx.x == 0) acc[0] += scale * s;
}
