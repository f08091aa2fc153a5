// FP8 operands of the block products (--dtype fp8; the recipe and its NumPy twin: layers/fp8.py). Quantizing is
// q = sat(round(x * s)) with a power-of-two scale s, so the product x * s is exact and the CPU's casts (ml_dtypes)
// give the same bytes: cvt.rn.satfinite rounds to nearest even and clamps to the format's largest finite value.
// Every quantizing kernel also takes the tensor's amax (max |x|, NaN ignored) into its pending slot: atomicMax on
// the bits of non-negative floats, which order like the floats, so the result does not depend on the order.
#include "common.cuh"

// (fp8x2, fp8_max and fp8_store_pack, which the norms' fused kernels use too, are in common.cuh)

// 8 consecutive elements as fp32 (16-byte aligned: one bf16 pack or two fp32 packs)
__device__ __forceinline__ void load8(float (&v)[8], const bf16* p) {
    const Pack<bf16> a = load16(p);
#pragma unroll
    for (int k = 0; k < 8; k++) v[k] = to_f(a.v[k]);
}
__device__ __forceinline__ void load8(float (&v)[8], const float* p) { load_f32<8>(v, p); }

__device__ __forceinline__ void record_amax(float* amax, float m) {
    m = warp_max(m);
    if (threadIdx.x % 32 == 0) atomicMax(reinterpret_cast<unsigned int*>(amax), __float_as_uint(m));
}

// q (n bytes) = the fp8 of x (n elements, n % 8 == 0) under *scale; *amax = max(*amax, max|x|); *clamped += the
// elements whose |x * s| exceeded the format's largest (clamped may be null). Grid-stride, 8 elements a thread.
template <class T>
__global__ void fp8_quantize(unsigned char* __restrict__ q, const T* __restrict__ x, long long n,
                             const float* __restrict__ scale, float* __restrict__ amax, int* __restrict__ clamped,
                             int e5m2) {
    const float s = *scale, fmax = fp8_max(e5m2);
    float m = 0.0f;
    int over = 0;
    for (long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 8; i < n;
         i += (long long)gridDim.x * blockDim.x * 8) {
        float v[8];
        load8(v, x + i);
        unsigned int w[2] = {0u, 0u};
#pragma unroll
        for (int k = 0; k < 8; k += 2) {
            m = fmaxf(m, fmaxf(fabsf(v[k]), fabsf(v[k + 1])));
            const float a = v[k] * s, b = v[k + 1] * s;
            over += (fabsf(a) > fmax) + (fabsf(b) > fmax);
            w[k / 4] |= fp8x2(a, b, e5m2) << (16 * ((k / 2) % 2));
        }
        *reinterpret_cast<uint2*>(q + i) = make_uint2(w[0], w[1]);
    }
    record_amax(amax, m);
    if (clamped != nullptr) {
        for (int o = 16; o > 0; o >>= 1) over += __shfl_xor_sync(0xffffffffu, over, o);
        if (threadIdx.x % 32 == 0 && over) atomicAdd(clamped, over);
    }
}

// 8 fp32 values as T into p (16-byte aligned)
template <class T> __device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
    constexpr int N = Pack<T>::N;
#pragma unroll
    for (int j = 0; j < 8; j += N) {
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < N; k++) o.v[k] = from_f<T>(v[j + k]);
        store16(p + j, o);
    }
}

