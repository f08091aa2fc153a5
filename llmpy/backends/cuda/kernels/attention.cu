// The fallback attention (used in fp32 and when cuDNN is unavailable): permutes between the packed qkv layout and
// per-head matrices (repeating k, v over a group's query heads under grouped-query attention), and a causal softmax
// over materialised scores; the matrix products run in cuBLASLt. And the one-position decode step over a KV cache.
#include "common.cuh"

// qkv (B,T,3,NH,hs) -> q, k, v each (B,NH,T,hs)
template <class T>
__global__ void permute_qkv(T* q, T* k, T* v, const T* qkv, int B, int T_, int NH, int hs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * NH * T_ * hs) return;
    int d = i % hs, t = (i / hs) % T_, h = (i / ((long long)hs * T_)) % NH, b = i / ((long long)hs * T_ * NH);
    long long src = (((long long)b * T_ + t) * 3 * NH + h) * hs + d;
    q[i] = qkv[src];
    k[i] = qkv[src + (long long)NH * hs];
    v[i] = qkv[src + 2LL * NH * hs];
}

// the reverse, for gradients: dq, dk, dv (B,NH,T,hs) -> dqkv (B,T,3,NH,hs)
template <class T>
__global__ void unpermute_qkv(T* qkv, const T* q, const T* k, const T* v, int B, int T_, int NH, int hs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * NH * T_ * hs) return;
    int d = i % hs, t = (i / hs) % T_, h = (i / ((long long)hs * T_)) % NH, b = i / ((long long)hs * T_ * NH);
    long long dst = (((long long)b * T_ + t) * 3 * NH + h) * hs + d;
    qkv[dst] = q[i];
    qkv[dst + (long long)NH * hs] = k[i];
    qkv[dst + 2LL * NH * hs] = v[i];
}

// Grouped-query attention (K key/value heads, NH % K == 0): qkv (B,T,(NH+2K)hs) = [q | k | v] -> q, k, v each
// (B,NH,T,hs), k and v repeated for the NH/K query heads of their group (query head h reads kv head h / (NH/K)).
template <class T>
__global__ void permute_qkv_gqa(T* q, T* k, T* v, const T* qkv, int B, int T_, int NH, int KH, int hs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * NH * T_ * hs) return;
    int d = i % hs, t = (i / hs) % T_, h = (i / ((long long)hs * T_)) % NH, b = i / ((long long)hs * T_ * NH);
    int j = h / (NH / KH);
    const T* row = qkv + ((long long)b * T_ + t) * (NH + 2 * KH) * hs;
    q[i] = row[h * hs + d];
    k[i] = row[(NH + j) * hs + d];
    v[i] = row[(NH + KH + j) * hs + d];
}

// The reverse, for gradients, one thread per element of dqkv (B,T,(NH+2K)hs): dq copied; a kv head's dk, dv summed
// in fp32 over its group's query heads in head order (deterministic) from dq, dk, dv (B,NH,T,hs).
template <class T>
__global__ void unpermute_qkv_gqa(T* dqkv, const T* dq, const T* dk, const T* dv, int B, int T_, int NH, int KH,
                                  int hs) {
    const int W = (NH + 2 * KH) * hs;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * T_ * W) return;
    int c = i % W, t = (i / W) % T_, b = i / ((long long)W * T_), d = c % hs, hc = c / hs;
    if (hc < NH) {
        dqkv[i] = dq[(((long long)b * NH + hc) * T_ + t) * hs + d];
        return;
    }
    const T* src = hc < NH + KH ? dk : dv;
    const int j = hc < NH + KH ? hc - NH : hc - NH - KH, r = NH / KH;
    float acc = 0.0f;
    for (int h = j * r; h < (j + 1) * r; h++) acc += to_f(src[(((long long)b * NH + h) * T_ + t) * hs + d]);
    dqkv[i] = from_f<T>(acc);
}

// y (B,NH,T,hs) -> out (B,T,NH*hs) and back
template <class T>
__global__ void heads_to_rows(T* out, const T* y, int B, int T_, int NH, int hs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * NH * T_ * hs) return;
    int d = i % hs, t = (i / hs) % T_, h = (i / ((long long)hs * T_)) % NH, b = i / ((long long)hs * T_ * NH);
    out[(((long long)b * T_ + t) * NH + h) * hs + d] = y[i];
}
template <class T>
__global__ void rows_to_heads(T* y, const T* in, int B, int T_, int NH, int hs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * NH * T_ * hs) return;
    int d = i % hs, t = (i / hs) % T_, h = (i / ((long long)hs * T_)) % NH, b = i / ((long long)hs * T_ * NH);
    y[i] = in[(((long long)b * T_ + t) * NH + h) * hs + d];
}

// att[r, j] = softmax_j(scale * pre[r, j]) over j <= t (row r = (bh, t)), 0 for j > t. One warp per row.
template <class T>
__global__ void softmax_causal_forward(T* att, const T* pre, float scale, int rows, int T_) {
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const int lane = threadIdx.x % 32, t = r % T_;
    const T* x = pre + (long long)r * T_;
    T* y = att + (long long)r * T_;
    float m = -INFINITY;
    for (int j = lane; j <= t; j += 32) m = fmaxf(m, scale * to_f(x[j]));
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j <= t; j += 32) s += expf(scale * to_f(x[j]) - m);
    s = warp_sum(s);
    const float inv = 1.0f / s;
    for (int j = lane; j < T_; j += 32) y[j] = from_f<T>(j <= t ? expf(scale * to_f(x[j]) - m) * inv : 0.0f);
}

