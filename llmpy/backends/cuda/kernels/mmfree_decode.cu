// One decode step of the packed MatMul-free LM (models/mmfree.py; batch 1) as a single persistent kernel: every
// layer's BitLinears, MLGRU step, SwiGLU, residual adds and RMSNorms, then the LM head, bit for bit what the
// per-op decode path computes (kernels/bitlinear.cu bitlinear_packed_decode*, mlgru.cu mlgru_forward with T = 1,
// rmsnorm.cu fused_residual_rmsnorm_forward). The NumPy twins are layers/bitlinear.py, layers/mlgru.py and
// layers/rmsnorm.py; the math is theirs.
//
// Why: at batch 1 a token reads ~0.3 GB of ternary codes (~0.1 ms of HBM) but ~145 launches took ~1.5 ms, each a
// chain of dependent L2 trips (stage the row, normalize, quantize, then stream the codes). Here one block an SM
// (grid = SMs, all resident: a generation-counter barrier between the phases that need a whole row), and each
// block's share of the codes of the next two phases is in flight (cp.async into a ring of 3 shared slots) while it
// waits at the barrier and restages the row, so the weight stream overlaps the barriers.
//
// Phases of layer l (d channels, I the GLU width); every block recomputes the row it needs from L2 (4-22 KB) in
// the SAME reduction order as the per-op kernels (warp_sum_squares: that is what keeps the bits):
//   A  x = R2 + pd (l = 0: the embedding), R1 = x; u = RMSNorm(x) (rsqrtf, rmsnorm_row's); the block's BitLinear
//      (i, f or g: a third of the grid each) on u: rows of ai | af | ag
//   B  the MLGRU step from ai, af, ag, h[l] (o = RMSNorm(ag) silu(h), every channel in every block, into shared
//      memory; the new h kept for phase C), BitLinear o on o: rows of po
//   C  h[l] = the new state (each block its slice: every block has read the old one by now); x = R1 + po, R2 = x;
//      v = RMSNorm(x); gate/up BitLinear on v straight to up * silu(gate): rows of sw (I)
//   D  BitLinear down on sw: rows of pd
//   then H: x = R2 + pd, RMSNorm (lnfw), the LM head: logits.
// A block's rows of a phase are contiguous, so its codes are one (gate/up: two) contiguous byte ranges, copied in
// 16-byte cp.async words (the first aligned down, zero-fill past the range's end: nothing past it is read). A row's
// sum: 2-bit codes in whole 4-byte words (K % 16 == 0; a base-3 model's codes transcribed once, mmfree.py) by
// md_dot_fields, shifts and masks with no table; otherwise md_dot, bitlinear_packed_decode's code table. Both are
// exact int32 sums, so either gives the per-op path's bits.
//
// Arguments: A (int64 table, MD_* indices below: sizes and device pointers), F (fp32: eps, the head's s_w, then
// s_w of i, f, g, o, gate, down for each layer), bar (a zeroed uint32 counter). Dynamic shared memory
// (md_layout; the Python side, mmfree.decode_step_smem, sizes it the same way): the code table, q_x laid out per
// code byte (bitlinear_packed_decode's), the staged row, two gains, the MLGRU's inputs, reduction scratch, 3 slots.
#include "common.cuh"

