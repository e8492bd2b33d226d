// Elementwise passes of the numpy backend's layers, each one pass on the pool where NumPy takes
// two or three single-threaded ones with a temporary:
//   add_act:  y = act(a + b)  (a residual join with its ReLU / ReLU6; act 0: the plain sum,
//             which dnnpar.ops.activation leaves to NumPy); y may be a or b.
//   act_grad: dx = dy where the activated output y passes, +0.0 elsewhere (even where dy is NaN).
// Activation semantics are activation.h's (dnnpar.ops.activation's). Float32, every array n
// floats, C-contiguous (dnnpar/backend/cpu_native.py checks them). Elementwise: the result does
// not depend on the thread count.
#include <cstdint>

#include "activation.h"
#include "parallel.h"

namespace {

template <int A>
void add_act_range(const float* a, const float* b, float* y, int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) y[i] = dnnpar::activate<A>(a[i] + b[i]);
}

template <int A>
void act_grad_range(const float* dy, const float* y, float* dx, int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) dx[i] = dnnpar::passes<A>(y[i]) ? dy[i] : 0.0f;
}

}  // namespace

extern "C" void dnnpar_add_act(const float* a, const float* b, float* y, int64_t n, int act, int threads) {
    dnnpar::elementwise(n, threads, [&](int64_t lo, int64_t hi) {
        if (act == dnnpar::kRelu) add_act_range<dnnpar::kRelu>(a, b, y, lo, hi);
        else if (act == dnnpar::kRelu6) add_act_range<dnnpar::kRelu6>(a, b, y, lo, hi);
        else add_act_range<dnnpar::kNone>(a, b, y, lo, hi);
    });
}

extern "C" void dnnpar_act_grad(const float* dy, const float* y, float* dx, int64_t n, int act, int threads) {
    dnnpar::elementwise(n, threads, [&](int64_t lo, int64_t hi) {
        if (act == dnnpar::kRelu6) act_grad_range<dnnpar::kRelu6>(dy, y, dx, lo, hi);
        else act_grad_range<dnnpar::kRelu>(dy, y, dx, lo, hi);
    });
}

DNNPAR_CPU_COMMON_EXPORTS(1)
