// BitLinear (layers/bitlinear.py), the MatMul-free LM's ternary linear layer: x (M, K), W (N, K), gamma (K,).
// The forward product q_x q_w^T is a cuBLASLt int8 x int8 GEMM with int32 accumulation (mmfree.py; exact); the
// backward's products take T operands (dout is not an integer). Here: quantizing the activations (the inner
// RMSNorm fused in) and the weights, the one rescale per output, and the backward's input and gamma gradients.
#include "common.cuh"

// N values of a row stored as Q at q: T itself (N = one 16-byte pack of T), or int8 (N bytes: 8 or 4).
template <class T, class Q, int N>
__device__ __forceinline__ void store_q(Q* q, const float (&v)[N]) {
    if constexpr (sizeof(Q) == 1) {
        signed char b[N];
#pragma unroll
        for (int k = 0; k < N; k++) b[k] = (signed char)(int)v[k];
        if constexpr (N == 8) { uint2 u; memcpy(&u, b, 8); *reinterpret_cast<uint2*>(q) = u; }
        else { unsigned int u; memcpy(&u, b, 4); *reinterpret_cast<unsigned int*>(q) = u; }
    } else {
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < N; k++) o.v[k] = from_f<T>(v[k]);
        store16(q, o);
    }
}

// One warp per row of inp (rows, K), three passes over the row: rstd = 1/sqrt(mean x^2 + eps) (or the saved one:
// `saved`), y = x rstd gamma, s_x = 127 / max(max|y|, 1e-5), q_x = clamp(roundf(y s_x), -128, 127) (roundf: half
// away from zero). q (rows, K) gets q_x itself (Q = T: integers, exact in bf16 and fp32; Q = int8: the forward
// GEMM's operand) or, with `dequant`, yq = q_x / s_x in T (the backward's dW operand); sx (rows,) = s_x. 1/sqrtf
// rather than rsqrtf: correctly rounded like the reference, so rstd is exact where the reference's is (the tie tests
// rely on it). rstd is read when saved, else written.
template <class T, class Q>
__device__ __forceinline__ void quantize_rows(Q* q, float* sx, float* rstd, const T* inp, const T* gamma, float eps,
                                              int saved, int dequant, int rows, int K) {
    constexpr int N = Pack<T>::N;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long off = (long long)row * K;
    float r;
    if (saved) {
        r = rstd[row];
    } else {
        r = 1.0f / sqrtf(warp_sum_squares(inp + off, K, lane) / K + eps);
        if (lane == 0) rstd[row] = r;
    }
    float m = 0.0f;
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> p = load16(inp + off + c), g = load16(gamma + c);
#pragma unroll
        for (int k = 0; k < N; k++) m = fmaxf(m, fabsf(to_f(p.v[k]) * r * to_f(g.v[k])));
    }
    const float s = 127.0f / fmaxf(warp_max(m), 1e-5f);
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> p = load16(inp + off + c), g = load16(gamma + c);
        float o[N];
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float v = fminf(fmaxf(roundf(to_f(p.v[k]) * r * to_f(g.v[k]) * s), -128.0f), 127.0f);
            o[k] = dequant ? v / s : v;
        }
        store_q<T, Q, N>(q + off + c, o);
    }
    if (lane == 0) sx[row] = s;
}

template <class T>
__global__ void bitlinear_quantize(T* q, float* sx, float* rstd, const T* inp, const T* gamma, float eps, int saved,
                                   int dequant, int rows, int K) {
    quantize_rows<T, T>(q, sx, rstd, inp, gamma, eps, saved, dequant, rows, K);
}

// q_x as int8 (the forward's GEMM operand); rstd written.
template <class T>
__global__ void bitlinear_quantize_i8(signed char* q, float* sx, float* rstd, const T* inp, const T* gamma, float eps,
                                      int rows, int K) {
    quantize_rows<T, signed char>(q, sx, rstd, inp, gamma, eps, 0, 0, rows, K);
}

// The weight scale s_w = 1 / max(mean|W|, 1e-5), deterministic in two stages: a fixed grid of blocks, each summing
// |w| over a fixed stride pattern into part[block]; then bitlinear_weight_scale adds the partials in order.
// w (n,), n % Pack<T>::N == 0.
template <class T>
__global__ void bitlinear_absmean_partial(float* part, const T* w, long long n) {
    constexpr int N = Pack<T>::N;
    __shared__ float buf[32];
    float s = 0.0f;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N; i < n;
         i += (long long)gridDim.x * blockDim.x * N) {
        Pack<T> p = load16(w + i);
#pragma unroll
        for (int k = 0; k < N; k++) s += fabsf(to_f(p.v[k]));
    }
    s = block_sum(s, buf);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// sw[0] = 1 / max(sum(part[:nparts]) / count, 1e-5); one block, fixed order. count: the elements the mean is over
