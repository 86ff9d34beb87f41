// uniformer_fast._C: the CPU attention kernels (attention.cpp), bound in dwconv3d.cpp's module.
#pragma once

#include <cstdint>

namespace uf {

// Whether this build and CPU run attention_fwd in float32 (AVX-512, or AVX2 + FMA if avx2) or,
// with bf16, in bfloat16 (AVX512-BF16; never with avx2).
bool attention_supported(bool bf16, bool avx2);

// out (B, N, heads * D) dense = softmax(scale * q k^T) v per (batch, head), q, k, v read from
// qkv (B, N, 3, heads, D) with batch stride sqb and token stride sqn (elements), unit stride inside
// a token; float32, or bfloat16 (bits as uint16) if bf16. D a multiple of 32 up to 256. The AVX-512
// kernels, or the AVX2 + FMA ones (float32) if avx2.
void attention_fwd(std::uintptr_t qkv, std::uintptr_t out, long B, long N, long heads, long D, long sqb,
                   long sqn, bool bf16, bool avx2, double scale, long threads);

}  // namespace uf
