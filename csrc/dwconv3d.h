// uniformer_fast._C: depthwise 3-D convolution on channels-last float32 (dwconv3d.cpp), bound in
// module.cpp; both entries run with the current instruction set (isa.h).
#pragma once

#include <cstdint>

namespace uf {

// y (B, T, H, W, C) contiguous = depthwise conv of x (strides sxb .. sxw, unit channel stride) with
// weight (C, 1, kt, kh, kw; strides swc .. sww; point-reflected if flip) + bias (C,; stride sbc) or
// 0, + x if residual; on up to threads threads.
void dwconv3d_fwd(std::uintptr_t x_p, std::uintptr_t w_p, std::uintptr_t bias_p, std::uintptr_t y_p,
                  long B, long C, long T, long H, long W, int kt, int kh, int kw,
                  long sxb, long sxt, long sxh, long sxw, long swc, long swt, long swh, long sww, long sbc,
                  bool flip, bool residual, long threads);

// One pass: dx (0 to skip; + gy if residual), dweight and db (0 to skip) from x (strided), gy and
// weight; bitwise the same for any thread count.
void dwconv3d_bwd(std::uintptr_t x_p, std::uintptr_t gy_p, std::uintptr_t w_p, std::uintptr_t dx_p,
                  std::uintptr_t dw_p, std::uintptr_t db_p, long B, long C, long T, long H, long W,
                  int kt, int kh, int kw, long sxb, long sxt, long sxh, long sxw,
                  long swc, long swt, long swh, long sww, bool residual, long threads);

}  // namespace uf
