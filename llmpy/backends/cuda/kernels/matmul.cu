// The matrix products themselves run in cuBLASLt (gemm.py); here: the bias gradient, a column sum of dout
// (rows, OC) in two deterministic stages: partial sums over chunks of rows (row order), then the chunks in order.
#include "common.cuh"

// part[chunk, c] = sum of x[n, c] over the chunk's rows, in order. One thread per column.
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
    const float s = colsum_chunks(part, nchunks, width, c);
    out[c] = from_f<T>(to_f(out[c]) + s);
}
