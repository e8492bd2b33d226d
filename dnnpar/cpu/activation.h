// The activations the native kernels fuse (ReLU, ReLU6), with dnnpar.ops.activation's semantics:
// NaN passes forward (a comparison with NaN is false), -0.0 passes (np.maximum may give +0.0:
// NumPy leaves the sign of max(-0.0, 0.0) to its loops), and the gradient passes where the
// activated output y is inside the open interval (NaN y: 0).
// The codes are cpu_native.ACTIVATION_CODES.
#pragma once

namespace dnnpar {

enum Act { kNone = 0, kRelu = 1, kRelu6 = 2 };

template <int A>
inline float activate(float v) {
    if (A != kNone) v = v < 0.f ? 0.f : v;
    if (A == kRelu6) v = v > 6.f ? 6.f : v;
    return v;
}

template <int A>
inline bool passes(float y) {
    if (A == kRelu) return y > 0.f;
    if (A == kRelu6) return y > 0.f && y < 6.f;
    return true;
}

// The same with the activation known at run time.
inline float act_forward(float v, int act) {
    return act == kRelu ? activate<kRelu>(v) : act == kRelu6 ? activate<kRelu6>(v) : v;
}

inline float act_backward(float g, float y, int act) {
    const bool pass = act == kRelu ? passes<kRelu>(y) : act == kRelu6 ? passes<kRelu6>(y) : true;
    return pass ? g : 0.0f;
}

}  // namespace dnnpar