// dpre[r, j] = scale * att[r,j] * (datt[r,j] - sum_k att[r,k] datt[r,k]); written over datt. One warp per row.
template <class T>
__global__ void softmax_causal_backward(T* datt, const T* att, float scale, int rows, int T_) {
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const int lane = threadIdx.x % 32;
    T* d = datt + (long long)r * T_;
    const T* a = att + (long long)r * T_;
    float s = 0.0f;
    for (int j = lane; j < T_; j += 32) s += to_f(a[j]) * to_f(d[j]);
    s = warp_sum(s);
    for (int j = lane; j < T_; j += 32) d[j] = from_f<T>(scale * to_f(a[j]) * (to_f(d[j]) - s));
}

// Decode: one new position per sequence. qkv (B, 1, (NH + 2K) hs) holds the new q | k | v (head h on channels
// h*hs.. of its part); k_cache, v_cache (B, K, maxT, hs). With K == NH each block writes its head's new k, v at pos
// itself (it alone reads that row); with K < NH the query heads of a group share a cache row, so decode_kv_write
// (a launch before this one) writes it and the blocks only read. Then out (B, 1, C) = softmax(q k^T * scale) v over
// positions 0..pos, query head h reading kv head h / (NH/K). One block per (b, h); scores (B*NH, maxT) fp32 scratch.
// Dynamic shared memory: (1 + G) * hs floats, G = blockDim.x / (hs / Pack<T>::N). hs % Pack<T>::N == 0,
// hs / Pack<T>::N <= blockDim.x. Every sum runs in a fixed order (deterministic).
template <class T>
__global__ void attention_decode(T* out, T* k_cache, T* v_cache, float* scores, const T* qkv, int NH, int KH,
                                 int maxT, int hs, int pos, float scale) {
    constexpr int N = Pack<T>::N;
    extern __shared__ float sm[];  // q (hs) | per-group partial outputs (G, hs)
    __shared__ float buf[32];
    const int bh = blockIdx.x, b = bh / NH, h = bh % NH, kv = h / (NH / KH), C = NH * hs;
    const T* row = qkv + (long long)b * (NH + 2 * KH) * hs;
    const T* x = row + (long long)h * hs;
    T* K = k_cache + ((long long)b * KH + kv) * maxT * hs;
    T* V = v_cache + ((long long)b * KH + kv) * maxT * hs;
    float* s = scores + (long long)bh * maxT;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        sm[d] = to_f(x[d]);
        if (KH == NH) {
            K[(long long)pos * hs + d] = row[(long long)(NH + kv) * hs + d];
            V[(long long)pos * hs + d] = row[(long long)(NH + KH + kv) * hs + d];
        }
    }
    __syncthreads();  // q in shared memory, the new k, v in the cache (global writes visible to the block)
    // scores: one thread per position, 16-byte loads along the key row
    float m = -INFINITY;
    for (int t = threadIdx.x; t <= pos; t += blockDim.x) {
        const T* kr = K + (long long)t * hs;
        float dot = 0.0f;
        for (int d = 0; d < hs; d += N) {
            Pack<T> p = load16(kr + d);
#pragma unroll
            for (int k = 0; k < N; k++) dot += sm[d + k] * to_f(p.v[k]);
        }
        dot *= scale;
        s[t] = dot;
        m = fmaxf(m, dot);
    }
    m = block_max(m, buf);
    float sum = 0.0f;
    for (int t = threadIdx.x; t <= pos; t += blockDim.x) {
        float e = expf(s[t] - m);
        s[t] = e;
        sum += e;
    }
    sum = block_sum(sum, buf);
    __syncthreads();  // every exp written before any thread reads another's
    // out: G groups of P threads, each thread N channels; group g sums positions g, g + G, ... in order
    const int P = hs / N, G = blockDim.x / P, g = threadIdx.x / P, d0 = (threadIdx.x % P) * N;
    float* part = sm + hs;
    if (g < G) {
        float acc[N];
#pragma unroll
        for (int k = 0; k < N; k++) acc[k] = 0.0f;
        for (int t = g; t <= pos; t += G) {
            Pack<T> p = load16(V + (long long)t * hs + d0);
            const float w = s[t];
#pragma unroll
            for (int k = 0; k < N; k++) acc[k] += w * to_f(p.v[k]);
        }
#pragma unroll
        for (int k = 0; k < N; k++) part[g * hs + d0 + k] = acc[k];
    }
    __syncthreads();
    const float inv = 1.0f / sum;
    T* o = out + (long long)b * C + (long long)h * hs;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float r = 0.0f;
        for (int j = 0; j < G; j++) r += part[j * hs + d];
        o[d] = from_f<T>(r * inv);
    }
}

// The new k, v of each (b, kv head) into the caches at pos, before attention_decode when K < NH (see there).
// One thread per element of (B, K, hs).
template <class T>
__global__ void decode_kv_write(T* k_cache, T* v_cache, const T* qkv, int B, int NH, int KH, int maxT, int hs,
                                int pos) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * KH * hs) return;
    const int d = i % hs, bj = i / hs, b = bj / KH, j = bj % KH;
    const T* src = qkv + (long long)b * (NH + 2 * KH) * hs + (long long)(NH + j) * hs + d;
    const long long dst = ((long long)bj * maxT + pos) * hs + d;
    k_cache[dst] = src[0];
    v_cache[dst] = src[(long long)KH * hs];
}
