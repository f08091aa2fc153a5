// The matrix products themselves run in cuBLASLt (gemm.py); here: the bias gradient, a column sum of dout
// (rows, OC) in two deterministic stages: partial sums over chunks of rows (fixed order), then the chunks in order.
#include "common.cuh"

// part[chunk, c] = sum of x[n, c] over the chunk's rows (colsum_slab: grid (cdiv(C / N, 32), chunks), 256 threads)
template <class T>
__global__ void colsum_partial(float* part, const T* x, int rows, int C, int rows_per_chunk) {
    colsum_slab<T, 1>(part, C, C, rows, rows_per_chunk,
                      [&](int n, int c0) { return load16_cs(x + (long long)n * C + c0); },
                      [](const Pack<T>& q, float (&acc)[1][Pack<T>::N]) {
#pragma unroll
                          for (int j = 0; j < Pack<T>::N; j++) acc[0][j] += to_f(q.v[j]);
                      });
}

// out[c] += sum_k part[k, c] for k = 0..nchunks-1 (in order); `width` columns per chunk row of part. add 0: out[c]
// = the sum (a gradient that counts as zero: backend.fresh_grads)
template <class T>
__global__ void colsum_finalize(T* out, const float* part, int nchunks, int width, int C, int add) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float s = colsum_chunks(part, nchunks, width, c);
    out[c] = from_f<T>(add ? to_f(out[c]) + s : s);
}

// colsum_finalize for many chunks (colsum_chunks8: block (32, 8), grid cdiv(C, 32)); the bias gradients whose
// partials LayerNorm's one-pass backward formed (sum_part)
template <class T>
__global__ void colsum_finalize8(T* out, const float* part, int nchunks, int width, int C, int add) {
    const int c = blockIdx.x * 32 + threadIdx.x;
    const float s = colsum_chunks8(part, nchunks, width, c);
    if (threadIdx.y != 0 || c >= C) return;
    out[c] = from_f<T>(add ? to_f(out[c]) + s : s);
}
