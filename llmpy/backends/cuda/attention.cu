// The fallback attention (used in fp32 and when cuDNN is unavailable): permutes between the packed qkv layout and
// per-head matrices, and a causal softmax over materialised scores; the matrix products run in cuBLASLt.
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
