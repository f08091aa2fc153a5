// RMSNorm forward (optionally fused with the residual add before it) and backward; rstd kept in fp32.
// out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps): no mean, no bias (Llama).
#include "common.cuh"


// One warp per row of C; 16-byte loads; the sum of squares in fp32. Writes out and rstd. C % Pack<T>::N == 0.
template <class T>
__device__ void rmsnorm_row(T* out, float* rstd, const T* x, const T* w, float eps, int row, int C) {
    constexpr int N = Pack<T>::N;
    const int lane = threadIdx.x % 32;
    // U packs loaded before any is used or stored (out may alias x as far as the compiler knows, so a load after a
    // store waits for it): U loads in flight, not one (few-row calls, decoding, are bound by this latency); the sums
    // in the same order as one pack at a time
    constexpr int U = 4;
    float s = 0.0f;
    for (int c0 = lane * N; c0 < C; c0 += 32 * N * U) {
        Pack<T> p[U];
#pragma unroll
        for (int u = 0; u < U; u++) if (c0 + 32 * N * u < C) p[u] = load16(x + c0 + 32 * N * u);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + 32 * N * u >= C) break;
#pragma unroll
            for (int k = 0; k < N; k++) { float v = to_f(p[u].v[k]); s += v * v; }
        }
    }
    const float r = rsqrtf(warp_sum(s) / C + eps);
    for (int c0 = lane * N; c0 < C; c0 += 32 * N * U) {
        Pack<T> p[U], pw[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c0 + 32 * N * u < C) { p[u] = load16(x + c0 + 32 * N * u); pw[u] = load16(w + c0 + 32 * N * u); }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + 32 * N * u >= C) break;
            Pack<T> o;
#pragma unroll
            for (int k = 0; k < N; k++) o.v[k] = from_f<T>(to_f(p[u].v[k]) * r * to_f(pw[u].v[k]));
            store16(out + c0 + 32 * N * u, o);
        }
    }
    if (lane == 0) rstd[row] = r;
}

// out, inp (rows, C); rstd (rows,); w (C,). Blocks of 8 warps, one row each.
template <class T>
__global__ void rmsnorm_forward(T* out, float* rstd, const T* inp, const T* w, float eps, int rows, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    rmsnorm_row(out + (long long)row * C, rstd, inp + (long long)row * C, w, eps, row, C);
}

// residual = inp1 + inp2 (stored in T), then out = rmsnorm(residual) reading back the stored (rounded) values.
template <class T>
__global__ void fused_residual_rmsnorm_forward(T* residual, T* out, float* rstd, const T* inp1, const T* inp2,
                                               const T* w, float eps, int rows, int C) {
    constexpr int N = Pack<T>::N;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long off = (long long)row * C;
    constexpr int U = 4;  // packs in flight before the stores (as in rmsnorm_row)
    for (int c0 = (threadIdx.x % 32) * N; c0 < C; c0 += 32 * N * U) {
        Pack<T> a[U], b[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c0 + 32 * N * u < C) {
                a[u] = load16(inp1 + off + c0 + 32 * N * u);
                b[u] = load16(inp2 + off + c0 + 32 * N * u);
            }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + 32 * N * u >= C) break;
            Pack<T> o;
#pragma unroll
            for (int k = 0; k < N; k++) o.v[k] = from_f<T>(to_f(a[u].v[k]) + to_f(b[u].v[k]));
            store16(residual + off + c0 + 32 * N * u, o);
        }
    }
    __syncwarp();  // each lane reads back the packs other lanes of its warp stored
    rmsnorm_row(out + off, rstd, residual + off, w, eps, row, C);
}