#define MD_THREADS 512
#define MD_SLOTS 3
// A's entries
#define MD_L 0
#define MD_D 1
#define MD_I 2
#define MD_VL 3
#define MD_NBD 4        // code bytes a row of K = d
#define MD_NBI 5        // of K = I
#define MD_PER 6        // trits a byte: 5 (base 3) or 4 (2-bit)
#define MD_SLOT 7       // bytes of a ring slot (a multiple of 32)
#define MD_ENC 8        // T (d,): the token's embedding
#define MD_R1 9         // T (d,): residual after the GLU (layer input)
#define MD_R2 10        // T (d,): residual after the token mixer
#define MD_PO 11        // T (d,): BitLinear o's output
#define MD_PD 12        // T (d,): BitLinear down's output
#define MD_AI 13        // T (d,) x 3: ai, af, ag
#define MD_SW 16        // T (I,): up * silu(gate)
#define MD_LOGITS 17    // T (Vl,)
#define MD_H 18         // fp32 (L, d): the recurrent state, updated in place
#define MD_LAM 19       // fp32 (L, d): the lower bounds
#define MD_LN1 20       // T (L, d) (layer stride MD_PSTRIDE); ln2w, gnormw (L, d); lnfw, lm_headn (d,)
#define MD_LN2 21
#define MD_GNORM 22
#define MD_LNF 23
#define MD_HEADN 24
#define MD_GAIN 25      // T: in, fn, gn, on, gaten (L, d), downn (L, I), layer stride MD_PSTRIDE: the BitLinears'
                        // inner norm gains
#define MD_CODES 31     // uint8: i, f, g, o (L, d, nbd), gate (L, 2I, nbd), down (L, d, nbi), head (>= Vl, nbd)
#define MD_PROF 38      // int64 (4 L + 1, 4) or 0: block 0's %globaltimer (ns) at each phase's start, after its
                        // barrier, after its staging, after its rows (the dev probe's breakdown)
#define MD_PSTRIDE 39   // elements from one layer's norm gains to the next (the parameters are stored layer-major)
#define MD_FIELDS 40    // 1: 2-bit codes (per = 4, rows a multiple of 4 bytes) read by fields, no table (md_dot_fields)
#define MD_NARGS 41

__device__ __forceinline__ long long md_now() {
    long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ float md_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// 16 bytes global -> shared, cached in L2 only; the first `bytes` (1-16) read, the rest zero-filled
__device__ __forceinline__ void md_cp16(void* dst, const void* src, int bytes) {
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void md_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void md_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Every block arrives once per barrier; barrier n (1, 2, ...) waits for the counter to reach n G. The fences order
// the block's writes before its arrival and the reads after it (as cooperative groups' grid sync does); the data
// other blocks wrote is then read through L2 (ld.cg), never a stale L1 line.
__device__ __forceinline__ void md_grid_barrier(unsigned int* bar, unsigned int target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(bar, 1u);
        unsigned int v;
        long long spins = 0;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(bar) : "memory");
            if (++spins > (1LL << 24)) __trap();  // a block that never arrives (not all resident): an error, no hang
        } while (v < target);
        __threadfence();
    }
    __syncthreads();
}


// A staging pass: up to 8 segments of 16-byte words global -> shared, 8 loads a thread in flight at once (one trip
// to L2 for the whole row set, not one per array).
struct MdSeg {
    const int4* src;
    int4* dst;
    int n;  // 16-byte words
};
__device__ __forceinline__ void md_stage(const MdSeg* seg, int nseg) {
    int tot = 0;
    for (int s = 0; s < nseg; s++) tot += seg[s].n;
    for (int i0 = threadIdx.x; i0 < tot; i0 += 8 * blockDim.x) {
        int4 v[8];
        int4* d[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            d[u] = nullptr;
            int i = i0 + u * blockDim.x;
            if (i >= tot) continue;
            int s = 0;
            while (i >= seg[s].n) i -= seg[s++].n;
            v[u] = __ldcg(seg[s].src + i);
            d[u] = seg[s].dst + i;
        }
#pragma unroll
        for (int u = 0; u < 8; u++)
            if (d[u]) *d[u] = v[u];
    }
}

template <class T>
struct MdSmem {
    unsigned char* tab;  // the code table
    unsigned char* xs;   // q_x per code byte: (nb, 8) base 3, (nb, 4) 2-bit
    T* xrow;             // the staged row (up to max(d, I))
    T* gb;               // the BitLinear's gain
    T* g1;               // the block norm's gain (d), or the MLGRU's gate norm gain
    T* ta;               // (d,) ai; or the second addend of a residual add
    T* tf;               // (d,) af
    float* h0;           // (d,) the old state
    float* lam;          // (d,)
    float* hn;           // (d,) the new state
    float* red;          // 64 floats
    unsigned char* ring; // MD_SLOTS slots
};

