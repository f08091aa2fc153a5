// LayerNorm forward (optionally fused with the residual add before it) and backward; mean/rstd kept in fp32.
#include "common.cuh"

// Every loop over a row takes U packs a lane at a time, their loads issued before any is used. With U = 1 (one
// pack at a time) each warp waits on one load after another: fine when the rows are many waves of warps (d12's 65536
// rows), latency-bound when they are a wave or two (d48's 8192; there U = 4: 41.8 -> 35.3 us for the backward,
// 39.0 -> 34.9 for the forward, while d12's rows took 99.5 -> 114.5 us: dev/kernel_variants.py, H200). Hence
// two kernels of each, `name` (U = 1) and `name_batched` (U = 4); the backend picks by rows (backend.py ROWS_BATCHED).
// The sums run over the packs in the same order either way (the same bits).

// One warp per row of C; 16-byte loads; two passes over the row (mean, then variance about the mean, as the
// NumPy reference). Writes mean, rstd, and each pack of the output row at column c through put(c, pack) (stored, or
// its FP8 copy: layernorm_forward_fp8). C % Pack<T>::N == 0.
template <class T, int U, class Put>
__device__ void layernorm_row(Put put, float* mean, float* rstd, const T* x, const T* w, const T* b, int row, int C) {
    constexpr int N = Pack<T>::N;
    float s = 0.0f, v = 0.0f;
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, x); }, [&](int, const Packs<T, 1>& q) {
#pragma unroll
        for (int k = 0; k < N; k++) s += to_f(q.p[0].v[k]);
    });
    const float m = warp_sum(s) / C;
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, x); }, [&](int, const Packs<T, 1>& q) {
#pragma unroll
        for (int k = 0; k < N; k++) { float d = to_f(q.p[0].v[k]) - m; v += d * d; }
    });
    const float r = rsqrtf(warp_sum(v) / C + 1e-5f);
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, x, w, b); }, [&](int c, const Packs<T, 3>& q) {
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < N; k++)
            o.v[k] = from_f<T>((to_f(q.p[0].v[k]) - m) * r * to_f(q.p[1].v[k]) + to_f(q.p[2].v[k]));
        put(c, o);
    });
    if (threadIdx.x % 32 == 0) { mean[row] = m; rstd[row] = r; }
}

template <class T, int U>
__device__ void layernorm_forward_body(T* out, float* mean, float* rstd, const T* inp, const T* w, const T* b,
                                       int rows, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    T* o = out + (long long)row * C;
    layernorm_row<T, U>([=](int c, const Pack<T>& p) { store16(o + c, p); }, mean, rstd, inp + (long long)row * C,
                        w, b, row, C);
}
template <class T>
__global__ void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* w, const T* b, int rows,
                                  int C) {
    layernorm_forward_body<T, 1>(out, mean, rstd, inp, w, b, rows, C);
}
template <class T>
__global__ void layernorm_forward_batched(T* out, float* mean, float* rstd, const T* inp, const T* w, const T* b,
                                          int rows, int C) {
    layernorm_forward_body<T, 4>(out, mean, rstd, inp, w, b, rows, C);
}

// residual = inp1 + inp2 (stored in T), then out = layernorm(residual) reading back the stored (rounded) values.
template <class T, int U>
__device__ void fused_residual_layernorm_forward_body(T* residual, T* out, float* mean, float* rstd, const T* inp1,
                                                      const T* inp2, const T* w, const T* b, int rows, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long off = (long long)row * C;
    residual_add_row<T, U>(residual + off, inp1 + off, inp2 + off, C);
    T* o = out + off;
    layernorm_row<T, U>([=](int c, const Pack<T>& p) { store16(o + c, p); }, mean, rstd, residual + off, w, b, row,
                        C);
}
template <class T>
__global__ void fused_residual_layernorm_forward(T* residual, T* out, float* mean, float* rstd, const T* inp1,
                                                 const T* inp2, const T* w, const T* b, int rows, int C) {
    fused_residual_layernorm_forward_body<T, 1>(residual, out, mean, rstd, inp1, inp2, w, b, rows, C);
}
template <class T>
__global__ void fused_residual_layernorm_forward_batched(T* residual, T* out, float* mean, float* rstd,
                                                         const T* inp1, const T* inp2, const T* w, const T* b, int rows,
                                                         int C) {
    fused_residual_layernorm_forward_body<T, 4>(residual, out, mean, rstd, inp1, inp2, w, b, rows, C);
}