// Where the transposing quantizer's tile comes from: src(v, r, c) gives the 8 elements (r, c .. c + 7) of each
// of its NT column blocks (the tensor (rows, NT cols) is their concatenation, [dup | dgate] for SwiGLU's backward)
// as fp32, each the value its producer stores (rounded to T). FromTensor reads the tensor; the producers form it
// from their own input as their kernels do (gelu.cu, swiglu.cu: the same functions of common.cuh), and write it
// too where out is not null: their FP8 copies are then those of the tensor their kernel would have written.
template <class T> struct FromTensor {  // x (rows, cols)
    static constexpr int NT = 1;
    const T* x;
    int cols;
    __device__ __forceinline__ void operator()(float (&v)[1][8], int r, int c) const {
        load8(v[0], x + (long long)r * cols + c);
    }
};
template <class T> struct FromGelu {  // out (rows, cols) = gelu(inp (rows, cols))
    static constexpr int NT = 1;
    const T* inp;
    T* out;
    int cols;
    __device__ __forceinline__ void operator()(float (&v)[1][8], int r, int c) const {
        const long long at = (long long)r * cols + c;
        load8(v[0], inp + at);
#pragma unroll
        for (int k = 0; k < 8; k++) v[0][k] = to_f(from_f<T>(gelu(v[0][k])));
        if (out != nullptr) store8(out + at, v[0]);
    }
};
template <class T> struct FromSwiglu {  // out (rows, F) = up * silu(gate), inp (rows, 2F) = [up | gate]
    static constexpr int NT = 1;
    const T* inp;
    T* out;
    int F;
    __device__ __forceinline__ void operator()(float (&v)[1][8], int r, int c) const {
        const T* up = inp + (long long)r * 2 * F + c;
        float g[8];
        load8(v[0], up);
        load8(g, up + F);
#pragma unroll
        for (int k = 0; k < 8; k++) v[0][k] = to_f(from_f<T>(swiglu_f(v[0][k], g[k])));
        if (out != nullptr) store8(out + (long long)r * F + c, v[0]);
    }
};
template <class T> struct FromSwigluBackward {  // dinp (rows, 2F) = [dup | dgate] of inp (rows, 2F), dout (rows, F)
    static constexpr int NT = 2;
    const T* inp;
    const T* dout;
    T* dinp;
    int F;
    __device__ __forceinline__ void operator()(float (&v)[2][8], int r, int c) const {
        const long long at = (long long)r * 2 * F + c;
        float g[8], d[8];
        load8(v[0], inp + at);
        load8(g, inp + at + F);
        load8(d, dout + (long long)r * F + c);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float du, dg;
            swiglu_grad(v[0][k], g[k], d[k], du, dg);
            v[0][k] = to_f(from_f<T>(du));
            v[1][k] = to_f(from_f<T>(dg));
        }
        if (dinp != nullptr) {
            store8(dinp + at, v[0]);
            store8(dinp + at + F, v[1]);
        }
    }
};

template <class T> struct FromClassifier {  // dlogits (rows, Vp) of logits, given each row's (max, 1 / sum exp)
    static constexpr int NT = 1;
    const T* logits;
    const float2* stats;
    const int* targets;
    float dloss;
    int V, Vp;
    __device__ __forceinline__ void operator()(float (&v)[1][8], int r, int c) const {
        load8(v[0], logits + (long long)r * Vp + c);
        const float2 st = stats[r];
        const int tgt = targets[r];
#pragma unroll
        for (int k = 0; k < 8; k++) v[0][k] = to_f(from_f<T>(dlogit(v[0][k], st.x, st.y, c + k, tgt, V, dloss)));
    }
};

