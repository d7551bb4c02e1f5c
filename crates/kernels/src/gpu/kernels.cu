// kernels.cu: every arfuse kernel, for every dtype, from one source (see arfuse.h).
//
// The algorithms and the barrier protocol are those of crates/kernels/src/cpu (the reference):
// - a cross-rank kernel copies the part of its input that peers' same-numbered block reads into
//   its staging (unless input already is the staging), publishes its call descriptor (block 0),
//   arrives at barrier value barrier_base on every peer (release, system scope) and waits for
//   every peer (acquire, system scope) with a deadline;
// - numerics as in contract.rs: rank-order f32 sums with -0.0 read as +0.0, round to nearest even,
//   the fixed pack tree for the sum of squares, 1/sqrt with IEEE rounding, no FMA contraction.
#include "arfuse.h"

// ---- Storage types: conversions written by hand (round to nearest, ties to even). ----
struct Bf16 {
  typedef u16 bits;
  static constexpr u64 kCode = 0;  // DType::Bf16
  static constexpr u32 kNegZero = 0x8000u;
  static __device__ __forceinline__ float to_f32(u32 b) { return f32_from_bits(b << 16); }
  static __device__ __forceinline__ u32 from_f32(float f) {
    u32 x = bits_from_f32(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40u;  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return x >> 16;
  }
};

struct F16 {
  typedef u16 bits;
  static constexpr u64 kCode = 1;  // DType::F16
  static constexpr u32 kNegZero = 0x8000u;
  static __device__ __forceinline__ float to_f32(u32 h) {
    u32 sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
      float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
      return sign ? -v : v;
    }
    return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
  }
  static __device__ __forceinline__ u32 from_f32(float f) {
    u32 x = bits_from_f32(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | 0x7c00u | (ax > 0x7f800000u ? (0x200u | ((ax >> 13) & 0x3ffu)) : 0u);
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
    if (ax >= 0x38800000u) {                        // normal
      u32 r = ax - 0x38000000u;
      r += 0xfffu + ((r >> 13) & 1u);
      return sign | (r >> 13);
    }
    if (ax < 0x33000000u) return sign;  // below half the smallest subnormal: zero
    u32 e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, shift = 126u - e;
    u32 h = m >> shift, rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (h & 1u))) h += 1u;
    return sign | h;
  }
};

struct F32 {
  typedef u32 bits;
  static constexpr u64 kCode = 2;  // DType::F32
  static constexpr u32 kNegZero = 0x80000000u;
  static __device__ __forceinline__ float to_f32(u32 b) { return f32_from_bits(b); }
  static __device__ __forceinline__ u32 from_f32(float f) { return bits_from_f32(f); }
};

// A 16-byte pack as N elements.
template <class E>
struct Pack {
  static constexpr int N = 16 / sizeof(typename E::bits);
  union {
    pack16 v;
    typename E::bits e[N];
  };
};

template <class E>
__device__ __forceinline__ Pack<E> load_pack(u64 base, u64 index) {
  Pack<E> p;
  p.v = ((const ARFUSE_GLOBAL pack16*)base)[index];
  return p;
}
template <class E>
__device__ __forceinline__ void store_pack(u64 base, u64 index, const Pack<E>& p) {
  ((ARFUSE_GLOBAL pack16*)base)[index] = p.v;
}

// ---- A launch as the kernel bodies see it. ----
// The parameters are read where the launch put them (__grid_constant__ on NVIDIA, the kernarg
// segment on AMD): a by-value copy would sit in every thread's local memory (280 bytes, because
// peers' pointers are indexed by a run-time rank), which a 1024-thread block pays for on every
// call. What a launch resolves at run time (its epoch's barrier value, every rank's input for this
// call) is computed once per block into shared memory by `cross_rank`.
struct Launch {
  const LaunchParams& p;
  u64 barrier_base;
  const u64* staging;  // every rank's input for this call: __shared__ u64[ARFUSE_MAX_RANKS]
  bool copy;           // our input is not staging[rank]: copy it there first
};

