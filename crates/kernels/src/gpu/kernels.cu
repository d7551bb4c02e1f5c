// kernels.cu: every arfuse kernel, for every dtype, from one source (see arfuse.h).
//
// The algorithms, extents and barrier protocol are those of crates/kernels/src/cpu (the reference
// the GPU results are compared with bit for bit); the numerics are contract.rs:
// - a cross-rank kernel first copies into its staging the part of its input that peers' block of
//   the same number will read (unless the input already is the staging), then passes a per-block
//   barrier: threads 0..world-1 publish the call descriptor (block 0), store the barrier value into
//   flags[block][rank] of every peer's signal area (release, system scope) and spin until their own
//   flags[block][peer] reach it (then acquire, system scope), giving up at p.deadline_ns with an
//   ErrorWord in the own signal area; counters only grow, nothing is reset;
// - sums over ranks in f32 in rank order, -0.0 read as +0.0, rounded to nearest even;
// - RMSNorm from the rounded residual_out: each 16-byte pack's squares summed left to right, the
//   pack partials added by the canonical tree a[i] += a[i + s] (s = half the next power of two of
//   the pack count, down to 1), 1 / sqrt(sum / n + eps) with IEEE division and square root,
//   out = round(w * round(ro * inv)); built without FMA contraction.
//
// The parameter block is only ever indexed with constants (rank loops are unrolled to
// ARFUSE_MAX_RANKS and guarded; a runtime rank goes through pick()), so it is never copied to local
// memory and NVVM keeps every pointer taken from it in the global state space.
#include "arfuse.h"

