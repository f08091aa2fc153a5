// Small elementwise and reduction kernels: GELU (tanh form), adds, casts, column sums, sums of squares, loss sum.
#include "common.cuh"

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)

template <class T>
__global__ void gelu_forward(T* out, const T* inp, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(inp[i]);
    float u = GELU_SCALE * (x + 0.044715f * x * x * x);
    out[i] = from_f<T>(0.5f * x * (1.0f + tanhf(u)));
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
        float v = to_f(x.v[k]);
        float th = tanhf(GELU_SCALE * (v + 0.044715f * v * v * v));
        float g = 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * v * v);
        d.v[k] = from_f<T>(g * to_f(d.v[k]));
    }
    store16(dinp + i, d);
}

// a += b
template <class T>
__global__ void add_inplace(T* a, const T* b, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
}

// out = T(in), round to nearest (loading fp32 weights into the bf16 compute copy)
template <class T>
__global__ void cast_from_f32(T* out, const float* in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_f<T>(in[i]);
}

// Column sums of x (rows, C) in two deterministic stages: partial sums over chunks of rows (row order), then the
// chunks in order, added to out (+=). Used for bias gradients.
template <class T>
__global__ void colsum_partial(float* part, const T* x, int rows, int C, int rows_per_chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (c >= C) return;
    int lo = chunk * rows_per_chunk, hi = min(rows, lo + rows_per_chunk);
    float s = 0.0f;
    for (int n = lo; n < hi; n++) s += to_f(x[(long long)n * C + c]);
    part[(long long)chunk * C + c] = s;
}

// out[c] += sum_k part[k, c] for k = 0..nchunks-1 (in order); `width` columns per chunk row of part.
template <class T>
__global__ void colsum_finalize(T* out, const float* part, int nchunks, int width, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int k = 0; k < nchunks; k++) s += part[(long long)k * width + c];
    out[c] = from_f<T>(to_f(out[c]) + s);
}

// Sum of squares: each block strides over x in a fixed pattern and writes one partial; then one block adds the
// partials in order. Deterministic for a fixed grid.
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

// acc[0] += scale * sum(losses[0..n)), one block, fixed order (the mean loss over micro-batches)
__global__ void loss_accumulate(float* acc, const float* losses, int n, float scale) {
    __shared__ float buf[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
    s = block_sum(s, buf);
    if (threadIdx.x == 0) acc[0] += scale * s;
}
