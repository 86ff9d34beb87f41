// Compiles one kernel family once per instruction set: the file named by UF_ISA_IMPL (a string
// literal, e.g. "gelu_impl.h") is included inside `namespace avx512 { ... }` and
// `namespace avx2 { ... }` under a `#pragma GCC target(...)` (x86-64 with GCC, UF_X86_VARIANTS), and
// inside `namespace generic { ... }`, with UF_VLEN the number of float lanes of that set's vectors.
// UF_FOR_ISA(sym) (isa.h) then picks the current ISA's one. The targets match the CPU features the
// ISA table (module.cpp) requires of each set. No include guard: one inclusion per family.
#include "isa.h"

#ifndef UF_ISA_IMPL
#error "define UF_ISA_IMPL as the kernel family's header before including per_isa.h"
#endif

#ifdef UF_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2")
namespace avx512 {
#define UF_VLEN 16
#include UF_ISA_IMPL
#undef UF_VLEN
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
namespace avx2 {
#define UF_VLEN 8
#include UF_ISA_IMPL
#undef UF_VLEN
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace generic {
#define UF_VLEN 4
#include UF_ISA_IMPL
#undef UF_VLEN
}  // namespace generic