// qT (W, rows) = the fp8 of the tensor src gives (rows, W = NT cols) transposed (the K-major operand cuBLASLt's
// FP8 products need for a weight gradient or an input gradient), under *scale; *amax = max(*amax, max|x|); q (may
// be null): the same bytes in the tensor's own layout too, from the same read (then *clamped, may be null, counts
// as fp8_quantize does). rows and cols are multiples of 16. A block of 256 threads moves a 64 x 64 tile of each of
// the NT column blocks through shared memory: 16-byte loads of rows, 8-byte stores of columns (and of rows, for
// q). A row kernel (a norm's) could not write the transposed copy coalesced; an elementwise producer tiles as well
// as this.
#define FP8_TILE 64
template <class T, class Src>
__device__ __forceinline__ void quantize_t_tile(unsigned char* __restrict__ qT, unsigned char* __restrict__ q,
                                                const Src& src, int rows, int cols, const float* __restrict__ scale,
                                                float* __restrict__ amax, int* __restrict__ clamped, int e5m2) {
    constexpr int NT = Src::NT;
    __shared__ float tile[NT][FP8_TILE][FP8_TILE + 1];
    const float s = *scale, fmax = fp8_max(e5m2);
    const long long W = (long long)NT * cols;
    const int r0 = blockIdx.y * FP8_TILE, c0 = blockIdx.x * FP8_TILE;
    float m = 0.0f;
    int over = 0;
#pragma unroll
    for (int j = 0; j < 2; j++) {  // 64 rows x 8 packs of 8 columns: two packs a thread
        const int p = threadIdx.x + 256 * j, r = p / 8, c = (p % 8) * 8;
        if (r0 + r < rows && c0 + c < cols) {
            float v[NT][8];
            src(v, r0 + r, c0 + c);
#pragma unroll
            for (int t = 0; t < NT; t++) {
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    m = fmaxf(m, fabsf(v[t][k]));
                    v[t][k] *= s;
                    tile[t][r][c + k] = v[t][k];
                    over += fabsf(v[t][k]) > fmax;
                }
                if (q != nullptr) {
                    unsigned int w[2] = {0u, 0u};
#pragma unroll
                    for (int k = 0; k < 8; k += 2)
                        w[k / 4] |= fp8x2(v[t][k], v[t][k + 1], e5m2) << (16 * ((k / 2) % 2));
                    *reinterpret_cast<uint2*>(q + (r0 + r) * W + (long long)t * cols + c0 + c) = make_uint2(w[0], w[1]);
                }
            }
        }
    }
    if (clamped != nullptr) {
        for (int o = 16; o > 0; o >>= 1) over += __shfl_xor_sync(0xffffffffu, over, o);
        if (threadIdx.x % 32 == 0 && over) atomicAdd(clamped, over);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < NT; t++) {
#pragma unroll
        for (int j = 0; j < 2; j++) {  // 64 columns x 8 runs of 8 rows: two runs a thread
            const int p = threadIdx.x + 256 * j, c = p / 8, r = (p % 8) * 8;
            if (c0 + c < cols && r0 + r < rows) {
                unsigned int w[2] = {0u, 0u};
#pragma unroll
                for (int k = 0; k < 8; k += 2)
                    w[k / 4] |= fp8x2(tile[t][r + k][c], tile[t][r + k + 1][c], e5m2) << (16 * ((k / 2) % 2));
                *reinterpret_cast<uint2*>(qT + ((long long)t * cols + c0 + c) * rows + r0 + r) =
                    make_uint2(w[0], w[1]);
            }
        }
    }
    record_amax(amax, m);
}

// x (rows, cols) quantized transposed into qT (and into q, may be null): quantize_t_tile; grid (cols/64, rows/64)
template <class T>
__global__ void fp8_quantize_t(unsigned char* __restrict__ qT, unsigned char* __restrict__ q,
                               const T* __restrict__ x, int rows, int cols, const float* __restrict__ scale,
                               float* __restrict__ amax, int* __restrict__ clamped, int e5m2) {
    quantize_t_tile<T>(qT, q, FromTensor<T>{x, cols}, rows, cols, scale, amax, clamped, e5m2);
}

