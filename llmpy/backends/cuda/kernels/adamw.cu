// AdamW: weights in T (the compute copy: bf16 with stochastic rounding, or fp32), optional fp32 master weights,
// moments in fp32 or bf16 (stochastic rounding too: half the optimizer's memory and traffic). The per-step scalars
// come from device memory so one captured CUDA graph serves every step.
#include "common.cuh"

// Eight consecutive elements as floats, in 16-byte loads (one for bf16, two for fp32). 16-byte aligned pointers.
template <class T> __device__ __forceinline__ void load8(float (&x)[8], const T* p) {
#pragma unroll
    for (int h = 0; h < 8; h += Pack<T>::N) {
        const Pack<T> q = load16_cs(p + h);
#pragma unroll
        for (int k = 0; k < Pack<T>::N; k++) x[h + k] = to_f(q.v[k]);
    }
}
template <class T> __device__ __forceinline__ void store8(T* p, const T (&x)[8]) {
#pragma unroll
    for (int h = 0; h < 8; h += Pack<T>::N) {
        Pack<T> q;
#pragma unroll
        for (int k = 0; k < Pack<T>::N; k++) q.v[k] = x[h + k];
        store16(p + h, q);
    }
}

// Storage of an updated value: fp32 as it is; bf16 rounded stochastically with the 16 random bits r
template <class X> __device__ __forceinline__ X store_as(float x, unsigned int r);
template <> __device__ __forceinline__ float store_as<float>(float x, unsigned int) { return x; }
template <> __device__ __forceinline__ bf16 store_as<bf16>(float x, unsigned int r) { return round_bf16_bits(x, r); }

// The update's square root and division in their hardware approximations (a couple of ulp, deterministic): the
// IEEE forms cost ~20 more instructions an element, and by its instruction count (~85 an element, ~4 ms of issue on
// d48) the kernel is near issue-bound as well as HBM-bound (an estimate; the change was not timed on its own)
__device__ __forceinline__ float sqrt_approx(float x) {
    float r;
    asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// The random bits: one hash an element, r = element_hash(seed, idx) (common.cuh), its key computed once a thread.
// The weight takes r's low 16 bits, m its high 16, v the high 16 of a second mix of r (an xorshift, then an odd
// multiply: a bijection of r, so uniform too). All from the global element index, so a sharded (ZeRO) run rounds
// exactly as one GPU does. (Until 2026-11-30: three full hashes an element, 16% of the kernel's time in isolation.)
__device__ __forceinline__ unsigned int v_bits(unsigned int r) { return ((r ^ (r >> 15)) * 0x2c1b3c6du) >> 16; }

// hp: [0] lr, [1] beta1, [2] beta2, [3] eps, [4] 1/(1-beta1^t), [5] 1/(1-beta2^t), [6] grad_clip (0 = off),
//     [7] step seed (as float bits); norm: the global gradient norm (device). A non-finite norm skips the update,
//     so a diverging step never corrupts the weights. Each thread updates elements [8i, 8i + 8) of the run; `vec`
//     (every pointer 16-byte aligned) lets whole groups of 8 move in 16-byte loads. The arithmetic per element is
//     the same either way (same bits).
template <class T, class M>
__device__ __forceinline__ void adamw_8(T* params, float* master, const T* grads, M* m, M* v, long long n,
                                        const float* hp, const float* norm, float weight_decay, long long offset,
                                        int vec) {
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 >= n) return;
    const float gn = *norm;
    if (!isfinite(gn)) return;
    const float lr = hp[0], b1 = hp[1], b2 = hp[2], eps = hp[3], bc1 = hp[4], bc2 = hp[5], clip = hp[6];
    const unsigned int seed = __float_as_uint(hp[7]);
    const float scale = (clip > 0.0f && gn > clip) ? clip / gn : 1.0f;
    const int cnt = (int)min(8LL, n - i0);
    float g[8], mi[8], vi[8], p[8];
    if (vec && cnt == 8) {
        load8(g, grads + i0); load8(mi, m + i0); load8(vi, v + i0);
        if (master) load8(p, master + i0); else load8(p, params + i0);
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const bool in = k < cnt;
            g[k] = in ? to_f(grads[i0 + k]) : 0.0f;
            mi[k] = in ? to_f(m[i0 + k]) : 0.0f;
            vi[k] = in ? to_f(v[i0 + k]) : 0.0f;
            p[k] = in ? (master ? master[i0 + k] : to_f(params[i0 + k])) : 0.0f;
        }
    }
    T pt[8];
    M mt[8], vt[8];
    const unsigned long long base = (unsigned long long)(offset + i0);  // the keys of the thread's (at most two) hi32
    const unsigned int key0 = hash_u32(seed ^ hash_u32((unsigned int)(base >> 32)));
    const unsigned int key1 = hash_u32(seed ^ hash_u32((unsigned int)((base + 7) >> 32)));
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const float gk = g[k] * scale;
        const float mk = b1 * mi[k] + (1.0f - b1) * gk;
        const float vk = b2 * vi[k] + (1.0f - b2) * gk * gk;
        p[k] -= lr * (__fdividef(mk * bc1, sqrt_approx(vk * bc2) + eps) + weight_decay * p[k]);
        const unsigned long long idx = base + k;
        // == element_hash(seed, idx)
        const unsigned int r = hash_u32((unsigned int)idx ^ ((idx >> 32) == (base >> 32) ? key0 : key1));
        pt[k] = store_as<T>(p[k], r & 0xffffu);
        mt[k] = store_as<M>(mk, r >> 16);
        vt[k] = store_as<M>(vk, sizeof(M) == 2 ? v_bits(r) : 0u);
    }
    if (vec && cnt == 8) {
        store8(m + i0, mt); store8(v + i0, vt); store8(params + i0, pt);
        if (master) store8(master + i0, p);
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if (k >= cnt) break;
            m[i0 + k] = mt[k]; v[i0 + k] = vt[k]; params[i0 + k] = pt[k];
            if (master) master[i0 + k] = p[k];
        }
    }
}