// layernorm_forward (inp2 null: of inp1) or fused_residual_layernorm_forward (residual = inp1 + inp2) with its
// output written only as the FP8 copy the product it feeds takes (--dtype fp8): q (rows, C) e4m3 under *scale, its
// amax into *amax and its clamped values into *clamped (kernels/fp8.cu's quantizing, of the values out would hold);
// fp8_transpose then makes the transposed copy (a row kernel cannot write it coalesced). _batched: U = 4.
template <class T, int U>
__device__ void layernorm_forward_fp8_body(unsigned char* q, float* mean, float* rstd, T* residual, const T* inp1,
                                           const T* inp2, const T* w, const T* b, int rows, int C,
                                           const float* scale, float* amax, int* clamped) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long off = (long long)row * C;
    const T* x = inp1 + off;
    if (inp2 != nullptr) {
        residual_add_row<T, U>(residual + off, inp1 + off, inp2 + off, C);
        x = residual + off;
    }
    const float s = *scale;
    float m = 0.0f;
    int over = 0;
    unsigned char* qr = q + off;
    layernorm_row<T, U>([&](int c, const Pack<T>& p) { fp8_store_pack(qr + c, p, s, m, over); }, mean, rstd, x, w, b,
                        row, C);
    fp8_record(amax, clamped, m, over);
}
template <class T>
__global__ void layernorm_forward_fp8(unsigned char* q, float* mean, float* rstd, T* residual, const T* inp1,
                                      const T* inp2, const T* w, const T* b, int rows, int C, const float* scale,
                                      float* amax, int* clamped) {
    layernorm_forward_fp8_body<T, 1>(q, mean, rstd, residual, inp1, inp2, w, b, rows, C, scale, amax, clamped);
}
template <class T>
__global__ void layernorm_forward_fp8_batched(unsigned char* q, float* mean, float* rstd, T* residual,
                                              const T* inp1, const T* inp2, const T* w, const T* b, int rows, int C,
                                              const float* scale, float* amax, int* clamped) {
    layernorm_forward_fp8_body<T, 4>(q, mean, rstd, residual, inp1, inp2, w, b, rows, C, scale, amax, clamped);
}

// dinp += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd, dnorm = dout * w. One warp per row.
// The weight/bias gradients are column sums (the _params_ kernels below: deterministic, fixed order), or all in one
// pass: layernorm_backward_onepass.

// A row's two means (mean(dnorm), mean(dnorm * norm)), summed by one warp (every lane gets them): the dinp
// kernels' first pass
template <class T, int U>
__device__ __forceinline__ float2 layernorm_backward_means(const T* dout, const T* inp, const T* w, float m, float r,
                                                           int C) {
    constexpr int N = Pack<T>::N;
    float a = 0.0f, bsum = 0.0f;
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, inp, dout); },
                   [&](int c, const Packs<T, 2>& q) {  // x, dy
                       const Pack<T> pw = load16(w + c);
#pragma unroll
                       for (int k = 0; k < N; k++) {
                           float dn = to_f(q.p[1].v[k]) * to_f(pw.v[k]);
                           a += dn;
                           bsum += dn * (to_f(q.p[0].v[k]) - m) * r;
                       }
                   });
    return make_float2(warp_sum(a) / C, warp_sum(bsum) / C);
}
// the increment of one element of dinp given the row's mean, rstd and means (every backward kernel's formula)
__device__ __forceinline__ float layernorm_dinp(float x, float dy, float w, float m, float r, float a, float bsum) {
    const float dn = dy * w, norm = (x - m) * r;
    return (dn - a - norm * bsum) * r;
}

template <class T, int U>
__device__ void layernorm_backward_dinp_body(T* dinp, const T* dout, const T* inp, const T* w, const float* mean,
                                             const float* rstd, int rows, int C) {
    constexpr int N = Pack<T>::N;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long off = (long long)row * C;
    const float m = mean[row], r = rstd[row];
    const float2 ab = layernorm_backward_means<T, U>(dout + off, inp + off, w, m, r, C);
    row_pass<T, U>(C, [&](int c) { return load_packs<T>(c, inp + off, dout + off, (const T*)dinp + off); },
                   [&](int c, Packs<T, 3> q) {  // x, dy, dinp
                       const Pack<T> pw = load16(w + c);
#pragma unroll
                       for (int k = 0; k < N; k++)
                           q.p[2].v[k] = from_f<T>(to_f(q.p[2].v[k]) + layernorm_dinp(to_f(q.p[0].v[k]),
                               to_f(q.p[1].v[k]), to_f(pw.v[k]), m, r, ab.x, ab.y));
                       store16(dinp + off + c, q.p[2]);
                   });
}
template <class T>
__global__ void layernorm_backward_dinp(T* dinp, const T* dout, const T* inp, const T* w, const float* mean,
                                        const float* rstd, int rows, int C) {
    layernorm_backward_dinp_body<T, 1>(dinp, dout, inp, w, mean, rstd, rows, C);
}
template <class T>
__global__ void layernorm_backward_dinp_batched(T* dinp, const T* dout, const T* inp, const T* w, const float* mean,
                                                const float* rstd, int rows, int C) {
    layernorm_backward_dinp_body<T, 4>(dinp, dout, inp, w, mean, rstd, rows, C);
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

// dw and db (C,) += the chunks' partials in order, one launch for both: column c < C of part (width 2C) is dw[c],
// column C + c is db[c]. add: bit 0 dw accumulates (else it is overwritten), bit 1 db.
template <class T>
__global__ void layernorm_backward_params_finalize(T* dw, T* db, const float* part, int nchunks, int C, int add) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= 2 * C) return;
    const float s = colsum_chunks(part, nchunks, 2 * C, c);
    T* out = c < C ? dw + c : db + (c - C);
    *out = from_f<T>((add >> (c < C ? 0 : 1)) & 1 ? to_f(*out) + s : s);
}

