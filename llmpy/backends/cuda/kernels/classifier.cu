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
// write_dlogits, logits[row] becomes dloss * (softmax(x[:V]) - onehot(target)) and 0 on the padding. Held to 32
// registers so two rows share an SM (at 40 one block per SM waited alone at its barrier): the same bits; 0.774 ->
// 0.614 ms for 8192 x 50304 in isolation (benchmarks/kernel_variants.py), but ~636 us a call in the d12 step
// before and after (eager profiles, H200, 2026-11-30): no gain there
template <class T>
__global__ void __launch_bounds__(1024, 2) fused_classifier(T* logits, float* losses, const int* targets, float dloss,
                                                            int V, int Vp, int write_dlogits) {
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
    if (threadIdx.x == 0) losses[row] = acc.m + logf(acc.s) - xt;
    if (!write_dlogits) return;
    const float inv = 1.0f / acc.s;
    for (int i = threadIdx.x * N; i < Vp; i += blockDim.x * N) {
        Pack<T> p = load16(x + i), o;
#pragma unroll
        for (int k = 0; k < N; k++) {
            int v = i + k;
            float g = v < V ? (__expf(to_f(p.v[k]) - acc.m) * inv - (v == tgt ? 1.0f : 0.0f)) * dloss : 0.0f;
            o.v[k] = from_f<T>(g);
        }
        store16(x + i, o);
    }
}

// ---- The staged classifier (training): each row read from HBM once ----
// fused_classifier above reads a row twice (the second pass hoping for L2) with one 16-byte load a thread in flight:
// ~2.7 TB/s of the bytes it must move (8192 x 50304 bf16: 0.614 ms in isolation, H200). Here C blocks of a
// thread-block cluster (C = 1, 2, 4 or 8; consecutive blocks, one row) each copy their segment of S columns,
// [rank * S, min((rank + 1) * S, Vp)), into shared memory with cp.async, every copy in flight at once; reduce
// (max, sum of exp) over it; combine the cluster's C partials in rank order through distributed shared memory (the
// same order in every block: deterministic); and write their dlogits from shared memory. With C = 1 each thread
// visits the packs the two-pass kernel's thread does, in the same order: the same bits. Shared memory: S * sizeof(T).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem) : "memory");
}
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
// a float of block `rank`'s shared memory, at the address p has in this block's (distributed shared memory)
__device__ __forceinline__ float ld_cluster(const float* p, unsigned rank) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p), ra;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(ra) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(ra) : "memory");
    return v;
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

template <class T, int C>
__device__ __forceinline__ void classifier_staged(T* logits, float* losses, const int* targets, float dloss, int V,
                                                  int Vp, int S) {
    constexpr int N = Pack<T>::N;
    extern __shared__ __align__(16) unsigned char staged_raw[];
    T* sh = reinterpret_cast<T*>(staged_raw);
    __shared__ float part[3];  // this block's (max, sum of exp) and, if it holds the target's column, its logit
    const unsigned rank = C == 1 ? 0u : cluster_rank();
    const long long row = blockIdx.x / C;
    T* x = logits + row * Vp;
    const int c0 = rank * S, c1 = min(c0 + S, Vp), cv = min(c1, V);
    for (int i = c0 + threadIdx.x * N; i < c1; i += blockDim.x * N) cp_async16(sh + (i - c0), x + i);
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();
    MaxSum acc = {-INFINITY, 0.0f};  // the two-pass kernel's step, pack for pack
    for (int i = c0 + threadIdx.x * N; i < cv; i += blockDim.x * N) {
        const Pack<T> p = *reinterpret_cast<const Pack<T>*>(sh + (i - c0));
        float mx = -INFINITY;
        bool nan = false;
#pragma unroll
        for (int k = 0; k < N; k++)
            if (i + k < V) { const float v = to_f(p.v[k]); mx = fmaxf(mx, v); nan |= v != v; }
        const float m = fmaxf(acc.m, mx);
        if (m == -INFINITY) {
            if (nan) acc.s = __int_as_float(0x7fc00000);
            continue;
        }
        float s = acc.s * __expf(acc.m - m);
#pragma unroll
        for (int k = 0; k < N; k++)
            if (i + k < V) s += __expf(to_f(p.v[k]) - m);
        acc = {m, s};
    }
    acc = block_maxsum(acc);
    const int tgt = targets[row];
    float xt;
    if (C == 1) {
        xt = to_f(sh[tgt]);
    } else {
        if (threadIdx.x == 0) {
            part[0] = acc.m;
            part[1] = acc.s;
            part[2] = tgt >= c0 && tgt < c1 ? to_f(sh[tgt - c0]) : 0.0f;
        }
        cluster_arrive();
        cluster_wait();  // every block's partial is written
        MaxSum tot = {-INFINITY, 0.0f};
        bool nan = false;
        for (unsigned r = 0; r < (unsigned)C; r++) {
            const MaxSum b = {ld_cluster(part, r), ld_cluster(part + 1, r)};
            nan |= b.s != b.s;  // combine drops a NaN sum whose max is -inf: keep it (a NaN logit shows in the loss)
            tot = combine(tot, b);
        }
        if (nan) tot.s = __int_as_float(0x7fc00000);
        xt = ld_cluster(part + 2, (unsigned)(tgt / S));
        acc = tot;
        cluster_arrive();  // done reading the others' shared memory: they may exit after their last wait below
    }
    if (rank == 0 && threadIdx.x == 0) losses[row] = acc.m + logf(acc.s) - xt;
    const float inv = 1.0f / acc.s;
    for (int i = c0 + threadIdx.x * N; i < c1; i += blockDim.x * N) {
        const Pack<T> p = *reinterpret_cast<const Pack<T>*>(sh + (i - c0));
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < N; k++) {
            int v = i + k;
            float g = v < V ? (__expf(to_f(p.v[k]) - acc.m) * inv - (v == tgt ? 1.0f : 0.0f)) * dloss : 0.0f;
            o.v[k] = from_f<T>(g);
        }
        store16(x + i, o);
    }
    if (C > 1) cluster_wait();
}

// one launch: rows * C blocks of 1024 threads, S * sizeof(T) bytes of dynamic shared memory
template <class T>
__global__ void __launch_bounds__(1024, 2) classifier_staged_c1(T* logits, float* losses, const int* targets,
                                                                float dloss, int V, int Vp, int S) {
    classifier_staged<T, 1>(logits, losses, targets, dloss, V, Vp, S);
}
template <class T>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(1024, 2) classifier_staged_c2(
    T* logits, float* losses, const int* targets, float dloss, int V, int Vp, int S) {
    classifier_staged<T, 2>(logits, losses, targets, dloss, V, Vp, S);
}
template <class T>
__global__ void __cluster_dims__(4, 1, 1) __launch_bounds__(1024, 2) classifier_staged_c4(
    T* logits, float* losses, const int* targets, float dloss, int V, int Vp, int S) {
    classifier_staged<T, 4>(logits, losses, targets, dloss, V, Vp, S);
}
template <class T>
__global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(1024, 2) classifier_staged_c8(
    T* logits, float* losses, const int* targets, float dloss, int V, int Vp, int S) {
    classifier_staged<T, 8>(logits, losses, targets, dloss, V, Vp, S);
}

// acc[0] += scale * sum(losses[0..n)), one block, fixed order (the mean loss over micro-batches)
__global__ void loss_accumulate(float* acc, const float* losses, int n, float scale) {
    __shared__ float buf[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
    s = block_sum(s, buf);
    if (threadIdx.x == 0) acc[0] += scale * s;
}
