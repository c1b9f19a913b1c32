// medjax's fused first block for XLA:CPU (XLA FFI custom calls): a stride-1 convolution with few input
// channels, the batch-norm moments of its output and a 2x2/2 max pool, in one pass over the images,
// and the gradient of the convolution's kernel through all three.
//
// Forward: for the padded NHWC input xp [n, h + kh - 1, w + kw - 1, cin] and the kernel k
// [kh * kw * cin, cout], with x = conv(xp, k) [n, h, w, cout] (never stored):
//   pooled[n, y, x, o] = sign[o] * max over the 2x2 window of sign[o] * x  (sign = +1 or -1 per channel)
//   moments[0, o] = mean of x[..., o], moments[1, o] = mean of x[..., o]^2  (over n, h, w)
// Kernel gradient: given the cotangents of pooled (gp) and of the moments, as alpha = d mean / (n h w)
// and beta = 2 d mean_sq / (n h w):
//   dx = alpha + beta * x + gp at the first window element that equals the pooled value, else 0
//   dk[(i, j, c), o] = sum over n, y, x of xp[n, y + i, x + j, c] * dx[n, y, x, o]
// with x recomputed and dx never stored. Per image, 16 output channels at a time: the kernel's taps and
// the gradient's accumulators stay in registers. The images are split into parts that run on XLA's
// intra-op threads (parts.h); each part sums into its own buffer (moments in double precision).
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
typedef int32_t m16 __attribute__((vector_size(64), aligned(4)));

inline v16 Load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

inline v16 Max(v16 a, v16 b) { return a > b ? a : b; }

struct Geometry {
  int64_t n, hp, wp, cin, kh, kw, h, w, cout;
};

// The kernel's 16 output channels from o0, one vector per kernel row (i, j, c).
template <int TAPS>
void LoadKernel(const Geometry& s, const float* kernel, int64_t o0, v16* k) {
  for (int t = 0; t < TAPS; ++t) k[t] = Load(kernel + t * s.cout + o0);
}

// One output pixel: p points at its window's top-left input value, rs is the input's row stride (kernel
// size and channels known at compile time, so every tap is a base register plus a constant offset).
template <int KH, int KW, int CIN>
inline v16 Convolve(const float* p, int64_t rs, const v16* k) {
  v16 x = p[0] * k[0];
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j)
#pragma GCC unroll 4
      for (int c = 0; c < CIN; ++c)
        if (i + j + c > 0) x += p[i * rs + j * CIN + c] * k[(i * KW + j) * CIN + c];
  return x;
}

template <int KH, int KW, int CIN>
void ForwardImage(const Geometry& s, const float* xp, const float* kernel, const float* sign, float* pooled,
                  double* moments, int64_t n) {
  constexpr int TAPS = KH * KW * CIN;
  const int64_t ph = s.h / 2, pw = s.w / 2, rs = s.wp * CIN;
  for (int64_t o0 = 0; o0 < s.cout; o0 += 16) {
    v16 k[TAPS];
    LoadKernel<TAPS>(s, kernel, o0, k);
    const v16 sg = Load(sign + o0);
    v16 sum{}, sum_sq{};
    for (int64_t py = 0; py < ph; ++py) {
      const float* row = xp + (n * s.hp + 2 * py) * rs;
      float* out = pooled + (n * ph + py) * pw * s.cout + o0;
      for (int64_t px = 0; px < pw; ++px) {
        const float* p = row + 2 * px * CIN;
        v16 best;
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          const v16 x = Convolve<KH, KW, CIN>(p + (q / 2) * rs + (q % 2) * CIN, rs, k);
          sum += x;
          sum_sq += x * x;
          best = q == 0 ? x * sg : Max(best, x * sg);
        }
        Store(out + px * s.cout, best * sg);
      }
    }
    for (int c = 0; c < 16; ++c) {
      moments[o0 + c] += sum[c];
      moments[s.cout + o0 + c] += sum_sq[c];
    }
  }
}

