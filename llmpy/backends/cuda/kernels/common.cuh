// Shared device helpers for llmpy's kernels. Every kernel is a template over the storage type T: float (--dtype
// fp32, exact) or __nv_bfloat16 (mixed precision); arithmetic and every reduction accumulate in fp32.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

#ifndef INFINITY  // NVRTC compiles without <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T: one 128-bit load or store (8 bf16 or 4 float). Pointers must be 16-byte aligned.
template <class T> struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};
template <class T> __device__ __forceinline__ Pack<T> load16(const T* p) {
    return *reinterpret_cast<const Pack<T>*>(p);
}
template <class T> __device__ __forceinline__ Pack<T> load16_cs(const T* p) {  // streaming: read once
    Pack<T> r;
    *reinterpret_cast<int4*>(&r) = __ldcs(reinterpret_cast<const int4*>(p));
    return r;
}
template <class T> __device__ __forceinline__ void store16(T* p, const Pack<T>& x) {
    *reinterpret_cast<Pack<T>*>(p) = x;
}

// N fp32 values (N % 4 == 0) in 16-byte loads, for fp32 tensors read alongside Pack<T>s of N elements.
template <int N> __device__ __forceinline__ void load_f32(float (&v)[N], const float* p) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
        const float4 q = *reinterpret_cast<const float4*>(p + i);
        v[i] = q.x; v[i + 1] = q.y; v[i + 2] = q.z; v[i + 3] = q.w;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// sum(x^2) over a row x of d elements (d % Pack<T>::N == 0) by one warp: lane l adds the packs l, l + 32, ... in
// order, then warp_sum. Every kernel whose RMSNorm statistics must agree bit for bit (a BitLinear's quantizing and
// its decode kernel; the MLGRU's gate norm and its decoding step) sums this way.
template <class T> __device__ __forceinline__ float warp_sum_squares(const T* x, int d, int lane) {
    constexpr int N = Pack<T>::N;
    float s = 0.0f;
    for (int c = lane * N; c < d; c += 32 * N) {
        Pack<T> p = load16(x + c);
#pragma unroll
        for (int k = 0; k < N; k++) { const float v = to_f(p.v[k]); s += v * v; }
    }
    return warp_sum(s);
}

// Sum over the block in a fixed order (deterministic). `buf` holds >= 32 floats of shared memory; every thread
// gets the result.
__device__ __forceinline__ float block_sum(float v, float* buf) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = (blockDim.x + 31) / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    v = lane < nwarps ? buf[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* buf) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = (blockDim.x + 31) / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    v = lane < nwarps ? buf[lane] : -INFINITY;
    return warp_max(v);
}

// Stochastic rounding fp32 -> bf16: add 16 random bits below the bf16 mantissa, then truncate. Unbiased in
// expectation; deterministic for a given (seed, index). Inf/NaN pass through.
__device__ __forceinline__ unsigned int hash_u32(unsigned int x) {  // a small integer mixer (xorshift-multiply)
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}
// x rounded down or up with the 16 random bits r (< 2^16)
__device__ __forceinline__ bf16 round_bf16_bits(float x, unsigned int r) {
    unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) return __float2bfloat16_rn(x);
    unsigned int up = bits + r;
    // do not let the random carry turn the largest finite value into Inf
    if ((up & 0x7f800000u) == 0x7f800000u) up = bits;
    return __ushort_as_bfloat16((unsigned short)(up >> 16));
}
// The hash of element idx under step seed: hash_u32(seed ^ hash_u32(lo32(idx) ^ hash_u32(hi32(idx)))); its low 16
// bits round the weights (callers that round more values per element take other bits or seeds of the same inner hash)
__device__ __forceinline__ unsigned int element_hash(unsigned int seed, unsigned long long idx) {
    return hash_u32(seed ^ hash_u32((unsigned int)idx ^ hash_u32((unsigned int)(idx >> 32))));
}
__device__ __forceinline__ bf16 stochastic_round_bf16(float x, unsigned int seed, unsigned long long idx) {
    return round_bf16_bits(x, element_hash(seed, idx) & 0xffffu);
}
template <class T> __device__ __forceinline__ T round_param(float x, unsigned int seed, unsigned long long idx);
template <> __device__ __forceinline__ float round_param<float>(float x, unsigned int, unsigned long long) {
    return x;
}
template <> __device__ __forceinline__ bf16 round_param<bf16>(float x, unsigned int seed, unsigned long long idx) {
    return stochastic_round_bf16(x, seed, idx);
}

// One-pass norm backward (LayerNorm, RMSNorm): a block of warps takes one chunk of rows (warp w: rows lo + w,
// lo + w + W, ...), writes each row's dinp and adds the row's parameter-gradient terms into the warp's own K x C
// slice of dynamic shared memory (lanes own distinct columns: no atomics); then the block adds the W slices in warp
// order into part[chunk, k * C + c]; the *_finalize kernels add the chunks in order. Deterministic. Within a slice,
// element j of the lane's pack q (column q * N + j) lives at j * (C / N) + q, so that a warp's 32 lanes touch 32
// consecutive floats (no bank conflicts).
template <int N> __device__ __forceinline__ void norm_acc_zero(float* acc, int K, int C) {
    const int lane = threadIdx.x % 32;
    for (int e = lane; e < K * C; e += 32) acc[e] = 0.0f;
    __syncwarp();  // a lane then adds into entries another lane of its warp zeroed
}
template <int N> __device__ __forceinline__ void norm_acc_flush(float* part, const float* smem, int K, int C) {
    __syncthreads();
    const int W = blockDim.x / 32, Q = C / N;
    for (int e = threadIdx.x; e < K * C; e += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < W; w++) s += smem[(long long)w * K * C + e];
        const int k = e / C, j = (e % C) / Q, q = (e % C) % Q;  // slice layout -> column q * N + j
        part[(long long)blockIdx.x * K * C + k * C + q * N + j] = s;
    }
}

// Second stage of the deterministic column sums (bias gradients in matmul.cu, LayerNorm's dw|db in layernorm.cu):
// sum over k = 0..nchunks-1, in order, of part[k, c]; part holds one row of `width` fp32 partials per chunk of rows.
__device__ __forceinline__ float colsum_chunks(const float* part, int nchunks, int width, int c) {
    float s = 0.0f;
    for (int k = 0; k < nchunks; k++) s += part[(long long)k * width + c];
    return s;
}
