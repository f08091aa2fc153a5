// The matrix products themselves run in cuBLASLt (gemm.py); here: the bias gradient, a column sum of dout
// (rows, OC), deterministic: partial sums over chunks of rows (fixed order), then the chunks in order.
#include "common.cuh"

// out[c] += sum of x[n, c] over the rows (colsum_slab: grid (cdiv(C / N, 32), chunks), 256 threads; partials per
// chunk in part, the last block of each column slab adds them in chunk order)
template <class T>
__global__ void colsum(T* out, float* part, unsigned int* counters, const T* x, int rows, int C, int rows_per_chunk) {
    T* const outs[1] = {out};
    colsum_slab<T, 1>(part, C, C, rows, rows_per_chunk,
                      [&](int n, int c0) { return load16_cs(x + (long long)n * C + c0); },
                      [](const Pack<T>& q, float (&acc)[1][Pack<T>::N]) {
#pragma unroll
                          for (int j = 0; j < Pack<T>::N; j++) acc[0][j] += to_f(q.v[j]);
                      },
                      outs, counters);
}