template <int KH, int KW, int CIN>
void KernelGradImage(const Geometry& s, const float* xp, const float* kernel, const float* sign,
                     const float* gp, const float* alpha, const float* beta, float* dk, int64_t n) {
  constexpr int TAPS = KH * KW * CIN;
  const int64_t ph = s.h / 2, pw = s.w / 2, rs = s.wp * CIN;
  std::vector<v16> dx(4 * pw);  // A row of windows' output cotangents.
  for (int64_t o0 = 0; o0 < s.cout; o0 += 16) {
    v16 k[TAPS], acc[TAPS];
    LoadKernel<TAPS>(s, kernel, o0, k);
    for (int t = 0; t < TAPS; ++t) acc[t] = v16{};
    const v16 sg = Load(sign + o0), a = Load(alpha + o0), b = Load(beta + o0);
    for (int64_t py = 0; py < ph; ++py) {
      const float* row = xp + (n * s.hp + 2 * py) * rs;
      const float* g_row = gp + (n * ph + py) * pw * s.cout + o0;
      // A row of windows in two loops (the output cotangents, then the kernel's), so that neither needs
      // more vector registers than there are.
      for (int64_t px = 0; px < pw; ++px) {
        const float* p = row + 2 * px * CIN;
        v16 x[4], best;
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          x[q] = Convolve<KH, KW, CIN>(p + (q / 2) * rs + (q % 2) * CIN, rs, k);
          best = q == 0 ? x[q] * sg : Max(best, x[q] * sg);
        }
        const m16 g = (m16)Load(g_row + px * s.cout);
        m16 taken{};
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          const m16 hit = (x[q] * sg == best) & ~taken;
          taken |= hit;
          dx[4 * px + q] = a + b * x[q] + (v16)(g & hit);
        }
      }
      for (int64_t px = 0; px < pw; ++px) {
        const float* p = row + 2 * px * CIN;
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          const v16 d = dx[4 * px + q];
#pragma GCC unroll 8
          for (int i = 0; i < KH; ++i)
#pragma GCC unroll 8
            for (int j = 0; j < KW; ++j)
#pragma GCC unroll 4
              for (int c = 0; c < CIN; ++c)
                acc[(i * KW + j) * CIN + c] += p[(q / 2 + i) * rs + (q % 2 + j) * CIN + c] * d;
        }
      }
    }
    for (int t = 0; t < TAPS; ++t)
      for (int c = 0; c < 16; ++c) dk[t * s.cout + o0 + c] += acc[t][c];
  }
}

std::string Str(int64_t v) { return std::to_string(v); }

// Checks the shapes shared by both calls; fills s.
ffi::Error CheckGeometry(const char* name, ffi::Buffer<ffi::F32>& xp, ffi::Buffer<ffi::F32>& kernel,
                         ffi::Buffer<ffi::F32>& sign, int64_t kh, int64_t kw, Geometry& s) {
  const auto xd = xp.dimensions(), kd = kernel.dimensions(), sd = sign.dimensions();
  if (xd.size() != 4 || kd.size() != 2 || sd.size() != 1) {
    return ffi::Error::InvalidArgument(std::string(name) + ": expected 4-d xp, 2-d kernel, 1-d sign");
  }
  s = Geometry{xd[0], xd[1], xd[2], xd[3], kh, kw, xd[1] - kh + 1, xd[2] - kw + 1, kd[1]};
  const int64_t taps = kh * kw * s.cin;  // The kernel's rows.
  if (kd[0] != taps || sd[0] != s.cout || s.cout % 16 != 0 || s.h < 2 || s.w < 2 || s.h % 2 || s.w % 2 ||
      kh != 3 || kw != 3 || (s.cin != 1 && s.cin != 3)) {
    return ffi::Error::InvalidArgument(
        std::string(name) + ": padded input " + Str(s.hp) + "x" + Str(s.wp) + "x" + Str(s.cin) + ", " +
        Str(kh) + "x" + Str(kw) + " kernel [" + Str(kd[0]) + ", " + Str(kd[1]) + "], sign [" + Str(sd[0]) +
        "]: need an even output size, a 3x3 kernel on 1 or 3 channels, output channels a multiple of 16"
        " and one sign per output channel");
  }
  return ffi::Error::Success();
}

