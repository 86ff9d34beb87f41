// uniformer_fast._C: the exact GELU in place (gelu.cpp), bound in module.cpp.
#pragma once

#include <cstdint>

namespace uf {

// x[0 .. n) = gelu(x) (float32, exact erf form, max |error| 2.4e-7 max(|x|, 1)) with the kernels of
// the current instruction set (isa.h), on up to threads threads.
void gelu_inplace(std::uintptr_t x, long n, long threads);

}  // namespace uf