// ------------------------------------------------------------------------------ storage types
// Conversions written by hand: round to nearest, ties to even; NaN stays NaN (quiet, sign and the
// high payload bits kept: what the `half` crate does on the CPU).
struct Bf16 {
  static constexpr u32 kBits = 16;
  static constexpr u64 kCode = 0;  // DType::Bf16
  static constexpr u32 kNegZero = 0x8000u;
  static __device__ __forceinline__ float to_f32(u32 b) { return f32_from_bits(b << 16); }
  static __device__ __forceinline__ u32 from_f32(float f) {
    const u32 x = bits_from_f32(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40u;
    return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  }
};

struct F16 {
  static constexpr u32 kBits = 16;
  static constexpr u64 kCode = 1;  // DType::F16
  static constexpr u32 kNegZero = 0x8000u;
  static __device__ __forceinline__ float to_f32(u32 h) {
    const u32 sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
    // Subnormals (and zero): em * 2^-24, exact in f32.
    const u32 sub = bits_from_f32((float)em * 5.9604644775390625e-8f);
    // Normals: rebias the exponent (15 -> 127); infinities and NaN keep an all-ones exponent.
    const u32 normal = em >= 0x7c00u ? (em << 13) | 0x7f800000u : (em << 13) + 0x38000000u;
    return f32_from_bits(sign | (em < 0x400u ? sub : normal));
  }
  static __device__ __forceinline__ u32 from_f32(float f) {
    const u32 x = bits_from_f32(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u | ((ax >> 13) & 0x3ffu);  // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00u;                          // rounds to infinity
    if (ax >= 0x38800000u) {                                                // f16 normal
      const u32 r = ax - 0x38000000u;
      return sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
    }
    // f16 subnormal or zero: |f| + 0.5 rounds |f| to a multiple of 2^-24 (the f16 subnormal step,
    // the unit in the last place of 0.5) by the f32 addition's round-to-nearest-even; what is left
    // above 0.5 is the f16 encoding (0x400, the smallest normal, when it rounds up to it).
    return sign | (bits_from_f32(f32_from_bits(ax) + 0.5f) - 0x3f000000u);
  }
};

struct F32 {
  static constexpr u32 kBits = 32;
  static constexpr u64 kCode = 2;  // DType::F32
  static constexpr u32 kNegZero = 0x80000000u;
  static __device__ __forceinline__ float to_f32(u32 b) { return f32_from_bits(b); }
  static __device__ __forceinline__ u32 from_f32(float f) { return bits_from_f32(f); }
};

// --------------------------------------------------------------------------------------- packs
// A 16-byte pack as four 32-bit words; a 16-bit element i is the low (even i) or high (odd i)
// half of word i / 2. Indices are compile-time constants after unrolling, so packs live in four
// registers each.
struct Pack {
  u32 w[4];
};
template <class E>
struct Elems {
  static constexpr int N = 128 / E::kBits;
};
template <class E>
__device__ __forceinline__ u32 get(const Pack& p, int i) {
  if (E::kBits == 32) return p.w[i];
  return (i & 1) ? p.w[i >> 1] >> 16 : p.w[i >> 1] & 0xffffu;
}
// Elements must be set in order 0, 1, ..., N - 1.
template <class E>
__device__ __forceinline__ void set(Pack& p, int i, u32 bits) {
  if (E::kBits == 32) {
    p.w[i] = bits;
  } else if (i & 1) {
    p.w[i >> 1] |= bits << 16;
  } else {
    p.w[i >> 1] = bits & 0xffffu;
  }
}
__device__ __forceinline__ Pack load_pack(u64 base, u64 index) {
  const pack16 v = ((const ARFUSE_GLOBAL pack16*)base)[index];
  Pack p;
  p.w[0] = v.x;
  p.w[1] = v.y;
  p.w[2] = v.z;
  p.w[3] = v.w;
  return p;
}
__device__ __forceinline__ void store_pack(u64 base, u64 index, const Pack& p) {
  pack16 v;
  v.x = p.w[0];
  v.y = p.w[1];
  v.z = p.w[2];
  v.w = p.w[3];
  ((ARFUSE_GLOBAL pack16*)base)[index] = v;
}

// a[i] for a runtime (block-uniform or per-thread) i < ARFUSE_MAX_RANKS, without indexing the
// parameter block at run time (that would copy it to local memory on NVIDIA).
__device__ __forceinline__ u64 pick(const u64 (&a)[ARFUSE_MAX_RANKS], u32 i) {
  u64 v = a[0];
#pragma unroll
  for (u32 k = 1; k < ARFUSE_MAX_RANKS; ++k) v = i == k ? a[k] : v;
  return v;
}

// Pack `index` of every rank's staging, summed in f32 in rank order with -0.0 read as +0.0,
// rounded to storage. All loads are issued before the first addition.
template <class E>
__device__ __forceinline__ Pack sum_ranks(const LaunchParams& p, u64 index) {
  constexpr int N = Elems<E>::N;
  Pack x[ARFUSE_MAX_RANKS];
#pragma unroll
  for (u32 r = 0; r < ARFUSE_MAX_RANKS; ++r)
    if (r < p.world_size) x[r] = load_pack(p.staging[r], index);
  float acc[N];
#pragma unroll
  for (u32 r = 0; r < ARFUSE_MAX_RANKS; ++r) {
    if (r < p.world_size) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const u32 b = get<E>(x[r], i);
        const float v = E::to_f32(b == E::kNegZero ? 0u : b);
        acc[i] = r == 0 ? v : acc[i] + v;
      }
    }
  }
  Pack s;
#pragma unroll
  for (int i = 0; i < N; ++i) set<E>(s, i, E::from_f32(acc[i]));
  return s;
}

// ------------------------------------------------------------------------ the signal protocol
__device__ __forceinline__ ARFUSE_GLOBAL u64* signal_word(u64 signal, u32 byte_offset, u32 index) {
  return (ARFUSE_GLOBAL u64*)(signal + byte_offset) + index;
}
__device__ __forceinline__ ARFUSE_GLOBAL u64* flag(u64 signal, u32 block, u32 slot) {
  return signal_word(signal, ARFUSE_SIGNAL_FLAGS_OFFSET, block * ARFUSE_MAX_RANKS + slot);
}
__device__ __forceinline__ ARFUSE_GLOBAL u64* call_word(u64 signal, u32 parity, u32 slot, u32 word) {
  return signal_word(signal, ARFUSE_SIGNAL_CALLS_OFFSET, (parity * ARFUSE_MAX_RANKS + slot) * ARFUSE_CALL_WORDS + word);
}
// Word `w` of the call descriptor (params.rs CallDescriptor): [barrier_base,
// op | dtype << 8 | world_size << 16, rows, hidden].
template <class E>
__device__ __forceinline__ u64 descriptor_word(const LaunchParams& p, u64 op, u32 w) {
  return w == 0   ? p.barrier_base
         : w == 1 ? op | (E::kCode << 8) | ((u64)p.world_size << 16)
         : w == 2 ? (u64)p.rows
                  : (u64)p.hidden;
}