ffi::Error ConvBnPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> kernel,
                             ffi::Buffer<ffi::F32> sign, ffi::ResultBuffer<ffi::F32> pooled,
                             ffi::ResultBuffer<ffi::F32> moments, int64_t kh, int64_t kw) {
  Geometry s;
  if (auto error = CheckGeometry("medjax_conv_bn_pool", xp, kernel, sign, kh, kw, s); error.failure()) {
    return error;
  }
  const auto pd = pooled->dimensions(), md = moments->dimensions();
  if (pd.size() != 4 || pd[0] != s.n || pd[1] != s.h / 2 || pd[2] != s.w / 2 || pd[3] != s.cout ||
      md.size() != 2 || md[0] != 2 || md[1] != s.cout) {
    return ffi::Error::InvalidArgument("medjax_conv_bn_pool: pooled or moments has the wrong shape");
  }
  const int64_t parts = medjax::NumParts(pool, s.n);
  std::vector<std::vector<double>> sums(parts, std::vector<double>(2 * s.cout, 0.0));
  const float *x_data = xp.typed_data(), *k_data = kernel.typed_data(), *s_data = sign.typed_data();
  float* p_data = pooled->typed_data();
  const bool three = s.cin == 3;
  medjax::RunParts(pool, parts, [&](int64_t p) {
    for (int64_t n = s.n * p / parts; n < s.n * (p + 1) / parts; ++n) {
      if (three) {
        ForwardImage<3, 3, 3>(s, x_data, k_data, s_data, p_data, sums[p].data(), n);
      } else {
        ForwardImage<3, 3, 1>(s, x_data, k_data, s_data, p_data, sums[p].data(), n);
      }
    }
  });
  const double count = static_cast<double>(s.n) * s.h * s.w;
  float* out = moments->typed_data();
  for (int64_t c = 0; c < 2 * s.cout; ++c) {
    double total = 0.0;
    for (int64_t p = 0; p < parts; ++p) total += sums[p][c];
    out[c] = static_cast<float>(total / count);
  }
  return ffi::Error::Success();
}

ffi::Error ConvBnPoolKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> kernel,
                                ffi::Buffer<ffi::F32> sign, ffi::Buffer<ffi::F32> gp,
                                ffi::Buffer<ffi::F32> alpha, ffi::Buffer<ffi::F32> beta,
                                ffi::ResultBuffer<ffi::F32> dk, int64_t kh, int64_t kw) {
  Geometry s;
  if (auto error = CheckGeometry("medjax_conv_bn_pool_kernel_grad", xp, kernel, sign, kh, kw, s);
      error.failure()) {
    return error;
  }
  const auto gd = gp.dimensions(), ad = alpha.dimensions(), bd = beta.dimensions(), dd = dk->dimensions();
  if (gd.size() != 4 || gd[0] != s.n || gd[1] != s.h / 2 || gd[2] != s.w / 2 || gd[3] != s.cout ||
      ad.size() != 1 || ad[0] != s.cout || bd.size() != 1 || bd[0] != s.cout || dd.size() != 2 ||
      dd[0] != kh * kw * s.cin || dd[1] != s.cout) {
    return ffi::Error::InvalidArgument(
        "medjax_conv_bn_pool_kernel_grad: pooled cotangent, alpha, beta or dk has the wrong shape");
  }
  const int64_t size = kh * kw * s.cin * s.cout;
  const int64_t parts = medjax::NumParts(pool, s.n);
  std::vector<std::vector<float>> sums(parts, std::vector<float>(size, 0.0f));
  const float *x_data = xp.typed_data(), *k_data = kernel.typed_data(), *s_data = sign.typed_data();
  const float *g_data = gp.typed_data(), *a_data = alpha.typed_data(), *b_data = beta.typed_data();
  const bool three = s.cin == 3;
  medjax::RunParts(pool, parts, [&](int64_t p) {
    for (int64_t n = s.n * p / parts; n < s.n * (p + 1) / parts; ++n) {
      if (three) {
        KernelGradImage<3, 3, 3>(s, x_data, k_data, s_data, g_data, a_data, b_data, sums[p].data(), n);
      } else {
        KernelGradImage<3, 3, 1>(s, x_data, k_data, s_data, g_data, a_data, b_data, sums[p].data(), n);
      }
    }
  });
  medjax::SumParts(sums, dk->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxConvBnPool, ConvBnPoolForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxConvBnPoolKernelGrad, ConvBnPoolKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw"));