// dinp += rstd * (u - xh * mean(u * xh)), xh = x * rstd, u = w * dout. One warp per row.
// The weight gradient is a column sum (the _weight_ kernels below: deterministic, fixed order).
template <class T, int U>
__device__ void rmsnorm_backward_dinp_body(T* dinp, const T* dout, const T* inp, const T* w, const float* rstd,
                                           int rows, int C) {
    constexpr int N = Pack<T>::N;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x % 32;
    const long long off = (long long)row * C;
    const float r = rstd[row];
    float a = 0.0f;
    for (int c0 = lane * N; c0 < C; c0 += 32 * N * U) {
        Pack<T> x[U], dy[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c0 + 32 * N * u < C) { x[u] = load16(inp + off + c0 + 32 * N * u); dy[u] = load16(dout + off + c0 + 32 * N * u); }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + 32 * N * u >= C) break;
            const Pack<T> pw = load16(w + c0 + 32 * N * u);
#pragma unroll
            for (int k = 0; k < N; k++) a += to_f(dy[u].v[k]) * to_f(pw.v[k]) * to_f(x[u].v[k]) * r;
        }
    }
    a = warp_sum(a) / C;
    for (int c0 = lane * N; c0 < C; c0 += 32 * N * U) {
        Pack<T> x[U], dy[U], di[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c0 + 32 * N * u < C) {
                const long long i = off + c0 + 32 * N * u;
                x[u] = load16(inp + i); dy[u] = load16(dout + i); di[u] = load16(dinp + i);
            }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + 32 * N * u >= C) break;
            const Pack<T> pw = load16(w + c0 + 32 * N * u);
#pragma unroll
            for (int k = 0; k < N; k++) {
                float u_ = to_f(dy[u].v[k]) * to_f(pw.v[k]);
                float xh = to_f(x[u].v[k]) * r;
                di[u].v[k] = from_f<T>(to_f(di[u].v[k]) + (u_ - xh * a) * r);
            }
            store16(dinp + off + c0 + 32 * N * u, di[u]);
        }
    }
}

// U packs a lane in flight (as layernorm.cu's kernels: `_batched` U = 4 for rows of a wave or two, 98.6 -> 71.6 us
// on Llama 1B's 16384 x 2048; the plain one, U = 1, for many rows); the same order of sums either way
template <class T>
__global__ void rmsnorm_backward_dinp(T* dinp, const T* dout, const T* inp, const T* w, const float* rstd, int rows,
                                      int C) {
    rmsnorm_backward_dinp_body<T, 1>(dinp, dout, inp, w, rstd, rows, C);
}
template <class T>
__global__ void rmsnorm_backward_dinp_batched(T* dinp, const T* dout, const T* inp, const T* w, const float* rstd,
                                              int rows, int C) {
    rmsnorm_backward_dinp_body<T, 4>(dinp, dout, inp, w, rstd, rows, C);
}

// Partial column sums of the weight gradient over a chunk of rows (colsum_slab's grid and order):
// part[chunk, c] = sum_n dout[n,c] * inp[n,c] * rstd[n].
template <class T>
struct RmsRow {  // what one row gives a lane's columns of the weight gradient
    Pack<T> dy, x;
    float r;
};

template <class T>
__global__ void rmsnorm_backward_weight_partial(float* part, const T* dout, const T* inp, const float* rstd, int rows,
                                                int C, int rows_per_chunk) {
    colsum_slab<T, 1>(part, C, C, rows, rows_per_chunk,
                      [&](int n, int c0) {
                          const long long off = (long long)n * C + c0;
                          return RmsRow<T>{load16_cs(dout + off), load16_cs(inp + off), rstd[n]};
                      },
                      [](const RmsRow<T>& a, float (&acc)[1][Pack<T>::N]) {
#pragma unroll
                          for (int j = 0; j < Pack<T>::N; j++) acc[0][j] += to_f(a.dy.v[j]) * to_f(a.x.v[j]) * a.r;
                      });
}

// dw (C,) += the chunks' partials (nchunks rows of C) summed in chunk order.
template <class T>
__global__ void rmsnorm_backward_weight_finalize(T* dw, const float* part, int nchunks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float s = colsum_chunks(part, nchunks, C, c);
    dw[c] = from_f<T>(to_f(dw[c]) + s);
}