// Barrier `value` of this block with every peer's block of the same number. Every write of every
// thread of the block before it is visible to the peers' blocks after it, and theirs to us. With
// `op` >= 0 (a call's first barrier) block 0 also publishes the call descriptor before and checks
// the peers' after. Returns false, in every thread, when the block must give up (a peer missed the
// deadline, or ran a different call): the error word is then set.
template <class E>
__device__ __forceinline__ bool barrier(const LaunchParams& p, u64 value, int op) {
  __shared__ u32 give_up;
  const u32 t = tid_x();
  const u32 block = bid_x();
  if (t == 0) give_up = 0;
  fence_release_sys();
  block_sync();
  if (t < p.world_size) {
    const u64 peer_signal = pick(p.signals, t);
    const u64 own_signal = pick(p.signals, p.rank);
    const u32 parity = (u32)((p.barrier_base / 2) & 1);
    const bool describe = op >= 0 && block == 0;
    if (describe) {
#pragma unroll
      for (u32 w = 0; w < ARFUSE_CALL_WORDS; ++w)
        store_relaxed_sys(call_word(peer_signal, parity, p.rank, w), descriptor_word<E>(p, (u64)op, w));
    }
    store_release_sys(flag(peer_signal, block, p.rank), value);
    ARFUSE_GLOBAL u64* mine = flag(own_signal, block, t);
    const u64 start = clock_ns();
    bool arrived = true;
    while (load_relaxed_sys(mine) < value) {
      if (clock_ns() - start > p.deadline_ns) {
        arrived = false;
        break;
      }
    }
    fence_acquire_sys();
    if (!arrived) {
      store_relaxed_sys(signal_word(own_signal, ARFUSE_SIGNAL_ERROR_OFFSET, 0),
                        ARFUSE_ERROR_PEER_TIMEOUT | ((u64)(t & 0xffu) << 8) | (value << 16));
      give_up = 1;
    } else if (describe) {
      bool same = true;
#pragma unroll
      for (u32 w = 0; w < ARFUSE_CALL_WORDS; ++w)
        same = same && load_relaxed_sys(call_word(own_signal, parity, t, w)) == descriptor_word<E>(p, (u64)op, w);
      if (!same) {
        store_relaxed_sys(signal_word(own_signal, ARFUSE_SIGNAL_ERROR_OFFSET, 0),
                          ARFUSE_ERROR_CALL_MISMATCH | ((u64)(t & 0xffu) << 8) | (p.barrier_base << 16));
        give_up = 1;
      }
    }
  }
  block_sync();
  return give_up == 0;
}

// Op codes (the index of the op in Op::ALL, kernel_id.rs).
#define ARFUSE_OP_FUSED_1STAGE 0
#define ARFUSE_OP_REDUCE_SCATTER 1
#define ARFUSE_OP_ALLREDUCE_1STAGE 3

// ------------------------------------------------------------------------------ the row routine
// Dynamic shared memory of the row kernels: one f32 partial per pack of a row.
ARFUSE_DYNAMIC_SHARED(float, arfuse_row_partials);

// Sum of the first `n` entries of `a` by the canonical tree: shared-memory levels while the stride
// is at least the warp width, then the same additions, in the same order, by shuffles inside the
// first warp. Every thread of the block must call it; returns the sum in every thread.
__device__ __forceinline__ float tree_sum(float* a, u32 n) {
  __shared__ float total;
  const u32 t = tid_x(), nt = bdim_x(), warp = warp_size();
  u32 top = 1;
  while (top < n) top <<= 1;
  block_sync();  // every partial is written
  u32 s = top / 2;
  for (; s >= warp; s /= 2) {
    for (u32 i = t; i < s; i += nt)
      if (i + s < n) a[i] = a[i] + a[i + s];
    block_sync();
  }
  if (t < warp) {  // the whole first warp: the block size is a multiple of the warp width
    // Live entries are a[0 .. 2s) with 2s <= warp; lane i holds a[i].
    float v = t < n ? a[t] : 0.0f;
    for (; s >= 1; s /= 2) {
      const float other = shfl_down_f32(v, s);
      if (t + s < n) v = v + other;
    }
    if (t == 0) total = v;
  }
  block_sync();
  return total;
}

