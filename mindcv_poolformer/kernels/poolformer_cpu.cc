// CPU kernels of the PoolFormer block for MindSpore's Custom "aot" ops (float32, NCHW).
//
// Why: on a CPU, MindSpore runs the block's elementwise work as separate kernels, each a full pass
// over memory, and its Erf kernel is scalar and single-threaded (305 ms on a 32x256x56x56 map against
// 18 ms for x*x). These kernels fuse each step of the block into one or two threaded, vectorisable
// passes, forward and backward:
//   PoolMixer:    y = x + d_b * s_c * rstd_b * (avgpool_k(x) - x)   (GroupNorm(1) folded in: the
//                 pool averages valid pixels only, so pool(n) - n = rstd * (pool(x) - x))
//   Normalize:    n = (x - mean_b) * rstd_b                          (GroupNorm(1) without affine)
//   GeluBias:     h = z * (erf(z) + 1), z = acc + bias_c              (sqrt2 * GELU, constants folded
//                                                                      into the convs around it)
//   ResidualBias: out = y + d_b * (acc + bias_c)                      (fc2 bias, drop path, residual)
// d_b is the per-sample drop-path scale (ones at inference). Statistics accumulate in double.
//
// Every entry point has MindSpore's aot signature; params holds the inputs then the outputs.

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

int NumThreads() {
  static const int threads = [] {
    if (const char *env = std::getenv("MINDCV_POOLFORMER_KERNEL_THREADS")) {
      int value = std::atoi(env);
      if (value > 0) return value;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return threads;
}

// Run fn(begin, end) over [0, n) split into one contiguous range per thread (the caller's thread
// takes the first range). Work items here are whole planes or long runs, so a spawn per call is cheap.
template <typename F>
void ParallelFor(int64_t n, int64_t min_per_thread, F fn) {
  int64_t threads = std::min<int64_t>(NumThreads(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread)));
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) {
    int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) pool.emplace_back(fn, begin, end);
  }
  fn(int64_t{0}, std::min(n, chunk));
  for (auto &thread : pool) thread.join();
}

// erf as a rational function on [-4, 4] (beyond it erf is +-1 in float32); max error ~1e-7, the
// coefficients of Eigen's / XLA's float erf. Branch-free so the loops vectorise.
inline float Erf(float a) {
  float x = std::min(4.f, std::max(-4.f, a));
  float x2 = x * x;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p + -2.10102402082508e-06f;
  p = x2 * p + -5.69250639462346e-05f;
  p = x2 * p + -7.34990630326855e-04f;
  p = x2 * p + -2.95459980854025e-03f;
  p = x2 * p + -1.60960333262415e-02f;
  p = x * p;
  float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = x2 * q + -1.68282697438203e-03f;
  q = x2 * q + -7.37332916720468e-03f;
  q = x2 * q + -1.42647390514189e-02f;
  return p / q;
}

// exp(x) for x <= 0 (here x = -z*z): 2^n * 2^f with a degree-6 polynomial for 2^f, f in [-0.5, 0.5];
// relative error ~2e-7, flushed to 0 below -87.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.f);
  float t = x * 1.44269504088896341f;
  float n = std::floor(t + 0.5f);
  float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

int64_t Numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Geometry of an NCHW map and of a k x k window (stride 1, zero padding k/2, count_include_pad=False).
struct Planes {
  int64_t batch, channels, height, width, plane, sample;
  Planes(const int64_t *shape) : batch(shape[0]), channels(shape[1]), height(shape[2]), width(shape[3]) {
    plane = height * width;
    sample = channels * plane;
  }
};

// out = sum over the valid k x k window around each pixel (tmp: one plane of scratch).
void BoxSum(const float *in, float *out, float *tmp, int64_t height, int64_t width, int64_t radius) {
  for (int64_t h = 0; h < height; ++h) {
    const float *row = in + h * width;
    float *acc = tmp + h * width;
    std::memcpy(acc, row, sizeof(float) * width);
    for (int64_t d = 1; d <= radius; ++d) {
      for (int64_t w = 0; w + d < width; ++w) acc[w] += row[w + d];
      for (int64_t w = d; w < width; ++w) acc[w] += row[w - d];
    }
  }
  for (int64_t h = 0; h < height; ++h) {
    float *dst = out + h * width;
    int64_t lo = std::max<int64_t>(0, h - radius), hi = std::min<int64_t>(height - 1, h + radius);
    std::memcpy(dst, tmp + lo * width, sizeof(float) * width);
    for (int64_t r = lo + 1; r <= hi; ++r) {
      const float *src = tmp + r * width;
      for (int64_t w = 0; w < width; ++w) dst[w] += src[w];
    }
  }
}