// fp32 moments (the arithmetic of the earlier one-element-a-thread kernel, element for element)
template <class T>
__global__ void adamw(T* params, float* master, const T* grads, float* m, float* v, long long n, const float* hp,
                      const float* norm, float weight_decay, long long offset, int vec) {
    adamw_8<T, float>(params, master, grads, m, v, n, hp, norm, weight_decay, offset, vec);
}

// bf16 moments, stochastically rounded (--moments bf16)
template <class T>
__global__ void adamw_bf16_moments(T* params, float* master, const T* grads, bf16* m, bf16* v, long long n,
                                   const float* hp, const float* norm, float weight_decay, long long offset, int vec) {
    adamw_8<T, bf16>(params, master, grads, m, v, n, hp, norm, weight_decay, offset, vec);
}

// The global gradient norm that clips the update. Sum of squares: thread t of the fixed grid adds the 16-byte packs
// t, t + G, t + 2G, ... (G threads in the grid) in that order, four loads in flight; block 0 adds the tail
// (n % pack elements); each block writes one partial; then one block adds the partials in order. Deterministic for
// a fixed grid. x is 16-byte aligned.
template <class T>
__global__ void sumsq_partial(float* part, const T* x, long long n) {
    __shared__ float buf[32];
    constexpr int N = Pack<T>::N;
    const long long packs = n / N, G = (long long)gridDim.x * blockDim.x;
    float s = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += 4 * G) {
        Pack<T> q[4];
#pragma unroll
        for (int u = 0; u < 4; u++)
            if (i + u * G < packs) q[u] = load16_cs(x + (i + u * G) * N);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (i + u * G >= packs) break;
#pragma unroll
            for (int k = 0; k < N; k++) { const float v = to_f(q[u].v[k]); s += v * v; }
        }
    }
    if (blockIdx.x == 0 && threadIdx.x < n - packs * N) {
        const float v = to_f(x[packs * N + threadIdx.x]);
        s += v * v;
    }
    s = block_sum(s, buf);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// out[0] = the sum of the first n partials, one block in a fixed order
__global__ void sum_partials(float* out, const float* part, int n) {
    __shared__ float buf[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
    s = block_sum(s, buf);
    if (threadIdx.x == 0) out[0] = s;
}

// out[0] = sqrt(sumsq[0]), the global gradient norm; NaN when the step's loss (guard[0]) is not finite, so that
// AdamW skips the update of a diverged step
__global__ void norm_from_sumsq(float* out, const float* sumsq, const float* guard) {
    out[0] = isfinite(guard[0]) ? sqrtf(sumsq[0]) : __int_as_float(0x7fc00000);
}