__device__ __forceinline__ long long md_r16(long long x) { return (x + 15) & ~15LL; }

// The shared memory layout (mmfree.decode_step_smem computes the same total).
template <class T>
__device__ MdSmem<T> md_layout(unsigned char* smem, int d, int I, int nbmax, int per) {
    MdSmem<T> m;
    const int K = d > I ? d : I;
    long long o = 0;
    m.tab = smem + o; o += 2048;
    m.xs = smem + o; o += md_r16((long long)nbmax * (per == 5 ? 8 : 4));
    m.xrow = reinterpret_cast<T*>(smem + o); o += md_r16((long long)K * sizeof(T));
    m.gb = reinterpret_cast<T*>(smem + o); o += md_r16((long long)K * sizeof(T));
    m.g1 = reinterpret_cast<T*>(smem + o); o += md_r16((long long)d * sizeof(T));
    m.ta = reinterpret_cast<T*>(smem + o); o += md_r16((long long)d * sizeof(T));
    m.tf = reinterpret_cast<T*>(smem + o); o += md_r16((long long)d * sizeof(T));
    m.h0 = reinterpret_cast<float*>(smem + o); o += md_r16((long long)d * 4);
    m.lam = reinterpret_cast<float*>(smem + o); o += md_r16((long long)d * 4);
    m.hn = reinterpret_cast<float*>(smem + o); o += md_r16((long long)d * 4);
    m.red = reinterpret_cast<float*>(smem + o); o += 256;
    m.ring = smem + o;
    return m;
}

// xrow (K,) in T -> q_x in xs, as bitlinear_packed_decode quantizes a row: rstd = 1/sqrtf(sum x^2 / K + eps) summed
// by warp_sum_squares (warp 0, from shared memory: the same order, the same bits), s_x = 127 / max(max|x rstd g|,
// 1e-5), q = clamp(roundf(x rstd g s_x), -128, 127), one code byte (its `per` columns, zeros past K) a thread.
// Returns s_x to every thread.
template <class T>
__device__ float md_quantize(const MdSmem<T>& m, const T* g, int K, int nb, int per, float eps, bool fields) {
    constexpr int P = Pack<T>::N;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (warp == 0) {
        const float r = 1.0f / sqrtf(warp_sum_squares(m.xrow, K, lane) / K + eps);
        if (lane == 0) m.red[32] = r;
    }
    __syncthreads();
    const float r = m.red[32];
    float mx = 0.0f;
    for (int c = threadIdx.x * P; c < K; c += blockDim.x * P) {
        Pack<T> p = load16(m.xrow + c), q = load16(g + c);
#pragma unroll
        for (int k = 0; k < P; k++) mx = fmaxf(mx, fabsf(to_f(p.v[k]) * r * to_f(q.v[k])));
    }
    const float s = 127.0f / fmaxf(block_max(mx, m.red), 1e-5f);
    const bool b3 = per == 5;
    if (fields) {  // word 4 w + f: q_x of columns 16 w + 4 k + f, k = 0..3 (md_dot_fields' order)
        for (int e = threadIdx.x; e < nb; e += blockDim.x) {
            const int w = e / 4, f = e % 4;
            unsigned int v = 0u;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int col = 16 * w + 4 * k + f;
                if (col >= K) break;
                const int q = (int)fminf(fmaxf(roundf(to_f(m.xrow[col]) * r * to_f(g[col]) * s), -128.0f), 127.0f);
                v |= (unsigned int)(unsigned char)(signed char)q << (8 * k);
            }
            reinterpret_cast<unsigned int*>(m.xs)[e] = v;
        }
        __syncthreads();
        return s;
    }
    for (int b = threadIdx.x; b < nb; b += blockDim.x) {
        unsigned int w[2] = {0u, 0u};
#pragma unroll
        for (int t = 0; t < 5; t++) {
            const int col = b * per + t;
            if (t >= per || col >= K) break;
            const int q = (int)fminf(fmaxf(roundf(to_f(m.xrow[col]) * r * to_f(g[col]) * s), -128.0f), 127.0f);
            w[t / 4] |= (unsigned int)(unsigned char)(signed char)q << (8 * (t % 4));
        }
        if (b3) reinterpret_cast<uint2*>(m.xs)[b] = make_uint2(w[0], w[1]);
        else reinterpret_cast<unsigned int*>(m.xs)[b] = w[0];
    }
    __syncthreads();
    return s;
}

