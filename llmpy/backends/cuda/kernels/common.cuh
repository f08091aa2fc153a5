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

// The activations, here because kernels/fp8.cu's fused quantizers form the same values as gelu.cu and swiglu.cu
#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)
__device__ __forceinline__ float gelu(float x) {  // tanh form
    const float u = GELU_SCALE * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}
__device__ __forceinline__ float swiglu_f(float up, float gate) {  // up * silu(gate)
    return up * (gate / (1.0f + expf(-gate)));
}
// its gradient given d = dL/dout: with s = sigmoid(gate), dup = d gate s, dgate = d up s (1 + gate (1 - s))
__device__ __forceinline__ void swiglu_grad(float up, float gate, float d, float& dup, float& dgate) {
    const float s = 1.0f / (1.0f + expf(-gate));
    dup = d * gate * s;
    dgate = d * up * s * (1.0f + gate * (1.0f - s));
}

// FP8 (--dtype fp8; kernels/fp8.cu): two fp32 values -> two fp8 bytes (lo in the low byte), e4m3 (max 448) or e5m2
// (max 57344), rounded to nearest even and clamped to the largest finite value. Needs sm_89+.
__device__ __forceinline__ unsigned int fp8x2(float lo, float hi, int e5m2) {
    unsigned short r;
    if (e5m2) asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float fp8_max(int e5m2) { return e5m2 ? 57344.0f : 448.0f; }

// The classifier's gradient of column v of a row of logits, given the row's max m and inv = 1 / sum exp(x - m):
// dloss * (softmax - onehot(tgt)), 0 on the padding (v >= V). Rounded op by op (no contraction) so that
// fused_classifier and fp8_classifier_t, two kernels, give the same bits.
__device__ __forceinline__ float dlogit(float x, float m, float inv, int v, int tgt, int V, float dloss) {
    if (v >= V) return 0.0f;
    return __fmul_rn(__fsub_rn(__fmul_rn(__expf(x - m), inv), v == tgt ? 1.0f : 0.0f), dloss);
}
// A pack of T written as its e4m3 bytes under scale s (Pack<T>::N bytes at q, as many-byte aligned), the way
// kernels/fp8.cu quantizes a tensor: m = max(m, |x|) (NaN ignored), over += the values clamped
template <class T>
__device__ __forceinline__ void fp8_store_pack(unsigned char* q, const Pack<T>& x, float s, float& m, int& over) {
    constexpr int N = Pack<T>::N;
    unsigned int w[2] = {0u, 0u};
#pragma unroll
    for (int k = 0; k < N; k += 2) {
        const float a = to_f(x.v[k]), b = to_f(x.v[k + 1]);
        m = fmaxf(m, fmaxf(fabsf(a), fabsf(b)));
        over += (fabsf(a * s) > 448.0f) + (fabsf(b * s) > 448.0f);
        w[k / 4] |= fp8x2(a * s, b * s, 0) << (16 * ((k / 2) % 2));
    }
    if (N == 8) *reinterpret_cast<uint2*>(q) = make_uint2(w[0], w[1]);
    else *reinterpret_cast<unsigned int*>(q) = w[0];
}
// The warp's m and over into *amax (atomicMax on the bits of non-negative floats, which order like the floats) and
// *clamped (may be null)
__device__ __forceinline__ void fp8_record(float* amax, int* clamped, float m, int over) {
    for (int o = 16; o > 0; o >>= 1) {
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        over += __shfl_xor_sync(0xffffffffu, over, o);
    }
    if (threadIdx.x % 32 == 0) {
        atomicMax(reinterpret_cast<unsigned int*>(amax), __float_as_uint(m));
        if (clamped != nullptr && over) atomicAdd(clamped, over);
    }
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
// The random bits of element idx under step seed: hash_u32(lo32(idx) ^ hash_u32(seed ^ hash_u32(hi32(idx)))), one
// full hash an element once the key (all but the outer hash) is hoisted, as AdamW does; its low 16 bits round a weight
__device__ __forceinline__ unsigned int element_hash(unsigned int seed, unsigned long long idx) {
    return hash_u32((unsigned int)idx ^ hash_u32(seed ^ hash_u32((unsigned int)(idx >> 32))));
}

// K 16-byte packs of one position of K arrays (a row pass's load)
template <class T, int K> struct Packs { Pack<T> p[K]; };
template <class T, class... P> __device__ __forceinline__ Packs<T, sizeof...(P)> load_packs(int c, const P*... x) {
    return {{load16(x + c)...}};
}

// One pass of a warp over its row of C (the norms' row kernels): use(c, load(c)) for each of the lane's packs c =
// lane N, lane N + 32 N, ... in that order, U at a time with their loads issued before any is used (U loads in
// flight instead of one: a warp alone on its row otherwise waits on each in turn). The order of use, and so of any
// sum, does not depend on U.
template <class T, int U, class Load, class Use>
__device__ __forceinline__ void row_pass(int C, Load load, Use use) {
    constexpr int N = Pack<T>::N;
    for (int c0 = (threadIdx.x % 32) * N; c0 < C; c0 += 32 * N * U) {
        decltype(load(0)) q[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c0 + 32 * N * u < C) q[u] = load(c0 + 32 * N * u);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + 32 * N * u >= C) break;
            use(c0 + 32 * N * u, q[u]);
        }
    }
}

