// RMSNorm forward (optionally fused with the residual add before it) and backward; rstd kept in fp32.
// out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps): no mean, no bias (Llama).
#include "common.cuh"

// One warp per row of C; 16-byte loads; the sum of squares in fp32. Writes rstd, and each pack of the output row at
// column c through put(c, pack) (stored, or its FP8 copy: rmsnorm_forward_fp8). C % Pack<T>::N == 0.
template <class T, class Put>
__device__ void rmsnorm_row(Put put, float* rstd, const T* x, const T* w, float eps, int row, int C) {
    constexpr int N = Pack<T>::N;
    // 4 packs a lane in flight (row_pass; out may alias x as far as the compiler knows, so a load after a store
    // waits for it): few-row calls, decoding, are bound by this latency
    constexpr int U = 4;
    float s = 0.0f;
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, x); }, [&](int, const Packs<T, 1>& q) {
#pragma unroll
        for (int k = 0; k < N; k++) { float v = to_f(q.p[0].v[k]); s += v * v; }
    });
    const float r = rsqrtf(warp_sum(s) / C + eps);
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, x, w); }, [&](int c, const Packs<T, 2>& q) {
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < N; k++) o.v[k] = from_f<T>(to_f(q.p[0].v[k]) * r * to_f(q.p[1].v[k]));
        put(c, o);
    });
    if (threadIdx.x % 32 == 0) rstd[row] = r;
}

// out, inp (rows, C); rstd (rows,); w (C,). Blocks of 8 warps, one row each.
template <class T>
__global__ void rmsnorm_forward(T* out, float* rstd, const T* inp, const T* w, float eps, int rows, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    T* o = out + (long long)row * C;
    rmsnorm_row([=](int c, const Pack<T>& p) { store16(o + c, p); }, rstd, inp + (long long)row * C, w, eps, row, C);
}

// residual = inp1 + inp2 (stored in T), then out = rmsnorm(residual) reading back the stored (rounded) values.
template <class T>
__global__ void fused_residual_rmsnorm_forward(T* residual, T* out, float* rstd, const T* inp1, const T* inp2,
                                               const T* w, float eps, int rows, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long off = (long long)row * C;
    residual_add_row<T, 4>(residual + off, inp1 + off, inp2 + off, C);  // 4 packs in flight, as in rmsnorm_row
    T* o = out + off;
    rmsnorm_row([=](int c, const Pack<T>& p) { store16(o + c, p); }, rstd, residual + off, w, eps, row, C);
}

// rmsnorm_forward (inp2 null: of inp1) or fused_residual_rmsnorm_forward (residual = inp1 + inp2) with its output
// written only as the FP8 copy the product it feeds takes (--dtype fp8): q (rows, C) e4m3 under *scale, its amax
// into *amax and its clamped values into *clamped (kernels/fp8.cu's quantizing, of the values out would hold);
// fp8_transpose then makes the transposed copy (a row kernel cannot write it coalesced).
template <class T>
__global__ void rmsnorm_forward_fp8(unsigned char* q, float* rstd, T* residual, const T* inp1, const T* inp2,
                                    const T* w, float eps, int rows, int C, const float* scale, float* amax,
                                    int* clamped) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long off = (long long)row * C;
    const T* x = inp1 + off;
    if (inp2 != nullptr) {
        residual_add_row<T, 4>(residual + off, inp1 + off, inp2 + off, C);
        x = residual + off;
    }
    const float s = *scale;
    float m = 0.0f;
    int over = 0;
    unsigned char* qr = q + off;
    rmsnorm_row([&](int c, const Pack<T>& p) { fp8_store_pack(qr + c, p, s, m, over); }, rstd, x, w, eps, row, C);
    fp8_record(amax, clamped, m, over);
}

// dinp += rstd * (u - xh * mean(u * xh)), xh = x * rstd, u = w * dout. One warp per row.
// The weight gradient is a column sum (the _weight_ kernels below: deterministic, fixed order).
template <class T, int U>
__device__ void rmsnorm_backward_dinp_body(T* dinp, const T* dout, const T* inp, const T* w, const float* rstd,
                                           int rows, int C) {
    constexpr int N = Pack<T>::N;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long off = (long long)row * C;
    const float r = rstd[row];
    float a = 0.0f;
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, inp + off, dout + off); },
                   [&](int c, const Packs<T, 2>& q) {  // x, dy
                       const Pack<T> pw = load16(w + c);
#pragma unroll
                       for (int k = 0; k < N; k++) a += to_f(q.p[1].v[k]) * to_f(pw.v[k]) * to_f(q.p[0].v[k]) * r;
                   });
    a = warp_sum(a) / C;
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, inp + off, dout + off, (const T*)dinp + off); },
                   [&](int c, Packs<T, 3> q) {  // x, dy, dinp
                       const Pack<T> pw = load16(w + c);
#pragma unroll
                       for (int k = 0; k < N; k++) {
                           float u = to_f(q.p[1].v[k]) * to_f(pw.v[k]);
                           float xh = to_f(q.p[0].v[k]) * r;
                           q.p[2].v[k] = from_f<T>(to_f(q.p[2].v[k]) + (u - xh * a) * r);
                       }
                       store16(dinp + off + c, q.p[2]);
                   });
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

// dw (C,) += the chunks' partials (nchunks rows of C) summed in chunk order (add 0: dw = the sum).
template <class T>
__global__ void rmsnorm_backward_weight_finalize(T* dw, const float* part, int nchunks, int C, int add) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float s = colsum_chunks(part, nchunks, C, c);
    dw[c] = from_f<T>(add ? to_f(dw[c]) + s : s);
}
