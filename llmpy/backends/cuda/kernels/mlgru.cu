// MLGRU (layers/mlgru.py), the MatMul-free LM's token mixer, elementwise over channels; ai, af, ag (B, T, d):
//   f = lam + (1 - lam) sigmoid(af); c = silu(ai) (1 - f); h_t = f_t h_{t-1} + c_t (fp32); o = RMSNorm(ag) silu(h)
// and the lower bounds of all layers, lam (L, d) = cumsum(softmax(P over layers)) - softmax(P)_0.
#include "common.cuh"

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// rstd (rows,) = 1/sqrt(mean(ag^2) + eps) of the gate's rows ag (rows, d), rows = B T. One warp per row.
template <class T>
__global__ void mlgru_gate_rstd(float* rstd, const T* ag, float eps, int rows, int d) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float s = warp_sum_squares(ag + (long long)row * d, d, lane);
    if (lane == 0) rstd[row] = 1.0f / sqrtf(s / d + eps);
}

// The recurrence h_t = f_t h_{t-1} + x_t is a chunked associative scan over t, deterministic (fixed chunks, fixed
// order). Block (32 channels, nch chunks of ceil(nt / nch) steps), grid (ceil(d / 32), B): a warp is one chunk of 32
// adjacent channels, so every load coalesces. Pass 1: each thread folds its chunk into (A, X) = (prod f, the chunk's
// h from a zero start); thread row 0 then walks the nch chunks in order, carry_{j+1} = A_j carry_j + X_j from h0;
// pass 2 reruns each chunk from its carry and writes h and o. B d nch threads instead of the B d of a sequential scan
// (8 x 1024 x 32 at 370M, B = 8, T = 2048). With nch = 1 (decoding) it is the sequential scan exactly.
constexpr int SCAN_MAX_CHUNKS = 32;

// f_t and x_t = silu(ai)(1 - f_t) of one element
__device__ __forceinline__ void mlgru_gates(float& f, float& x, float a, float af, float l) {
    f = l + (1.0f - l) * sigmoid_f(af);
    x = a * sigmoid_f(a) * (1.0f - f);
}

// h (B, nt, d) fp32 every state; o = ag rstd gamma * h sigmoid(h) (rstd (B, nt) from mlgru_gate_rstd);
// lam, gamma (d,); h0 (B, d) fp32 or null (zeros). own_rstd (nt = 1, one warp a block: decoding): the warp sums its
// row of ag itself, as mlgru_gate_rstd does (the same order: the same bits), and block 0 writes rstd (one launch
// fewer a layer and token).
template <class T>
__global__ void mlgru_forward(T* o, float* h, const T* ai, const T* af, const T* ag, const float* lam,
                              const T* gamma, float* rstd, const float* h0, int B, int nt, int d, int own_rstd,
                              float eps) {
    __shared__ float sa[SCAN_MAX_CHUNKS][32], sx[SCAN_MAX_CHUNKS][32];
    const int x = threadIdx.x, j = threadIdx.y, nch = blockDim.y, b = blockIdx.y, c = blockIdx.x * 32 + x;
    float r_own = 0.0f;
    if (own_rstd) {
        r_own = 1.0f / sqrtf(warp_sum_squares(ag + (long long)b * d, d, x) / d + eps);
        if (blockIdx.x == 0 && x == 0) rstd[b] = r_own;
    }
    const int len = (nt + nch - 1) / nch, t0 = min(nt, j * len), t1 = min(nt, t0 + len);
    const bool ok = c < d;
    const float l = ok ? lam[c] : 0.0f, g = ok ? to_f(gamma[c]) : 0.0f;
    const long long base = (long long)b * nt * d + c;
    float A = 1.0f, X = 0.0f;
    if (ok && nch > 1)
        for (int t = t0; t < t1; t++) {
            float f, xt;
            mlgru_gates(f, xt, to_f(ai[base + (long long)t * d]), to_f(af[base + (long long)t * d]), l);
            X = f * X + xt;
            A *= f;
        }
    sa[j][x] = A;
    sx[j][x] = X;
    __syncthreads();
    if (j == 0) {  // carries in chunk order: sa[k] becomes the state entering chunk k
        float carry = ok && h0 ? h0[(long long)b * d + c] : 0.0f;
        for (int k = 0; k < nch; k++) {
            const float next = sa[k][x] * carry + sx[k][x];
            sa[k][x] = carry;
            carry = next;
        }
    }
    __syncthreads();
    if (!ok) return;
    float prev = sa[j][x];
    for (int t = t0; t < t1; t++) {
        const long long off = base + (long long)t * d;
        float f, xt;
        mlgru_gates(f, xt, to_f(ai[off]), to_f(af[off]), l);
        prev = f * prev + xt;
        h[off] = prev;
        const float r = own_rstd ? r_own : rstd[(long long)b * nt + t];
        o[off] = from_f<T>(to_f(ag[off]) * r * g * (prev * sigmoid_f(prev)));
    }
}