// (an LM head's real vocabulary rows only: its padding rows are zero, in the sum but not the count).
__global__ void bitlinear_weight_scale(float* sw, const float* part, int nparts, long long count) {
    __shared__ float buf[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += part[i];
    s = block_sum(s, buf);
    if (threadIdx.x == 0) sw[0] = 1.0f / fmaxf((float)((double)s / (double)count), 1e-5f);
}

// qw (n,) = clamp(rint(w s_w), -1, 1) (rintf: half to even, as the reference's weights), as Q: T (exact; the
// backward's dX operand) or int8 (the forward's). w in W: T, or the fp32 master weights a bf16 model keeps (the
// reference quantizes its fp32 weights under bf16 autocast). One thread per 16-byte pack of w (n % 8 == 0).
template <class T, class W, class Q>
__device__ __forceinline__ void ternary_pack(Q* qw, const W* w, const float* sw, long long n) {
    constexpr int N = Pack<W>::N;
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i >= n) return;
    const float s = sw[0];
    Pack<W> p = load16(w + i);
    float v[N];
#pragma unroll
    for (int k = 0; k < N; k++) v[k] = fminf(fmaxf(rintf(to_f(p.v[k]) * s), -1.0f), 1.0f);
    if constexpr (sizeof(Q) == 1 || N == Pack<T>::N) {
        store_q<T, Q, N>(qw + i, v);
    } else {  // fp32 source, bf16 destination: 4 values, 8 bytes
#pragma unroll
        for (int k = 0; k < N; k++) qw[i + k] = from_f<T>(v[k]);
    }
}

template <class T>
__global__ void bitlinear_ternary(T* qw, const T* w, const float* sw, long long n) {
    ternary_pack<T, T, T>(qw, w, sw, n);
}

template <class T>
__global__ void bitlinear_ternary_i8(signed char* qw, const T* w, const float* sw, long long n) {
    ternary_pack<T, T, signed char>(qw, w, sw, n);
}

// The same two steps from fp32 master weights (bf16 training keeps them): w fp32 (n,), n % 4 == 0.
template <class T>
__global__ void bitlinear_absmean_partial_f32(float* part, const float* w, long long n) {
    __shared__ float buf[32];
    float s = 0.0f;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < n;
         i += (long long)gridDim.x * blockDim.x * 4) {
        const float4 p = *reinterpret_cast<const float4*>(w + i);
        s += fabsf(p.x) + fabsf(p.y) + fabsf(p.z) + fabsf(p.w);
    }
    s = block_sum(s, buf);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

template <class T>
__global__ void bitlinear_ternary_f32(T* qw, const float* w, const float* sw, long long n) {
    ternary_pack<T, float, T>(qw, w, sw, n);
}

template <class T>
__global__ void bitlinear_ternary_f32_i8(signed char* qw, const float* w, const float* sw, long long n) {
    ternary_pack<T, float, signed char>(qw, w, sw, n);
}

// out (rows, N) = acc / (s_x s_w): the int8 GEMM's exact int32 sums acc (rows, N) (|acc| < 2^24: converted to float
// exactly), one rescale per output. One thread per 16-byte pack of out (N % Pack<T>::N == 0: a pack stays in a row).
template <class T>
__global__ void bitlinear_rescale_i32(T* out, const int* acc, const float* sx, const float* sw, int rows, int N) {
    constexpr int P = Pack<T>::N;
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * P;
    if (i >= (long long)rows * N) return;
    const float d = sx[i / N] * sw[0];
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < P; k += 4) {
        const int4 a = *reinterpret_cast<const int4*>(acc + i + k);
        o.v[k] = from_f<T>((float)a.x / d);
        o.v[k + 1] = from_f<T>((float)a.y / d);
        o.v[k + 2] = from_f<T>((float)a.z / d);
        o.v[k + 3] = from_f<T>((float)a.w / d);
    }
    store16(out + i, o);
}