// The backward in one pass: dinp += the norm's input gradient and, while the rows are in registers, the partial
// column sums of the K parameter gradients and, when sum_part is not null, of the updated dinp (the bias gradient
// of the product that wrote this residual stream). Each row of x, dout and dinp is read once (the separate kernels
// read each twice). Block b owns rows [b R, (b + 1) R) (R = rows_per_block); thread t = g P + p (P = C / N packs a
// row, G = blockDim / P groups) owns pack p of its group's RB rows of each sub-chunk (S = G RB rows), loading x,
// dout and dinp of all RB rows at once; then
//   1. rowpart(mr, x, dy, w) -> a pack element's terms of the row's two sums, added over the pack (element order)
//      into red[row][p];
//   2. one warp per row adds red[row][0..P-1] (lane-strided, then warp_sum) -> st[row] (the sums / C);
//   3. elem(mr, ab, x, dy, w, acc) -> the element's dinp increment and parameter terms, from the registers.
// mr = stat(row): (mean, rstd) from the forward. Then the groups' sums are added in order g = 0..G-1: part[b, k C +
// c], sum_part[b, c]. A fixed grid for a given row count (the host's), so a fixed order: deterministic.
// Host: G P <= 256, G <= 32 (red: RB x 256 float2, st: RB x 32). (Written over K and the three functions so that
// RMSNorm could take it too; there it was slower than its separate kernels: backend.py _ln_onepass.)
template <class T, int K, int RB, class Stat, class RowPart, class Elem>
__device__ __forceinline__ void norm_backward_onepass(T* dinp, float* part, float* sum_part, const T* dout,
                                                      const T* inp, const T* w, int rows, int C, int rows_per_block,
                                                      Stat stat, RowPart rowpart, Elem elem) {
    constexpr int N = Pack<T>::N, A = K + 1;
    __shared__ float2 red[RB * 256];
    __shared__ float2 st[RB * 32];
    __shared__ float gred[A * N * 128];
    const int P = C / N, G = blockDim.x / P, S = G * RB, t = threadIdx.x, g = t / P, p = t % P, c0 = p * N;
    const int lane = t % 32, warp = t / 32, nw = blockDim.x / 32;
    const int lo = blockIdx.x * rows_per_block, hi = min(rows, lo + rows_per_block);
    const bool active = g < G, sums = sum_part != nullptr;
    float acc[A][N];
#pragma unroll
    for (int k = 0; k < A; k++)
#pragma unroll
        for (int j = 0; j < N; j++) acc[k][j] = 0.0f;
    Pack<T> pw;
    if (active) pw = load16(w + c0);
    for (int s0 = lo; s0 < hi; s0 += S) {
        const int r0 = s0 + g * RB;  // this thread's first row
        Packs<T, 3> q[RB];
        float2 mr[RB];
        if (active) {
#pragma unroll
            for (int i = 0; i < RB; i++)
                if (r0 + i < hi) {
                    const long long off = (long long)(r0 + i) * C + c0;
                    q[i] = load_packs<T>(0, inp + off, dout + off, (const T*)dinp + off);
                    mr[i] = stat(r0 + i);
                }
#pragma unroll
            for (int i = 0; i < RB; i++)
                if (r0 + i < hi) {
                    float2 s = make_float2(0.0f, 0.0f);
#pragma unroll
                    for (int j = 0; j < N; j++) {
                        const float2 e = rowpart(mr[i], to_f(q[i].p[0].v[j]), to_f(q[i].p[1].v[j]), to_f(pw.v[j]));
                        s.x += e.x;
                        s.y += e.y;
                    }
                    red[(g * RB + i) * P + p] = s;
                }
        }
        __syncthreads();
        const int ns = min(S, hi - s0);
        for (int i = warp; i < ns; i += nw) {
            float sx = 0.0f, sy = 0.0f;
            for (int pp = lane; pp < P; pp += 32) {
                const float2 v = red[i * P + pp];
                sx += v.x;
                sy += v.y;
            }
            sx = warp_sum(sx);
            sy = warp_sum(sy);
            if (lane == 0) st[i] = make_float2(sx / C, sy / C);
        }
        __syncthreads();
        if (active) {
#pragma unroll
            for (int i = 0; i < RB; i++)
                if (r0 + i < hi) {
                    const float2 ab = st[g * RB + i];
                    Pack<T> d = q[i].p[2];
#pragma unroll
                    for (int j = 0; j < N; j++) {
                        float a[K];
                        const float inc = elem(mr[i], ab, to_f(q[i].p[0].v[j]), to_f(q[i].p[1].v[j]),
                                               to_f(pw.v[j]), a);
#pragma unroll
                        for (int k = 0; k < K; k++) acc[k][j] += a[k];
                        d.v[j] = from_f<T>(to_f(d.v[j]) + inc);
                        acc[K][j] += to_f(d.v[j]);
                    }
                    store16(dinp + (long long)(r0 + i) * C + c0, d);
                }
        }
        // no barrier here: the next sub-chunk writes red only after this one's step 2 ended (the barrier above),
        // and st only after the next step-1 barrier, which every thread reaches after its step 3
    }
    for (int gg = 1; gg < G; gg++) {  // groups in order (G > 1 only when P <= 128: gred holds A N 128 floats)
        if (g == gg)
#pragma unroll
            for (int k = 0; k < A; k++)
#pragma unroll
                for (int j = 0; j < N; j++) gred[(k * N + j) * P + p] = acc[k][j];
        __syncthreads();
        if (g == 0)
#pragma unroll
            for (int k = 0; k < A; k++)
#pragma unroll
                for (int j = 0; j < N; j++) acc[k][j] += gred[(k * N + j) * P + p];
        __syncthreads();
    }
    if (g != 0) return;
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int j = 0; j < N; j++) part[(long long)blockIdx.x * K * C + k * C + c0 + j] = acc[k][j];
    if (sums)