// The fused producers (e4m3, an X operand): gelu_forward's out = gelu(inp) (rows, cols), or swiglu_forward's
// out (rows, F) of inp (rows, 2F), written as the next product's Xq (rows, cols) and XqT (cols, rows) with its amax
// and clamp count from the one read of inp; out (bf16 / fp32) too unless null (no reader left: the products take
// the FP8 copies). The bytes are fp8_quantize_t's of the out the producer's own kernel writes.
template <class T>
__global__ void fp8_gelu_t(unsigned char* __restrict__ qT, unsigned char* __restrict__ q, T* __restrict__ out,
                           const T* __restrict__ inp, int rows, int cols, const float* __restrict__ scale,
                           float* __restrict__ amax, int* __restrict__ clamped) {
    quantize_t_tile<T>(qT, q, FromGelu<T>{inp, out, cols}, rows, cols, scale, amax, clamped, 0);
}
template <class T>
__global__ void fp8_swiglu_t(unsigned char* __restrict__ qT, unsigned char* __restrict__ q, T* __restrict__ out,
                             const T* __restrict__ inp, int rows, int F, const float* __restrict__ scale,
                             float* __restrict__ amax, int* __restrict__ clamped) {
    quantize_t_tile<T>(qT, q, FromSwiglu<T>{inp, out, F}, rows, F, scale, amax, clamped, 0);
}

// The fused producer of a gradient (e5m2, a D operand): swiglu_backward's dinp (rows, 2F) = [dup | dgate] of inp
// (rows, 2F) and dout (rows, F), written as the gate/up product's Dq (rows, 2F) and DqT (2F, rows) with their amax
// and clamp count from one read of inp and dout (grid (F/64, rows/64)); dinp too unless null. The bytes are
// fp8_quantize_t's of the dinp swiglu_backward writes.
template <class T>
__global__ void fp8_swiglu_backward_t(unsigned char* __restrict__ qT, unsigned char* __restrict__ q,
                                      T* __restrict__ dinp, const T* __restrict__ inp, const T* __restrict__ dout,
                                      int rows, int F, const float* __restrict__ scale, float* __restrict__ amax,
                                      int* __restrict__ clamped) {
    quantize_t_tile<T>(qT, q, FromSwigluBackward<T>{inp, dout, dinp, F}, rows, F, scale, amax, clamped, 1);
}

// The fused producer of the LM head's output gradient (e5m2, its fixed scale: layers/fp8.py): the dlogits of logits
// (rows, Vp) that fused_classifier would write in place (its stats given: each row's max and 1 / sum exp), written
// instead as the head's Dq (rows, Vp) and DqT (Vp, rows); grid (Vp/64, rows/64). The bytes are fp8_quantize_t's
// of those dlogits. (A row kernel, fused_classifier itself, could not write DqT coalesced; this second read of the
// logits takes the place of the write pass of fused_classifier, which then only forms the stats and losses.)
template <class T>
__global__ void fp8_classifier_t(unsigned char* __restrict__ qT, unsigned char* __restrict__ q,
                                 const T* __restrict__ logits, const float2* __restrict__ stats,
                                 const int* __restrict__ targets, float dloss, int V, int rows, int Vp,
                                 const float* __restrict__ scale, float* __restrict__ amax, int* __restrict__ clamped) {
    quantize_t_tile<T>(qT, q, FromClassifier<T>{logits, stats, targets, dloss, V, Vp}, rows, Vp, scale, amax,
                       clamped, 1);
}

// qT (cols, rows) = q (rows, cols) transposed, bytes: a norm's Xq (rmsnorm_forward_fp8, layernorm_forward_fp8) into
// the XqT its product's dW takes. rows and cols multiples of 16; a 64 x 64 tile a block of 256 threads, grid
// (cols/64, rows/64): 8-byte loads of rows, 8-byte stores of columns.
__global__ void fp8_transpose(unsigned char* __restrict__ qT, const unsigned char* __restrict__ q, int rows,
                              int cols) {
    __shared__ __align__(8) unsigned char tile[FP8_TILE][FP8_TILE + 8];
    const int r0 = blockIdx.y * FP8_TILE, c0 = blockIdx.x * FP8_TILE;
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int p = threadIdx.x + 256 * j, r = p / 8, c = (p % 8) * 8;
        if (r0 + r < rows && c0 + c < cols)
            *reinterpret_cast<uint2*>(&tile[r][c]) =
                *reinterpret_cast<const uint2*>(q + (long long)(r0 + r) * cols + c0 + c);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int p = threadIdx.x + 256 * j, c = p / 8, r = (p % 8) * 8;
        if (c0 + c < cols && r0 + r < rows) {
            unsigned int w[2] = {0u, 0u};
#pragma unroll
            for (int k = 0; k < 8; k++) w[k / 4] |= (unsigned int)tile[r + k][c] << (8 * (k % 4));
            *reinterpret_cast<uint2*>(qT + (long long)(c0 + c) * rows + r0 + r) = make_uint2(w[0], w[1]);
        }
    }
}