// Add + RMSNorm of row `row`: `source(k)` gives the rounded all-reduced sum of pack k of the
// tensor. Writes residual_out and out. The same code on every path (1-stage, 2-stage, unfused),
// so a token's result does not depend on the path. Reads each input pack before writing the same
// pack of an output, so input == out and residual == residual_out are allowed.
template <class E, class Source>
__device__ __forceinline__ void norm_row(const LaunchParams& p, u32 row, Source source) {
  constexpr int N = Elems<E>::N;
  float* partial = arfuse_row_partials;
  const u32 t = tid_x(), nt = bdim_x();
  const u32 n_packs = p.hidden / N;
  const u64 row_pack = (u64)row * n_packs;
  Pack ro[ARFUSE_MAX_PACKS_PER_THREAD];
#pragma unroll
  for (int k = 0; k < ARFUSE_MAX_PACKS_PER_THREAD; ++k) {
    const u32 j = t + k * nt;
    if (j < n_packs) {
      const Pack s = source(row_pack + j);
      const Pack r = load_pack(p.residual, row_pack + j);
      float sq = 0.0f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const u32 b = E::from_f32(E::to_f32(get<E>(s, i)) + E::to_f32(get<E>(r, i)));
        set<E>(ro[k], i, b);
        const float f = E::to_f32(b);
        const float f2 = f * f;
        sq = i == 0 ? f2 : sq + f2;
      }
      store_pack(p.residual_out, row_pack + j, ro[k]);
      partial[j] = sq;
    }
  }
  const float sum = tree_sum(partial, n_packs);
  const float inv = div_rn(1.0f, sqrt_rn(div_rn(sum, (float)p.hidden) + p.eps));
#pragma unroll
  for (int k = 0; k < ARFUSE_MAX_PACKS_PER_THREAD; ++k) {
    const u32 j = t + k * nt;
    if (j < n_packs) {
      const Pack w = load_pack(p.weight, j);
      Pack o;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float normed = E::to_f32(E::from_f32(E::to_f32(get<E>(ro[k], i)) * inv));
        set<E>(o, i, E::from_f32(E::to_f32(get<E>(w, i)) * normed));
      }
      store_pack(p.out, row_pack + j, o);
    }
  }
}

// ------------------------------------------------------------------------------------ kernels
// Fused all-reduce + residual + RMSNorm, one stage: block b takes rows b, b + grid, ...
template <class E>
__device__ __forceinline__ void fused_1stage(const LaunchParams& p) {
  const u32 n_packs = p.hidden / Elems<E>::N;
  const u64 own = pick(p.staging, p.rank);
  if (p.input != own)
    for (u32 row = bid_x(); row < p.rows; row += gdim_x())
      for (u32 j = tid_x(); j < n_packs; j += bdim_x())
        store_pack(own, (u64)row * n_packs + j, load_pack(p.input, (u64)row * n_packs + j));
  if (!barrier<E>(p, p.barrier_base, ARFUSE_OP_FUSED_1STAGE)) return;
  for (u32 row = bid_x(); row < p.rows; row += gdim_x())
    norm_row<E>(p, row, [&](u64 k) { return sum_ranks<E>(p, k); });
}

// Custom all-reduce, one stage: out = the rounded sum; thread (b, t) takes packs
// b * block + t + n * grid * block.
template <class E>
__device__ __forceinline__ void allreduce_1stage(const LaunchParams& p) {
  const u64 packs = (u64)p.rows * p.hidden / Elems<E>::N;
  const u64 stride = (u64)gdim_x() * bdim_x();
  const u64 first = (u64)bid_x() * bdim_x() + tid_x();
  const u64 own = pick(p.staging, p.rank);
  if (p.input != own)
    for (u64 k = first; k < packs; k += stride) store_pack(own, k, load_pack(p.input, k));
  if (!barrier<E>(p, p.barrier_base, ARFUSE_OP_ALLREDUCE_1STAGE)) return;
  for (u64 k = first; k < packs; k += stride) store_pack(p.out, k, sum_ranks<E>(p, k));
}

// The packs [start, end) rank r reduces in the two-stage algorithms (cpu::kernels::chunk_of).
__device__ __forceinline__ void chunk_of(u32 r, u32 world, u64 packs, u64* start, u64* end) {
  const u64 per_rank = (packs + world - 1) / world;
  *start = r * per_rank < packs ? r * per_rank : packs;
  *end = (r + 1) * per_rank < packs ? (r + 1) * per_rank : packs;
}