// dinp (rows, K) += rstd (u - xh mean_k(xh u)), u = gamma dyq, xh = x rstd, where dyq = graw / s_w and graw
// (rows, K) fp32 = dout q_w from the GEMM (the 1/s_w of Wq = q_w / s_w folded in here). One warp per row.
template <class T>
__global__ void bitlinear_backward_dinp(T* dinp, const float* graw, const T* inp, const T* gamma, const float* rstd,
                                        const float* sw, int rows, int K) {
    constexpr int N = Pack<T>::N;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long off = (long long)row * K;
    const float r = rstd[row], isw = 1.0f / sw[0];
    float a = 0.0f;
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> x = load16(inp + off + c), g = load16(gamma + c);
        float dy[N];
        load_f32<N>(dy, graw + off + c);
#pragma unroll
        for (int k = 0; k < N; k++) a += (to_f(x.v[k]) * r) * (to_f(g.v[k]) * (dy[k] * isw));
    }
    a = warp_sum(a) / K;
    for (int c = lane * N; c < K; c += 32 * N) {
        Pack<T> x = load16(inp + off + c), g = load16(gamma + c), di = load16(dinp + off + c);
        float dy[N];
        load_f32<N>(dy, graw + off + c);
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float u = to_f(g.v[k]) * (dy[k] * isw), xh = to_f(x.v[k]) * r;
            di.v[k] = from_f<T>(to_f(di.v[k]) + r * (u - xh * a));
        }
        store16(dinp + off + c, di);
    }
}

// dgamma = sum over rows of dyq * xh, deterministic in two stages. part[chunk, k] = the sum over the chunk's rows
// (in order) of (graw[n, k] / s_w) (x[n, k] rstd[n]); one thread per column, grid (K / 128, chunks).
template <class T>
__global__ void bitlinear_backward_dgamma_partial(float* part, const float* graw, const T* inp, const float* rstd,
                                                  const float* sw, int rows, int K, int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (c >= K) return;
    const int lo = chunk * rows_per_chunk, hi = min(rows, lo + rows_per_chunk);
    const float isw = 1.0f / sw[0];
    float s = 0.0f;
    for (int n = lo; n < hi; n++) {
        const long long i = (long long)n * K + c;
        s += (graw[i] * isw) * (to_f(inp[i]) * rstd[n]);
    }
    part[(long long)chunk * K + c] = s;
}

// dgamma (K,) += the chunks' partials (nchunks rows of K) summed in chunk order.
template <class T>
__global__ void bitlinear_backward_dgamma_finalize(T* dgamma, const float* part, int nchunks, int K) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= K) return;
    dgamma[c] = from_f<T>(to_f(dgamma[c]) + colsum_chunks(part, nchunks, K, c));
}

// ---- packed inference (formats/ternary.py): q_w read from its codes, `per` to a byte (5: base 3, byte =
// sum_j (q_j + 1) 3^j; 4: 2 bits each, 0 -> 0, 1 -> +1, 3 -> -1), nb = ceil(K / per) bytes a row of codes.
__device__ __forceinline__ int trit(unsigned int& c, int per) {
    int t;
    if (per == 5) { t = (int)(c % 3u) - 1; c /= 3u; }
    else { t = (int)(c & 3u); t = t == 3 ? -1 : t; c >>= 2; }
    return t;
}

