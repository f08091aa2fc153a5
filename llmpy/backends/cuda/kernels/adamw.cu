// AdamW with fp32 master weights and moments; the compute copy of the weights is written in T (bf16 with
// stochastic rounding). The per-step scalars come from device memory so one captured CUDA graph serves every step.
#include "common.cuh"

// hp: [0] lr, [1] beta1, [2] beta2, [3] eps, [4] 1/(1-beta1^t), [5] 1/(1-beta2^t), [6] grad_clip (0 = off),
//     [7] step seed (as float bits); norm: the global gradient norm (device). A non-finite norm skips the update,
//     so a diverging step never corrupts the weights.
template <class T>
__global__ void adamw(T* params, float* master, const T* grads, float* m, float* v, long long n, const float* hp,
                      const float* norm, float weight_decay, long long offset) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gn = *norm;
    if (!isfinite(gn)) return;
    const float lr = hp[0], b1 = hp[1], b2 = hp[2], eps = hp[3], bc1 = hp[4], bc2 = hp[5], clip = hp[6];
    const unsigned int seed = __float_as_uint(hp[7]);
    const float scale = (clip > 0.0f && gn > clip) ? clip / gn : 1.0f;
    float g = to_f(grads[i]) * scale;
    float mi = b1 * m[i] + (1.0f - b1) * g;
    float vi = b2 * v[i] + (1.0f - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float p = master ? master[i] : to_f(params[i]);
    p -= lr * ((mi * bc1) / (sqrtf(vi * bc2) + eps) + weight_decay * p);
    if (master) master[i] = p;
    params[i] = round_param<T>(p, seed, (unsigned long long)(offset + i));
}

// The global gradient norm that clips the update. Sum of squares: each block strides over x in a fixed pattern
// and writes one partial; then one block adds the partials in order. Deterministic for a fixed grid.
template <class T>
__global__ void sumsq_partial(float* part, const T* x, long long n) {
    __shared__ float buf[32];
    float s = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
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