// Fused stage 1 / custom all-reduce stage 1: this rank reduces its chunk and stores each reduced
// pack into every rank's scratch at the same offset; a second barrier makes every block's stores
// of every rank visible before any rank's next kernel reads its scratch.
template <class E>
__device__ __forceinline__ void reduce_scatter(const LaunchParams& p) {
  const u64 packs = (u64)p.rows * p.hidden / Elems<E>::N;
  const u64 stride = (u64)gdim_x() * bdim_x();
  const u64 first = (u64)bid_x() * bdim_x() + tid_x();
  const u64 own = pick(p.staging, p.rank);
  if (p.input != own) {
    // Block b copies what every rank's block b reads: its share of each rank's chunk.
    for (u32 r = 0; r < p.world_size; ++r) {
      u64 start, end;
      chunk_of(r, p.world_size, packs, &start, &end);
      for (u64 k = start + first; k < end; k += stride) store_pack(own, k, load_pack(p.input, k));
    }
  }
  if (!barrier<E>(p, p.barrier_base, ARFUSE_OP_REDUCE_SCATTER)) return;
  u64 start, end;
  chunk_of(p.rank, p.world_size, packs, &start, &end);
  for (u64 k = start + first; k < end; k += stride) {
    const Pack s = sum_ranks<E>(p, k);
#pragma unroll
    for (u32 r = 0; r < ARFUSE_MAX_RANKS; ++r)
      if (r < p.world_size) store_pack(p.scratch[r], k, s);
  }
  barrier<E>(p, p.barrier_base + 1, -1);
}

// Fused stage 2: add + RMSNorm of the reduced sum in this rank's scratch.
template <class E>
__device__ __forceinline__ void scratch_add_rmsnorm(const LaunchParams& p) {
  const u64 scratch = pick(p.scratch, p.rank);
  for (u32 row = bid_x(); row < p.rows; row += gdim_x())
    norm_row<E>(p, row, [&](u64 k) { return load_pack(scratch, k); });
}

// The unfused path's second kernel: add + RMSNorm of a local sum (`input`, may be `out`).
template <class E>
__device__ __forceinline__ void add_rmsnorm(const LaunchParams& p) {
  for (u32 row = bid_x(); row < p.rows; row += gdim_x())
    norm_row<E>(p, row, [&](u64 k) { return load_pack(p.input, k); });
}

// Custom all-reduce stage 2: out = this rank's scratch.
template <class E>
__device__ __forceinline__ void allgather(const LaunchParams& p) {
  const u64 packs = (u64)p.rows * p.hidden / Elems<E>::N;
  const u64 scratch = pick(p.scratch, p.rank);
  for (u64 k = (u64)bid_x() * bdim_x() + tid_x(); k < packs; k += (u64)gdim_x() * bdim_x())
    store_pack(p.out, k, load_pack(scratch, k));
}

// One extern "C" entry point per (op, dtype), named as KernelId::symbol() (`{op}_{dtype}`).
#define ARFUSE_INSTANTIATE(dtype, E)                                                                 \
  extern "C" __global__ ARFUSE_LAUNCH_BOUNDS void fused_ar_rmsnorm_1stage_##dtype(LaunchParams p) {  \
    fused_1stage<E>(p);                                                                              \
  }                                                                                                  \
  extern "C" __global__ ARFUSE_LAUNCH_BOUNDS void reduce_scatter_##dtype(LaunchParams p) {           \
    reduce_scatter<E>(p);                                                                            \
  }                                                                                                  \
  extern "C" __global__ ARFUSE_LAUNCH_BOUNDS void scratch_add_rmsnorm_##dtype(LaunchParams p) {      \
    scratch_add_rmsnorm<E>(p);                                                                       \
  }                                                                                                  \
  extern "C" __global__ ARFUSE_LAUNCH_BOUNDS void allreduce_1stage_##dtype(LaunchParams p) {         \
    allreduce_1stage<E>(p);                                                                          \
  }                                                                                                  \
  extern "C" __global__ ARFUSE_LAUNCH_BOUNDS void allgather_##dtype(LaunchParams p) { allgather<E>(p); } \
  extern "C" __global__ ARFUSE_LAUNCH_BOUNDS void add_rmsnorm_##dtype(LaunchParams p) { add_rmsnorm<E>(p); }

ARFUSE_INSTANTIATE(bf16, Bf16)
ARFUSE_INSTANTIATE(f16, F16)
ARFUSE_INSTANTIATE(f32, F32)