// Asynchronous copies global -> shared (sm_80+, cp.async): 4 bytes, of which the first `bytes` (0-4) are read and
// the rest zero-filled, so a copy never reads past the end of an allocation.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int bytes) {
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Bytes of a shared buffer for one row of nb code bytes copied as aligned 4-byte words (<= 3 bytes before its
// start), rounded up to 16.
__device__ __forceinline__ int row_buffer_bytes(int nb) { return ((nb + 3 + 3) / 4 * 4 + 15) & ~15; }

// One warp copies the code row `row` (nb bytes, any alignment) into dst as the aligned words that cover it: byte b
// of the row lands at dst[(row & 3) + b]. `end`: the end of the codes (nothing past it is read).
__device__ __forceinline__ void fetch_row(unsigned char* dst, const unsigned char* row, int nb,
                                          const unsigned char* end, int lane) {
    const int shift = (int)((unsigned long long)row & 3u), words = (shift + nb + 3) / 4;
    const unsigned char* a = row - shift;
    for (int w = lane; w < words; w += 32) {
        const long long left = end - (a + 4 * w);
        cp_async4(dst + 4 * w, a + 4 * w, left >= 4 ? 4 : (int)max(left, 0LL));
    }
}

// (code_table, a code byte -> its trits, is in common.cuh: kernels/mmfree_decode.cu reads the same table)

// Decoding (rows <= 8), one launch per BitLinear, or per three BitLinears of one input (the MLGRU's i, f, g:
// blockIdx.y picks the weight, its gamma, scale and output; rstd is theirs in common): out (rows, N) =
// (q_x q_w^T) / (s_x s_w) from inp (rows, K) in T, q_w straight from the codes: int8 dot products (__dp4a) of q_x
// with each code byte's trits, int32 sums (exact), one rescale per output. Every block quantizes the rows itself
// (rows x K from L2: cheaper than a second launch), bit for bit as bitlinear_quantize does.
// Dynamic shared memory (the Python side sizes it, `decode_smem`): a table from a code byte to its trits as int8
// (base 3: 243 x 8 bytes, trits 0-3 | trit 4, 0, 0, 0; 2-bit: 256 x 4 bytes); q_x of every row laid out to match
// (base 3: 8 bytes per code byte, its 5 columns and 3 zeros; 2-bit: q_x as it is), so a code byte costs one table
// read and per row one 8- or 4-byte read of q_x and one or two dp4a; and with `staged`, the rows and gamma copied
// in by one pass of 16-byte loads all in flight at once (one trip to L2 where three passes over global memory took
// three). Then: rstd's sum of squares by warp m for row m in bitlinear_quantize's order (an fp32 sum depends on
// it); the absmax over the 8 / rows warps a row gets (fmaxf does not depend on order); q_x one code byte a thread.
// Then each warp takes output n = blockIdx.x 8 + warp (and n + 8 gridDim.x, ... when the grid is capped at the
// resident blocks, so that a large N pays the quantizing once per resident block): its code row is copied into the
// warp's shared buffer by cp.async (aligned 4-byte words, no registers held: the first row's copy is issued before
// the quantizing, each next one while the current row is summed), then its lanes stride over the row's code bytes
// (adjacent lanes, adjacent bytes and q_x words: no bank conflicts). Block (0, 0) writes rstd, block (0, y)
// sx[y rows ...].
// Measured on an H200 (1.3B, batch 1, 2026-11-29; docs/performance.md): the time of a call was (blocks / resident
// blocks) x one block's chain of dependent loads, so the staging (one trip to L2, not three), the launch bounds (48
// registers, no spills: 5 resident blocks an SM where 124 registers allowed 2), the grid cap and the row copies all
// shorten it.
#define PACKED_DECODE_ARGS                                                                                   \
    T *out0, T *out1, T *out2, float *rstd, float *sx, const T *inp, const T *gamma0, const T *gamma1,         \
        const T *gamma2, float eps, const unsigned char *codes0, const unsigned char *codes1,                  \
        const unsigned char *codes2, float sw0, float sw1, float sw2, int rows, int N, int K, int nb, int per, \
        int staged
template <class T, bool swiglu>
__device__ __forceinline__ void packed_decode(PACKED_DECODE_ARGS) {
    constexpr int P = Pack<T>::N;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ float r_s[8], m_s[8], s_s[8];  // rstd, s_x per row; absmax per warp (8 warps; Python counts 96 B)
    const int y = blockIdx.y;
    T* out = y == 0 ? out0 : y == 1 ? out1 : out2;
    const T* gamma = y == 0 ? gamma0 : y == 1 ? gamma1 : gamma2;
    const unsigned char* codes = y == 0 ? codes0 : y == 1 ? codes1 : codes2;
    const float sw = y == 0 ? sw0 : y == 1 ? sw1 : sw2;
    const bool b3 = per == 5;
    const int tab_bytes = b3 ? 2048 : 1024, xw = b3 ? 8 : 4;  // the table (243 x 8 used | 256 x 4); q_x per code byte
    unsigned char* xs = smem + tab_bytes;                            // (rows, nb, xw) int8
    T* xr = reinterpret_cast<T*>(xs + ((rows * nb * xw + 15) & ~15));  // staged: (rows, K) inputs, then gamma (K,)
    const T* xsrc = staged ? xr : inp;
    const T* gsrc = staged ? xr + (long long)rows * K : gamma;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    const int n = blockIdx.x * nw + warp;
    // this warp's two code-row buffers (rb bytes each, after the staged rows); its first row's copy is in flight
    // during the quantizing
    const int rb = row_buffer_bytes(nb);
    unsigned char* cbuf = reinterpret_cast<unsigned char*>(xr) + (staged ? (long long)(rows + 1) * K * sizeof(T) : 0)
                          + (long long)warp * 2 * rb;
    const unsigned char* cend = codes + (long long)N * nb;
    if (n < (swiglu ? N / 2 : N)) fetch_row(cbuf, codes + (long long)n * nb, nb, cend, lane);
    cp_async_commit();

    const int kp = K / P, tot = staged ? (rows + 1) * kp : 0;  // 16-byte packs to stage: the rows, then gamma
    int i0 = threadIdx.x;
    do {  // every thread passes once at least: it builds its part of the table while its first loads are in flight
        Pack<T> p[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < tot) p[u] = load16(i < rows * kp ? inp + (long long)i * P : gamma + (long long)(i - rows * kp) * P);
        }
        if (i0 == threadIdx.x) code_table(smem, b3);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < tot) store16(xr + (long long)i * P, p[u]);
        }
        i0 += 4 * blockDim.x;
    } while (i0 < tot);
    __syncthreads();

    if (warp < rows) {  // rstd of row `warp`, summed as bitlinear_quantize sums it
        const float r = 1.0f / sqrtf(warp_sum_squares(xsrc + (long long)warp * K, K, lane) / K + eps);
        if (lane == 0) r_s[warp] = r;
    }
    __syncthreads();
    const int g = nw / rows, m = warp / g, j = warp % g;  // warps per row; this warp's row (m >= rows: idle), part
    float mx = 0.0f;
    if (m < rows) {
        const float r = r_s[m];
        const T* x = xsrc + (long long)m * K;
        for (int c = (j * 32 + lane) * P; c < K; c += g * 32 * P) {
            Pack<T> p = load16(x + c), q = load16(gsrc + c);
#pragma unroll
            for (int k = 0; k < P; k++) mx = fmaxf(mx, fabsf(to_f(p.v[k]) * r * to_f(q.v[k])));
        }
        mx = warp_max(mx);
    }
    if (lane == 0) m_s[warp] = mx;
    __syncthreads();
    if (m < rows) {  // q_x, one code byte (its `per` columns, zeros past K) a thread of the row's warps
        float a = 0.0f;
        for (int i = 0; i < g; i++) a = fmaxf(a, m_s[m * g + i]);
        const float r = r_s[m], s = 127.0f / fmaxf(a, 1e-5f);
        const T* x = xsrc + (long long)m * K;
        unsigned char* xq = xs + (long long)m * nb * xw;
        for (int b = j * 32 + lane; b < nb; b += g * 32) {
            unsigned int w[2] = {0u, 0u};
#pragma unroll
            for (int t = 0; t < 5; t++) {  // unrolled: w stays in registers
                const int col = b * per + t;
                if (t >= per || col >= K) break;
                const int q = (int)fminf(fmaxf(roundf(to_f(x[col]) * r * to_f(gsrc[col]) * s), -128.0f), 127.0f);
                w[t / 4] |= (unsigned int)(unsigned char)(signed char)q << (8 * (t % 4));
            }
            if (b3) reinterpret_cast<uint2*>(xq)[b] = make_uint2(w[0], w[1]);
            else reinterpret_cast<unsigned int*>(xq)[b] = w[0];
        }
        if (j == 0 && lane == 0) {
            s_s[m] = s;
            if (blockIdx.x == 0) {
                sx[y * rows + m] = s;
                if (y == 0) rstd[m] = r;
            }
        }
    }
    __syncthreads();

    // outputs n, n + ostride, ...: a grid capped at the resident blocks loops (a large N pays the quantizing above
    // once per resident block, not once per 8 outputs); the batches run through the outputs back to back, the next
    // one (of this output or the next) in flight while this one is summed
    // the rows this warp sums, in order: n, n + ostride, ...; with swiglu, the up row f and the gate row f + N / 2
    // of each output f = n, n + ostride, ...
    const int nout = swiglu ? N / 2 : N, ostride = gridDim.x * nw;
    auto out_of = [&](int it) { return n + (swiglu ? it / 2 : it) * ostride; };
    auto row_of = [&](int it) { return out_of(it) + (swiglu && (it & 1) ? nout : 0); };
    float up[8];  // swiglu: the up row's outputs, rounded to T, until the gate row's
    for (int it = 0; out_of(it) < nout; it++) {
        const int row = row_of(it), k = it & 1;
        if (out_of(it + 1) < nout)  // the next row's copy, in flight while this one is summed
            fetch_row(cbuf + (k ^ 1) * rb, codes + (long long)row_of(it + 1) * nb, nb, cend, lane);
        cp_async_commit();
        cp_async_wait<1>();  // this row's copy has landed (every group but the newest)
        __syncwarp();
        const unsigned char* c = cbuf + k * rb + ((unsigned long long)(codes + (long long)row * nb) & 3u);
        int acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int b = lane; b < nb; b += 32) {
            if (b3) {
                const uint2 w = reinterpret_cast<const uint2*>(smem)[c[b]];
#pragma unroll
                for (int mm = 0; mm < 8; mm++)
                    if (mm < rows) {
                        const uint2 xv = reinterpret_cast<const uint2*>(xs)[mm * nb + b];
                        acc[mm] = __dp4a((int)w.x, (int)xv.x, acc[mm]);
                        acc[mm] = __dp4a((int)w.y, (int)xv.y, acc[mm]);
                    }
            } else {
                const unsigned int w = reinterpret_cast<const unsigned int*>(smem)[c[b]];
#pragma unroll
                for (int mm = 0; mm < 8; mm++)
                    if (mm < rows) acc[mm] = __dp4a((int)w, reinterpret_cast<const int*>(xs)[mm * nb + b], acc[mm]);
            }
        }