// Backward of the recurrence and the gates, the same chunked scan run from the end:
//   dh_t = do z (s + h s (1 - s)) (o = z silu(h), z = ag rstd gamma, s = sigmoid(h));
//   delta_t = dh_t + f_{t+1} delta_{t+1} (delta_nt = 0);
//   df = delta h_{t-1} - silu(ai) delta (h_{-1} = 0: training starts from zeros); dai, daf overwritten (B, nt, d).
// The parameter gradients' terms, df (1 - sigmoid(af)) for dlam and do h s (ag rstd) for dgamma, are summed over each
// chunk in order, then over the chunks in order, into part (2, B, d): fixed-order partials that
// mlgru_backward_params_finalize adds over b.
template <class T>
__global__ void mlgru_backward_scan(T* dai, T* daf, float* part, const T* dout, const T* ai, const T* af, const T* ag,
                                    const float* lam, const T* gamma, const float* h, const float* rstd, int B, int nt,
                                    int d) {
    __shared__ float sa[SCAN_MAX_CHUNKS][32], sx[SCAN_MAX_CHUNKS][32];
    const int x = threadIdx.x, j = threadIdx.y, nch = blockDim.y, b = blockIdx.y, c = blockIdx.x * 32 + x;
    const int len = (nt + nch - 1) / nch, t0 = min(nt, j * len), t1 = min(nt, t0 + len);
    const bool ok = c < d;
    const float l = ok ? lam[c] : 0.0f, g = ok ? to_f(gamma[c]) : 0.0f;
    const long long base = (long long)b * nt * d + c;
    auto fgate = [&](int t) { return l + (1.0f - l) * sigmoid_f(to_f(af[base + (long long)t * d])); };
    auto dh = [&](int t) {
        const long long off = base + (long long)t * d;
        const float hv = h[off], sh = sigmoid_f(hv), ah = to_f(ag[off]) * rstd[(long long)b * nt + t];
        return to_f(dout[off]) * (ah * g) * (sh + hv * sh * (1.0f - sh));
    };
    // pass 1: the chunk's delta_{t0} from delta_{t1} = 0, and A = prod f_{t+1} over t in [t0, t1)
    float A = 1.0f, X = 0.0f;
    if (ok && nch > 1) {
        float fn = t1 < nt ? fgate(t1) : 0.0f;
        for (int t = t1 - 1; t >= t0; t--) {
            X = dh(t) + fn * X;
            A *= fn;
            fn = fgate(t);
        }
    }
    sa[j][x] = A;
    sx[j][x] = X;
    __syncthreads();
    if (j == 0) {  // carries from the last chunk: sa[k] becomes delta_{t1} of chunk k
        float carry = 0.0f;
        for (int k = nch - 1; k >= 0; k--) {
            const float next = sa[k][x] * carry + sx[k][x];
            sa[k][x] = carry;
            carry = next;
        }
    }
    __syncthreads();
    float slam = 0.0f, sgam = 0.0f;
    if (ok) {
        float nxt = t1 < nt ? fgate(t1) * sa[j][x] : 0.0f;  // f_{t1} delta_{t1}
        for (int t = t1 - 1; t >= t0; t--) {
            const long long off = base + (long long)t * d;
            const float hv = h[off], sh = sigmoid_f(hv), ah = to_f(ag[off]) * rstd[(long long)b * nt + t];
            const float dov = to_f(dout[off]);
            const float delta = dov * (ah * g) * (sh + hv * sh * (1.0f - sh)) + nxt;
            const float a = to_f(ai[off]), si = sigmoid_f(a), sf = sigmoid_f(to_f(af[off]));
            const float f = l + (1.0f - l) * sf;
            nxt = f * delta;
            const float hprev = t > 0 ? h[off - d] : 0.0f;
            const float df = delta * hprev - a * si * delta;
            dai[off] = from_f<T>(si * (1.0f + a * (1.0f - si)) * (1.0f - f) * delta);
            daf[off] = from_f<T>(df * (1.0f - l) * sf * (1.0f - sf));
            slam += df * (1.0f - sf);
            sgam += dov * hv * sh * ah;
        }
    }
    __syncthreads();  // every carry read: sa and sx now take the chunks' partial sums
    sa[j][x] = slam;
    sx[j][x] = sgam;
    __syncthreads();
    if (j == 0 && ok) {
        float s1 = 0.0f, s2 = 0.0f;
        for (int k = 0; k < nch; k++) { s1 += sa[k][x]; s2 += sx[k][x]; }
        part[(long long)b * d + c] = s1;
        part[(long long)B * d + (long long)b * d + c] = s2;
    }
}