// 1 / (number of valid pixels in the window) at every position.
std::vector<float> ReciprocalCounts(int64_t height, int64_t width, int64_t radius) {
  std::vector<float> rc(height * width);
  for (int64_t h = 0; h < height; ++h) {
    int64_t ch = std::min<int64_t>(height - 1, h + radius) - std::max<int64_t>(0, h - radius) + 1;
    for (int64_t w = 0; w < width; ++w) {
      int64_t cw = std::min<int64_t>(width - 1, w + radius) - std::max<int64_t>(0, w - radius) + 1;
      rc[h * width + w] = 1.f / static_cast<float>(ch * cw);
    }
  }
  return rc;
}

// Per-sample mean and 1/sqrt(var + eps) over (C, H, W); plane sums run in parallel.
void SampleStats(const float *x, const Planes &g, float eps, float *mean, float *rstd) {
  int64_t planes = g.batch * g.channels;
  std::vector<double> sum(planes), sumsq(planes);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float *src = x + p * g.plane;
      double s = 0, q = 0;
      float fs = 0, fq = 0;
      int64_t i = 0;
      // float partials over short runs (vectorised), folded into double every 1024 values
      for (; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        fs = 0;
        fq = 0;
        for (int64_t j = i; j < stop; ++j) {
          fs += src[j];
          fq += src[j] * src[j];
        }
        s += fs;
        q += fq;
      }
      sum[p] = s;
      sumsq[p] = q;
    }
  });
  for (int64_t b = 0; b < g.batch; ++b) {
    double s = 0, q = 0;
    for (int64_t c = 0; c < g.channels; ++c) {
      s += sum[b * g.channels + c];
      q += sumsq[b * g.channels + c];
    }
    double m = s / g.sample;
    double var = std::max(0.0, q / g.sample - m * m);
    mean[b] = static_cast<float>(m);
    rstd[b] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
}

constexpr float kEps = 1e-5f;

}  // namespace