// x = from_f(a + b) over d (the residual add, stored in T; written to `keep` too when not null), then u = x rstd w
// in T with rstd = rsqrtf(mean x^2 + eps) summed as rmsnorm_row sums it; u replaces x in xrow. a in xrow, b in ta.
template <class T>
__device__ void md_residual_rmsnorm(const MdSmem<T>& m, bool add, T* keep, int d, float eps) {
    constexpr int P = Pack<T>::N;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (add)
        for (int c = threadIdx.x * P; c < d; c += blockDim.x * P) {
            Pack<T> a = load16(m.xrow + c), b = load16(m.ta + c), o;
#pragma unroll
            for (int k = 0; k < P; k++) o.v[k] = from_f<T>(to_f(a.v[k]) + to_f(b.v[k]));
            store16(m.xrow + c, o);
            if (keep) store16(keep + c, o);
        }
    else if (keep)
        for (int c = threadIdx.x * P; c < d; c += blockDim.x * P) store16(keep + c, load16(m.xrow + c));
    __syncthreads();
    if (warp == 0) {
        const float r = rsqrtf(warp_sum_squares(m.xrow, d, lane) / d + eps);
        if (lane == 0) m.red[33] = r;
    }
    __syncthreads();
    const float r = m.red[33];
    for (int c = threadIdx.x * P; c < d; c += blockDim.x * P) {
        Pack<T> x = load16(m.xrow + c), w = load16(m.g1 + c), o;
#pragma unroll
        for (int k = 0; k < P; k++) o.v[k] = from_f<T>(to_f(x.v[k]) * r * to_f(w.v[k]));
        store16(m.xrow + c, o);
    }
    __syncthreads();
}

