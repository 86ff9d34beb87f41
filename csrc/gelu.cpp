// uniformer_fast._C: the exact GELU in place, float32, one pass over memory; ops.linear's "cpp"
// backend runs it on the matmul's output below AVX-512 (see gelu_impl.h for the approximation).
#include "gelu.h"

#include <algorithm>
#include <stdexcept>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace avx512 {
#define UF_VLEN 16
#include "gelu_impl.h"
#undef UF_VLEN
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define UF_VLEN 8
#include "gelu_impl.h"
#undef UF_VLEN
}  // namespace avx2
#pragma GCC pop_options
#define UF_GELU_X86 1
#endif

namespace generic {
#define UF_VLEN 4
#include "gelu_impl.h"
#undef UF_VLEN
}  // namespace generic

namespace uf {

namespace {

void (*span_for(const std::string& isa))(float*, long) {
#ifdef UF_GELU_X86
    if (isa == "avx512") return avx512::gelu_span;
    if (isa == "avx2") return avx2::gelu_span;
#endif
    if (isa == "generic") return generic::gelu_span;
    throw std::invalid_argument("gelu: ISA '" + isa + "' is not built on this platform");
}

}  // namespace

void gelu_inplace(std::uintptr_t x_p, long n, const std::string& isa, long threads) {
    void (*span)(float*, long) = span_for(isa);
    float* x = reinterpret_cast<float*>(x_p);
    // Chunks of 16K floats (64 KiB) split evenly over the threads; a thread per 64K elements at
    // most, since waking one costs more than a small tensor's work.
    constexpr long CHUNK = 1L << 14;
    const long nchunk = (n + CHUNK - 1) / CHUNK;
    const int nthreads = (int)std::max(1L, std::min({threads, nchunk, n >> 16, 1024L}));
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long ch = 0; ch < nchunk; ++ch) span(x + ch * CHUNK, std::min(CHUNK, n - ch * CHUNK));
}

}  // namespace uf