extern "C" {

// inputs: x (B,C,H,W), scale (C), drop (B), pool_size (1, int32); outputs: y, mean (B), rstd (B)
int PoolMixer(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  const float *drop = static_cast<const float *>(params[2]);
  const int64_t radius = static_cast<const int32_t *>(params[3])[0] / 2;
  float *y = static_cast<float *>(params[4]);
  float *mean = static_cast<float *>(params[5]);
  float *rstd = static_cast<float *>(params[6]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  SampleStats(x, g, kEps, mean, rstd);
  std::vector<float> rc = ReciprocalCounts(g.height, g.width, radius);
  ParallelFor(g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pooled(g.plane), tmp(g.plane);
    for (int64_t p = begin; p < end; ++p) {
      int64_t b = p / g.channels, c = p % g.channels;
      const float k = drop[b] * scale[c] * rstd[b];
      const float *src = x + p * g.plane;
      float *dst = y + p * g.plane;
      BoxSum(src, pooled.data(), tmp.data(), g.height, g.width, radius);
      for (int64_t i = 0; i < g.plane; ++i) dst[i] = src[i] + k * (pooled[i] * rc[i] - src[i]);
    }
  });
  return 0;
}

// inputs: x, scale, drop, pool_size, mean, rstd, dy; outputs: dx (B,C,H,W), dscale (C)
int PoolMixerGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  const float *drop = static_cast<const float *>(params[2]);
  const int64_t radius = static_cast<const int32_t *>(params[3])[0] / 2;
  const float *mean = static_cast<const float *>(params[4]);
  const float *rstd = static_cast<const float *>(params[5]);
  const float *dy = static_cast<const float *>(params[6]);
  float *dx = static_cast<float *>(params[7]);
  float *dscale = static_cast<float *>(params[8]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  const int64_t planes = g.batch * g.channels;
  std::vector<float> rc = ReciprocalCounts(g.height, g.width, radius);
  // pass 1: A[b,c] = sum(dy * (pool(x) - x)), the gradient of the plane's scalar factor
  std::vector<double> a(planes);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pooled(g.plane), tmp(g.plane);
    for (int64_t p = begin; p < end; ++p) {
      const float *src = x + p * g.plane;
      const float *grad = dy + p * g.plane;
      BoxSum(src, pooled.data(), tmp.data(), g.height, g.width, radius);
      double total = 0;
      for (int64_t i = 0; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        float part = 0;
        for (int64_t j = i; j < stop; ++j) part += grad[j] * (pooled[j] * rc[j] - src[j]);
        total += part;
      }
      a[p] = total;
    }
  });
  // d rstd_b / d x = -rstd_b^3 (x - mean_b) / N
  std::vector<float> coef(g.batch);
  for (int64_t c = 0; c < g.channels; ++c) {
    double s = 0;
    for (int64_t b = 0; b < g.batch; ++b) s += drop[b] * rstd[b] * a[b * g.channels + c];
    dscale[c] = static_cast<float>(s);
  }
  for (int64_t b = 0; b < g.batch; ++b) {
    double dr = 0;
    for (int64_t c = 0; c < g.channels; ++c) dr += drop[b] * scale[c] * a[b * g.channels + c];
    double r = rstd[b];
    coef[b] = static_cast<float>(-dr * r * r * r / g.sample);
  }
  // pass 2: dx = dy + k * (pool^T(dy) - dy) + coef_b * (x - mean_b), pool^T(t) = boxsum(t / count)
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weighted(g.plane), pooled(g.plane), tmp(g.plane);
    for (int64_t p = begin; p < end; ++p) {
      int64_t b = p / g.channels, c = p % g.channels;
      const float k = drop[b] * scale[c] * rstd[b];
      const float cb = coef[b], mb = mean[b];
      const float *src = x + p * g.plane;
      const float *grad = dy + p * g.plane;
      float *out = dx + p * g.plane;
      for (int64_t i = 0; i < g.plane; ++i) weighted[i] = grad[i] * rc[i];
      BoxSum(weighted.data(), pooled.data(), tmp.data(), g.height, g.width, radius);
      for (int64_t i = 0; i < g.plane; ++i) out[i] = grad[i] + k * (pooled[i] - grad[i]) + cb * (src[i] - mb);
    }
  });
  return 0;
}

// inputs: x (B,C,H,W); outputs: n, mean (B), rstd (B)
int Normalize(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  float *n = static_cast<float *>(params[1]);
  float *mean = static_cast<float *>(params[2]);
  float *rstd = static_cast<float *>(params[3]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  SampleStats(x, g, kEps, mean, rstd);
  ParallelFor(g.batch * g.sample, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      int64_t b = i / g.sample;
      int64_t stop = std::min(end, (b + 1) * g.sample);
      const float m = mean[b], r = rstd[b];
      for (int64_t j = i; j < stop; ++j) n[j] = (x[j] - m) * r;
      i = stop;
    }
  });
  return 0;
}

// inputs: n (B,C,H,W), rstd (B), dn; outputs: dx = rstd * (dn - mean(dn) - n * mean(dn * n))
int NormalizeGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *n = static_cast<const float *>(params[0]);
  const float *rstd = static_cast<const float *>(params[1]);
  const float *dn = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  const int64_t planes = g.batch * g.channels;
  std::vector<double> s1(planes), s2(planes);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float *v = n + p * g.plane;
      const float *d = dn + p * g.plane;
      double a = 0, b = 0;
      for (int64_t i = 0; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        float fa = 0, fb = 0;
        for (int64_t j = i; j < stop; ++j) {
          fa += d[j];
          fb += d[j] * v[j];
        }
        a += fa;
        b += fb;
      }
      s1[p] = a;
      s2[p] = b;
    }
  });
  std::vector<float> m1(g.batch), m2(g.batch);
  for (int64_t b = 0; b < g.batch; ++b) {
    double a = 0, c2 = 0;
    for (int64_t c = 0; c < g.channels; ++c) {
      a += s1[b * g.channels + c];
      c2 += s2[b * g.channels + c];
    }
    m1[b] = static_cast<float>(a / g.sample);
    m2[b] = static_cast<float>(c2 / g.sample);
  }
  ParallelFor(g.batch * g.sample, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      int64_t b = i / g.sample;
      int64_t stop = std::min(end, (b + 1) * g.sample);
      const float r = rstd[b], a = m1[b], c2 = m2[b];
      for (int64_t j = i; j < stop; ++j) dx[j] = r * (dn[j] - a - n[j] * c2);
      i = stop;
    }
  });
  return 0;
}

