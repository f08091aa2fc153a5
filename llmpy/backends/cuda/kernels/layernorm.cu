// LayerNorm forward (optionally fused with the residual add before it) and backward; mean/rstd kept in fp32.
#include "common.cuh"

// One warp per row of C; 16-byte loads; two passes over the row (mean, then variance about the mean, as the
// NumPy reference). Writes out, mean, rstd. C % Pack<T>::N == 0.
template <class T>
__device__ void layernorm_row(T* out, float* mean, float* rstd, const T* x, const T* w, const T* b, int row, int C) {
    constexpr int N = Pack<T>::N;
    const int lane = threadIdx.x % 32;
    float s = 0.0f;
    for (int c = lane * N; c < C; c += 32 * N) {
        Pack<T> p = load16(x + c);
#pragma unroll
        for (int k = 0; k < N; k++) s += to_f(p.v[k]);
    }
    const float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane * N; c < C; c += 32 * N) {
        Pack<T> p = load16(x + c);
#pragma unroll
        for (int k = 0; k < N; k++) { float d = to_f(p.v[k]) - m; v += d * d; }
    }
    const float r = rsqrtf(warp_sum(v) / C + 1e-5f);
    for (int c = lane * N; c < C; c += 32 * N) {
        Pack<T> p = load16(x + c), pw = load16(w + c), pb = load16(b + c), o;
#pragma unroll
        for (int k = 0; k < N; k++) o.v[k] = from_f<T>((to_f(p.v[k]) - m) * r * to_f(pw.v[k]) + to_f(pb.v[k]));
        store16(out + c, o);
    }
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

template <class T>
__global__ void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* w, const T* b, int rows,
                                  int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    layernorm_row(out + (long long)row * C, mean, rstd, inp + (long long)row * C, w, b, row, C);
}

// residual = inp1 + inp2 (stored in T), then out = layernorm(residual) reading back the stored (rounded) values.
template <class T>
__global__ void fused_residual_layernorm_forward(T* residual, T* out, float* mean, float* rstd, const T* inp1,
                                                 const T* inp2, const T* w, const T* b, int rows, int C) {
    constexpr int N = Pack<T>::N;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long off = (long long)row * C;
    for (int c = (threadIdx.x % 32) * N; c < C; c += 32 * N) {
        Pack<T> a = load16(inp1 + off + c), bb = load16(inp2 + off + c), o;
#pragma unroll
        for (int k = 0; k < N; k++) o.v[k] = from_f<T>(to_f(a.v[k]) + to_f(bb.v[k]));
        store16(residual + off + c, o);
    }
    __syncwarp();
    layernorm_row(out + off, mean, rstd, residual + off, w, b, row, C);
}

// dinp += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd, dnorm = dout * w. One warp per row.
// The weight/bias gradients are column sums (the _params_ kernels below: deterministic, fixed order).
template <class T>
__global__ void layernorm_backward_dinp(T* dinp, const T* dout, const T* inp, const T* w, const float* mean,
                                        const float* rstd, int rows, int C) {
    constexpr int N = Pack<T>::N;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const long long off = (long long)row * C;
    const float m = mean[row], r = rstd[row];
    float a = 0.0f, bsum = 0.0f;
    for (int c = lane * N; c < C; c += 32 * N) {
        Pack<T> x = load16(inp + off + c), dy = load16(dout + off + c), pw = load16(w + c);
#pragma unroll
        for (int k = 0; k < N; k++) {
            float dn = to_f(dy.v[k]) * to_f(pw.v[k]);
            a += dn;
            bsum += dn * (to_f(x.v[k]) - m) * r;
        }
    }
    a = warp_sum(a) / C;
    bsum = warp_sum(bsum) / C;
    for (int c = lane * N; c < C; c += 32 * N) {
        Pack<T> x = load16(inp + off + c), dy = load16(dout + off + c), pw = load16(w + c), di = load16(dinp + off + c);
#pragma unroll
        for (int k = 0; k < N; k++) {
            float dn = to_f(dy.v[k]) * to_f(pw.v[k]);
            float norm = (to_f(x.v[k]) - m) * r;
            di.v[k] = from_f<T>(to_f(di.v[k]) + (dn - a - norm * bsum) * r);
        }
        store16(dinp + off + c, di);
    }
}

// Partial column sums for the LayerNorm parameter gradients over a chunk of rows (colsum_slab's grid and order):
// part[chunk, c] = sum dout[n,c] * norm[n,c];  part[chunk, C + c] = sum dout[n,c].
template <class T>
struct NormRow {  // what one row gives a lane's columns in the norms' parameter gradients: dout, input, statistics
    Pack<T> dy, x;
    float m, r;
};

template <class T>
__global__ void layernorm_backward_params_partial(float* part, const T* dout, const T* inp, const float* mean,
                                                  const float* rstd, int rows, int C, int rows_per_chunk) {
    colsum_slab<T, 2>(part, 2 * C, C, rows, rows_per_chunk,
                      [&](int n, int c0) {
                          const long long off = (long long)n * C + c0;
                          return NormRow<T>{load16_cs(dout + off), load16_cs(inp + off), mean[n], rstd[n]};
                      },
                      [](const NormRow<T>& a, float (&acc)[2][Pack<T>::N]) {
#pragma unroll
                          for (int j = 0; j < Pack<T>::N; j++) {
                              const float d = to_f(a.dy.v[j]);
                              acc[0][j] += d * (to_f(a.x.v[j]) - a.m) * a.r;
                              acc[1][j] += d;
                          }
                      });
}

// dw or db (C,) += the chunks' partials in order: launched on part for dw (width 2C) and on part + C for db.
template <class T>
__global__ void layernorm_backward_params_finalize(T* out, const float* part, int nchunks, int width, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float s = colsum_chunks(part, nchunks, width, c);
    out[c] = from_f<T>(to_f(out[c]) + s);
}
