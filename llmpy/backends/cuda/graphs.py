"""Surgery on a captured CUDA graph before it is instantiated (cuda-bindings' driver API; CuPy's Graph keeps no
cudaGraph_t). cuBLASLt issues a 4-byte memset before each of its cooperative (nvjet) products; captured, each is a
memset node, and in graph replay the next kernel started ~4.6 us after the previous one ended whenever a memset
node sat between them, against ~0.05 us otherwise (d48, benchmarks/kernel_profile.py --mode graph, H200,
2026-11-30: 531 such gaps, 2.44 ms a step). memsets_to_kernels replaces each small 1-D memset node by a kernel
node doing the same stores (kernels/cast.cu's graph_memset), with the same dependencies."""
from __future__ import annotations

import ctypes

MAX_BYTES = 256  # larger memsets (whole buffers) stay memset nodes


def _ok(res):
    """A cuda-bindings call's (status, *outputs): raises unless CUDA_SUCCESS; the output, a tuple of them, or None."""
    from cuda.bindings import driver as cu
    err, *out = res
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err!r}")
    return out[0] if len(out) == 1 else (tuple(out) if out else None)


def memsets_to_kernels(graph: int, func: int, max_bytes: int = MAX_BYTES) -> int:
    """Replaces every memset node of `graph` (a cudaGraph_t, not yet instantiated) that sets one row of at most
    max_bytes by a node launching `func` (graph_memset's CUfunction) with the node's dependencies and dependents.
    Returns how many were replaced."""
    from cuda.bindings import driver as cu
    g = cu.CUgraph(graph)
    _, n = _ok(cu.cuGraphGetNodes(g, 0))
    nodes, _ = _ok(cu.cuGraphGetNodes(g, n))
    memset = cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_MEMSET
    replaced = 0
    for node in nodes:
        if _ok(cu.cuGraphNodeGetType(node)) != memset:
            continue
        p = _ok(cu.cuGraphMemsetNodeGetParams(node))
        elem, width, height = int(p.elementSize), int(p.width), int(p.height)
        if height != 1 or elem not in (1, 2, 4) or width * elem > max_bytes:
            continue
        _, _, nd = _ok(cu.cuGraphNodeGetDependencies(node, 0))
        deps = _ok(cu.cuGraphNodeGetDependencies(node, nd))[0] if nd else []
        _, _, no = _ok(cu.cuGraphNodeGetDependentNodes(node, 0))
        outs = _ok(cu.cuGraphNodeGetDependentNodes(node, no))[0] if no else []
        args = [ctypes.c_uint64(int(p.dst)), ctypes.c_uint32(int(p.value)), ctypes.c_int32(elem), ctypes.c_int32(width)]
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        kp = cu.CUDA_KERNEL_NODE_PARAMS()
        kp.func = cu.CUfunction(func)
        kp.gridDimX, kp.gridDimY, kp.gridDimZ = (width + 127) // 128, 1, 1
        kp.blockDimX, kp.blockDimY, kp.blockDimZ = 128, 1, 1
        kp.sharedMemBytes = 0
        kp.kernelParams = ctypes.addressof(ptrs)  # the driver copies the values now
        k = _ok(cu.cuGraphAddKernelNode(g, deps, len(deps), kp))
        _ok(cu.cuGraphDestroyNode(node))  # and its edges
        if outs:
            _ok(cu.cuGraphAddDependencies(g, [k] * len(outs), outs, None, len(outs)))
        replaced += 1
    return replaced
