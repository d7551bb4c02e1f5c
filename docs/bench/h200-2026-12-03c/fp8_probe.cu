// fp8_probe.cu: the H200's e4m3fn conversion (cvt.rn.satfinite.e4m3x2.f32, arfuse.h
// `e4m3fn_x2_rn_satfinite`) with kernels.cu's NaN fix-up against the hand encoder
// (arfuse.h `fp8_encode`, the contract's bits) on every f32, in both halves of the pair.
// Build and run (on the GPU machine): nvcc -arch=sm_90 -std=c++17 -I<dir of arfuse.h> fp8_probe.cu
#include <cstdio>
#include "arfuse.h"

__device__ unsigned long long mismatches, raw_mismatches;
__device__ unsigned first_bad = 0xffffffffu, first_raw_bad = 0xffffffffu;

// (The bodies only in the device pass: the conversion exists only for __CUDA_ARCH__ >= 890.)
__global__ void probe() {
#ifdef __CUDA_ARCH__
  const u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32); i += stride) {
    const float lo = f32_from_bits((u32)i), hi = f32_from_bits((u32)i ^ 0x80000000u);
    u32 c = e4m3fn_x2_rn_satfinite(lo, hi);
    const u32 raw = c;
    // kernels.cu e4m3fn_codes2's fix-up: a NaN's code is 0x7f whatever its sign.
    c = (bits_from_f32(lo) & 0x7fffffffu) > 0x7f800000u ? (c & 0xff00u) | 0x7fu : c;
    c = (bits_from_f32(hi) & 0x7fffffffu) > 0x7f800000u ? (c & 0x00ffu) | 0x7f00u : c;
    const u32 want = fp8_encode(lo, false) | (fp8_encode(hi, false) << 8);
    if (c != want) {
      atomicAdd(&mismatches, 1ull);
      atomicMin(&first_bad, (u32)i);
    }
    if (raw != want) {  // without the fix-up: does the hardware give 0x7f for every NaN?
      atomicAdd(&raw_mismatches, 1ull);
      atomicMin(&first_raw_bad, (u32)i);
    }
  }
#endif
}

// The same without the fix-up: how the hardware encodes a NaN (reported, not required).
__global__ void nan_codes(u32* out) {
#ifdef __CUDA_ARCH__
  out[0] = e4m3fn_x2_rn_satfinite(f32_from_bits(0x7fc00000u), f32_from_bits(0xffc00000u));
  out[1] = e4m3fn_x2_rn_satfinite(f32_from_bits(0x7f800001u), f32_from_bits(0xff800001u));
#endif
}

int main() {
  probe<<<132 * 16, 256>>>();
  u32* d;
  cudaMalloc(&d, 8);
  nan_codes<<<1, 1>>>(d);
  u32 nan[2];
  cudaMemcpy(nan, d, 8, cudaMemcpyDeviceToHost);
  unsigned long long bad = 0, raw_bad = 0;
  unsigned first = 0, raw_first = 0;
  cudaMemcpyFromSymbol(&bad, mismatches, sizeof bad);
  cudaMemcpyFromSymbol(&first, first_bad, sizeof first);
  cudaMemcpyFromSymbol(&raw_bad, raw_mismatches, sizeof raw_bad);
  cudaMemcpyFromSymbol(&raw_first, first_raw_bad, sizeof raw_first);
  const cudaError_t e = cudaGetLastError();
  std::printf("fp8 probe: %s; 2^32 f32 x 2 halves, mismatches %llu (first at bits 0x%08x); raw hardware NaN codes "
              "(+qNaN,-qNaN) 0x%04x (+sNaN,-sNaN) 0x%04x; without the fix-up mismatches %llu (first at 0x%08x)\n",
              cudaGetErrorString(e), bad, first, nan[0], nan[1], raw_bad, raw_first);
  return e != cudaSuccess || bad != 0;
}
