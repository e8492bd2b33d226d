// Softmax + cross-entropy, forward and backward fused: one pass over the logits for the row
// maximum, one for the sum of exponentials, one writing the gradient -- the probabilities are
// never stored, and the loss comes out per row for the host to average on the device.
//
//   softmax_ce  logits (N, C) row-major, labels (N,) int32 in [0, C) (checked on the host),
//               loss (N,) = logsumexp(z) - z[label], dlogits (N, C) = (softmax(z) - onehot) * scale
//               (scale = 1 / N for the mean loss). One block per row, rows strided over
//               gridDim.x; each thread strides over the row's columns, then a warp-shuffle
//               reduction and a shared-memory pass over the warps (fixed order: deterministic).
//               block: a multiple of 32, at most 1024 (the launcher uses 128); grid (min(N, 65535)).
// Row offsets are 64-bit. NaN in a row makes that row's loss and gradient NaN, as the numpy
// path; a +inf logit too (inf - inf).

// The block's max or sum of v: warp shuffles, the warps' partials in warp_vals[0..31], the
// total in warp_vals[32]. Each reduction of a row gets its own 33 floats, so no barrier is needed
// between one reduction's final read and the next one's writes (a row's three reductions), and
// the row loop's next row reuses them only after the gradient pass's own reduction barriers.
__device__ __forceinline__ float block_reduce(float v, float* warp_vals, bool is_max) {
    for (int off = 16; off > 0; off >>= 1) {
        float o = __shfl_down_sync(0xffffffffu, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) >> 5;
        v = lane < nwarps ? warp_vals[lane] : (is_max ? -INFINITY : 0.f);
        for (int off = 16; off > 0; off >>= 1) {
            float o = __shfl_down_sync(0xffffffffu, v, off);
            v = is_max ? fmaxf(v, o) : v + o;
        }
        if (lane == 0) warp_vals[32] = v;
    }
    __syncthreads();
    return warp_vals[32];
}

extern "C" __global__ void softmax_ce(const float* __restrict__ logits, const int* __restrict__ labels,
                                      float* __restrict__ loss, float* __restrict__ dlogits, int N, int C,
                                      float scale) {
    __shared__ float red[3][33];  // one set per reduction of a row: the NaN flag, the max, the sum
    for (int row = blockIdx.x; row < N; row += gridDim.x) {
        const float* z = logits + (long long)row * C;
        float* d = dlogits + (long long)row * C;
        float m = -INFINITY;
        bool nan = false;
        for (int j = threadIdx.x; j < C; j += blockDim.x) {
            const float v = z[j];
            nan |= v != v;
            m = fmaxf(m, v);  // fmaxf drops NaN: it is carried by the flag instead
        }
        const float any_nan = block_reduce(nan ? 1.f : 0.f, red[0], false);
        m = block_reduce(m, red[1], true);
        if (any_nan > 0.f) m = NAN;
        float s = 0.f;
        for (int j = threadIdx.x; j < C; j += blockDim.x) s += expf(z[j] - m);
        s = block_reduce(s, red[2], false);
        const float lse = m + logf(s);
        const int label = labels[row];
        for (int j = threadIdx.x; j < C; j += blockDim.x) {
            const float p = expf(z[j] - lse);
            d[j] = (p - (j == label ? 1.f : 0.f)) * scale;
        }
        if (threadIdx.x == 0) loss[row] = lse - z[label];
    }
}
