// uniformer_fast._C: the CPU attention kernels (attention.cpp), bound in module.cpp.
#pragma once

#include <cstdint>

namespace uf {

// Whether this build and CPU run attention_fwd with the current instruction set (isa.h): in float32
// on AVX-512 or AVX2 + FMA, in bfloat16 (bf16) on AVX-512 with AVX512-BF16 only; never on generic.
bool attention_supported(bool bf16);

// out (B, N, heads * D) dense = softmax(scale * q k^T) v per (batch, head), q, k, v read from
// qkv (B, N, 3, heads, D) with batch stride sqb and token stride sqn (elements), unit stride inside
// a token; float32, or bfloat16 (bits as uint16) if bf16. D a multiple of 32 up to 256. The kernels
// of the current instruction set: AVX-512, or AVX2 + FMA (float32); throws where
// attention_supported(bf16) is false.
void attention_fwd(std::uintptr_t qkv, std::uintptr_t out, long B, long N, long heads, long D, long sqb,
                   long sqn, bool bf16, double scale, long threads);

}  // namespace uf
