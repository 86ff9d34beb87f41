// uniformer_fast._C: every binding of the extension, and the one instruction-set (ISA) choice its
// kernels run with (isa.h).
//
// Built without torch's headers: Python validates the tensors and passes data pointers (as
// integers), sizes, strides (in elements) and a thread count, so the binary does not depend on the
// torch version. The kernels are compiled for AVX-512, AVX2+FMA and the baseline x86-64 / other
// architectures (per_isa.h; attention has AVX-512 and AVX2 kernels only), and the best set this
// build and CPU support is picked at import (override: UNIFORMER_FAST_ISA=avx512|avx2|generic, or
// _C.set_isa()); every kernel entry runs with it.
#include <pybind11/pybind11.h>

#include "attention.h"
#include "dwconv3d.h"
#include "gelu.h"
#include "isa.h"

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

struct IsaEntry {
    uf::Isa isa;
    const char* name;
    bool (*supported)();  // by this build and CPU
};

bool always() { return true; }
#ifdef UF_X86_VARIANTS
bool has_avx512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
}
bool has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
}
#else
bool has_avx512() { return false; }  // not built: generic only
bool has_avx2() { return false; }
#endif

// Most preferred first, in the order of uf::Isa.
const IsaEntry kIsas[] = {
    {uf::Isa::avx512, "avx512", has_avx512},
    {uf::Isa::avx2, "avx2", has_avx2},
    {uf::Isa::generic, "generic", always},
};

const IsaEntry* g_isa = &kIsas[2];  // generic until init_isa()

const IsaEntry* find_isa(const std::string& name) {
    for (const IsaEntry& e : kIsas)
        if (name == e.name) return &e;
    return nullptr;
}

py::list supported_isas() {
    py::list out;
    for (const IsaEntry& e : kIsas)
        if (e.supported()) out.append(e.name);
    return out;
}

std::string set_isa(const std::string& name) {
    const IsaEntry* e = find_isa(name);
    if (!e) throw std::invalid_argument("unknown ISA '" + name + "' (known: avx512, avx2, generic)");
    if (!e->supported()) throw std::invalid_argument("this CPU does not support ISA '" + name + "'");
    std::string previous = g_isa->name;
    g_isa = e;
    return previous;
}

void init_isa() {
    for (const IsaEntry& e : kIsas)
        if (e.supported()) { g_isa = &e; break; }
    if (const char* env = std::getenv("UNIFORMER_FAST_ISA"); env && *env) set_isa(env);
}

bool has_openmp() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

}  // namespace

namespace uf {

Isa current_isa() { return g_isa->isa; }

const char* isa_name(Isa isa) { return kIsas[static_cast<int>(isa)].name; }

}  // namespace uf

PYBIND11_MODULE(_C, m) {
    m.doc() = "uniformer_fast CPU kernels: depthwise 3-D convolution on channels-last float32, attention on packed qkv, "
              "GELU in place "
              "(data pointers, sizes and element strides in; no torch headers)";
    init_isa();
    m.def("dwconv3d_fwd", &uf::dwconv3d_fwd, py::call_guard<py::gil_scoped_release>(),
          py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"),
          py::arg("B"), py::arg("C"), py::arg("T"), py::arg("H"), py::arg("W"),
          py::arg("kt"), py::arg("kh"), py::arg("kw"),
          py::arg("sxb"), py::arg("sxt"), py::arg("sxh"), py::arg("sxw"),
          py::arg("swc"), py::arg("swt"), py::arg("swh"), py::arg("sww"), py::arg("sbc"),
          py::arg("flip"), py::arg("residual"), py::arg("threads"),
          "y (B,T,H,W,C) contiguous = depthwise conv of x (B,T,H,W,C; strides sxb..sxw, unit C "
          "stride) with weight (C,1,kt,kh,kw; strides swc..sww; reflected if flip) + bias (C,; "
          "stride sbc) or 0 (+ x if residual).");
    m.def("dwconv3d_bwd", &uf::dwconv3d_bwd, py::call_guard<py::gil_scoped_release>(),
          py::arg("x"), py::arg("grad_y"), py::arg("weight"), py::arg("grad_x"), py::arg("grad_weight"),
          py::arg("grad_bias"), py::arg("B"), py::arg("C"), py::arg("T"), py::arg("H"), py::arg("W"),
          py::arg("kt"), py::arg("kh"), py::arg("kw"),
          py::arg("sxb"), py::arg("sxt"), py::arg("sxh"), py::arg("sxw"),
          py::arg("swc"), py::arg("swt"), py::arg("swh"), py::arg("sww"), py::arg("residual"), py::arg("threads"),
          "One pass: grad_x (B,T,H,W,C contiguous; 0 to skip; + grad_y if residual), grad_weight "
          "(C,1,kt,kh,kw contiguous) and grad_bias (C,; 0 to skip) from x (strided, unit C stride), "
          "grad_y (B,T,H,W,C contiguous) and weight (strides swc..sww); bitwise the same for any "
          "thread count.");
    m.def("attention_fwd", &uf::attention_fwd, py::call_guard<py::gil_scoped_release>(),
          py::arg("qkv"), py::arg("out"), py::arg("B"), py::arg("N"), py::arg("heads"), py::arg("D"),
          py::arg("sqb"), py::arg("sqn"), py::arg("bf16"), py::arg("scale"), py::arg("threads"),
          "out (B,N,heads*D) dense = softmax(scale q k^T) v per head, from qkv (B,N,3,heads,D; batch and "
          "token strides sqb, sqn; unit stride in a token); float32, or bfloat16 bits if bf16; the kernels "
          "of the current instruction set: AVX-512, or AVX2 + FMA (float32 only).");
    m.def("attention_supported", &uf::attention_supported, py::arg("bf16"),
          "Whether this build and CPU run attention_fwd (in bfloat16 if bf16) with the current instruction set.");
    m.def("gelu_inplace", &uf::gelu_inplace, py::call_guard<py::gil_scoped_release>(),
          py::arg("x"), py::arg("n"), py::arg("threads"),
          "x[0 .. n) = gelu(x) in place (float32, dense; the exact erf form to 2.4e-7 max(|x|, 1)) with "
          "the kernels of the current instruction set.");
    m.def("isa", []() { return std::string(g_isa->name); }, "The instruction set the kernels run with.");
    m.def("supported_isas", &supported_isas, "Instruction sets this CPU can run, best first.");
    m.def("set_isa", &set_isa, py::arg("name"), "Select the kernels' instruction set; returns the previous one.");
    m.def("has_openmp", &has_openmp);
}
