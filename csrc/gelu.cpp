// uniformer_fast._C: the exact GELU in place, float32, one pass over memory; ops.linear's "cpp"
// backend runs it on the matmul's output below AVX-512 (see gelu_impl.h for the approximation).
#include "gelu.h"

#include "isa.h"

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define UF_ISA_IMPL "gelu_impl.h"
#include "per_isa.h"
#undef UF_ISA_IMPL

namespace uf {

void gelu_inplace(std::uintptr_t x_p, long n, long threads) {
    void (*span)(float*, long) = UF_FOR_ISA(gelu_span);
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