#pragma unroll
        for (int mm = 0; mm < 8; mm++) {
            if (mm >= rows) break;
            int s = acc[mm];
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            const T v = from_f<T>((float)s / (s_s[mm] * sw));
            if constexpr (!swiglu) {
                if (lane == 0) out[(long long)mm * N + row] = v;
            } else if (!(it & 1)) {
                up[mm] = to_f(v);
            } else if (lane == 0) {  // up * silu(gate), as swiglu_forward computes and rounds it
                const float a = to_f(v);
                out[(long long)mm * nout + row - nout] = from_f<T>(up[mm] * (a / (1.0f + expf(-a))));
            }
        }
        __syncwarp();  // every lane is done with buffer k before the next turn's copy overwrites it
    }
    cp_async_wait<0>();
}

template <class T>
__global__ void __launch_bounds__(256, 5) bitlinear_packed_decode(PACKED_DECODE_ARGS) {
    packed_decode<T, false>(out0, out1, out2, rstd, sx, inp, gamma0, gamma1, gamma2, eps, codes0, codes1, codes2,
                            sw0, sw1, sw2, rows, N, K, nb, per, staged);
}

// A GLU's gate/up projection (N = 2F rows: up, then gate) straight to its SwiGLU: out (rows, F) = up * silu(gate),
// bit for bit bitlinear_packed_decode then swiglu_forward (one launch fewer a layer). One weight (grid y = 1).
template <class T>
__global__ void __launch_bounds__(256, 5) bitlinear_packed_decode_swiglu(PACKED_DECODE_ARGS) {
    packed_decode<T, true>(out0, out1, out2, rstd, sx, inp, gamma0, gamma1, gamma2, eps, codes0, codes1, codes2,
                           sw0, sw1, sw2, rows, N, K, nb, per, staged);
}

