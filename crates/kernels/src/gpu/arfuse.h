// arfuse.h: the portability header of the arfuse kernels (one source for CUDA and HIP).
//
// Header-free: compiles under NVRTC (no cuda_fp16.h/cuda_bf16.h), under clang -x hip with
// -nogpuinc -nogpulib (clang builtins only), and under hipRTC. Everything vendor-specific is here:
// thread ids, barriers, system-scope acquire/release, fences, the deadline clock, global pointers.
#ifndef ARFUSE_H
#define ARFUSE_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;

#if defined(__HIP__) || defined(__HIPCC_RTC__)
#define ARFUSE_HIP 1
#endif

#if defined(ARFUSE_HIP) && !defined(__HIPCC_RTC__)
// clang -x hip -nogpuinc: nothing is predefined but the attributes.
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ inline __attribute__((always_inline))
#endif

// Every kernel may be launched with up to 1024 threads per block: the compiler must keep
// registers within what that allows (64 per thread on NVIDIA).
#if defined(ARFUSE_HIP)
#define ARFUSE_LAUNCH_BOUNDS __attribute__((amdgpu_flat_work_group_size(1, 1024)))
#else
#define ARFUSE_LAUNCH_BOUNDS __launch_bounds__(1024)
#endif

// Kernel parameters read in place, never copied to local memory: NVIDIA's __grid_constant__
// (sm_70+); AMD reads them from the kernarg segment anyway.
#if defined(ARFUSE_HIP)
#define ARFUSE_GRID_CONSTANT
#else
#define ARFUSE_GRID_CONSTANT __grid_constant__
#endif

