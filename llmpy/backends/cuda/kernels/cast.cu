// Infrastructure, no NumPy twin: out = T(in), round to nearest (loading fp32 weights into the bf16 compute copy).
#include "common.cuh"

template <class T>
__global__ void cast_from_f32(T* out, const float* in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_f<T>(in[i]);
}

// A small memset as a kernel: backend.capture puts it in a captured graph in place of each memset node of at most
// 256 bytes (cuBLASLt's 4-byte flag before each cooperative nvjet product). A memset node left ~4.6 us idle before
// the next kernel (d48 in graph replay, H200, 2026-11-30); a kernel node stays on the compute engine.
// elem: 1, 2 or 4 bytes an element; n elements; dst aligned to elem.
__global__ void graph_memset(unsigned char* dst, unsigned int value, int elem, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (elem == 4) reinterpret_cast<unsigned int*>(dst)[i] = value;
    else if (elem == 2) reinterpret_cast<unsigned short*>(dst)[i] = (unsigned short)value;
    else dst[i] = (unsigned char)value;
}
