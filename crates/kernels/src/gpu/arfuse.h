// arfuse.h: the portability header of the arfuse kernels (one source for CUDA and HIP).
//
// Header-free: compiles under NVRTC (which has no cuda_fp16.h/cuda_bf16.h), under clang -x hip
// with -nogpuinc -nogpulib (clang builtins only), and under hipRTC. Everything vendor-specific is
// here: thread ids, the warp (wavefront) width and shuffles, barriers, system-scope atomics and
// fences, the deadline clock, IEEE division and square root, global pointers, dynamic shared memory.
// The warp width is never assumed: 32 on NVIDIA, 64 on gfx90a/gfx942/gfx950.
#ifndef ARFUSE_H
#define ARFUSE_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
static_assert(sizeof(u16) == 2 && sizeof(u32) == 4 && sizeof(u64) == 8, "fixed-width integers");

#if defined(__HIP__) || defined(__HIPCC_RTC__)
#define ARFUSE_HIP 1
#elif defined(__CUDACC__)
#define ARFUSE_CUDA 1
#else
#error "arfuse.h: compile as CUDA (NVRTC, nvcc) or as HIP (clang -x hip, hipRTC)"
#endif

#if defined(ARFUSE_HIP)
// ---------------------------------------------------------------------------------- AMD (HIP)
// clang -x hip -nogpuinc predefines nothing but the attributes; hipRTC predefines these names.
#ifndef __global__
#define __global__ __attribute__((global))
#endif
#ifndef __device__
#define __device__ __attribute__((device))
#endif
#ifndef __shared__
#define __shared__ __attribute__((shared))
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
// The most threads per block a kernel is launched with (registers are allocated for it).
#define ARFUSE_LAUNCH_BOUNDS(threads) __attribute__((amdgpu_flat_work_group_size(1, threads)))
// Pointers into device memory (ours or a peer's) are marked global (address space 1), so that
// accesses through them are global_load/global_store, not the slower flat_ ones a pointer loaded
// from memory would otherwise get.
#define ARFUSE_GLOBAL __attribute__((address_space(1)))