// inputs: acc (B,K,H,W), bias (K); outputs: h = z * (erf(z) + 1), z = acc + bias
int GeluBias(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *acc = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  float *h = static_cast<float *>(params[2]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  ParallelFor(g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float b = bias[p % g.channels];
      const float *src = acc + p * g.plane;
      float *dst = h + p * g.plane;
      for (int64_t i = 0; i < g.plane; ++i) {
        float z = src[i] + b;
        dst[i] = z * (Erf(z) + 1.f);
      }
    }
  });
  return 0;
}

// inputs: acc, bias, dh; outputs: dacc = dh * (erf(z) + 1 + z * 2/sqrt(pi) * exp(-z^2)), dbias (K)
int GeluBiasGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *acc = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  const float *dh = static_cast<const float *>(params[2]);
  float *dacc = static_cast<float *>(params[3]);
  float *dbias = static_cast<float *>(params[4]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  const int64_t planes = g.batch * g.channels;
  std::vector<double> sums(planes);
  constexpr float kTwoOverSqrtPi = 1.12837916709551257f;
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float b = bias[p % g.channels];
      const float *src = acc + p * g.plane;
      const float *grad = dh + p * g.plane;
      float *dst = dacc + p * g.plane;
      for (int64_t i = 0; i < g.plane; ++i) {
        float z = src[i] + b;
        dst[i] = grad[i] * (Erf(z) + 1.f + z * kTwoOverSqrtPi * ExpNonPositive(-z * z));
      }
      double total = 0;
      for (int64_t i = 0; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        float part = 0;
        for (int64_t j = i; j < stop; ++j) part += dst[j];
        total += part;
      }
      sums[p] = total;
    }
  });
  for (int64_t c = 0; c < g.channels; ++c) {
    double s = 0;
    for (int64_t b = 0; b < g.batch; ++b) s += sums[b * g.channels + c];
    dbias[c] = static_cast<float>(s);
  }
  return 0;
}

// inputs: y (B,C,H,W), acc (B,C,H,W), bias (C), drop (B); outputs: out = y + drop_b * (acc + bias_c)
int ResidualBias(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *y = static_cast<const float *>(params[0]);
  const float *acc = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  const float *drop = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  if (ndims[0] != 4) return 1;
  Planes g(shapes[0]);
  ParallelFor(g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float d = drop[p / g.channels], b = bias[p % g.channels];
      const int64_t offset = p * g.plane;
      for (int64_t i = 0; i < g.plane; ++i) out[offset + i] = y[offset + i] + d * (acc[offset + i] + b);
    }
  });
  return 0;
}

// inputs: drop (B), dout (B,C,H,W); outputs: dacc = drop_b * dout, dbias (C) = sum of dacc
int ResidualBiasGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *drop = static_cast<const float *>(params[0]);
  const float *dout = static_cast<const float *>(params[1]);
  float *dacc = static_cast<float *>(params[2]);
  float *dbias = static_cast<float *>(params[3]);
  if (ndims[1] != 4) return 1;
  Planes g(shapes[1]);
  const int64_t planes = g.batch * g.channels;
  std::vector<double> sums(planes);
  ParallelFor(planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float d = drop[p / g.channels];
      const float *src = dout + p * g.plane;
      float *dst = dacc + p * g.plane;
      double total = 0;
      for (int64_t i = 0; i < g.plane; i += 1024) {
        int64_t stop = std::min<int64_t>(g.plane, i + 1024);
        float part = 0;
        for (int64_t j = i; j < stop; ++j) {
          dst[j] = d * src[j];
          part += dst[j];
        }
        total += part;
      }
      sums[p] = total;
    }
  });
  for (int64_t c = 0; c < g.channels; ++c) {
    double s = 0;
    for (int64_t b = 0; b < g.batch; ++b) s += sums[b * g.channels + c];
    dbias[c] = static_cast<float>(s);
  }
  return 0;
}

}  // extern "C"
