// The residual add: a += b (the gradient flowing into the residual stream accumulates).
#include "common.cuh"

template <class T>
__global__ void add_inplace(T* a, const T* b, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
}