// sum over the row's code bytes of dp4a(trits, q_x) by one warp, all lanes get it (an int32 sum: exact, any order):
// lane l takes bytes l, l + 32, ..., MD_UNROLL at a time with all their loads in flight together (a row of 410
// bytes is 4 rounds, not 13 dependent ones; 8 at a time spill registers); c: the row's first code byte in shared
// memory (any alignment). The table path: base 3, or rows that are not whole 4-byte words.
#define MD_UNROLL 4
__device__ __forceinline__ int md_dot(const unsigned char* c, const unsigned char* xs, const unsigned char* tab,
                                      int nb, bool b3, int lane) {
    int acc = 0;
    for (int b0 = lane; b0 < nb; b0 += 32 * MD_UNROLL) {
        unsigned int cb[MD_UNROLL];
#pragma unroll
        for (int u = 0; u < MD_UNROLL; u++) cb[u] = b0 + 32 * u < nb ? c[b0 + 32 * u] : 0u;
        if (b3) {
            uint2 w[MD_UNROLL], x[MD_UNROLL];
#pragma unroll
            for (int u = 0; u < MD_UNROLL; u++) {
                const bool in = b0 + 32 * u < nb;  // past the row: zero trits, no q_x read
                w[u] = in ? reinterpret_cast<const uint2*>(tab)[cb[u]] : make_uint2(0u, 0u);
                x[u] = in ? reinterpret_cast<const uint2*>(xs)[b0 + 32 * u] : make_uint2(0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < MD_UNROLL; u++) {
                acc = __dp4a((int)w[u].x, (int)x[u].x, acc);
                acc = __dp4a((int)w[u].y, (int)x[u].y, acc);
            }
        } else {
            unsigned int w[MD_UNROLL];
            int x[MD_UNROLL];
#pragma unroll
            for (int u = 0; u < MD_UNROLL; u++) {
                const bool in = b0 + 32 * u < nb;
                w[u] = in ? reinterpret_cast<const unsigned int*>(tab)[cb[u]] : 0u;
                x[u] = in ? reinterpret_cast<const int*>(xs)[b0 + 32 * u] : 0;
            }
#pragma unroll
            for (int u = 0; u < MD_UNROLL; u++) acc = __dp4a((int)w[u], x[u], acc);
        }
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

// md_dot for 2-bit codes without the table: a row as 32-bit words W (4 code bytes, 16 fields: field j at bits
// 2j, 2j+1; 0 -> 0, 1 -> +1, 3 -> -1), 4-byte aligned in shared memory. For each f in 0..3, (W >> 2f) & 0x01010101
// holds the low bits of fields f, 4 + f, 8 + f, 12 + f in its 4 bytes and (W >> 2f + 1) & 0x01010101 their high
// bits; trit = low - 2 high, so the sum is dp4a(low, x) - 2 dp4a(high, x) with x the word of q_x that
// md_quantize lays out for (w, f). Integer sums: the same value as md_dot's, in ~6 integer instructions a code byte
// and one 16-byte q_x load per word instead of a table lookup (a ~3-way bank conflict) and an 8-byte load per byte.
#define MD_WUNROLL 4  // words a lane has in flight
__device__ __forceinline__ int md_dot_fields(const unsigned int* row, const uint4* xs, int nw, int lane) {
    int lo = 0, hi = 0;
    for (int w0 = lane; w0 < nw; w0 += 32 * MD_WUNROLL) {
        unsigned int W[MD_WUNROLL];
        uint4 X[MD_WUNROLL];
#pragma unroll
        for (int u = 0; u < MD_WUNROLL; u++) {
            const bool in = w0 + 32 * u < nw;
            W[u] = in ? row[w0 + 32 * u] : 0u;
            X[u] = in ? xs[w0 + 32 * u] : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < MD_WUNROLL; u++) {
            const unsigned int x[4] = {X[u].x, X[u].y, X[u].z, X[u].w};
#pragma unroll
            for (int f = 0; f < 4; f++) {
                lo = __dp4a((int)((W[u] >> (2 * f)) & 0x01010101u), (int)x[f], lo);
                hi = __dp4a((int)((W[u] >> (2 * f + 1)) & 0x01010101u), (int)x[f], hi);
            }
        }
    }
    int acc = lo - 2 * hi;
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

// A block's share of one phase kind: weight w (i, f, g for kind 0), units u0 .. u0 + nu (rows; gate/up: outputs,
// each an up row and a gate row), at most cap a chunk (a ring slot), nc chunks.
struct MdJob {
    int w, u0, nu, cap, nc;
};

__device__ __forceinline__ MdJob md_job(int kind, int G, int b, int d, int I, int Vl, int nbd, int nbi, int S) {
    MdJob j;
    int groups = G, idx = b, N = d, nb = nbd;
    j.w = 0;
    if (kind == 0) {  // i, f, g: a third of the grid each
        groups = G / 3;
        j.w = b / groups;
        idx = b % groups;
        if (j.w > 2) { j.w = 2; idx = groups; }  // the blocks past 3 (G / 3): idle
    } else if (kind == 2) {
        N = I;
    } else if (kind == 3) {
        nb = nbi;
    } else if (kind == 4) {
        N = Vl;
    }
    const int per = (N + groups - 1) / groups;
    j.u0 = min(N, idx * per);
    j.nu = min(N, j.u0 + per) - j.u0;
    j.cap = kind == 2 ? (S / 2 - 16) / nb : (S - 16) / nb;
    j.nc = j.nu > 0 ? (j.nu + j.cap - 1) / j.cap : 0;
    return j;
}

template <class T>
__global__ void __launch_bounds__(MD_THREADS, 1) mmfree_decode_step(const long long* A, const float* F,
                                                                    unsigned int* bar) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int L = (int)A[MD_L], d = (int)A[MD_D], I = (int)A[MD_I], Vl = (int)A[MD_VL];
    const int nbd = (int)A[MD_NBD], nbi = (int)A[MD_NBI], per = (int)A[MD_PER], S = (int)A[MD_SLOT];
    const bool b3 = per == 5;
    const float eps = F[0];
    const long long ps = A[MD_PSTRIDE];
    const bool fields = A[MD_FIELDS] != 0;
    const int G = gridDim.x, blk = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int nw = blockDim.x / 32;
    auto ptr = [&](int i) { return reinterpret_cast<void*>(A[i]); };
    const MdSmem<T> m = md_layout<T>(smem, d, I, nbd > nbi ? nbd : nbi, per);
    code_table(m.tab, b3);  // (common.cuh)

    MdJob job[5];
#pragma unroll
    for (int k = 0; k < 5; k++) job[k] = md_job(k, G, blk, d, I, Vl, nbd, nbi, S);
    const int per_layer = job[0].nc + job[1].nc + job[2].nc + job[3].nc;
    const long long tasks = (long long)L * per_layer + job[4].nc;

    // the code bytes of piece p (0, or 1: gate/up's gate rows) of chunk c of phase kind t, layer l
    auto piece = [&](int l, int t, int c, int p, const unsigned char*& src, long long& bytes) {
        const MdJob& j = job[t];
        const int r0 = j.u0 + c * j.cap, r1 = min(j.u0 + j.nu, r0 + j.cap);
        const unsigned char* base;
        long long nb = nbd, first = r0;
        if (t == 0) base = (const unsigned char*)ptr(MD_CODES + j.w) + (long long)l * d * nbd;
        else if (t == 1) base = (const unsigned char*)ptr(MD_CODES + 3) + (long long)l * d * nbd;
        else if (t == 2) {
            base = (const unsigned char*)ptr(MD_CODES + 4) + (long long)l * 2 * I * nbd;
            if (p) first += I;
        } else if (t == 3) {
            base = (const unsigned char*)ptr(MD_CODES + 5) + (long long)l * d * nbi;
            nb = nbi;
        } else base = (const unsigned char*)ptr(MD_CODES + 6);
        src = base + first * nb;
        bytes = (long long)(r1 - r0) * nb;
    };
    // task k (the chunks in order: per layer A, B, C, D, then the head) -> (layer, kind, chunk)
    auto task = [&](long long k, int& l, int& t, int& c) {
        if (k < (long long)L * per_layer) {
            l = (int)(k / per_layer);
            int r = (int)(k % per_layer);
            t = 0;
            while (r >= job[t].nc) r -= job[t++].nc;
            c = r;
        } else {
            l = L;
            t = 4;
            c = (int)(k - (long long)L * per_layer);
        }
    };
    // copies task k's codes into its slot (k mod 3), one commit group either way
    auto issue = [&](long long k) {
        if (k < tasks) {
            int l, t, c;
            task(k, l, t, c);
            unsigned char* slot = m.ring + (k % MD_SLOTS) * S;
            for (int p = 0; p < (t == 2 ? 2 : 1); p++) {
                const unsigned char* src;
                long long bytes;
                piece(l, t, c, p, src, bytes);
                const unsigned char* a = (const unsigned char*)((unsigned long long)src & ~15ULL);
                const unsigned char* end = src + bytes;
                const int words = (int)((end - a + 15) / 16);
                unsigned char* dst = slot + p * (S / 2);
                for (int w = threadIdx.x; w < words; w += blockDim.x) {
                    const long long left = end - (a + 16LL * w);
                    md_cp16(dst + 16 * w, a + 16LL * w, left >= 16 ? 16 : (int)left);
                }
            }
        }
        md_commit();
    };

    issue(0);
    issue(1);
    long long k = 0;
    unsigned int nbar = 0;
    T* sw_out = (T*)ptr(MD_SW);
    for (int l = 0; l <= L; l++) {
        for (int t = 0; t < 4; t++) {
            const int kind = l == L ? 4 : t;
            if (l == L && t > 0) break;
            long long* prof = blk == 0 && threadIdx.x == 0 && A[MD_PROF] ? (long long*)A[MD_PROF] + 4 * (4 * l + t)
                                                                         : nullptr;
            if (prof) prof[0] = md_now();
            if (l > 0 || t > 0) md_grid_barrier(bar, ++nbar * (unsigned int)G);
            if (prof) prof[1] = md_now();
            // ---- stage the phase's row and quantize it (every block: the same row, the same bits)
            const int dw = d * (int)sizeof(T) / 16, iw = I * (int)sizeof(T) / 16;
            const int K = kind == 3 ? I : d, nb = kind == 3 ? nbi : nbd;
            const T* gain;
            if (kind == 0 || kind == 4) {  // A or H: x = R2 + pd (layer 0: the embedding), its RMSNorm
                const T* g1 = kind == 4 ? (const T*)ptr(MD_LNF) : (const T*)ptr(MD_LN1) + l * ps;
                gain = kind == 4 ? (const T*)ptr(MD_HEADN) : (const T*)ptr(MD_GAIN + job[0].w) + l * ps;
                MdSeg seg[4] = {{(const int4*)(l == 0 ? ptr(MD_ENC) : ptr(MD_R2)), (int4*)m.xrow, dw},
                                {(const int4*)g1, (int4*)m.g1, dw},
                                {(const int4*)gain, (int4*)m.gb, dw},
                                {(const int4*)ptr(MD_PD), (int4*)m.ta, l == 0 ? 0 : dw}};
                md_stage(seg, 4);
                gain = m.gb;
                __syncthreads();
                md_residual_rmsnorm(m, l > 0, blk == 0 && kind == 0 ? (T*)ptr(MD_R1) : nullptr, d, eps);
            } else if (kind == 1) {  // B: the MLGRU step, o into xrow
                const long long off = (long long)l * d;
                MdSeg seg[7] = {{(const int4*)ptr(MD_AI + 2), (int4*)m.xrow, dw},
                                {(const int4*)ptr(MD_AI), (int4*)m.ta, dw},
                                {(const int4*)ptr(MD_AI + 1), (int4*)m.tf, dw},
                                {(const int4*)((const T*)ptr(MD_GNORM) + l * ps), (int4*)m.g1, dw},
                                {(const int4*)((const T*)ptr(MD_GAIN + 3) + l * ps), (int4*)m.gb, dw},
                                {(const int4*)((const float*)ptr(MD_H) + off), (int4*)m.h0, d / 4},
                                {(const int4*)((const float*)ptr(MD_LAM) + off), (int4*)m.lam, d / 4}};
                md_stage(seg, 7);
                __syncthreads();
                if (warp == 0) {  // the gate norm's rstd, summed as mlgru_forward sums it
                    const float r = 1.0f / sqrtf(warp_sum_squares(m.xrow, d, lane) / d + eps);
                    if (lane == 0) m.red[34] = r;
                }
                __syncthreads();
                const float rg = m.red[34];
                for (int c = threadIdx.x; c < d; c += blockDim.x) {  // mlgru_forward's step (nt = 1), its expressions
                    const float lc = m.lam[c], g = to_f(m.g1[c]);
                    const float a = to_f(m.ta[c]);
                    const float f = lc + (1.0f - lc) * md_sigmoid(to_f(m.tf[c]));
                    const float xt = a * md_sigmoid(a) * (1.0f - f);
                    float prev = m.h0[c];
                    prev = f * prev + xt;
                    m.hn[c] = prev;
                    m.xrow[c] = from_f<T>(to_f(m.xrow[c]) * rg * g * (prev * md_sigmoid(prev)));
                }
                gain = m.gb;
                __syncthreads();
            } else if (kind == 2) {  // C: the new state out; x = R1 + po, its RMSNorm
                const long long off = (long long)l * d;
                MdSeg seg[4] = {{(const int4*)ptr(MD_R1), (int4*)m.xrow, dw},
                                {(const int4*)ptr(MD_PO), (int4*)m.ta, dw},
                                {(const int4*)((const T*)ptr(MD_LN2) + l * ps), (int4*)m.g1, dw},
                                {(const int4*)((const T*)ptr(MD_GAIN + 4) + l * ps), (int4*)m.gb, dw}};
                md_stage(seg, 4);
                const int hs = (d + G - 1) / G;  // this block's slice of the state
                float* h = (float*)ptr(MD_H) + off;
                for (int c = blk * hs + threadIdx.x; c < min(d, (blk + 1) * hs); c += blockDim.x) h[c] = m.hn[c];
                gain = m.gb;
                __syncthreads();
                md_residual_rmsnorm(m, true, blk == 0 ? (T*)ptr(MD_R2) : nullptr, d, eps);
            } else {  // D: sw
                MdSeg seg[2] = {{(const int4*)ptr(MD_SW), (int4*)m.xrow, iw},
                                {(const int4*)((const T*)ptr(MD_GAIN + 5) + l * ps), (int4*)m.gb, iw}};
                md_stage(seg, 2);
                gain = m.gb;
                __syncthreads();
            }
            const float sx = md_quantize(m, gain, K, nb, per, eps, fields);
            const float sw = kind == 4 ? F[1] : F[2 + 6 * l + (kind == 0 ? job[0].w : kind + 2)];
            const float den = sx * sw;
            if (prof) prof[2] = md_now();
            T* out = kind == 0 ? (T*)ptr(MD_AI + job[0].w) : kind == 1 ? (T*)ptr(MD_PO) : kind == 2 ? sw_out
                     : kind == 3 ? (T*)ptr(MD_PD) : (T*)ptr(MD_LOGITS);
            // ---- the block's rows, a chunk (ring slot) at a time; two tasks ahead in flight
            const MdJob& j = job[kind];
            for (int c = 0; c < j.nc; c++, k++) {
                issue(k + 2);
                md_wait<2>();
                __syncthreads();
                const unsigned char* slot = m.ring + (k % MD_SLOTS) * S;
                const unsigned char* src;
                long long bytes;
                piece(l, kind, c, 0, src, bytes);
                const unsigned char* c0 = slot + ((unsigned long long)src & 15u);
                const unsigned char* c1 = nullptr;
                if (kind == 2) {
                    piece(l, kind, c, 1, src, bytes);
                    c1 = slot + S / 2 + ((unsigned long long)src & 15u);
                }
                const int r0 = j.u0 + c * j.cap, n = min(j.u0 + j.nu, r0 + j.cap) - r0;
                for (int i = warp; i < n; i += nw) {
                    const int acc = fields ? md_dot_fields((const unsigned int*)(c0 + (long long)i * nb),
                                                           (const uint4*)m.xs, nb / 4, lane)
                                           : md_dot(c0 + (long long)i * nb, m.xs, m.tab, nb, b3, lane);
                    const T v = from_f<T>((float)acc / den);
                    if (kind != 2) {
                        if (lane == 0) out[r0 + i] = v;
                    } else {  // up * silu(gate), as swiglu_forward computes and rounds it
                        const int ga = fields ? md_dot_fields((const unsigned int*)(c1 + (long long)i * nb),
                                                              (const uint4*)m.xs, nb / 4, lane)
                                              : md_dot(c1 + (long long)i * nb, m.xs, m.tab, nb, b3, lane);
                        const float a = to_f(from_f<T>((float)ga / den));
                        if (lane == 0) out[r0 + i] = from_f<T>(to_f(v) * (a / (1.0f + expf(-a))));
                    }
                }
                __syncthreads();
            }
            if (prof) prof[3] = md_now();
        }
    }
    md_wait<0>();
}