// Sum over ranks of pack `index` of every rank's staging, in rank order, -0.0 read as +0.0,
// rounded to storage.
template <class E>
__device__ __forceinline__ Pack<E> sum_ranks(const Launch& l, u64 index) {
  float acc[Pack<E>::N];
  for (u32 r = 0; r < l.p.world_size; ++r) {
    Pack<E> x = load_pack<E>(l.staging[r], index);
#pragma unroll
    for (int i = 0; i < Pack<E>::N; ++i) {
      u32 b = x.e[i];
      float v = E::to_f32(b == E::kNegZero ? 0u : b);
      acc[i] = r == 0 ? v : acc[i] + v;
    }
  }
  Pack<E> s;
#pragma unroll
  for (int i = 0; i < Pack<E>::N; ++i) s.e[i] = (typename E::bits)E::from_f32(acc[i]);
  return s;
}

// ---- The cross-rank protocol. ----
__device__ __forceinline__ u64* flag(u64 signal, u32 block, u32 slot) {
  return (u64*)(signal) + block * ARFUSE_MAX_RANKS + slot;
}
__device__ __forceinline__ u64* error_word(u64 signal) { return (u64*)(signal + ARFUSE_SIGNAL_ERROR_OFFSET); }
__device__ __forceinline__ u64* epoch_word(u64 signal) { return (u64*)(signal + ARFUSE_SIGNAL_EPOCH_OFFSET); }
__device__ __forceinline__ u64* done_word(u64 signal) { return (u64*)(signal + ARFUSE_SIGNAL_DONE_OFFSET); }
__device__ __forceinline__ u64* call_word(u64 signal, u32 parity, u32 slot, u32 word) {
  return (u64*)(signal + ARFUSE_SIGNAL_CALLS_OFFSET) + (parity * ARFUSE_MAX_RANKS + slot) * ARFUSE_CALL_WORDS + word;
}

// Every thread's writes before it are visible to peers after they pass the barrier. Returns false
// (in every thread of the block) when a peer did not arrive within the deadline: the error word
// is set and the block must return.
__device__ bool barrier(const LaunchParams& p, u64 barrier_base, u64 value, const u64* descriptor) {
  __shared__ int abort_block;
  const u32 t = tid_x();
  if (t == 0) abort_block = 0;
  // The block's writes are ordered before the signalling threads' release by the block barrier
  // (releases and fences are cumulative), so only those threads release: a system-scope fence in
  // every thread of a 1024-thread block costs microseconds.
  block_sync();
  const u32 parity = (u32)((barrier_base / 2) & 1);
  if (t < p.world_size) {
    fence_before_release_sys();
    if (descriptor && bid_x() == 0) {
      for (u32 w = 0; w < ARFUSE_CALL_WORDS; ++w)
        store_relaxed_sys(call_word(p.signals[t], parity, p.rank, w), descriptor[w]);
    }
    store_release_sys(flag(p.signals[t], bid_x(), p.rank), value);
    u64* mine = flag(p.signals[p.rank], bid_x(), t);
    const u64 start = clock_ns();
    while (load_acquire_sys(mine) < value) {
      if (clock_ns() - start > p.deadline_ns) {
        store_relaxed_sys(error_word(p.signals[p.rank]),
                          ARFUSE_ERROR_PEER_TIMEOUT | ((u64)(t & 0xff) << 8) | (value << 16));
        abort_block = 1;
        break;
      }
    }
    if (descriptor && bid_x() == 0 && !abort_block) {
      bool same = true;
      for (u32 w = 0; w < ARFUSE_CALL_WORDS; ++w)
        same = same && load_relaxed_sys(call_word(p.signals[p.rank], parity, t, w)) == descriptor[w];
      if (!same) {
        store_relaxed_sys(error_word(p.signals[p.rank]),
                          ARFUSE_ERROR_CALL_MISMATCH | ((u64)(t & 0xff) << 8) | (barrier_base << 16));
        abort_block = 1;
      }
    }
  }
  block_sync();
  return abort_block == 0;
}