// Many rows (prefill, eval, batches over 8): qw (N, K) int8 = the codes unpacked, for the int8 GEMM. One thread per
// 8 columns of a row (K % 8 == 0): the 2-3 code bytes they span read, one 8-byte store, so a warp writes 256
// contiguous bytes (one byte a thread and five byte stores each left the GPU's bandwidth mostly unused). Thread 0
// also writes the weight's scale s_w where the rescale reads it (one launch fewer than a separate fill).
template <class T>
__global__ void bitlinear_unpack(signed char* qw, float* sw, const unsigned char* codes, float scale, int N, int K,
                                 int nb, int per) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (row, group of 8 columns)
    const int groups = K / 8;
    if (i == 0) *sw = scale;
    if (i >= (long long)N * groups) return;
    const long long n = i / groups;
    const int k0 = (int)(i - n * groups) * 8;
    const unsigned char* row = codes + n * nb;
    unsigned int w[2] = {0u, 0u};
    int b = k0 / per, j = k0 - b * per;  // code byte and trit of column k0
    unsigned int c = row[b];
    for (int t = 0; t < j; t++) trit(c, per);  // skip the byte's trits before k0
#pragma unroll
    for (int t = 0; t < 8; t++) {
        if (j == per) { c = row[++b]; j = 0; }  // K % 8 == 0: every column read lies inside the row's nb bytes
        w[t / 4] |= (unsigned int)(unsigned char)(signed char)trit(c, per) << (8 * (t % 4));
        j++;
    }
    reinterpret_cast<uint2*>(qw)[i] = make_uint2(w[0], w[1]);
}