// residual = inp1 + inp2 over one warp's row of C (stored in T); then the warp syncs, so that its lanes can read
// back each other's packs
template <class T, int U>
__device__ __forceinline__ void residual_add_row(T* residual, const T* inp1, const T* inp2, int C) {
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, inp1, inp2); },
                   [&](int c, const Packs<T, 2>& q) {
                       Pack<T> o;
#pragma unroll
                       for (int k = 0; k < Pack<T>::N; k++) o.v[k] = from_f<T>(to_f(q.p[0].v[k]) + to_f(q.p[1].v[k]));
                       store16(residual + c, o);
                   });
    __syncwarp();
}

// First stage of the deterministic column sums: K sums per column over one chunk of rows, by a block of COLSUM_WARPS
// warps (grid: (cdiv(C / N, 32), chunks), N = Pack<T>::N, C % N == 0). Lane l owns the N columns from
// c0 = (blockIdx.x * 32 + l) * N; warp w adds rows lo + w, lo + w + COLSUM_WARPS, ... in order, loading four rows
// ahead (16-byte loads, many rows in flight: one thread per column and 2-byte loads left HBM mostly idle); then the
// warps' sums are added in warp order: part[chunk, k * C + c] (row width `width`). load(n, c0) reads what row n
// contributes to the lane's columns; add(item, acc) adds it to acc[K][N].
#define COLSUM_WARPS 8
template <class T, int K, class Load, class Add>
__device__ __forceinline__ void colsum_slab(float* part, int width, int C, int rows, int rows_per_chunk, Load load,
                                            Add add) {
    constexpr int N = Pack<T>::N, W = COLSUM_WARPS;
    __shared__ float sh[W][K][N * 32];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, chunk = blockIdx.y;
    const int c0 = (blockIdx.x * 32 + lane) * N, lo = chunk * rows_per_chunk, hi = min(rows, lo + rows_per_chunk);
    float acc[K][N];
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int j = 0; j < N; j++) acc[k][j] = 0.0f;
    if (c0 < C) {
        int n = lo + w;
        for (; n + 3 * W < hi; n += 4 * W) {
            const auto a = load(n, c0), b = load(n + W, c0), c = load(n + 2 * W, c0), d = load(n + 3 * W, c0);
            add(a, acc); add(b, acc); add(c, acc); add(d, acc);
        }
        for (; n < hi; n += W) add(load(n, c0), acc);
    }
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int j = 0; j < N; j++) sh[w][k][j * 32 + lane] = acc[k][j];
    __syncthreads();
    for (int e = threadIdx.x; e < K * N * 32; e += blockDim.x) {
        const int k = e / (N * 32), j = (e / 32) % N, l = e % 32, c = (blockIdx.x * 32 + l) * N + j;
        if (c >= C) continue;
        float s = 0.0f;
        for (int ww = 0; ww < W; ww++) s += sh[ww][k][j * 32 + l];
        part[(long long)chunk * width + k * C + c] = s;
    }
}

// Second stage of the deterministic column sums (bias gradients in matmul.cu, LayerNorm's dw|db in layernorm.cu):
// sum over k = 0..nchunks-1, in order, of part[k, c]; part holds one row of `width` fp32 partials per chunk of rows.
__device__ __forceinline__ float colsum_chunks(const float* part, int nchunks, int width, int c) {
    float s = 0.0f;
    for (int k = 0; k < nchunks; k++) s += part[(long long)k * width + c];
    return s;
}

// The partials' second stage with 8 threads a column (the ~264 chunks of LayerNorm's one-pass backward: one thread
// a column walking every chunk waits on each load in turn): block (32, 8) sums columns blockIdx.x * 32 +
// threadIdx.x, thread y the chunks y, y + 8, ... in order, then the 8 in order y = 0..7. Returns the sum to
// threadIdx.y == 0 (others: 0).
__device__ __forceinline__ float colsum_chunks8(const float* part, int nchunks, int width, int c) {
    __shared__ float sh[8][32];
    float s = 0.0f;
    if (c < width)
        for (int k = threadIdx.y; k < nchunks; k += 8) s += part[(long long)k * width + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y != 0) return 0.0f;
    s = 0.0f;
#pragma unroll
    for (int y = 0; y < 8; y++) s += sh[y][threadIdx.x];
    return s;
}

// The packed decode kernels' table (bitlinear.cu's, mmfree_decode.cu's) from a code byte to its trits as int8, in
// shared memory: base 3, 243 x 8 bytes (trits 0-3 | trit 4, 0, 0, 0); 2-bit, 256 x 4 bytes. Every thread of the
// block takes part.
__device__ __forceinline__ void code_table(unsigned char* smem, bool b3) {
    for (int v = threadIdx.x; v < 256; v += blockDim.x) {
        if (b3) {
            if (v < 243) {
                unsigned int c = v, w[2] = {0u, 0u};
                for (int j = 0; j < 5; j++, c /= 3u)
                    w[j / 4] |= (unsigned int)(unsigned char)(signed char)((int)(c % 3u) - 1) << (8 * (j % 4));
                reinterpret_cast<uint2*>(smem)[v] = make_uint2(w[0], w[1]);
            }
        } else {
            unsigned int w = 0u;
            for (int j = 0; j < 4; j++) {
                const int t = (v >> (2 * j)) & 3;
                w |= (unsigned int)(unsigned char)(signed char)(t == 3 ? -1 : t) << (8 * j);
            }
            reinterpret_cast<unsigned int*>(smem)[v] = w;
        }
    }
}