template <class E>
__device__ __forceinline__ void make_descriptor(const Launch& l, u64 op, u64* d) {
  d[0] = l.barrier_base;
  d[1] = op | (E::kCode << 8) | ((u64)l.p.world_size << 16);
  d[2] = l.p.rows;
  d[3] = l.p.hidden;
}

// ---- The row routine: add residual, RMSNorm; the same code on every path. ----
// `source(k)` gives the rounded all-reduced sum of pack k of the row.
template <class E, class Source>
__device__ __forceinline__ void norm_row(const LaunchParams& p, u32 row, Source source) {
  constexpr int N = Pack<E>::N;
  __shared__ float partial[ARFUSE_MAX_ROW_PACKS];
  const u32 n_packs = p.hidden / N;
  const u64 row_pack = (u64)row * n_packs;
  Pack<E> ro[ARFUSE_MAX_PACKS_PER_THREAD];
#pragma unroll
  for (int k = 0; k < ARFUSE_MAX_PACKS_PER_THREAD; ++k) {
    const u32 j = tid_x() + k * bdim_x();
    if (j < n_packs) {
      Pack<E> s = source(row_pack + j);
      Pack<E> r = load_pack<E>(p.residual, row_pack + j);
      float sq = 0.0f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        ro[k].e[i] = (typename E::bits)E::from_f32(E::to_f32(s.e[i]) + E::to_f32(r.e[i]));
        float f = E::to_f32(ro[k].e[i]);
        float f2 = f * f;
        sq = i == 0 ? f2 : sq + f2;
      }
      store_pack<E>(p.residual_out, row_pack + j, ro[k]);
      partial[j] = sq;
    }
  }
  block_sync();
  u32 top = 1;
  while (top < n_packs) top <<= 1;
  for (u32 s = top / 2; s >= 1; s /= 2) {
    for (u32 i = tid_x(); i < s; i += bdim_x())
      if (i + s < n_packs) partial[i] = partial[i] + partial[i + s];
    block_sync();
  }
  const float inv = div_rn(1.0f, sqrt_rn(div_rn(partial[0], (float)p.hidden) + p.eps));
#pragma unroll
  for (int k = 0; k < ARFUSE_MAX_PACKS_PER_THREAD; ++k) {
    const u32 j = tid_x() + k * bdim_x();
    if (j < n_packs) {
      Pack<E> w = load_pack<E>(p.weight, j);
      Pack<E> o;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        float normed = E::to_f32(E::from_f32(E::to_f32(ro[k].e[i]) * inv));
        o.e[i] = (typename E::bits)E::from_f32(E::to_f32(w.e[i]) * normed);
      }
      store_pack<E>(p.out, row_pack + j, o);
    }
  }
  block_sync();  // `partial` is reused by the next row
}

// ---- Kernels. ----
template <class E>
__device__ __forceinline__ bool fused_1stage(const Launch& l) {
  const LaunchParams& p = l.p;
  const u32 n_packs = p.hidden / Pack<E>::N;
  for (u32 row = bid_x(); row < p.rows && l.copy; row += gdim_x())
    for (u32 j = tid_x(); j < n_packs; j += bdim_x())
      store_pack<E>(l.staging[p.rank], (u64)row * n_packs + j, load_pack<E>(p.input, (u64)row * n_packs + j));
  u64 d[ARFUSE_CALL_WORDS];
  make_descriptor<E>(l, 0, d);
  if (!barrier(p, l.barrier_base, l.barrier_base, d)) return false;
  for (u32 row = bid_x(); row < p.rows; row += gdim_x())
    norm_row<E>(p, row, [&](u64 k) { return sum_ranks<E>(l, k); });
  return true;
}