#pragma unroll
        for (int j = 0; j < N; j++) sum_part[(long long)blockIdx.x * C + c0 + j] = acc[K][j];
}

// dinp, and the partials of dw | db (part, 2C wide) and of the updated dinp (sum_part, C wide; null: not formed),
// in one read of each row (norm_backward_onepass above). The row means are summed in another order than the
// dinp kernel's, so dinp takes other bits than the separate kernels give. Two rows a thread (128 registers); four
// were slower (held to 128 registers they spill; H200, 2026-11-30: d12 0.2235 vs 0.1797 ms, d48 0.0678 vs 0.0606).
template <class T>
__global__ void layernorm_backward_onepass(T* dinp, float* part, float* sum_part, const T* dout, const T* inp,
                                           const T* w, const float* mean, const float* rstd, int rows, int C,
                                           int rows_per_block) {
    norm_backward_onepass<T, 2, 2>(
        dinp, part, sum_part, dout, inp, w, rows, C, rows_per_block,
        [&](int n) { return make_float2(mean[n], rstd[n]); },
        [](const float2& mr, float x, float dy, float w) {  // the row's dnorm and dnorm * norm
            const float dn = dy * w;
            return make_float2(dn, dn * (x - mr.x) * mr.y);
        },
        [](const float2& mr, const float2& ab, float x, float dy, float w, float (&a)[2]) {
            a[0] = dy * (x - mr.x) * mr.y;  // dw, db: as layernorm_backward_params_partial
            a[1] = dy;
            return layernorm_dinp(x, dy, w, mr.x, mr.y, ab.x, ab.y);
        });
}

// layernorm_backward_params_finalize for the one-pass kernel's ~264 chunks (colsum_chunks8: block (32, 8), grid
// cdiv(2C, 32))
template <class T>
__global__ void layernorm_backward_params_finalize8(T* dw, T* db, const float* part, int nchunks, int C, int add) {
    const int c = blockIdx.x * 32 + threadIdx.x;
    const float s = colsum_chunks8(part, nchunks, 2 * C, c);
    if (threadIdx.y != 0 || c >= 2 * C) return;
    T* out = c < C ? dw + c : db + (c - C);
    *out = from_f<T>((add >> (c < C ? 0 : 1)) & 1 ? to_f(*out) + s : s);
}
