// medjax's fused convolution kernel gradient for XLA:CPU (an XLA FFI custom call).
//
// dk[(i, j, c), o] = sum over images n and output pixels (y, x) of
//     xp[n, y * sh + i, x * sw + j, c] * g[n, y, x, o]
// for an already padded NHWC input xp [n, hp, wp, cin] and the NHWC output cotangent g [n, oh, ow, cout],
// read in place: no patches are built. Rows (i, j, c) are taken a register block at a time (R rows by NV
// vectors of 16 output channels), so each pixel's cotangent vector is loaded once per block and every
// row's input value is one broadcast. The images are split into parts that run on XLA's intra-op
// threads (parts.h); each part sums into its own buffer, added up at the end (float32 throughout).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parts.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

struct Geometry {
  int64_t n, hp, wp, cin, oh, ow, cout, kh, kw, sh, sw;
};

// Adds image n's products for rows [r0, r0 + rows) (rows <= R) and output channels [o0, o0 + 16 * NV)
// into dk ([kh * kw * cin, cout]).
template <int NV, int R>
void AccumulateBlock(const Geometry& s, const float* xp, const float* g, float* dk, int64_t n, int64_t r0,
                     int64_t rows, int64_t o0) {
  int64_t offset[R];
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + std::min<int64_t>(r, rows - 1);  // Spare slots repeat the last row.
    const int64_t c = row % s.cin, tap = row / s.cin, i = tap / s.kw, j = tap % s.kw;
    offset[r] = (i * s.wp + j) * s.cin + c;
  }
  v16 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = v16{};
  for (int64_t y = 0; y < s.oh; ++y) {
    const float* g_row = g + ((n * s.oh + y) * s.ow) * s.cout + o0;
    const float* x_row = xp + ((n * s.hp + y * s.sh) * s.wp) * s.cin;
    for (int64_t x = 0; x < s.ow; ++x) {
      v16 gv[NV];
      for (int v = 0; v < NV; ++v) std::memcpy(&gv[v], g_row + x * s.cout + 16 * v, sizeof(v16));
      const float* base = x_row + x * s.sw * s.cin;
      for (int r = 0; r < R; ++r) {
        const float b = base[offset[r]];
        for (int v = 0; v < NV; ++v) acc[r][v] += b * gv[v];
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int v = 0; v < NV; ++v) {
      float* out = dk + (r0 + r) * s.cout + o0 + 16 * v;
      for (int k = 0; k < 16; ++k) out[k] += acc[r][v][k];
    }
}

template <int NV, int R>
void AccumulateRows(const Geometry& s, const float* xp, const float* g, float* dk, int64_t n, int64_t o0) {
  const int64_t total = s.kh * s.kw * s.cin;
  for (int64_t r0 = 0; r0 < total; r0 += R)
    AccumulateBlock<NV, R>(s, xp, g, dk, n, r0, std::min<int64_t>(R, total - r0), o0);
}

// One image at a time, so that its cotangent stays in cache across the row blocks.
void AccumulateImages(const Geometry& s, const float* xp, const float* g, float* dk, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t o0 = 0;
    for (; o0 + 32 <= s.cout; o0 += 32) AccumulateRows<2, 12>(s, xp, g, dk, n, o0);
    if (o0 < s.cout) AccumulateRows<1, 12>(s, xp, g, dk, n, o0);
  }
}

ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dk, int64_t kh, int64_t kw, int64_t sh, int64_t sw) {
  const auto xd = xp.dimensions(), gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0]) {
    return ffi::Error::InvalidArgument("medjax_conv_kernel_grad: expected NHWC xp and g with equal batch");
  }
  const Geometry s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], kh, kw, sh, sw};
  if (s.cout % 16 != 0 || (s.oh - 1) * sh + kh > s.hp || (s.ow - 1) * sw + kw > s.wp) {
    const auto str = [](int64_t v) { return std::to_string(v); };
    return ffi::Error::InvalidArgument(
        "medjax_conv_kernel_grad: padded input " + str(s.hp) + "x" + str(s.wp) + " too small for a " +
        str(s.oh) + "x" + str(s.ow) + " output with a " + str(kh) + "x" + str(kw) + " kernel, or " +
        str(s.cout) + " output channels (need a multiple of 16)");
  }
  const int64_t size = kh * kw * s.cin * s.cout;
  const int64_t parts = medjax::NumParts(pool, s.n);
  std::vector<std::vector<float>> sums(parts, std::vector<float>(size, 0.0f));
  const float* x_data = xp.typed_data();
  const float* g_data = g.typed_data();
  medjax::RunParts(pool, parts, [&](int64_t p) {
    AccumulateImages(s, x_data, g_data, sums[p].data(), s.n * p / parts, s.n * (p + 1) / parts);
  });

  medjax::SumParts(sums, dk->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxConvKernelGrad, ConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw"));
