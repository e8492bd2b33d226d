#!/usr/bin/env python3
"""Planted bugs that compute-sanitizer must report, to prove a clean sanitizer run means something.

    compute-sanitizer --tool memcheck  python tools/sanitizer_control.py oob    # must report an error
    compute-sanitizer --tool racecheck python tools/sanitizer_control.py race   # must report a hazard

tools/gpu_check.sh runs both (step `controls`) next to the real kernel suite.
"""
import sys

import cupy as cp

OOB = r'''extern "C" __global__ void oob(float* p, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i == 0) p[n + (1ll << 28)] = 1.f;   // far past the end of the allocation (and of any pool slack)
    else if (i < n) p[i] = 2.f;
}'''
RACE = r'''extern "C" __global__ void race(float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = threadIdx.x;
    // missing __syncthreads(): a neighbour's slot is read before it is surely written
    out[threadIdx.x] = s[(threadIdx.x + 1) % 256];
}'''

kind = sys.argv[1] if len(sys.argv) > 1 else "oob"
a = cp.zeros(1024, cp.float32)
if kind == "oob":
    cp.RawKernel(OOB, "oob")((4,), (256,), (a, cp.int64(a.size)))
elif kind == "race":
    cp.RawKernel(RACE, "race")((1,), (256,), (a,))
else:
    sys.exit(f"unknown control {kind!r} (oob | race)")
try:
    cp.cuda.runtime.deviceSynchronize()
    print(f"{kind}: kernel returned")
except cp.cuda.runtime.CUDARuntimeError as e:
    print(f"{kind}: {e}")