template <class E>
__device__ __forceinline__ bool allreduce_1stage(const Launch& l) {
  const LaunchParams& p = l.p;
  const u64 packs = (u64)p.rows * p.hidden / Pack<E>::N;
  const u64 stride = (u64)gdim_x() * bdim_x();
  if (l.copy)
    for (u64 k = (u64)bid_x() * bdim_x() + tid_x(); k < packs; k += stride)
      store_pack<E>(l.staging[p.rank], k, load_pack<E>(p.input, k));
  u64 d[ARFUSE_CALL_WORDS];
  make_descriptor<E>(l, 3, d);
  if (!barrier(p, l.barrier_base, l.barrier_base, d)) return false;
  for (u64 k = (u64)bid_x() * bdim_x() + tid_x(); k < packs; k += stride) store_pack<E>(p.out, k, sum_ranks<E>(l, k));
  return true;
}

// The pack range rank `r` reduces (cpu::kernels::chunk_of, in packs).
__device__ __forceinline__ void chunk_of(u32 r, u32 world, u64 packs, u64* start, u64* end) {
  const u64 per_rank = (packs + world - 1) / world;
  *start = r * per_rank < packs ? r * per_rank : packs;
  *end = (r + 1) * per_rank < packs ? (r + 1) * per_rank : packs;
}

template <class E>
__device__ __forceinline__ bool reduce_scatter(const Launch& l) {
  const LaunchParams& p = l.p;
  const u64 packs = (u64)p.rows * p.hidden / Pack<E>::N;
  const u64 stride = (u64)gdim_x() * bdim_x();
  const u64 first = (u64)bid_x() * bdim_x() + tid_x();
  if (l.copy) {
    // Block b copies what every rank's block b will read: its share of each rank's chunk.
    for (u32 r = 0; r < p.world_size; ++r) {
      u64 start, end;
      chunk_of(r, p.world_size, packs, &start, &end);
      for (u64 k = start + first; k < end; k += stride) store_pack<E>(l.staging[p.rank], k, load_pack<E>(p.input, k));
    }
  }
  u64 d[ARFUSE_CALL_WORDS];
  make_descriptor<E>(l, 1, d);
  if (!barrier(p, l.barrier_base, l.barrier_base, d)) return false;
  u64 start, end;
  chunk_of(p.rank, p.world_size, packs, &start, &end);
  for (u64 k = start + first; k < end; k += stride) {
    Pack<E> s = sum_ranks<E>(l, k);
    for (u32 r = 0; r < p.world_size; ++r) store_pack<E>(p.scratch[r], k, s);
  }
  return barrier(p, l.barrier_base, l.barrier_base + 1, 0);
}

// Runs a cross-rank kernel body. With barrier_base 0 the epoch comes from the rank's epoch word
// (device memory, so a captured graph takes a fresh epoch on every replay): barrier value 2e,
// staging half e % 2; the last block to finish advances the word. Every block reads the word
// before it counts itself done, so the word changes only after every block has read it.
//
// With `inputs` set (graph inputs registered after capture), every rank's input is read where the
// user keeps it: rank r's input is `inputs[r]` (our own entry is `input`, so nothing is copied).
// The user may overwrite that tensor as soon as our launch has finished, so a body that does not
// end with a barrier after its last read of peers' inputs (`kEndsWithBarrier`) gets one, value
// 2e + 1: no rank finishes before every peer has finished reading it.
template <bool kEndsWithBarrier, class Body>
__device__ __forceinline__ void cross_rank(const LaunchParams& p, Body body) {
  const bool device_epoch = p.barrier_base == 0;
  const bool in_place = device_epoch && p.inputs != 0;
  const u64 base = device_epoch ? 2 * (load_relaxed_sys(epoch_word(p.signals[p.rank])) + 1) : p.barrier_base;
  const u64 half = device_epoch && ((base / 2) & 1) ? p.staging_half_bytes : 0;
  __shared__ u64 staging[ARFUSE_MAX_RANKS];
  __shared__ int registered;
  const u32 t = tid_x();
  if (t == 0) registered = 1;
  block_sync();
  if (t < p.world_size) {
    staging[t] = in_place ? ((const u64*)p.inputs)[t] : p.staging[t] + half;
    if (staging[t] == 0) registered = 0;
  }
  block_sync();
  const Launch l = {p, base, staging, p.input != staging[p.rank]};
  if (!registered) {  // replayed before the ranks registered the graph's inputs
    if (bid_x() == 0 && t == 0)
      store_relaxed_sys(error_word(p.signals[p.rank]), ARFUSE_ERROR_NOT_REGISTERED | (base << 16));
    return;
  }
  if (!body(l)) return;
  if (!kEndsWithBarrier && in_place && !barrier(p, base, base + 1, 0)) return;
  if (!device_epoch) return;
  // Only this rank's later launches read the epoch word (stream order makes our writes visible
  // to them), and each block read it before its acq_rel increment: no system fence needed.
  block_sync();
  if (t == 0) {
    if (fetch_add_device(done_word(p.signals[p.rank]), 1) == gdim_x() - 1) {
      store_relaxed_sys(done_word(p.signals[p.rank]), 0);
      store_relaxed_sys(epoch_word(p.signals[p.rank]), base / 2);
    }
  }
}

