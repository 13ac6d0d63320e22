// Runtime ISA dispatch for the CPU kernels: one build serves every x86-64, and the loader
// picks the widest clone of a TK_CPU_CLONES function that the CPU supports (GCC/Clang
// target_clones through an ifunc). Elsewhere the attribute is empty.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define TK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TK_CPU_CLONES
#endif
