// uniformer_fast._C: the exact GELU in place (gelu.cpp), bound in dwconv3d.cpp's module.
#pragma once

#include <cstdint>
#include <string>

namespace uf {

// x[0 .. n) = gelu(x) (float32, exact erf form, max |error| 2.4e-7 max(|x|, 1)) with the kernels of
// instruction set isa ("avx512", "avx2" or "generic"), on up to threads threads. The caller checks
// that this CPU runs isa (the module's binding, against its ISA table).
void gelu_inplace(std::uintptr_t x, long n, const std::string& isa, long threads);

}  // namespace uf
