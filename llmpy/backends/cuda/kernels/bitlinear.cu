// BitLinear (layers/bitlinear.py), the MatMul-free LM's ternary linear layer: x (M, K), W (N, K), gamma (K,).
// The product q_x q_w^T itself is a cuBLASLt GEMM on integer-valued operands with fp32 output (mmfree.py), exact
// for K < 2^17; here: quantizing the activations (the inner RMSNorm fused in) and the weights, the one rescale per
// output, and the backward's input and gamma gradients.
#include "common.cuh"

// One warp per row of inp (rows, K), three passes over the row: rstd = 1/sqrt(mean x^2 + eps) (or the saved one:
// `saved`), y = x rstd gamma, s_x = 127 / max(max|y|, 1e-5), q_x = clamp(roundf(y s_x), -128, 127) (roundf: half
// away from zero). q (rows, K) gets q_x itself (integers: exact in bf16 and fp32) or, with `dequant`, yq = q_x / s_x
// (the backward's dW operand); sx (rows,) = s_x. 1/sqrtf rather than rsqrtf: correctly rounded like the reference,
// so rstd is exact where the reference's is (the tie tests rely on it). rstd is read when saved, else written.
template <class T>
__global__ void bitlinear_quantize(T* q, float* sx, float* rstd, const T* inp, const T* gamma, float eps, int saved,
                                   int dequant, int rows, int K) {
    constexpr int N = Pack<T>::N;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long off = (long long)row * K;
    float r;
    if (saved) {
        r = rstd[row];
    } else {
        float s = 0.0f;
        for (int c = lane * N; c < K; c += 32 * N) {
            Pack<T> p = load16(inp + off + c);
#pragma unroll
            for (int k = 0; k < N; k++) { const float v = to_f(p.v[k]); s += v * v; }
        }
        r = 1.0f / sqrtf(warp_sum(s) / K + eps);
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
        Pack<T> p = load16(inp + off + c), g = load16(gamma + c), o;
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float v = fminf(fmaxf(roundf(to_f(p.v[k]) * r * to_f(g.v[k]) * s), -128.0f), 127.0f);
            o.v[k] = from_f<T>(dequant ? v / s : v);
        }
        store16(q + off + c, o);
    }
    if (lane == 0) sx[row] = s;
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

// qw (n,) = clamp(rint(w s_w), -1, 1) (rintf: half to even, as the reference's weights), in T (exact). One thread
// per 16-byte pack.
template <class T>
__global__ void bitlinear_ternary(T* qw, const T* w, const float* sw, long long n) {
    constexpr int N = Pack<T>::N;
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i >= n) return;
    const float s = sw[0];
    Pack<T> p = load16(w + i), o;
#pragma unroll
    for (int k = 0; k < N; k++) o.v[k] = from_f<T>(fminf(fmaxf(rintf(to_f(p.v[k]) * s), -1.0f), 1.0f));
    store16(qw + i, o);
}

// The same two steps from fp32 master weights (bf16 training keeps them; the reference quantizes its fp32
// weights under bf16 autocast): w fp32 (n,), n % 4 == 0; q_w written in T.
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
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= n) return;
    const float s = sw[0];
    const float4 p = *reinterpret_cast<const float4*>(w + i);
    const float v[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int k = 0; k < 4; k++) qw[i + k] = from_f<T>(fminf(fmaxf(rintf(v[k] * s), -1.0f), 1.0f));
}

// out (rows, N) = acc / (s_x s_w): the GEMM's exact integer sums acc (rows, N) fp32, one rescale per output.
// One thread per 16-byte pack of out (N % Pack<T>::N == 0: a pack stays in one row).
template <class T>
__global__ void bitlinear_rescale(T* out, const float* acc, const float* sx, const float* sw, int rows, int N) {
    constexpr int P = Pack<T>::N;
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * P;
    if (i >= (long long)rows * N) return;
    const float d = sx[i / N] * sw[0];
    float v[P];
    load_f32<P>(v, acc + i);
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < P; k++) o.v[k] = from_f<T>(v[k] / d);
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

// Decoding (rows <= 8): out (rows, N) = (q_x q_w^T) / (s_x s_w), q_w straight from the codes: integer additions
// and subtractions of q_x, int32 sums (exact), one rescale per output. The block first stages q_x (rows, K) (the
// integers bitlinear_quantize wrote, in T) as int8 in shared memory, zero-padded to nb * per columns (dynamic
// shared memory: rows * nb * per bytes); then each warp takes one output, its lanes striding over the row's code
// bytes eight loads at a time (independent loads in flight: decoding is bound by the latency of reading codes).
template <class T>
__global__ void bitlinear_packed_gemv(T* out, const T* q, const float* sx, const unsigned char* codes, float sw,
                                      int rows, int N, int K, int nb, int per) {
    extern __shared__ signed char xs[];
    const int Kp = nb * per;
    for (int m = 0; m < rows; m++)
        for (int k = threadIdx.x; k < Kp; k += blockDim.x)
            xs[m * Kp + k] = k < K ? (signed char)(int)to_f(q[(long long)m * K + k]) : (signed char)0;
    __syncthreads();
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    int acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const unsigned char* row = codes + (long long)n * nb;
    for (int b0 = lane; b0 < nb; b0 += 32 * 8) {
        unsigned int c8[8];
#pragma unroll
        for (int u = 0; u < 8; u++) c8[u] = b0 + 32 * u < nb ? __ldg(row + b0 + 32 * u) : 0u;
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int b = b0 + 32 * u;
            if (b >= nb) break;
            unsigned int c = c8[u];
            const signed char* x = xs + b * per;
            for (int j = 0; j < per; j++) {
                const int t = trit(c, per);
#pragma unroll
                for (int m = 0; m < 8; m++)
                    if (m < rows) acc[m] += t * (int)x[m * Kp + j];
            }
        }
    }
#pragma unroll
    for (int m = 0; m < 8; m++) {
        if (m >= rows) break;
        int s = acc[m];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) out[(long long)m * N + n] = from_f<T>((float)s / (sx[m] * sw));
    }
}

// Many rows (eval): qw (N, K) in T = the codes unpacked, for the GEMM; one thread per code byte.
template <class T>
__global__ void bitlinear_unpack(T* qw, const unsigned char* codes, int N, int K, int nb, int per) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * nb) return;
    const long long n = i / nb;
    const int b = (int)(i % nb);
    unsigned int c = codes[i];
    for (int j = 0, k = b * per; j < per && k < K; j++, k++) qw[n * K + k] = from_f<T>((float)trit(c, per));
}