#if defined(ARFUSE_HIP)
// Peer pointers are marked global (address space 1) so that loads through them are
// global_load_dwordx4, not the slower flat_ loads.
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
__device__ __forceinline__ void block_sync() {
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup");
  __builtin_amdgcn_s_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");
}
__device__ __forceinline__ void fence_system() { __builtin_amdgcn_fence(__ATOMIC_SEQ_CST, ""); }
// Before a signalling thread's system-scope release store, after a block barrier: a full system
// fence, so that every wave's writes of the block reach memory first.
__device__ __forceinline__ void fence_before_release_sys() { fence_system(); }
__device__ __forceinline__ void store_release_sys(u64* p, u64 v) {
  __hip_atomic_store(p, v, __ATOMIC_RELEASE, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ void store_relaxed_sys(u64* p, u64 v) {
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ u64 load_acquire_sys(u64* p) {
  return __hip_atomic_load(p, __ATOMIC_ACQUIRE, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ u64 load_relaxed_sys(u64* p) {
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ u64 fetch_add_device(u64* p, u64 v) {
  return __hip_atomic_fetch_add(p, v, __ATOMIC_ACQ_REL, __HIP_MEMORY_SCOPE_AGENT);
}
// Stores `v` only where `*p` is still 0 (relaxed, system scope).
__device__ __forceinline__ void store_if_zero_sys(u64* p, u64 v) {
  u64 expected = 0;
  __hip_atomic_compare_exchange_strong(p, &expected, v, __ATOMIC_RELAXED, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
__device__ __forceinline__ u64 load_relaxed_device(u64* p) {
  return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
}
// s_memrealtime ticks at a constant 100 MHz on gfx9.
__device__ __forceinline__ u64 clock_ns() { return __builtin_amdgcn_s_memrealtime() * 10ull; }
__device__ __forceinline__ float f32_from_bits(u32 b) { return __builtin_bit_cast(float, b); }
__device__ __forceinline__ u32 bits_from_f32(float f) { return __builtin_bit_cast(u32, f); }
__device__ __forceinline__ float div_rn(float a, float b) { return a / b; }
__device__ __forceinline__ float sqrt_rn(float a) { return __builtin_sqrtf(a); }
__device__ __forceinline__ float rcp_rn(float a) { return 1.0f / a; }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
struct alignas(16) pack16 { u32 x, y, z, w; };
// 16-byte loads and stores of the push protocol, at system scope and relaxed: what a peer GPU
// writes behind this one's back is seen by a polling load, and what this GPU writes leaves for
// the peer. A wider relaxed atomic does not exist, so the pack moves as four 32-bit atomics (the
// unit the receiver checks: every word, never only the first). The receive buffers are
// fine-grained/uncached memory (hipExtMallocWithFlags), so these are sc0 sc1 accesses that
// bypass the non-coherent caches on gfx90a/gfx942/gfx950.
__device__ __forceinline__ pack16 load16_sys(const ARFUSE_GLOBAL pack16* p) {
  const ARFUSE_GLOBAL u32* w = (const ARFUSE_GLOBAL u32*)p;
  pack16 v;
  v.x = __hip_atomic_load(w + 0, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
  v.y = __hip_atomic_load(w + 1, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
  v.z = __hip_atomic_load(w + 2, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
  v.w = __hip_atomic_load(w + 3, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
  return v;
}
__device__ __forceinline__ void store16_sys(ARFUSE_GLOBAL pack16* p, pack16 v) {
  ARFUSE_GLOBAL u32* w = (ARFUSE_GLOBAL u32*)p;
  __hip_atomic_store(w + 0, v.x, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
  __hip_atomic_store(w + 1, v.y, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
  __hip_atomic_store(w + 2, v.z, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
  __hip_atomic_store(w + 3, v.w, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
// Programmatic dependent launch is NVIDIA's (sm_90+); a HIP launch always starts after the kernel
// before it in the stream has finished, so there is nothing to wait for or to release.
__device__ __forceinline__ void wait_for_prior_grid() {}
__device__ __forceinline__ void release_dependent_grid() {}
// Butterfly exchange inside groups of 32 lanes (xor offsets below 32 never leave a 32-lane half of
// a 64-wide wavefront): the reduction tree does not depend on the wavefront width.
__device__ __forceinline__ float shfl_xor32(float v, int offset) {
  const int lane = __builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u));
  return __builtin_bit_cast(float, __builtin_amdgcn_ds_bpermute((lane ^ offset) << 2, __builtin_bit_cast(int, v)));
}
#else
#define ARFUSE_GLOBAL
__device__ __forceinline__ u32 tid_x() { return threadIdx.x; }
__device__ __forceinline__ u32 bid_x() { return blockIdx.x; }
__device__ __forceinline__ u32 bdim_x() { return blockDim.x; }
__device__ __forceinline__ u32 gdim_x() { return gridDim.x; }
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ void fence_system() { __threadfence_system(); }
// Before a signalling thread's system-scope release store, after a block barrier: nothing. In the
// PTX memory model bar.sync orders the block's writes before the signalling thread's, and
// st.release.sys is cumulative over them (what vLLM's custom all-reduce relies on as well); the
// extra fence.sc.sys cost a round trip on every barrier.
__device__ __forceinline__ void fence_before_release_sys() {}
__device__ __forceinline__ void store_release_sys(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void store_relaxed_sys(u64* p, u64 v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 load_acquire_sys(u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u64 load_relaxed_sys(u64* p) {
  u64 v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u64 load_relaxed_device(u64* p) {
  u64 v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u64 fetch_add_device(u64* p, u64 v) {
  u64 old;
  asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;" : "=l"(old) : "l"(p), "l"(v) : "memory");
  return old;
}
// Stores `v` only where `*p` is still 0 (relaxed, system scope).
__device__ __forceinline__ void store_if_zero_sys(u64* p, u64 v) {
  u64 old;
  asm volatile("atom.relaxed.sys.global.cas.b64 %0, [%1], 0, %2;" : "=l"(old) : "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 clock_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ float f32_from_bits(u32 b) { return __uint_as_float(b); }
__device__ __forceinline__ u32 bits_from_f32(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
// 1 / a with IEEE rounding, the same bits as div_rn(1.0f, a) (rcp.rn.f32: no general-numerator path).
__device__ __forceinline__ float rcp_rn(float a) { return __frcp_rn(a); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
typedef uint4 pack16;
// 16-byte loads and stores of the push protocol: .volatile is relaxed at system scope and never
// served from L1, so a polling load sees what a peer writes and a store leaves for the peer. A
// v4 access is single-copy atomic per 32-bit element, the unit the receiver checks.
__device__ __forceinline__ pack16 load16_sys(const pack16* p) {
  pack16 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}
__device__ __forceinline__ void store16_sys(pack16* p, pack16 v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
// Programmatic dependent launch (sm_90+; source.rs `launch_config`'s `programmatic`): a kernel
// launched with programmatic stream serialisation may start while the kernel before it in the
// stream still runs. `wait_for_prior_grid` returns once that kernel has finished and its writes
// are visible (at once when there is no such dependency, or before sm_90); a kernel reads nothing
// another kernel may write before it. `release_dependent_grid` lets the next kernel start once
// every block of this one has released it (or exited): only what this block still does after it
// overlaps the next kernel's start.
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(ARFUSE_EXP_NO_PDL)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void release_dependent_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(ARFUSE_EXP_NO_PDL) && !defined(ARFUSE_EXP_NO_RELEASE)
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// What the fused kernel loads early (ARFUSE_EARLY_NORM below), where it differs. Before sm_90 (no
// programmatic launch: the kernel starts once the one before it has finished) only its input
// pack, and every row's weight at the output stage: the early residual and weight, and the first
// pack's weight held across the wait for the peers, made the bf16 kernels spill on sm_80 (24-40
// bytes; f32 with the epilogue 20). On sm_100 the epilogue kernels load the residual early but
// the weights at the output stage (the weight held across the wait spilled 16-48 bytes there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define ARFUSE_EARLY_NORM 0
#define ARFUSE_EARLY_NORM_EPI 0
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
#define ARFUSE_EARLY_NORM_EPI ARFUSE_EARLY_RESIDUAL
// On sm_100, rows of more packs than the block has threads (K > 1, kernels.cu `wide_route`)
// quantise per tensor and per group by division (the contract's sequence as written): with the
// quotient route beside the K packs held, the f16 epilogue kernel spilled 40 bytes.
#define ARFUSE_FP8_ROUTE_WIDE 0
#endif
// Butterfly exchange inside groups of 32 lanes (a whole warp here).
__device__ __forceinline__ float shfl_xor32(float v, int offset) { return __shfl_xor_sync(0xffffffffu, v, offset); }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(ARFUSE_EXP_SOFT_CVT)
// Hardware conversions (sm_80+): round to nearest even, subnormals kept (no .ftz), overflow to
// infinity, exactly the contract's rounding; a NaN becomes the canonical NaN, which the contract
// allows (NaN payloads and signs are the platform's). Two f32 go into one 32-bit word, `lo` in
// the low half (PTX puts its first source in the high half).
#define ARFUSE_HW_CVT 1
__device__ __forceinline__ u32 bf16x2_rn(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ u32 f16x2_rn(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ float f32_from_f16(u32 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h));
  return f;
}
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(ARFUSE_EXP_SOFT_FP8)
// The e4m3fn codes of two f32 (sm_89+), `lo`'s in the low byte: round to nearest even, subnormals
// kept, a zero keeps its sign, |v| >= 448 (infinities included) saturates to +-448 (.satfinite).
// A NaN is a NaN code: on sm_90 0x7f for every NaN, the contract's (the same bits as the hand
// encoder, fp8_encode, for every f32: docs/bench/h200-2026-12-03c/fp8_probe.cu on the H200,
// 2026-12-03). Elsewhere (sm_89, sm_100+: not checked) kernels.cu `e4m3fn_codes2` makes any NaN's
// code 0x7f itself (ARFUSE_HW_FP8_NAN_FIX), which cost 0.1-0.3 us a call on the H200.
#define ARFUSE_HW_FP8 1
#if __CUDA_ARCH__ != 900
#define ARFUSE_HW_FP8_NAN_FIX 1
#endif
__device__ __forceinline__ u32 e4m3fn_x2_rn_satfinite(float lo, float hi) {
  u16 r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}
#endif
#endif

// What the fused kernel loads before its epoch read besides its input pack (kernels.cu `ahead`),
// for the plain kernels and for the epilogue ones: its first row's residual pack, its weight pack
// (and the row routine its first pack's weight before the sum). Both by default (sm_90, AMD).
#define ARFUSE_EARLY_RESIDUAL 1
#define ARFUSE_EARLY_WEIGHT 2
#ifndef ARFUSE_EARLY_NORM
#define ARFUSE_EARLY_NORM (ARFUSE_EARLY_RESIDUAL | ARFUSE_EARLY_WEIGHT)
#endif
#ifndef ARFUSE_EARLY_NORM_EPI
#define ARFUSE_EARLY_NORM_EPI (ARFUSE_EARLY_RESIDUAL | ARFUSE_EARLY_WEIGHT)
#endif

// Without hardware conversions (AMD, NVIDIA before sm_80) kernels.cu converts by hand.
#ifndef ARFUSE_HW_CVT
#define ARFUSE_HW_CVT 0
#endif
// Without the FP8 conversion (AMD, e4m3fnuz everywhere, NVIDIA before sm_89) fp8_encode below.
#ifndef ARFUSE_HW_FP8
#define ARFUSE_HW_FP8 0
#endif
// The FP8 quotient route also where a thread holds several packs of a row (kernels.cu
// `wide_route`): everywhere but sm_100 (above).
#ifndef ARFUSE_FP8_ROUTE_WIDE
#define ARFUSE_FP8_ROUTE_WIDE 1
#endif

// ---- FP8 (e4m3fn, e4m3fnuz) by hand: contract.rs `Fp8Format::encode`, the same integer sequence
// on every target (no vendor header, no hardware conversion: the bits are the contract's). ----
// `v` rounded to nearest even and saturated: NaN -> the format's NaN (0x7f e4m3fn, 0x80 e4m3fnuz),
// |v| >= max (448, 240; infinities included) -> +-max, subnormals kept, a zero keeps its sign in
// e4m3fn and is 0x00 in e4m3fnuz. Branch-free (both candidates computed, then selected): a
// normal code is the f32 bits re-biased with 20 mantissa bits rounded off (a carry moves into the
// exponent, the next code up); a subnormal one is |v| / 2^(-2 - bias) rounded to an integer by
// the f32 addition of 2^23 (the product is exact; the sum rounds to nearest even at 1, and a
// result of 8 is the least normal code). The same bits as contract.rs for every f32.
__device__ __forceinline__ u32 fp8_encode(float v, bool fnuz) {
  const u32 bits = bits_from_f32(v);
  const u32 sign = (bits >> 24) & 0x80u;
  const u32 a = bits & 0x7fffffffu;
  const u32 bias = fnuz ? 8u : 7u;
  const u32 x = a - ((127u - bias) << 23);
  const u32 normal = (x + 0x7ffffu + ((x >> 20) & 1u)) >> 20;
  const float t = f32_from_bits(a) * f32_from_bits((129u + bias) << 23) + 8388608.0f;
  const u32 subnormal = bits_from_f32(t) - 0x4b000000u;
  u32 code = a < ((128u - bias) << 23) ? subnormal : normal;
  code = a >= (fnuz ? 0x43700000u : 0x43e00000u) ? (fnuz ? 0x7fu : 0x7eu) : code;  // 240, 448
  const u32 r = fnuz && code == 0u ? 0u : (sign | code);
  return a > 0x7f800000u ? (fnuz ? 0x80u : 0x7fu) : r;
}
// The floor of dynamic scales, fl(1 / (max * 512)) (contract.rs `Fp8Format::min_scale`).
__device__ __forceinline__ float fp8_min_scale(bool fnuz) { return f32_from_bits(fnuz ? 0x37088889u : 0x36924925u); }

// ---- The launch parameters: a mirror of arfuse_kernels::LaunchParams (params.rs). ----
#define ARFUSE_MAX_RANKS 8
#define ARFUSE_MAX_BLOCKS 256
#define ARFUSE_SIGNAL_ERROR_OFFSET (ARFUSE_MAX_BLOCKS * ARFUSE_MAX_RANKS * 8)
#define ARFUSE_SIGNAL_EPOCH_OFFSET (ARFUSE_SIGNAL_ERROR_OFFSET + 8)
#define ARFUSE_SIGNAL_DONE_OFFSET (ARFUSE_SIGNAL_ERROR_OFFSET + 16)
#define ARFUSE_PUSH_ROTATIONS 3
#define ARFUSE_PUSH_HEADER_BYTES 256
#define ARFUSE_PUSH_SENTINEL 0x80000000u
#define ARFUSE_FLAG_REFUSED 1u
#define ARFUSE_OP_CODE_REFUSED 15u
#define ARFUSE_ERROR_PEER_TIMEOUT 1ull
#define ARFUSE_ERROR_CALL_MISMATCH 2ull
// LaunchParams::epilogue bits (params.rs EPILOGUE_*).
#define ARFUSE_EPILOGUE_GEMMA 1u
#define ARFUSE_EPILOGUE_NO_RESIDUAL 2u
#define ARFUSE_EPILOGUE_SCALE_MASK 0xcu
#define ARFUSE_EPILOGUE_SCALE_PER_TENSOR 0x4u
#define ARFUSE_EPILOGUE_SCALE_PER_TOKEN 0x8u
#define ARFUSE_EPILOGUE_SCALE_PER_GROUP 0xcu
#define ARFUSE_EPILOGUE_FNUZ 0x10u
// The epilogue bits a call header carries, and where (params.rs EPILOGUE_CALL_*).
#define ARFUSE_EPILOGUE_CALL_MASK 0x1fu
#define ARFUSE_EPILOGUE_CALL_SHIFT 16u
// Largest number of 16-byte packs per row (the tree lives in shared memory) and packs per thread.
#define ARFUSE_MAX_ROW_PACKS 4096
#define ARFUSE_MAX_PACKS_PER_THREAD 4

struct LaunchParams {
  u64 receive[ARFUSE_MAX_RANKS];
  u64 scratch[ARFUSE_MAX_RANKS];
  u64 signals[ARFUSE_MAX_RANKS];
  u64 input, residual, weight, out, residual_out;
  u64 barrier_base;
  u64 deadline_ns;
  u32 rows, hidden, rank, world_size;
  float eps;
  u32 reserved0;
  u64 reserved1;
  u64 push[ARFUSE_MAX_RANKS];
  u32 push_slot_bytes;
  u32 flags;
  u64 out_q;
  u64 scales;
  float quant_scale;
  u32 epilogue;
  u64 reserved;
};
static_assert(sizeof(LaunchParams) == 384, "LaunchParams layout differs from params.rs");
#if defined(ARFUSE_HIP)  // NVRTC's front end has no __builtin_offsetof; clang checks the offsets.
static_assert(__builtin_offsetof(LaunchParams, input) == 192, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, barrier_base) == 232, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, rows) == 248, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, eps) == 264, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, reserved1) == 272, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, push) == 280, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, flags) == 348, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, out_q) == 352, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, quant_scale) == 368, "LaunchParams layout differs from params.rs");
static_assert(__builtin_offsetof(LaunchParams, epilogue) == 372, "LaunchParams layout differs from params.rs");
#endif

// Loop bodies that derive much from the parameters and the thread id (the row routine per row:
// pointers, bounds, the epilogue's selections, per-pack lane masks) start from these. On AMD both
// are opaque to the optimiser, so what the body derives is recomputed in it (scalar loads from the
// kernarg segment, a few ALU instructions) instead of being hoisted out of the row loop and kept
// live in SGPRs for the whole kernel: a wave has at most 102, and they spilled. NVIDIA: the
// parameter and threadIdx.x themselves (the code is unchanged).
#if defined(ARFUSE_HIP)
#define ARFUSE_FRESH_PARAMS 1
// The kernel's parameters read afresh. `p` must be the kernel's own parameter (kernels.cu passes
// no other): LaunchParams is the only argument, at offset 0 of the kernarg segment. (Not `&p`:
// taking its address copies the parameters to scratch.)
__device__ __forceinline__ const LaunchParams& fresh_params(const LaunchParams&) {
  auto k = (const __attribute__((address_space(4))) LaunchParams*)__builtin_amdgcn_kernarg_segment_ptr();
  asm volatile("" : "+s"(k));
  return *(const LaunchParams*)k;
}
__device__ __forceinline__ u32 fresh_tid_x() {
  u32 t = tid_x();
  asm volatile("" : "+v"(t));
  return t;
}
__device__ __forceinline__ u32 reread_tid_x() { return fresh_tid_x(); }
// The block and grid sizes, opaque (their loads from the dispatch packet are shared with every
// other use): what is derived from them is recomputed where used.
__device__ __forceinline__ u32 fresh_bdim_x() {
  u32 b = bdim_x();
  asm volatile("" : "+s"(b));
  return b;
}
__device__ __forceinline__ u32 fresh_gdim_x() {
  u32 g = gdim_x();
  asm volatile("" : "+s"(g));
  return g;
}
#else
#define ARFUSE_FRESH_PARAMS 0
__device__ __forceinline__ const LaunchParams& fresh_params(const LaunchParams& p) { return p; }
__device__ __forceinline__ u32 fresh_tid_x() { return tid_x(); }
__device__ __forceinline__ u32 fresh_bdim_x() { return bdim_x(); }
__device__ __forceinline__ u32 fresh_gdim_x() { return gdim_x(); }
// The thread id read again (S2R) rather than kept in a register from an earlier read: what the
// bf16/f16 epilogue kernels' row routine uses (kernels.cu `row_tid_x`), where keeping it (its
// `t == 0` predicate) spilled on sm_90 and sm_100.
__device__ __forceinline__ u32 reread_tid_x() {
  u32 t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}
#endif

#endif  // ARFUSE_H