// *out = max(*out, max|x|) over n elements (n % 8 == 0): the calibrating step's own amax of a tensor
template <class T>
__global__ void fp8_amax(float* __restrict__ out, const T* __restrict__ x, long long n) {
    float m = 0.0f;
    for (long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 8; i < n;
         i += (long long)gridDim.x * blockDim.x * 8) {
        float v[8];
        load8(v, x + i);
#pragma unroll
        for (int k = 0; k < 8; k++) m = fmaxf(m, fabsf(v[k]));
    }
    record_amax(out, m);
}

// 2^floor(log2(fmax / a)) from the exponents and mantissas (layers/fp8.py scale_from_amax); `previous` unless a is
// finite and > 0
__device__ __forceinline__ float scale_from_amax(float a, float fmax, float previous) {
    if (!(a > 0.0f) || isinf(a)) return previous;
    int ea, ef;
    const float ma = frexpf(a, &ea), mf = frexpf(fmax, &ef);
    int e = ef - ea - (mf < ma ? 1 : 0);
    e = max(-100, min(100, e));
    return ldexpf(1.0f, e);
}

// The calibrating step (no history yet): one operand's scale from its own amax a (then pending = max(pending, a))
__global__ void fp8_calibrate(float* scale, float* inv, float* pending, const float* a, int e5m2) {
    const float s = scale_from_amax(*a, fp8_max(e5m2), *scale);
    *scale = s;
    *inv = 1.0f / s;
    *pending = fmaxf(*pending, *a);
}

// A fixed scale s, a power of two (the LM head's output gradient's: layers/fp8.py head_grad_scale): *scale = s,
// *inv = 1 / s (one thread; a kernel, so that a CUDA graph replays it)
__global__ void fp8_set_scale(float* scale, float* inv, float s) {
    *scale = s;
    *inv = 1.0f / s;
}

// Before a step's first micro-batch: the activations' and gradients' pending amax (roles 0 and 2 of P products)
// and the clamp count start at zero (the weights' amax, taken when they were quantized after the last update, stays)
__global__ void fp8_begin(float* pending, int* clamped, int P) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i == 0) *clamped = 0;
    if (i < P) {
        pending[3 * i] = 0.0f;
        pending[3 * i + 2] = 0.0f;
    }
}

// After a step: each of the n = P * 3 operands' history (H newest first) takes its pending amax (non-finite: 0),
// its scale comes from the history's max (all zero: unchanged), pending returns to 0. Role = index % 3 (X, W, D).
// inv: 1 / scale in slots of 4 floats (16-byte aligned: what cuBLASLt's scale pointers take)
__global__ void fp8_fold(float* __restrict__ hist, float* __restrict__ pending, float* __restrict__ scale,
                         float* __restrict__ inv, int n, int H) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float* h = hist + (long long)i * H;
    for (int k = H - 1; k > 0; k--) h[k] = h[k - 1];
    const float p = pending[i];
    h[0] = isfinite(p) ? p : 0.0f;
    float top = 0.0f;
    for (int k = 0; k < H; k++) top = fmaxf(top, h[k]);
    const float s = scale_from_amax(top, fp8_max(i % 3 == 2), scale[i]);
    scale[i] = s;
    inv[4 * i] = 1.0f / s;
    pending[i] = 0.0f;
}
