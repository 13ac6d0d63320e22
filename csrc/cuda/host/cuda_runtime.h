// A stand-in for the CUDA runtime that runs the CUDA kernels' own source on the CPU, so
// their indexing, tiling and tables are tested where no GPU is (tests/kernels/test_cuda_host.py).
//
// Built only with -DTK_CUDA_HOST and this directory first on the include path, in place of
// the real <cuda_runtime.h>. A launch runs its blocks one after another; the threads of a
// block are fibers (ucontext) on the calling thread, switched at __syncthreads, so shared
// memory and barriers mean what they mean on a GPU and every run is deterministic. Device
// memory is host memory: "device" pointers are the addresses of CPU tensors.
//
// What it cannot show: device-only numerics (CUDA's pow, fast-math), timing, races between
// blocks (they run in turn; a position written by two blocks shows up as a wrong value).
#pragma once

#ifndef TK_CUDA_HOST
#error "this header stands in for cuda_runtime.h in host builds only (-DTK_CUDA_HOST)"
#endif

#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Blocks run one at a time, so one static object per kernel is the block's shared memory.
#define __shared__ static
#define CUDART_VERSION 13000

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// CUDA's vector types, with their alignment (the 16-byte path relies on it).
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

// The running fiber's coordinates (one OS thread runs every fiber of a launch).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

namespace tk_host {

constexpr size_t kStackBytes = 64 * 1024;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  const std::function<void()>* body = nullptr;
  size_t current = 0;
};

inline Block& block() {
  static Block b;
  return b;
}

inline void fiber_main() {
  Block& b = block();
  (*b.body)();
  b.fibers[b.current].done = true;
  // returning ends the fiber: uc_link goes back to the scheduler
}

// Every thread of the block reaches the barrier (or has returned) before any goes on.
inline void syncthreads() {
  Block& b = block();
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Run `body` (the kernel call) for every thread of every block of the grid.
inline void launch(dim3 grid, dim3 threads, const std::function<void()>& body) {
  Block& b = block();
  const size_t n = static_cast<size_t>(threads.x) * threads.y * threads.z;
  if (b.fibers.size() < n) b.fibers.resize(n);
  b.body = &body;
  gridDim = grid;
  blockDim = threads;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        for (size_t t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          if (f.stack.empty()) f.stack.resize(kStackBytes);
          f.done = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = &b.scheduler;
          makecontext(&f.context, fiber_main, 0);
        }
        // Round after round, each live thread runs to its next barrier or its end.
        bool live = true;
        while (live) {
          live = false;
          for (size_t t = 0; t < n; ++t) {
            if (b.fibers[t].done) continue;
            b.current = t;
            threadIdx = dim3(static_cast<unsigned>(t % threads.x),
                             static_cast<unsigned>(t / threads.x % threads.y),
                             static_cast<unsigned>(t / (threads.x * threads.y)));
            swapcontext(&b.scheduler, &b.fibers[t].context);
            live = live || !b.fibers[t].done;
          }
        }
      }
    }
  }
  b.body = nullptr;
}

}  // namespace tk_host

#define __syncthreads() ::tk_host::syncthreads()

// ---- the runtime API the bindings and launchers use ------------------------------------
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorInvalidValue = 1 };
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1,
                      cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "error (host stand-in)";
}
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  *p = std::malloc(bytes == 0 ? 1 : bytes);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
