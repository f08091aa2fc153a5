// The matrix products themselves run in cuBLASLt (gemm.py); here: the bias gradient, a column sum of dout
// (rows, OC) in two deterministic stages: partial sums over chunks of rows (fixed order), then the chunks in order.
#include "common.cuh"

// part[chunk, c] = the sum of x[n, c] over the chunk's rows, by a block of COLSUM_WARPS warps (grid:
// (cdiv(C / N, 32), chunks), N = Pack<T>::N, C % N == 0). Lane l owns the N columns from c0 = (blockIdx.x * 32 + l) * N;
// warp w adds rows lo + w, lo + w + COLSUM_WARPS, ... in order, four rows loaded ahead (16-byte loads, many rows in
// flight: one thread per column with 2-byte loads left HBM mostly idle); then the warps' sums are added in warp
// order. Deterministic.
#define COLSUM_WARPS 8
template <class T>
__global__ void colsum_partial(float* part, const T* x, int rows, int C, int rows_per_chunk) {
    constexpr int N = Pack<T>::N, W = COLSUM_WARPS;
    __shared__ float sh[W][N * 32];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, chunk = blockIdx.y;
    const int c0 = (blockIdx.x * 32 + lane) * N, lo = chunk * rows_per_chunk, hi = min(rows, lo + rows_per_chunk);
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; j++) acc[j] = 0.0f;
    if (c0 < C) {
        int n = lo + w;
        for (; n + 3 * W < hi; n += 4 * W) {
            Pack<T> q[4];
#pragma unroll
            for (int u = 0; u < 4; u++) q[u] = load16_cs(x + (long long)(n + u * W) * C + c0);
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int j = 0; j < N; j++) acc[j] += to_f(q[u].v[j]);
        }
        for (; n < hi; n += W) {
            const Pack<T> q = load16_cs(x + (long long)n * C + c0);
#pragma unroll
            for (int j = 0; j < N; j++) acc[j] += to_f(q.v[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < N; j++) sh[w][j * 32 + lane] = acc[j];
    __syncthreads();
    for (int e = threadIdx.x; e < N * 32; e += blockDim.x) {
        const int j = e / 32, l = e % 32, c = (blockIdx.x * 32 + l) * N + j;
        if (c >= C) continue;
        float s = 0.0f;
        for (int ww = 0; ww < W; ww++) s += sh[ww][j * 32 + l];
        part[(long long)chunk * C + c] = s;
    }
}

// out[c] += sum_k part[k, c] for k = 0..nchunks-1 (in order); `width` columns per chunk row of part.
template <class T>
__global__ void colsum_finalize(T* out, const float* part, int nchunks, int width, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float s = colsum_chunks(part, nchunks, width, c);
    out[c] = from_f<T>(to_f(out[c]) + s);
}