// dlam (d,) fp32 += sum_b part[0, b, :]; dgamma (d,) += sum_b part[1, b, :]; b in order.
template <class T>
__global__ void mlgru_backward_params_finalize(float* dlam, T* dgamma, const float* part, int B, int d) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    dlam[c] += colsum_chunks(part, B, d, c);
    dgamma[c] = from_f<T>(to_f(dgamma[c]) + colsum_chunks(part + (long long)B * d, B, d, c));
}

// The gate norm's input gradient: dag (rows, d) = rstd (u - ah mean_d(ah u)), u = gamma dz, dz = do h sigmoid(h),
// ah = ag rstd; h (rows, d) fp32. One warp per row.
template <class T>
__global__ void mlgru_backward_dag(T* dag, const T* dout, const T* ag, const T* gamma, const float* h,
                                   const float* rstd, int rows, int d) {
    constexpr int N = Pack<T>::N;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long long off = (long long)row * d;
    const float r = rstd[row];
    float a = 0.0f;
    for (int c = lane * N; c < d; c += 32 * N) {
        Pack<T> x = load16(ag + off + c), dy = load16(dout + off + c), g = load16(gamma + c);
        float hv[N];
        load_f32<N>(hv, h + off + c);
#pragma unroll
        for (int k = 0; k < N; k++)
            a += (to_f(x.v[k]) * r) * (to_f(g.v[k]) * (to_f(dy.v[k]) * hv[k] * sigmoid_f(hv[k])));
    }
    a = warp_sum(a) / d;
    for (int c = lane * N; c < d; c += 32 * N) {
        Pack<T> x = load16(ag + off + c), dy = load16(dout + off + c), g = load16(gamma + c), o;
        float hv[N];
        load_f32<N>(hv, h + off + c);
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float u = to_f(g.v[k]) * (to_f(dy.v[k]) * hv[k] * sigmoid_f(hv[k])), ah = to_f(x.v[k]) * r;
            o.v[k] = from_f<T>(r * (u - ah * a));
        }
        store16(dag + off + c, o);
    }
}

// lam (L, d) fp32 = cumsum_l(S) - S_0, S = softmax of P (L, d) over the layer axis (lam_0 = 0 exactly). One thread
// per channel, the L layers in order.
template <class T>
__global__ void lower_bounds_forward(float* lam, const T* P, int L, int d) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float m = -INFINITY, z = 0.0f;
    for (int l = 0; l < L; l++) m = fmaxf(m, to_f(P[(long long)l * d + c]));
    for (int l = 0; l < L; l++) z += expf(to_f(P[(long long)l * d + c]) - m);
    float cum = 0.0f, s0 = 0.0f;
    for (int l = 0; l < L; l++) {
        const float s = expf(to_f(P[(long long)l * d + c]) - m) / z;
        if (l == 0) s0 = s;
        cum += s;
        lam[(long long)l * d + c] = cum - s0;
    }
}

// dP (L, d) += S (dS - sum_j S_j dS_j), dS_j = sum_{l >= j} dlam_l for j > 0 and dS_0 = 0 (the - S_0 takes back
// layer 0's whole suffix); dlam (L, d) fp32. One thread per channel; the suffix sums in the same order twice.
template <class T>
__global__ void lower_bounds_backward(T* dP, const float* dlam, const T* P, int L, int d) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float m = -INFINITY, z = 0.0f;
    for (int l = 0; l < L; l++) m = fmaxf(m, to_f(P[(long long)l * d + c]));
    for (int l = 0; l < L; l++) z += expf(to_f(P[(long long)l * d + c]) - m);
    float suffix = 0.0f, dot = 0.0f;
    for (int j = L - 1; j > 0; j--) {
        const long long i = (long long)j * d + c;
        suffix += dlam[i];
        dot += expf(to_f(P[i]) - m) / z * suffix;
    }
    suffix = 0.0f;
    for (int j = L - 1; j >= 0; j--) {
        const long long i = (long long)j * d + c;
        if (j > 0) suffix += dlam[i];
        const float s = expf(to_f(P[i]) - m) / z, ds = j > 0 ? suffix : 0.0f;
        dP[i] = from_f<T>(to_f(dP[i]) + s * (ds - dot));
    }
}
