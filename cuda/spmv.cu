// CSR sparse x dense products, float32 values or uint8 codebook indices.
//
// A is M x K in CSR (indptr[M+1], indices[nnz] int32 column indices, values[nnz]). The codebook
// variants (suffix _cb) store values as uint8 indices into a float32 codebook of <= 256 entries,
// Deep Compression's weight sharing: 1 byte per nonzero instead of 4. The codebook is staged in
// shared memory once per block (hence a __syncthreads before any thread uses it).
//
//   csr_spmv_scalar     y = A x, one thread per row. Simple; uncoalesced when rows are long.
//                       block 256, grid ceil(M / 256).
//   csr_spmv_vector     + a group of `tpr` lanes (2, 4, 8, 16 or 32, a power of two that divides
//                       the warp) per row: the group strides over the row's nonzeros with
//                       coalesced loads and reduces with warp shuffles. The launcher picks tpr
//                       from the mean row length. block 256, grid ceil(M * tpr / 256).
//   csr_spmm            Y = A X, X dense K x B row-major, Y M x B. block (32, 8): threadIdx.y picks
//                       a row, threadIdx.x a column of X; the 32 lanes of a warp share the row's
//                       nonzeros (broadcast) and read 32 consecutive floats of each X row
//                       (coalesced). grid (ceil(M / 8), ceil(B / 32)): rows on x, which has no
//                       65535 limit.

template <bool CB> __device__ __forceinline__ float csr_value(const float* __restrict__ vals,
                                                              const unsigned char* __restrict__ codes,
                                                              const float* cb, int j) {
    return CB ? cb[codes[j]] : vals[j];
}

// Stage the codebook (if any) in shared memory. Every thread of the block must call this.
template <bool CB> __device__ __forceinline__ const float* stage_codebook(const float* __restrict__ codebook,
                                                                          int ncodes, float* smem) {
    if (!CB) return codebook;
    int nthreads = blockDim.x * blockDim.y;
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < ncodes; i += nthreads) smem[i] = codebook[i];
    __syncthreads();
    return smem;
}

template <bool CB> __device__ __forceinline__ void spmv_scalar(int M, const int* __restrict__ indptr,
                                                               const int* __restrict__ indices,
                                                               const float* __restrict__ vals,
                                                               const unsigned char* __restrict__ codes,
                                                               const float* __restrict__ codebook, int ncodes,
                                                               const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float cb_s[256];
    const float* cb = stage_codebook<CB>(codebook, ncodes, cb_s);
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= M) return;
    float acc = 0.f;
    for (int j = indptr[row]; j < indptr[row + 1]; ++j) acc += csr_value<CB>(vals, codes, cb, j) * x[indices[j]];
    y[row] = acc;
}

template <bool CB> __device__ __forceinline__ void spmv_vector(int M, const int* __restrict__ indptr,
                                                               const int* __restrict__ indices,
                                                               const float* __restrict__ vals,
                                                               const unsigned char* __restrict__ codes,
                                                               const float* __restrict__ codebook, int ncodes,
                                                               const float* __restrict__ x, float* __restrict__ y,
                                                               int tpr) {
    __shared__ float cb_s[256];
    const float* cb = stage_codebook<CB>(codebook, ncodes, cb_s);
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    int row = gid / tpr;
    int lane = threadIdx.x & (tpr - 1);
    // Whole warps stay alive through the shuffles: a row past the end contributes nothing.
    float acc = 0.f;
    if (row < M) {
        int end = indptr[row + 1];
        for (int j = indptr[row] + lane; j < end; j += tpr) acc += csr_value<CB>(vals, codes, cb, j) * x[indices[j]];
    }
    for (int off = tpr >> 1; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off, tpr);
    if (row < M && lane == 0) y[row] = acc;
}

template <bool CB> __device__ __forceinline__ void spmm_rows(int M, int B, const int* __restrict__ indptr,
                                                             const int* __restrict__ indices,
                                                             const float* __restrict__ vals,
                                                             const unsigned char* __restrict__ codes,
                                                             const float* __restrict__ codebook, int ncodes,
                                                             const float* __restrict__ X, float* __restrict__ Y) {
    __shared__ float cb_s[256];
    const float* cb = stage_codebook<CB>(codebook, ncodes, cb_s);
    int row = blockIdx.x * blockDim.y + threadIdx.y;
    int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (row >= M || col >= B) return;
    float acc = 0.f;
    for (int j = indptr[row]; j < indptr[row + 1]; ++j)
        acc += csr_value<CB>(vals, codes, cb, j) * X[(long long)indices[j] * B + col];
    Y[(long long)row * B + col] = acc;
}

extern "C" __global__ void csr_spmv_scalar(int M, const int* __restrict__ indptr, const int* __restrict__ indices,
                                           const float* __restrict__ vals, const float* __restrict__ x,
                                           float* __restrict__ y) {
    spmv_scalar<false>(M, indptr, indices, vals, nullptr, nullptr, 0, x, y);
}

extern "C" __global__ void csr_spmv_scalar_cb(int M, const int* __restrict__ indptr, const int* __restrict__ indices,
                                              const unsigned char* __restrict__ codes,
                                              const float* __restrict__ codebook, int ncodes,
                                              const float* __restrict__ x, float* __restrict__ y) {
    spmv_scalar<true>(M, indptr, indices, nullptr, codes, codebook, ncodes, x, y);
}

extern "C" __global__ void csr_spmv_vector(int M, const int* __restrict__ indptr, const int* __restrict__ indices,
                                           const float* __restrict__ vals, const float* __restrict__ x,
                                           float* __restrict__ y, int tpr) {
    spmv_vector<false>(M, indptr, indices, vals, nullptr, nullptr, 0, x, y, tpr);
}

extern "C" __global__ void csr_spmv_vector_cb(int M, const int* __restrict__ indptr, const int* __restrict__ indices,
                                              const unsigned char* __restrict__ codes,
                                              const float* __restrict__ codebook, int ncodes,
                                              const float* __restrict__ x, float* __restrict__ y, int tpr) {
    spmv_vector<true>(M, indptr, indices, nullptr, codes, codebook, ncodes, x, y, tpr);
}

extern "C" __global__ void csr_spmm(int M, int B, const int* __restrict__ indptr, const int* __restrict__ indices,
                                    const float* __restrict__ vals, const float* __restrict__ X,
                                    float* __restrict__ Y) {
    spmm_rows<false>(M, B, indptr, indices, vals, nullptr, nullptr, 0, X, Y);
}

extern "C" __global__ void csr_spmm_cb(int M, int B, const int* __restrict__ indptr, const int* __restrict__ indices,
                                       const unsigned char* __restrict__ codes, const float* __restrict__ codebook,
                                       int ncodes, const float* __restrict__ X, float* __restrict__ Y) {
    spmm_rows<true>(M, B, indptr, indices, nullptr, codes, codebook, ncodes, X, Y);
}
