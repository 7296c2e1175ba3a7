// PIL's affine transform (Image.transform(size, AFFINE, matrix, BILINEAR | BICUBIC, fillcolor=...)) of an
// HWC uint8 RGB image, pixel for pixel: the arithmetic of Pillow's libImaging/Geometry.c
// (affine_transform, bilinear_filter32RGB, bicubic_filter32RGB), in the same double operations and the
// same order, so the results are bit-identical. Built with -ffp-contract=off: a fused multiply-add
// would round differently from Pillow's separate multiply and add.
//
// Why not PIL itself: Pillow calls two function pointers per pixel and always runs the 4x4 bicubic
// sum, ~48 ns per pixel (2.4 ms for a 224x224 crop). RandAugment's translate and shear matrices make
// one of the two interpolation offsets exactly 0.0 for every pixel; then Pillow's sum reduces, exactly,
// to one 4-tap cubic (p1 + 0.0 * q == p1), which is what the branches below compute.

#include <cmath>
#include <cstdint>

namespace {

inline int floor_int(double v) { return v < 0.0 ? static_cast<int>(std::floor(v)) : static_cast<int>(v); }
inline int clip_index(int v, int n) { return v < 0 ? 0 : (v < n ? v : n - 1); }

// Geometry.c's BICUBIC macro: on integer samples (T = int) p2..p4 in int arithmetic, as there (UINT8
// promotes to int); on the doubles of the first pass (T = double) in double.
template <typename T>
inline double cubic(T v1, T v2, T v3, T v4, double d) {
  double p1 = v2;
  double p2 = -v1 + v3;
  double p3 = 2 * (v1 - v2) + v3 - v4;
  double p4 = -v1 + v2 - v3 + v4;
  return p1 + d * (p2 + d * (p3 + d * p4));
}

inline uint8_t clamp_cubic(double v) {
  if (v <= 0.0) return 0;
  if (v >= 255.0) return 255;
  return static_cast<uint8_t>(v);
}

void bicubic_pixel(const uint8_t* in, int h, int w, double xin, double yin, uint8_t* out) {
  xin -= 0.5;
  yin -= 0.5;
  int x = floor_int(xin);
  int y = floor_int(yin);
  const double dx = xin - x;
  const double dy = yin - y;
  x--;
  y--;
  const int c0 = clip_index(x, w) * 3, c1 = clip_index(x + 1, w) * 3, c2 = clip_index(x + 2, w) * 3,
            c3 = clip_index(x + 3, w) * 3;
  const long stride = 3L * w;
  if (dy == 0.0) {  // Pillow's vertical pass returns its second row: row y + 1, in range here
    const uint8_t* row = in + (y + 1) * stride;
    for (int b = 0; b < 3; ++b) {
      out[b] = dx == 0.0 ? row[c1 + b] : clamp_cubic(cubic<int>(row[c0 + b], row[c1 + b], row[c2 + b], row[c3 + b], dx));
    }
    return;
  }
  const uint8_t* r0 = in + clip_index(y, h) * stride;
  const bool has1 = y + 1 >= 0 && y + 1 < h, has2 = y + 2 >= 0 && y + 2 < h, has3 = y + 3 >= 0 && y + 3 < h;
  for (int b = 0; b < 3; ++b) {
    double v1, v2, v3, v4;
    if (dx == 0.0) {  // each row's horizontal pass returns its second sample
      v1 = r0[c1 + b];
      v2 = has1 ? static_cast<double>(in[(y + 1) * stride + c1 + b]) : v1;
      v3 = has2 ? static_cast<double>(in[(y + 2) * stride + c1 + b]) : v2;
      v4 = has3 ? static_cast<double>(in[(y + 3) * stride + c1 + b]) : v3;
    } else {
      v1 = cubic<int>(r0[c0 + b], r0[c1 + b], r0[c2 + b], r0[c3 + b], dx);
      if (has1) {
        const uint8_t* r = in + (y + 1) * stride;
        v2 = cubic<int>(r[c0 + b], r[c1 + b], r[c2 + b], r[c3 + b], dx);
      } else {
        v2 = v1;
      }
      if (has2) {
        const uint8_t* r = in + (y + 2) * stride;
        v3 = cubic<int>(r[c0 + b], r[c1 + b], r[c2 + b], r[c3 + b], dx);
      } else {
        v3 = v2;
      }
      if (has3) {
        const uint8_t* r = in + (y + 3) * stride;
        v4 = cubic<int>(r[c0 + b], r[c1 + b], r[c2 + b], r[c3 + b], dx);
      } else {
        v4 = v3;
      }
    }
    out[b] = clamp_cubic(cubic<double>(v1, v2, v3, v4, dy));
  }
}

void bilinear_pixel(const uint8_t* in, int h, int w, double xin, double yin, uint8_t* out) {
  xin -= 0.5;
  yin -= 0.5;
  const int x = floor_int(xin);
  const int y = floor_int(yin);
  const double dx = xin - x;
  const double dy = yin - y;
  const long stride = 3L * w;
  const int x0 = clip_index(x, w) * 3, x1 = clip_index(x + 1, w) * 3;
  const uint8_t* r0 = in + clip_index(y, h) * stride;
  const bool has1 = y + 1 >= 0 && y + 1 < h;
  const uint8_t* r1 = has1 ? in + (y + 1) * stride : r0;
  for (int b = 0; b < 3; ++b) {
    double v1 = r0[x0 + b] + (r0[x1 + b] - r0[x0 + b]) * dx;
    double v2 = has1 ? r1[x0 + b] + (r1[x1 + b] - r1[x0 + b]) * dx : v1;
    v1 = v1 + (v2 - v1) * dy;
    out[b] = static_cast<uint8_t>(v1);
  }
}

}  // namespace

extern "C" {

// out (h x w x 3) = in (h x w x 3) under the inverse map `a` (Pillow's data tuple), pixels that map outside
// the image set to `fill`. filter: 2 = bilinear, 3 = bicubic (PIL's numbers). Returns 0, or -1 for another filter.
int MindcvAffineRgb(const uint8_t* in, int h, int w, const double* a, int filter, const uint8_t* fill, uint8_t* out) {
  if (filter != 2 && filter != 3) return -1;
  const double a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], a4 = a[4], a5 = a[5];
  for (int y = 0; y < h; ++y) {
    uint8_t* dst = out + 3L * w * y;
    for (int x = 0; x < w; ++x, dst += 3) {
      const double xin = x + 0.5;
      const double yin = y + 0.5;
      const double xx = a0 * xin + a1 * yin + a2;
      const double yy = a3 * xin + a4 * yin + a5;
      if (xx < 0.0 || xx >= w || yy < 0.0 || yy >= h) {
        dst[0] = fill[0];
        dst[1] = fill[1];
        dst[2] = fill[2];
      } else if (filter == 3) {
        bicubic_pixel(in, h, w, xx, yy, dst);
      } else {
        bilinear_pixel(in, h, w, xx, yy, dst);
      }
    }
  }
  return 0;
}

}  // extern "C"