__device__ __forceinline__ u32 tid_x() { return __builtin_amdgcn_workitem_id_x(); }
__device__ __forceinline__ u32 bid_x() { return __builtin_amdgcn_workgroup_id_x(); }
// Block and grid sizes from the HSA dispatch packet (workgroup_size_x: u16 at byte 4,
// grid_size_x: u32 at byte 12, in work-items).
__device__ __forceinline__ u32 bdim_x() {
  return ((const __attribute__((address_space(4))) u16*)__builtin_amdgcn_dispatch_ptr())[2];
}
__device__ __forceinline__ u32 gdim_x() {
  return ((const __attribute__((address_space(4))) u32*)__builtin_amdgcn_dispatch_ptr())[3] / bdim_x();
}
__device__ __forceinline__ u32 warp_size() { return __builtin_amdgcn_wavefrontsize(); }
__device__ __forceinline__ u32 lane_id() { return __builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u)); }
// `v` of lane `lane_id() + delta` (wrapping); every lane of the wavefront must be active.
__device__ __forceinline__ float shfl_down_f32(float v, u32 delta) {
  return __builtin_bit_cast(float, __builtin_amdgcn_ds_bpermute((i32)((lane_id() + delta) << 2), __builtin_bit_cast(i32, v)));
}
__device__ __forceinline__ void block_sync() {
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup");
  __builtin_amdgcn_s_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");
}
// System-scope fences ("" is the system scope of __builtin_amdgcn_fence).
__device__ __forceinline__ void fence_release_sys() { __builtin_amdgcn_fence(__ATOMIC_RELEASE, ""); }
__device__ __forceinline__ void fence_acquire_sys() { __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, ""); }
__device__ __forceinline__ void store_release_sys(ARFUSE_GLOBAL u64* p, u64 v) {
  __hip_atomic_store(p, v, __ATOMIC_RELEASE, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ void store_relaxed_sys(ARFUSE_GLOBAL u64* p, u64 v) {
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ u64 load_relaxed_sys(ARFUSE_GLOBAL u64* p) {
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
// Nanoseconds from s_memrealtime, which ticks at a constant 100 MHz on gfx9.
__device__ __forceinline__ u64 clock_ns() { return __builtin_amdgcn_s_memrealtime() * 10ull; }
__device__ __forceinline__ float f32_from_bits(u32 b) { return __builtin_bit_cast(float, b); }
__device__ __forceinline__ u32 bits_from_f32(float f) { return __builtin_bit_cast(u32, f); }
// IEEE-rounded: clang compiles HIP's f32 division and sqrt correctly rounded
// (-fhip-fp32-correctly-rounded-divide-sqrt, on by default and passed explicitly).
__device__ __forceinline__ float div_rn(float a, float b) { return a / b; }
__device__ __forceinline__ float sqrt_rn(float a) { return __builtin_sqrtf(a); }
// 16 bytes: one global_load_dwordx4 / global_store_dwordx4.
typedef u32 pack16 __attribute__((ext_vector_type(4)));
// The dynamic shared memory of the launch.
#define ARFUSE_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

#else
// -------------------------------------------------------------------------------- NVIDIA (CUDA)
// The most threads per block a kernel is launched with (registers are allocated for it).
#define ARFUSE_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
// NVVM infers the global state space for pointers taken from the kernel's parameters (as long as
// the parameter block is never copied to local memory: index it with constants only).
#define ARFUSE_GLOBAL

__device__ __forceinline__ u32 tid_x() { return threadIdx.x; }
__device__ __forceinline__ u32 bid_x() { return blockIdx.x; }
__device__ __forceinline__ u32 bdim_x() { return blockDim.x; }
__device__ __forceinline__ u32 gdim_x() { return gridDim.x; }
__device__ __forceinline__ u32 warp_size() { return warpSize; }
__device__ __forceinline__ u32 lane_id() {
  u32 lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}
// `v` of lane `lane_id() + delta`; every lane of the warp must be active.
__device__ __forceinline__ float shfl_down_f32(float v, u32 delta) { return __shfl_down_sync(0xffffffffu, v, delta); }
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ void fence_release_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_acquire_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void store_release_sys(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void store_relaxed_sys(u64* p, u64 v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 load_relaxed_sys(u64* p) {
  u64 v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
// Nanoseconds from the global timer.
__device__ __forceinline__ u64 clock_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ float f32_from_bits(u32 b) { return __uint_as_float(b); }
__device__ __forceinline__ u32 bits_from_f32(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
// 16 bytes: one ld.global.v4.u32 / st.global.v4.u32.
typedef uint4 pack16;
#define ARFUSE_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// ------------------------------------------- The launch parameters: a mirror of params.rs.
// Keep in step with crates/kernels/src/params.rs (a Rust test compares the constants below with
// the Rust ones; the static_asserts pin the layout; clang also checks the offsets).
#define ARFUSE_MAX_RANKS 8
#define ARFUSE_MAX_BLOCKS 256
#define ARFUSE_PACK_BYTES 16
#define ARFUSE_SIGNAL_FLAGS_OFFSET 0
#define ARFUSE_SIGNAL_ERROR_OFFSET (ARFUSE_MAX_BLOCKS * ARFUSE_MAX_RANKS * 8)
#define ARFUSE_SIGNAL_CALLS_OFFSET (ARFUSE_SIGNAL_ERROR_OFFSET + 64)
#define ARFUSE_CALL_WORDS 4
#define ARFUSE_SIGNAL_BYTES (64 * 1024)
// ErrorWord kinds (bits 0..8; peer in 8..16, barrier value in 16..64).
#define ARFUSE_ERROR_PEER_TIMEOUT 1ull
#define ARFUSE_ERROR_CALL_MISMATCH 2ull
// Block shapes, mirrored by source.rs (launch_config). A row kernel's thread keeps up to
// PACKS_PER_THREAD packs of its row in registers, so the longest row is 4096 packs (hidden 32768
// for bf16/f16, 16384 for f32) on every path: the local row kernels with up to 1024 threads x 4
// packs, the fused 1-stage kernel (which also holds every rank's pack while it sums) with up to
// 512 threads x 8 packs, so that it needs no more than 128 registers and never spills.
#define ARFUSE_MAX_ROW_PACKS 4096
#define ARFUSE_ROW_THREADS 1024
#define ARFUSE_ROW_PACKS_PER_THREAD 4
#define ARFUSE_FUSED_THREADS 512
#define ARFUSE_FUSED_PACKS_PER_THREAD 8
#define ARFUSE_ELEMENTWISE_THREADS 512
static_assert(ARFUSE_ROW_THREADS * ARFUSE_ROW_PACKS_PER_THREAD == ARFUSE_MAX_ROW_PACKS, "row kernel shape");
static_assert(ARFUSE_FUSED_THREADS * ARFUSE_FUSED_PACKS_PER_THREAD == ARFUSE_MAX_ROW_PACKS, "fused kernel shape");

struct LaunchParams {
  u64 staging[ARFUSE_MAX_RANKS];
  u64 scratch[ARFUSE_MAX_RANKS];
  u64 signals[ARFUSE_MAX_RANKS];
  u64 input, residual, weight, out, residual_out;
  u64 barrier_base;
  u64 deadline_ns;
  u32 rows, hidden, rank, world_size;
  float eps;
  u32 reserved[3];
};
static_assert(sizeof(LaunchParams) == 280, "LaunchParams layout differs from params.rs");
static_assert(ARFUSE_SIGNAL_CALLS_OFFSET + 2 * ARFUSE_MAX_RANKS * ARFUSE_CALL_WORDS * 8 <= ARFUSE_SIGNAL_BYTES,
              "signal area too small");
#if defined(ARFUSE_HIP)  // NVRTC's front end has no __builtin_offsetof; clang checks the offsets.
static_assert(__builtin_offsetof(LaunchParams, staging) == 0, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, scratch) == 64, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, signals) == 128, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, input) == 192, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, barrier_base) == 232, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, deadline_ns) == 240, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, rows) == 248, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, eps) == 264, "LaunchParams layout differs from params.rs");
#endif

#endif  // ARFUSE_H