template <class E>
__device__ __forceinline__ void scratch_add_rmsnorm(const LaunchParams& p) {
  const u64 scratch = p.scratch[p.rank];
  for (u32 row = bid_x(); row < p.rows; row += gdim_x())
    norm_row<E>(p, row, [&](u64 k) { return load_pack<E>(scratch, k); });
}

template <class E>
__device__ __forceinline__ void add_rmsnorm(const LaunchParams& p) {
  for (u32 row = bid_x(); row < p.rows; row += gdim_x())
    norm_row<E>(p, row, [&](u64 k) { return load_pack<E>(p.input, k); });
}

template <class E>
__device__ __forceinline__ void allgather(const LaunchParams& p) {
  const u64 packs = (u64)p.rows * p.hidden / Pack<E>::N;
  for (u64 k = (u64)bid_x() * bdim_x() + tid_x(); k < packs; k += (u64)gdim_x() * bdim_x())
    store_pack<E>(p.out, k, load_pack<E>(p.scratch[p.rank], k));
}

// One extern "C" entry point per (op, dtype): the symbols of KernelId::symbol(). The parameters
// are never copied (see `Launch`).
#define ARFUSE_KERNEL(name) extern "C" __global__ void ARFUSE_LAUNCH_BOUNDS name(const ARFUSE_GRID_CONSTANT LaunchParams p)
#define ARFUSE_INSTANTIATE(dtype, E)                                                                  \
  ARFUSE_KERNEL(fused_ar_rmsnorm_1stage_##dtype) {                                                    \
    cross_rank<false>(p, [](const Launch& l) { return fused_1stage<E>(l); });                         \
  }                                                                                                   \
  ARFUSE_KERNEL(reduce_scatter_##dtype) {                                                             \
    cross_rank<true>(p, [](const Launch& l) { return reduce_scatter<E>(l); });                        \
  }                                                                                                   \
  ARFUSE_KERNEL(scratch_add_rmsnorm_##dtype) { scratch_add_rmsnorm<E>(p); }                           \
  ARFUSE_KERNEL(allreduce_1stage_##dtype) {                                                           \
    cross_rank<false>(p, [](const Launch& l) { return allreduce_1stage<E>(l); });                     \
  }                                                                                                   \
  ARFUSE_KERNEL(allgather_##dtype) { allgather<E>(p); }                                               \
  ARFUSE_KERNEL(add_rmsnorm_##dtype) { add_rmsnorm<E>(p); }

ARFUSE_INSTANTIATE(bf16, Bf16)
ARFUSE_INSTANTIATE(f16, F16)
ARFUSE_INSTANTIATE(f32, F32)
