// uniformer_fast._C: the one instruction-set (ISA) choice every kernel entry runs with. The table
// (module.cpp) picks the best set this build and CPU support at import; UNIFORMER_FAST_ISA and
// _C.set_isa() override it. Kernel files read it through current_isa() and run their variant for
// it (per_isa.h compiles a family of them; UF_FOR_ISA picks one).
#pragma once

// x86-64 with GCC: AVX-512 and AVX2 variants under #pragma GCC target; elsewhere generic only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define UF_X86_VARIANTS 1
#endif

namespace uf {

// Most preferred first.
enum class Isa { avx512, avx2, generic };

// The instruction set the kernels run with now (set at import; see module.cpp).
Isa current_isa();

// "avx512", "avx2" or "generic".
const char* isa_name(Isa isa);

}  // namespace uf

// The variant of sym, one per namespace avx512 / avx2 / generic (per_isa.h), for the current ISA.
#ifdef UF_X86_VARIANTS
#define UF_FOR_ISA(sym)                                           \
    (::uf::current_isa() == ::uf::Isa::avx512 ? ::avx512::sym     \
     : ::uf::current_isa() == ::uf::Isa::avx2 ? ::avx2::sym       \
                                              : ::generic::sym)
#else
#define UF_FOR_ISA(sym) (::generic::sym)
#endif
