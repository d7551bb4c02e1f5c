// kernels.cu: every arfuse kernel, for every dtype, from one source (see arfuse.h).
//
// The algorithms and the protocols are those of crates/kernels/src/cpu (the reference):
// - every cross-rank kernel writes its call header into every peer's push region first and checks
//   every peer's before it writes an output (a peer in another call: CALL_MISMATCH);
// - the 1-stage kernels push (data as its own arrival flag, see "The push protocol" below);
// - the reduce-scatter pushes the part of its input that each peer's same-numbered block reduces
//   into that peer's receive area, arrives at barrier value 2e on every peer (release, system
//   scope) and waits for every peer (acquire, system scope) with a deadline;
// - numerics as in contract.rs: rank-order f32 sums with -0.0 read as +0.0, round to nearest even,
//   the fixed pack tree for the sum of squares, 1/sqrt with IEEE rounding, no FMA contraction.
#include "arfuse.h"

// ---- Storage types: a 16-byte pack widened to f32 and rounded back. ----
// `narrow` rounds to nearest, ties to even: by the hardware where arfuse.h has it (ARFUSE_HW_CVT),
// else by hand; both give the same bits for every non-NaN value (a NaN stays a NaN, its payload
// is the platform's, as the contract allows).
struct Bf16 {
  typedef u16 bits;
  static constexpr int kN = 8;
  static constexpr u64 kCode = 0;  // DType::Bf16
  static __device__ __forceinline__ u32 from_f32(float f) {
    u32 x = bits_from_f32(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40u;  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return x >> 16;
  }
  static __device__ __forceinline__ void widen(u32 w, float* f) {
    f[0] = f32_from_bits(w << 16);
    f[1] = f32_from_bits(w & 0xffff0000u);
  }
  static __device__ __forceinline__ u32 narrow(const float* f) {
#if ARFUSE_HW_CVT
    return bf16x2_rn(f[0], f[1]);
#else
    return from_f32(f[0]) | (from_f32(f[1]) << 16);
#endif
  }
};

struct F16 {
  typedef u16 bits;
  static constexpr int kN = 8;
  static constexpr u64 kCode = 1;  // DType::F16
  static __device__ __forceinline__ float to_f32(u32 h) {
#if ARFUSE_HW_CVT
    return f32_from_f16(h);
#else
    u32 sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
      float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
      return sign ? -v : v;
    }
    return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
#endif
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
  static __device__ __forceinline__ void widen(u32 w, float* f) {
    f[0] = to_f32(w & 0xffffu);
    f[1] = to_f32(w >> 16);
  }
  static __device__ __forceinline__ u32 narrow(const float* f) {
#if ARFUSE_HW_CVT
    return f16x2_rn(f[0], f[1]);
#else
    return from_f32(f[0]) | (from_f32(f[1]) << 16);
#endif
  }
};

struct F32 {
  typedef u32 bits;
  static constexpr int kN = 4;
  static constexpr u64 kCode = 2;  // DType::F32
  static __device__ __forceinline__ void widen(u32 w, float* f) { f[0] = f32_from_bits(w); }
  static __device__ __forceinline__ u32 narrow(const float* f) { return bits_from_f32(f[0]); }
};

// The epilogue kernels' element types: `Epi<E>` is E (the same storage, the same dtype code)
// marked so that the row routine compiles the epilogue (Gemma's norm, no residual, FP8 out, as
// LaunchParams::epilogue selects at run time) into them and only into them: the plain kernels,
// instantiated with E, carry none of it (contract.rs "Epilogues").
template <class E>
struct Epi : E {};
template <class E>
struct HasEpilogue {
  static constexpr bool value = false;
};
template <class E>
struct HasEpilogue<Epi<E>> {
  static constexpr bool value = true;
};

// A 16-byte pack: four 32-bit words, each holding 32 / (bits of E) elements.
template <class E>
struct Pack {
  static constexpr int N = E::kN;       // elements
  static constexpr int PerWord = N / 4;  // elements per 32-bit word
  union {
    pack16 v;
    u32 w[4];
  };
  // The pack's elements as f32.
  __device__ __forceinline__ void widen(float (&f)[N]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) E::widen(w[i], f + i * PerWord);
  }
  // The pack of `f` rounded to storage.
  static __device__ __forceinline__ Pack narrow(const float (&f)[N]) {
    Pack p;
#pragma unroll
    for (int i = 0; i < 4; ++i) p.w[i] = E::narrow(f + i * PerWord);
    return p;
  }
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

// The rank-order sum of one element, finished: `acc + 0.0f` is the sum with every -0.0 term read
// as +0.0 (contract.rs `sum_ranks`). A raw partial sum is -0.0 only while every term so far was
// -0.0, where the canonical one is +0.0; the next other term gives both the same value, and
// -0.0 + 0.0 = +0.0 mends the all-(-0.0) case. Exact otherwise (x + 0.0 = x for x != -0.0).
__device__ __forceinline__ float finish_sum(float acc) { return acc + 0.0f; }

// ---- Measurement switches (ARFUSE_KERNEL_DEFINES, source.rs `experiment_defines`): each leaves a
// stage out and gives wrong results on purpose; never set in normal use. (Two give right results:
// ARFUSE_EXP_NO_PDL launches the fused kernel plainly, ARFUSE_EXP_NO_RELEASE keeps the programmatic
// launch but lets the next kernel start only when this one ends; see arfuse.h.) ----
#ifdef ARFUSE_EXP_LOCAL_ONLY  // no data pushed or polled: every rank's pack is our own
#undef ARFUSE_EXP_LOCAL_ONLY
#define ARFUSE_EXP_LOCAL_ONLY 1
#else
#define ARFUSE_EXP_LOCAL_ONLY 0
#endif

// ---- The push region (params.rs, `push_region_bytes`). ----
__device__ __forceinline__ u64 rotation_base(const LaunchParams& p, u32 owner, u32 rot) {
  return p.push[owner] + (u64)rot * (ARFUSE_PUSH_HEADER_BYTES + (u64)p.world_size * p.push_slot_bytes);
}
__device__ __forceinline__ ARFUSE_GLOBAL pack16* header_at(const LaunchParams& p, u32 owner, u32 rot, u32 sender) {
  return (ARFUSE_GLOBAL pack16*)(rotation_base(p, owner, rot)) + sender;
}
__device__ __forceinline__ ARFUSE_GLOBAL pack16* slot_at(const LaunchParams& p, u32 owner, u32 rot, u32 sender) {
  return (ARFUSE_GLOBAL pack16*)(rotation_base(p, owner, rot) + ARFUSE_PUSH_HEADER_BYTES + (u64)sender * p.push_slot_bytes);
}
// Every 32-bit word has arrived (the receiver never trusts a pack by its first word alone).
__device__ __forceinline__ bool arrived(const pack16& v) {
  return v.x != ARFUSE_PUSH_SENTINEL && v.y != ARFUSE_PUSH_SENTINEL && v.z != ARFUSE_PUSH_SENTINEL &&
         v.w != ARFUSE_PUSH_SENTINEL;
}
__device__ __forceinline__ pack16 sentinel_pack() {
  pack16 v;
  v.x = v.y = v.z = v.w = ARFUSE_PUSH_SENTINEL;
  return v;
}

// ---- A launch as the kernel bodies see it. ----
// The parameters are read where the launch put them (__grid_constant__ on NVIDIA, the kernarg
// segment on AMD): a by-value copy would sit in every thread's local memory (peers' pointers are
// indexed by a run-time rank), which a 1024-thread block pays for on every call. What a launch
// resolves at run time (its epoch, its push rotation, the block's abort flag) is
// computed once per block into shared memory by `cross_rank`.
struct Launch {
  const LaunchParams& p;
  u64 epoch;           // this call's epoch e: barrier values 2e and 2e + 1
  u32 rot;             // its push rotation, e % ARFUSE_PUSH_ROTATIONS
  u32 op;              // its op code (KernelId::op's index in Op::ALL)
  volatile int* abort; // __shared__: set when the block must give up (peer timeout, call mismatch)
};

__device__ __forceinline__ u64* error_word(u64 signal) { return (u64*)(signal + ARFUSE_SIGNAL_ERROR_OFFSET); }
__device__ __forceinline__ u64* epoch_word(u64 signal) { return (u64*)(signal + ARFUSE_SIGNAL_EPOCH_OFFSET); }
__device__ __forceinline__ u64* done_word(u64 signal) { return (u64*)(signal + ARFUSE_SIGNAL_DONE_OFFSET); }
__device__ __forceinline__ u64* flag(u64 signal, u32 block, u32 slot) {
  return (u64*)(signal) + block * ARFUSE_MAX_RANKS + slot;
}

// Records why the block gives up and makes every thread of it stop spinning. The rank's first
// failure is the one it reports: a later one (often a consequence, e.g. a mismatch after a peer
// timed out) does not overwrite it.
__device__ __forceinline__ void give_up(const Launch& l, u64 kind, u32 peer) {
  store_if_zero_sys(error_word(l.p.signals[l.p.rank]), kind | ((u64)(peer & 0xff) << 8) | ((2 * l.epoch) << 16));
  *l.abort = 1;
}

// Spins until `ready()` holds; gives up (false) when the block's abort flag is set or, after the
// deadline, with a peer timeout naming `peer`. The clock and the flag are read every 64 polls.
template <class Ready>
__device__ __forceinline__ bool spin(const Launch& l, u32 peer, Ready ready) {
  u64 start = 0;
  u32 polls = 0;
  while (!ready()) {
    if ((++polls & 63) != 0) continue;
    if (*l.abort) return false;
    const u64 now = clock_ns();
    if (start == 0) {
      start = now;
    } else if (now - start > l.p.deadline_ns) {
      give_up(l, ARFUSE_ERROR_PEER_TIMEOUT, peer);
      return false;
    }
  }
  return true;
}

// The call header `sender` writes for this call (params.rs `CallHeader`): bit 31 clear in every
// word, so a header is never the sentinel. It names the call's epilogue selection (bits 16..21:
// LaunchParams::epilogue under ARFUSE_EPILOGUE_CALL_MASK), which every launch of a call carries,
// so a peer with another epilogue is a mismatch also where the cross-rank kernel is the same.
template <class E>
__device__ __forceinline__ pack16 call_header(const Launch& l, u32 sender) {
  const LaunchParams& p = l.p;
  const bool refused = (p.flags & ARFUSE_FLAG_REFUSED) != 0;
  pack16 h;
  h.x = (u32)(l.epoch & 0x7fffffffull);
  const u32 call = (l.op & 0xfu) | ((p.epilogue & ARFUSE_EPILOGUE_CALL_MASK) << ARFUSE_EPILOGUE_CALL_SHIFT);
  h.y = (refused ? ARFUSE_OP_CODE_REFUSED : call) | ((u32)E::kCode << 4) | ((p.world_size & 0xfu) << 8) | (sender << 12);
  h.z = refused ? 0u : (p.rows & 0x7fffffffu);
  h.w = refused ? 0u : (p.hidden & 0x7fffffffu);
  return h;
}

// Block 0 of every cross-rank launch: re-arms the headers its peers wrote for the call before
// (that call has finished: stream order) and writes this call's header into every peer.
template <class E>
__device__ __forceinline__ void publish_header(const Launch& l) {
#ifdef ARFUSE_EXP_NO_HEADER  // measurement only: no call check
  return;
#endif
  const LaunchParams& p = l.p;
  const u32 t = tid_x();
  if (bid_x() != 0 || t >= p.world_size || t == p.rank) return;
  store16_sys(header_at(p, p.rank, (l.rot + ARFUSE_PUSH_ROTATIONS - 1) % ARFUSE_PUSH_ROTATIONS, t), sentinel_pack());
  store16_sys(header_at(p, t, l.rot, p.rank), call_header<E>(l, p.rank));
}

// Compares header `h`, as read from peer's slot, with the one it must have sent: 0 not arrived,
// 1 same call, 2 different. (After a mismatch the host reads both headers where they lie to
// describe the two calls: nothing re-arms them once the rank has failed.)
template <class E>
__device__ __forceinline__ int header_state(const Launch& l, u32 peer, const pack16& h) {
  if (!arrived(h)) return 0;
  const pack16 want = call_header<E>(l, peer);
  return h.x == want.x && h.y == want.y && h.z == want.z && h.w == want.w ? 1 : 2;
}
template <class E>
__device__ __forceinline__ int peer_header(const Launch& l, u32 peer) {
  return header_state<E>(l, peer, load16_sys(header_at(l.p, l.p.rank, l.rot, peer)));
}

// Waits for `peer`'s header and checks it; a different call gives up with a call mismatch.
template <class E>
__device__ __forceinline__ void check_peer_header(const Launch& l, u32 peer) {
  int seen = 0;
  if (!spin(l, peer, [&] { return (seen = peer_header<E>(l, peer)) != 0; })) return;
  if (seen == 2) give_up(l, ARFUSE_ERROR_CALL_MISMATCH, peer);
}

// Every thread's writes before it are visible to peers after they pass the barrier (value `value`
// for this block). With `check_headers`, the waiting threads also check their peer's call header
// (a peer in another kind of call never arrives: its header says so). Returns false in every
// thread of the block when the block must give up.
template <class E>
__device__ bool barrier(const Launch& l, u64 value, bool check_headers) {
#ifdef ARFUSE_EXP_NO_HEADER
  check_headers = false;  // measurement only: no header is ever sent
#endif
  const LaunchParams& p = l.p;
  const u32 t = tid_x();
  // The block's writes are ordered before the signalling threads' release by the block barrier
  // (releases and fences are cumulative), so only those threads release: a system-scope fence in
  // every thread of a 1024-thread block costs microseconds.
  block_sync();
  if (t < p.world_size) {
    fence_before_release_sys();
    store_release_sys(flag(p.signals[t], bid_x(), p.rank), value);
    u64* mine = flag(p.signals[p.rank], bid_x(), t);
    int seen = t == p.rank || !check_headers ? 1 : 0;
    u32 polls = 0;
    const bool passed = spin(l, t, [&] {
      if (load_acquire_sys(mine) >= value) return true;
      // Now and then, a header that says the peer is in another call ends the wait.
      if (seen == 0 && (++polls & 63) == 0 && (seen = peer_header<E>(l, t)) == 2) {
        give_up(l, ARFUSE_ERROR_CALL_MISMATCH, t);
        return true;
      }
      return false;
    });
    if (passed && !*l.abort && seen == 0) check_peer_header<E>(l, t);
  }
  block_sync();
  return *l.abort == 0;
}

// ---- The row routine: add residual, RMSNorm; the same code on every path. ----
// `sum(k, index)` gives the rounded all-reduced sum of pack `index` (the thread's k-th pack of the
// row). The sum of squares follows contract.rs's tree: per pack left to right; pairwise
// (a[i] += a[i + s], s = 16..1) over each group of 32 consecutive packs (a butterfly of 32 lanes,
// whatever the warp width); pairwise over the 128 group slots (missing packs and groups are +0.0,
// which adds exactly). Outputs are written only when `abort` (if any) is still clear after every
// pack has been read; returns false if not.
//
// `K` is the most packs a thread holds: 1 when the row has no more packs than the block has
// threads (hidden <= 8192 for bf16/f16 at 1024 threads), else ARFUSE_MAX_PACKS_PER_THREAD. The
// pack of a thread and the tree are the same for both; K = 1 only needs fewer registers, so that
// what `early` holds (the pack's residual and weight, loaded before the kernel read its epoch)
// fits beside the rest.
// Whether the row routine skips the residual: never in the plain kernels (a constant there, so
// their code is unchanged); in the epilogue kernels as LaunchParams::epilogue says. It then adds
// +0.0 instead, and `round(s + 0.0)` is `s` (contract.rs "No residual").
template <class E>
__device__ __forceinline__ bool no_residual(const LaunchParams& p) {
  if constexpr (HasEpilogue<E>::value) return (p.epilogue & ARFUSE_EPILOGUE_NO_RESIDUAL) != 0u;
  return false;
}
template <class E>
__device__ __forceinline__ Pack<E> zero_pack() {
  Pack<E> zero;
#pragma unroll
  for (int i = 0; i < 4; ++i) zero.w[i] = 0u;
  return zero;
}

// What is loaded ahead (ARFUSE_EARLY_NORM, or ARFUSE_EARLY_NORM_EPI for the epilogue kernels:
// arfuse.h): ARFUSE_EARLY_RESIDUAL, the fused kernel's first-row residual pack before the epoch
// read; ARFUSE_EARLY_WEIGHT, its weight pack then too, and in the row routine the first pack's
// weight before the sum (else at the output stage, like the others).
template <class E>
__device__ __forceinline__ constexpr bool ahead(int what) {
  return ((HasEpilogue<E>::value ? ARFUSE_EARLY_NORM_EPI : ARFUSE_EARLY_NORM) & what) != 0;
}

// What a row routine's `checks` returns where the thread id is to be read again at the start of
// the row on NVIDIA too (arfuse.h `reread_tid_x`): the fused bf16/f16 epilogue kernels, where
// keeping it from the kernel's start (its `t == 0` predicate) spilled on sm_90 and sm_100. The
// other kernels' `checks` return nothing, and their row routine is unchanged.
struct RereadTid {};
__device__ __forceinline__ constexpr bool rereads_tid(const RereadTid*) { return true; }
__device__ __forceinline__ constexpr bool rereads_tid(const void*) { return false; }
template <bool kReread>
__device__ __forceinline__ u32 row_tid_x() {
  if constexpr (kReread) return reread_tid_x();
  return fresh_tid_x();
}

template <class E>
struct Early {
  bool valid;  // this thread has a pack in the first row of its block (K = 1 rows only)
  Pack<E> input, residual, weight;
};

// The 1-stage kernel's first loads, issued before anything else that reads memory: their latency
// then hides behind the epoch read and the wait for the peers. They come after the wait for the
// kernel before in the stream (launched as a programmatic dependent, this kernel may start while
// that one runs; it may be what writes our input, residual or even weight). Nothing is read for a
// refused call (its pointers are not the caller's tensors) or where a thread holds more than one
// pack of a row. The residual and weight only as `ahead` says.
template <class E>
__device__ __forceinline__ Early<E> load_early(const LaunchParams& p) {
  Early<E> f = {};
  const u32 n_packs = p.hidden / Pack<E>::N, row = bid_x(), t = tid_x();
  f.valid = (p.flags & ARFUSE_FLAG_REFUSED) == 0 && row < p.rows && t < n_packs && n_packs <= bdim_x();
  wait_for_prior_grid();
  if (f.valid) {
    const u64 k = (u64)row * n_packs + t;
    f.input = load_pack<E>(p.input, k);
    // No residual tensor: nothing to load.
    if (ahead<E>(ARFUSE_EARLY_RESIDUAL) && !no_residual<E>(p)) f.residual = load_pack<E>(p.residual, k);
    if (ahead<E>(ARFUSE_EARLY_WEIGHT)) f.weight = load_pack<E>(p.weight, t);
  }
  return f;
}

// sum / n with IEEE rounding: for n a power of two the product with 1 / n, which is exact, so
// the same bits (one rounding of the same value, subnormal results included) without a division.
// 1 / 2^k is 2^-k: exponent field 127 - k, where (float)2^k has 127 + k.
__device__ __forceinline__ float mean_of(float sum, u32 n) {
  if ((n & (n - 1)) != 0) return div_rn(sum, (float)n);
  return sum * f32_from_bits((254u << 23) - bits_from_f32((float)n));
}

// ---- The epilogue of the row routine (Epi<E> kernels only; contract.rs "Epilogues"). ----


// max(acc, |y|) with a NaN `y` skipped (it never compares greater): contract.rs `amax`.
__device__ __forceinline__ float amax_step(float acc, float y) {
  const float a = f32_from_bits(bits_from_f32(y) & 0x7fffffffu);
  return a > acc ? a : acc;
}

// max(amax / fmax, min_scale): contract.rs `dynamic_scale`.
__device__ __forceinline__ float fp8_dynamic_scale(float amax, bool fnuz) {
  const float s = div_rn(amax, fnuz ? 240.0f : 448.0f);
  const float floor = fp8_min_scale(fnuz);
  return s > floor ? s : floor;
}

// max over the pack of |value|, NaN skipped.
template <class E>
__device__ __forceinline__ float pack_amax(const Pack<E>& v) {
  constexpr int W = Pack<E>::PerWord;
  float a = 0.0f;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    float f[W];
    E::widen(v.w[w], f);
#pragma unroll
    for (int i = 0; i < W; ++i) a = amax_step(a, f[i]);
  }
  return a;
}

// The per-token scale of the block's row from every thread's `amax` (max is exact in any order):
// a butterfly per warp, the warps' maxima through shared memory, reduced by the first 32 lanes (at
// most 32 warps); thread 0 writes it to `*out`; every thread gets it. Two block barriers.
__device__ __forceinline__ float per_token_scale(float amax, bool fnuz, ARFUSE_GLOBAL float* out) {
  __shared__ float slots[32];
  __shared__ float scale;
  const u32 t = fresh_tid_x();
#pragma unroll
  for (int offset = 16; offset >= 1; offset /= 2) {
    const float other = shfl_xor32(amax, offset);
    amax = other > amax ? other : amax;
  }
  if ((t & 31u) == 0u) slots[t / 32u] = amax;
  block_sync();
  if (t < 32u) {
    float a = t < (fresh_bdim_x() + 31u) / 32u ? slots[t] : 0.0f;
#pragma unroll
    for (int offset = 16; offset >= 1; offset /= 2) {
      const float other = shfl_xor32(a, offset);
      a = other > a ? other : a;
    }
    if (t == 0) {
      scale = fp8_dynamic_scale(a, fnuz);
      *out = scale;
    }
  }
  block_sync();
  return scale;
}

// y / scale with IEEE rounding, for y a bf16 or f16 value, without a division: q0 = y * (1 / scale)
// (the reciprocal rounded once), the remainder y - q0 * scale (exact, by an FMA), and
// q0 + remainder / scale by a second FMA with the reciprocal. This is the correctly rounded
// quotient wherever nothing under- or overflows: checked for every significand of y (8 and 11
// bits) against every significand of the scale (2^23), 2026-12-03 (contract.rs
// `quotient_without_division` replays it on sampled scales in CI). Applies where the scale lies in
// [2^-60, 2^60] (`quotient_route_applies`) and |q0| in [2^-13, 2^10); for other |q0| it returns
// q0, whose FP8 code is the quotient's: both saturate (above 448) or both round to a zero of the
// same sign (below half the least FP8 subnormal, 2^-11), and a NaN or infinite y stays so.
__device__ __forceinline__ bool quotient_route_applies(float scale) {
  return scale >= f32_from_bits(0x21800000u) && scale <= f32_from_bits(0x5d800000u);  // 2^-60, 2^60; NaN: no
}
__device__ __forceinline__ float quotient_route(float y, float scale, float inv) {
  const float q0 = y * inv;
  const float q = fma_rn(fma_rn(-q0, scale, y), inv, q0);
  const u32 a = bits_from_f32(q0) & 0x7fffffffu;
  return a - 0x39000000u < 0x44800000u - 0x39000000u ? q : q0;  // 2^-13 <= |q0| < 2^10
}

#if ARFUSE_HW_FP8
// The e4m3fn codes of two quotients (`lo` in the low byte) by the hardware conversion, a NaN's
// code the contract's 0x7f whatever its sign (made so where the hardware is not known to:
// arfuse.h ARFUSE_HW_FP8_NAN_FIX): fp8_encode's bits for every f32.
__device__ __forceinline__ u32 e4m3fn_codes2(float lo, float hi) {
  u32 c = e4m3fn_x2_rn_satfinite(lo, hi);
#ifdef ARFUSE_HW_FP8_NAN_FIX
  c = (bits_from_f32(lo) & 0x7fffffffu) > 0x7f800000u ? (c & 0xff00u) | 0x7fu : c;
  c = (bits_from_f32(hi) & 0x7fffffffu) > 0x7f800000u ? (c & 0x00ffu) | 0x7f00u : c;
#endif
  return c;
}
#endif

// The codes of `v` by fp8_encode, each quotient by `quot`, widened a word at a time (few
// registers live), ORed into `words` (element e at byte e % 4 of word e / 4).
template <class E, class Quot>
__device__ __forceinline__ void codes_by_hand(u32 (&words)[Pack<E>::N / 4], const Pack<E>& v, bool fnuz, Quot quot) {
  constexpr int W = Pack<E>::PerWord;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    float f[W];
    E::widen(v.w[w], f);
#pragma unroll
    for (int i = 0; i < W; ++i) words[(w * W + i) / 4] |= fp8_encode(quot(f[i]), fnuz) << (8 * ((w * W + i) % 4));
  }
}

// The FP8 codes of pack `index` (encode(f32(v) / scale) per element) into `out_q`: N bytes in
// element order, as N / 4 32-bit words. bf16/f16 take the quotient route above where it applies
// (one choice per pack: the same in every lane of a row or group); where the hardware converts
// to e4m3fn (sm_89+), the route is taken for e4m3fn only, and its codes come from the hardware.
// Else, and for f32, the IEEE division and fp8_encode. (Two variants per call site, not three:
// three spilled on sm_100.)
// (Before 2026-12-03 every element divided and encoded by hand: about 32 instructions an element
// on sm_90, issue-bound at one block a row, docs/performance.md.)
template <class E, bool kRoute = true>
__device__ __forceinline__ void store_codes(u64 out_q, u64 index, const Pack<E>& v, float scale, bool fnuz) {
#ifdef ARFUSE_EXP_FP8_NO_CODES  // measurement only: no code computed or written
  return;
#endif
  constexpr int N = Pack<E>::N;
  constexpr int W = Pack<E>::PerWord;
  u32 words[N / 4];
#pragma unroll
  for (int o = 0; o < N / 4; ++o) words[o] = 0u;
  const bool route = kRoute && W == 2 && quotient_route_applies(scale);
#if ARFUSE_HW_FP8
  if (route && !fnuz) {
    const float inv = rcp_rn(scale);
#pragma unroll
    for (int w = 0; w < 4; ++w) {  // two elements a word: two codes, 16 bits of the output
      float f[2];
      E::widen(v.w[w], f);
      words[w / 2] |= e4m3fn_codes2(quotient_route(f[0], scale, inv), quotient_route(f[1], scale, inv)) << (16 * (w % 2));
    }
  } else {  // e4m3fnuz (AMD's format) and the scales off the route: as the contract writes it
    codes_by_hand<E>(words, v, fnuz, [&](float y) { return div_rn(y, scale); });
  }
#else
  if (route) {
    const float inv = rcp_rn(scale);
    codes_by_hand<E>(words, v, fnuz, [&](float y) { return quotient_route(y, scale, inv); });
  } else {
    codes_by_hand<E>(words, v, fnuz, [&](float y) { return div_rn(y, scale); });
  }
#endif
#pragma unroll
  for (int o = 0; o < N / 4; ++o) ((ARFUSE_GLOBAL u32*)out_q)[index * (N / 4) + o] = words[o];
}

// Per group: the codes of pack `j` of `row` (`v`, its max |value| `pack_max`) and, from the
// group's first lane, its scale. The 128 / N lanes holding a group exchange their maxima by a
// butterfly; every lane of the warp takes part (a group's lanes are all in the row or all past it:
// hidden is a multiple of 128, blocks a multiple of 32 threads).
template <class E, bool kRoute = true>
__device__ __forceinline__ void per_group_codes(const LaunchParams& p, u32 row, u32 j, u32 n_packs, const Pack<E>& v,
                                                float pack_max, bool fnuz) {
  constexpr u32 kGroupLanes = 128 / Pack<E>::N;  // 16 (bf16, f16), 32 (f32)
#pragma unroll
  for (u32 offset = kGroupLanes / 2; offset >= 1; offset /= 2) {
    const float other = shfl_xor32(pack_max, (int)offset);
    pack_max = other > pack_max ? other : pack_max;
  }
  if (j >= n_packs) return;
  const float scale = fp8_dynamic_scale(pack_max, fnuz);
  if (j % kGroupLanes == 0u) ((ARFUSE_GLOBAL float*)p.scales)[(u64)row * (p.hidden / 128u) + j / kGroupLanes] = scale;
  store_codes<E, kRoute>(p.out_q, (u64)row * n_packs + j, v, scale, fnuz);
}

// Whether the row routine's output stage quantises by store_codes' route (kRoute) where a thread
// holds K packs of the row, all of them live across it: at K = 1 always; at K > 1 as
// ARFUSE_FP8_ROUTE_WIDE says (arfuse.h: not on sm_100, where it spilled).
template <int K>
__device__ __forceinline__ constexpr bool wide_route() { return K == 1 || ARFUSE_FP8_ROUTE_WIDE; }

// The output stage of the row routine with the epilogue: residual_out (unless no residual),
// out by the selected norm, and the FP8 codes and scales if asked for. `ro` holds the thread's
// packs of x (the row before normalisation); it is overwritten with `out`'s packs, which the
// dynamic scalings quantise once their scale is known: per group from the 128 / N lanes holding
// the group (a butterfly inside 32-lane groups), per token from the whole block.
template <class E, int K, bool kReread>
__device__ __forceinline__ void epilogue_out(const LaunchParams& p, u32 row, u32 n_packs, Pack<E> (&ro)[K],
                                             const Pack<E>& w0, float inv) {
  constexpr int N = Pack<E>::N;
  const u32 t = row_tid_x<kReread>();
  const u64 row_pack = (u64)row * n_packs;
  const u32 bits = p.epilogue;
  const u32 scaling = bits & ARFUSE_EPILOGUE_SCALE_MASK;
  const bool dynamic = (scaling & ARFUSE_EPILOGUE_SCALE_PER_TOKEN) != 0u;  // per token or per group
  const bool fnuz = (bits & ARFUSE_EPILOGUE_FNUZ) != 0u;
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if ((u32)k * bdim_x() >= n_packs) break;  // the same in every thread
    const u32 j = t + k * bdim_x();
    float pack_max = 0.0f;
    if (j < n_packs) {
      if ((bits & ARFUSE_EPILOGUE_NO_RESIDUAL) == 0u) store_pack<E>(p.residual_out, row_pack + j, ro[k]);
      const Pack<E> w = ahead<E>(ARFUSE_EARLY_WEIGHT) && k == 0 ? w0 : load_pack<E>(p.weight, j);
      float x[N], y[N];
      ro[k].widen(x);
#pragma unroll
      for (int i = 0; i < N; ++i) x[i] = x[i] * inv;
      Pack<E>::narrow(x).widen(x);
      w.widen(y);
      if (bits & ARFUSE_EPILOGUE_GEMMA) {
#pragma unroll
        for (int i = 0; i < N; ++i) y[i] = x[i] * (y[i] + 1.0f);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) y[i] = y[i] * x[i];
      }
      ro[k] = Pack<E>::narrow(y);
      store_pack<E>(p.out, row_pack + j, ro[k]);
      if (scaling == ARFUSE_EPILOGUE_SCALE_PER_TENSOR) store_codes<E, wide_route<K>()>(p.out_q, row_pack + j, ro[k], p.quant_scale, fnuz);
      if (dynamic) pack_max = pack_amax<E>(ro[k]);
    }
    if (scaling == ARFUSE_EPILOGUE_SCALE_PER_GROUP) per_group_codes<E, wide_route<K>()>(p, row, j, n_packs, ro[k], pack_max, fnuz);
    if (scaling == ARFUSE_EPILOGUE_SCALE_PER_TOKEN) amax = pack_max > amax ? pack_max : amax;
  }
  if (scaling != ARFUSE_EPILOGUE_SCALE_PER_TOKEN) return;
  const float scale = per_token_scale(amax, fnuz, (ARFUSE_GLOBAL float*)p.scales + row);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const u32 j = t + k * bdim_x();
    // `out` as this thread stored it (read back rather than kept: fewer registers live across
    // the block's reduction; measured the same, 2026-12-02).
    if (j < n_packs) store_codes<E>(p.out_q, row_pack + j, load_pack<E>(p.out, row_pack + j), scale, fnuz);
  }
}

template <class E, int K, class Sum, class Checks>
__device__ __forceinline__ bool norm_row(const LaunchParams& params, u32 row, Sum sum, volatile int* abort,
                                         bool use_early, const Early<E>& early, Checks checks) {
  constexpr int N = Pack<E>::N;
  __shared__ float group_sums[ARFUSE_MAX_ROW_PACKS / 32];
  __shared__ float row_sum;
  constexpr bool kReread = rereads_tid((decltype(checks())*)nullptr);
  const LaunchParams& p = fresh_params(params);  // per row (arfuse.h)
  const u32 t = row_tid_x<kReread>();
  const u32 n_packs = p.hidden / N;
  const u64 row_pack = (u64)row * n_packs;
  Pack<E> ro[K];
  // The first pack's weight, loaded before the sum (more would spill at K > 1) where
  // ahead<E>(ARFUSE_EARLY_WEIGHT), else at the output stage like the others.
  Pack<E> w0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if ((u32)k * bdim_x() >= n_packs) break;  // the same in every thread
    const u32 j = t + k * bdim_x();
    float sq = 0.0f;
    if (j < n_packs) {
      // Residual and weight first: their loads travel while the sum waits for peers.
      const bool pre = k == 0 && use_early;
      const Pack<E> r = no_residual<E>(p)                        ? zero_pack<E>()
                        : ahead<E>(ARFUSE_EARLY_RESIDUAL) && pre ? early.residual
                                                                 : load_pack<E>(p.residual, row_pack + j);
      if (ahead<E>(ARFUSE_EARLY_WEIGHT) && k == 0) w0 = pre ? early.weight : load_pack<E>(p.weight, j);
      float f[N], g[N];
      sum(k, row_pack + j).widen(f);
      r.widen(g);
#pragma unroll
      for (int i = 0; i < N; ++i) f[i] = f[i] + g[i];
      ro[k] = Pack<E>::narrow(f);
      ro[k].widen(f);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float f2 = f[i] * f[i];
        sq = i == 0 ? f2 : sq + f2;
      }
    }
#pragma unroll
    for (int offset = 16; offset >= 1; offset /= 2) sq = sq + shfl_xor32(sq, offset);
    if ((j & 31u) == 0) group_sums[j / 32] = sq;
  }
  checks();  // the last waits before any output is written (the 1-stage call headers)
  block_sync();
  if (abort && *abort) return false;
  if (t < 32) {
    const u32 groups = (n_packs + 31) / 32;
    float a = t < groups ? group_sums[t] : 0.0f;
    float b = t + 32 < groups ? group_sums[t + 32] : 0.0f;
    const float c = t + 64 < groups ? group_sums[t + 64] : 0.0f;
    const float d = t + 96 < groups ? group_sums[t + 96] : 0.0f;
    a = a + c;
    b = b + d;
    a = a + b;
#pragma unroll
    for (int offset = 16; offset >= 1; offset /= 2) a = a + shfl_xor32(a, offset);
    if (t == 0) row_sum = a;
  }
  block_sync();
  const float inv = rcp_rn(sqrt_rn(mean_of(row_sum, p.hidden) + p.eps));
#ifndef ARFUSE_EXP_EPI_PLAIN_OUT  // measurement only: the epilogue kernels' output stage is the plain one
  if constexpr (HasEpilogue<E>::value) {
    epilogue_out<E, K, kReread>(p, row, n_packs, ro, w0, inv);
    return true;
  }
#endif
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const u32 j = t + k * bdim_x();
    if (j < n_packs) {
      store_pack<E>(p.residual_out, row_pack + j, ro[k]);
      const Pack<E> w = ahead<E>(ARFUSE_EARLY_WEIGHT) && k == 0 ? w0 : load_pack<E>(p.weight, j);
      float x[N], y[N];
      ro[k].widen(x);
#pragma unroll
      for (int i = 0; i < N; ++i) x[i] = x[i] * inv;
      Pack<E>::narrow(x).widen(x);
      w.widen(y);
#pragma unroll
      for (int i = 0; i < N; ++i) y[i] = y[i] * x[i];
      store_pack<E>(p.out, row_pack + j, Pack<E>::narrow(y));
    }
  }
  return true;
}

// The rows `row_of(i)`, i < count, of this block through the row routine at the right width (see
// norm_row's `K`), for the kernels with nothing to wait for or check (the unfused path's and
// 2-stage's second kernels).
template <class E, class RowOf, class Sum>
__device__ __forceinline__ void norm_rows(const LaunchParams& p, u32 count, RowOf row_of, Sum sum) {
  auto none = [] {};
  for (u32 i = bid_x(); i < count; i += gdim_x()) {
    const u32 row = row_of(i);
    if (p.hidden / Pack<E>::N <= bdim_x())
      norm_row<E, 1>(p, row, sum, nullptr, false, Early<E>{}, none);
    else
      norm_row<E, ARFUSE_MAX_PACKS_PER_THREAD>(p, row, sum, nullptr, false, Early<E>{}, none);
  }
}

// ---- The push protocol of the 1-stage kernels. ----
// Call e uses rotation e % 3 of every rank's push region. Each rank writes its input into its
// slot of every peer's rotation; the data is its own arrival flag: a reader polls its *local* slot
// until no 32-bit word is the sentinel, then re-arms what it read (no peer writes that rotation
// again before this rank's next two calls have sent to it). No barrier, no fence, no read of a
// peer's memory, nothing registered.

// A pack as it is sent: a 32-bit word equal to the sentinel (f32 -0.0, or a -0.0 above a +0.0
// in bf16/f16) becomes +0.0. The receivers' sum reads -0.0 as +0.0 anyway (finish_sum), so the
// change is invisible, and no word of sent data is ever the sentinel.
template <class E>
__device__ __forceinline__ pack16 sendable(Pack<E> x) {
#pragma unroll
  for (int i = 0; i < 4; ++i) x.w[i] = x.w[i] == ARFUSE_PUSH_SENTINEL ? 0u : x.w[i];
  return x.v;
}

// Sends pack `k` of our input (`x`) into our slot of every peer.
template <class E>
__device__ __forceinline__ void push_pack(const Launch& l, u64 k, const Pack<E>& x) {
  const LaunchParams& p = l.p;
  if (ARFUSE_EXP_LOCAL_ONLY) return;
  const pack16 v = sendable(x);
  for (u32 r = 0; r < p.world_size; ++r)
    if (r != p.rank) store16_sys(slot_at(p, r, l.rot, p.rank) + k, v);
}

// The pack `peer` pushes to `at` (a slot of our own memory), into `v`: waited for until no word
// is the sentinel, then re-armed. With `kLate`, the peer's call header is read now and then while we
// wait: a peer in another call may never send it (receive_sum). After a give-up the pack is
// whatever the slot held; the caller writes nothing then (the block's abort flag).
template <class E, bool kLate>
__device__ __forceinline__ void take_pushed(const Launch& l, ARFUSE_GLOBAL pack16* at, u32 peer, pack16& v) {
  u32 polls = 0;
  spin(l, peer, [&] {
    v = load16_sys(at);
    if (arrived(v)) return true;
    if (kLate && (++polls & 255) == 0 && peer_header<E>(l, peer) == 2) {
      give_up(l, ARFUSE_ERROR_CALL_MISMATCH, peer);
      return true;
    }
    return false;
  });
  store16_sys(at, sentinel_pack());
}

// Pack `k` summed over ranks in rank order (ours is `own`), rounded to storage; peers' packs
// waited for and re-armed.
//
// `kLate`: the caller checks the headers after the data (fused_rows), so a peer in another call,
// which may never send this pack, must be seen by its header now and then while we wait.
template <class E, bool kLate>
__device__ __forceinline__ Pack<E> receive_sum(const Launch& l, u64 k, const Pack<E>& own) {
  const LaunchParams& p = l.p;
  constexpr int N = Pack<E>::N;
  float acc[N];
  for (u32 r = 0; r < p.world_size; ++r) {
    Pack<E> x;
    if (r == p.rank || ARFUSE_EXP_LOCAL_ONLY) {
      x = own;
    } else {
      take_pushed<E, kLate>(l, slot_at(p, p.rank, l.rot, r) + k, r, x.v);
    }
    float f[N];
    x.widen(f);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = r == 0 ? f[i] : acc[i] + f[i];
  }
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = finish_sum(acc[i]);
  return Pack<E>::narrow(acc);
}

// Threads below the world size check their peer's header (in every block: each block writes
// outputs only after the checks of its own threads). With `checkers_last`, the block's last
// world-size threads do instead: a block with threads to spare past its row's packs (the fused
// kernel's extra warp, source.rs `launch_config`) checks there, beside the waits for the data.
// `seen` (shared memory, one slot per first thread): what the first threads already read of
// their peer's header (fused_rows; 0 where it had not arrived): a header already seen to match
// needs no second read, one seen to differ is a mismatch at once.
template <class E>
__device__ __forceinline__ void check_headers(const Launch& l, bool checkers_last = false, const int* seen = nullptr) {
#ifdef ARFUSE_EXP_NO_HEADER
  return;
#endif
  const u32 base = checkers_last ? bdim_x() - l.p.world_size : 0;
  const u32 t = tid_x();
  if (t < base || t - base >= l.p.world_size || t - base == l.p.rank) return;
  const int state = checkers_last || seen == nullptr ? 0 : seen[t];
  if (state == 2) {
    give_up(l, ARFUSE_ERROR_CALL_MISMATCH, t);
  } else if (state != 1) {
    check_peer_header<E>(l, t - base);
  }
}

// The rows of this block: every pack goes out first, so that the peers' waits end early; then
// each row is summed and normalised. `use_early`: a thread's only pack of the block's first row
// is `early`'s (K = 1 rows); the wide path (K > 1) keeps nothing from before the epoch.
template <class E, int K>
__device__ __forceinline__ bool fused_rows(const Launch& l, bool use_early, const Early<E>& early) {
  const LaunchParams& p = l.p;
  const u32 n_packs = p.hidden / Pack<E>::N;
  const bool sends = (p.flags & ARFUSE_FLAG_REFUSED) == 0;
  // (On AMD `sends` is read afresh per row: arfuse.h.)
  for (u32 row = bid_x();
       row < p.rows && (ARFUSE_FRESH_PARAMS ? (fresh_params(p).flags & ARFUSE_FLAG_REFUSED) == 0 : sends);
       row += gdim_x())
    for (u32 j = tid_x(); j < n_packs; j += bdim_x()) {
      const u64 k = (u64)row * n_packs + j;
      push_pack<E>(l, k, use_early && row == bid_x() ? early.input : load_pack<E>(p.input, k));
    }
  // The headers are checked once the first row's data is in: while it travelled, the peers'
  // headers did too, so the check is one read, and it still comes before any output is written.
  // (f32 checks them first: the late check's registers would spill there.)
  constexpr bool kLate = sizeof(typename E::bits) == 2;
  // Threads past the row's last pack (at least the world size of them) check the headers while
  // the others wait for the data; else the first threads do, after their data (kLate).
  const bool spare = K == 1 && bdim_x() >= n_packs + p.world_size;
  // On AMD from `q`, the parameters read afresh where it is used (not held across the rows:
  // arfuse.h `fresh_params`).
  auto spare_of = [&](const LaunchParams& q) {
    return ARFUSE_FRESH_PARAMS ? K == 1 && bdim_x() >= q.hidden / Pack<E>::N + q.world_size : spare;
  };
  if (!kLate) check_headers<E>(l);
  // Where the first threads check the headers (no spare threads), each reads its peer's header
  // once before it waits for the data: the read's round trip overlaps the data's travel, and a
  // header seen to match needs no read after the data (check_headers `seen`). What it saw waits
  // in shared memory, not in a register across the row routine.
  __shared__ int seen[ARFUSE_MAX_RANKS];
  if (kLate && !spare) {
    const u32 t = tid_x();
    if (t < p.world_size) seen[t] = t != p.rank && bid_x() < p.rows && sends ? peer_header<E>(l, t) : 0;
  }
  for (u32 row = bid_x(); row < fresh_params(p).rows && sends; row += gdim_x()) {  // (arfuse.h)
    const bool first = use_early && row == bid_x();
    const Launch lr = {fresh_params(p), l.epoch, l.rot, l.op, l.abort};  // per row (arfuse.h)
    auto sum = [&](int k, u64 index) {
      return receive_sum<E, kLate>(lr, index, first && k == 0 ? early.input : load_pack<E>(lr.p.input, index));
    };
#ifdef ARFUSE_EXP_NO_NORM  // measurement only: the sum goes to `out`, no row routine
    for (u32 j = tid_x(); j < n_packs; j += bdim_x())
      store_pack<E>(p.out, (u64)row * n_packs + j, sum(j == tid_x() ? 0 : 1, (u64)row * n_packs + j));
    if (kLate && row == bid_x()) check_headers<E>(l, spare);
    continue;
#endif
    auto checks = [&] {
      if (kLate && row == bid_x()) check_headers<E>(lr, spare_of(lr.p), seen);
      // Every peer's data of the block's last row is in: the next kernel of the stream may start
      // (a programmatic dependent) while this block normalises. Not before: blocks of the next
      // call that spin while peers' blocks of this one wait for a multiprocessor could hang.
      // Only threads that waited for a pack of the row release: the first release of any thread
      // counts for the whole block, and a header checker (the spare warp) has seen only the
      // peers' block 0, not that their block of this row runs (8 ranks on one H200 hung so).
      if (row + gdim_x() >= p.rows && tid_x() < n_packs) release_dependent_grid();
      if constexpr (HasEpilogue<E>::value && kLate) return RereadTid{};  // see RereadTid
    };
    if (!norm_row<E, K>(p, row, sum, l.abort, first, early, checks)) return false;
  }
  const LaunchParams& q = fresh_params(p);
  const bool no_row =  // refused or empty
      ARFUSE_FRESH_PARAMS ? (q.flags & ARFUSE_FLAG_REFUSED) != 0 || bid_x() >= q.rows : !sends || bid_x() >= p.rows;
  if (kLate && no_row) check_headers<E>(l, spare_of(q));
  block_sync();
  return *l.abort == 0;
}

template <class E>
__device__ __forceinline__ bool fused_1stage(const Launch& l, const Early<E>& early) {
  if (l.p.hidden / Pack<E>::N <= bdim_x()) return fused_rows<E, 1>(l, early.valid, early);
  return fused_rows<E, ARFUSE_MAX_PACKS_PER_THREAD>(l, false, early);
}

template <class E>
__device__ __forceinline__ bool allreduce_1stage(const Launch& l) {
  constexpr u32 K = ARFUSE_MAX_PACKS_PER_THREAD;
  const LaunchParams& p = l.p;
  const u64 packs = (p.flags & ARFUSE_FLAG_REFUSED) ? 0 : (u64)p.rows * p.hidden / Pack<E>::N;
  const u64 stride = (u64)gdim_x() * bdim_x();
  for (u64 k = (u64)bid_x() * bdim_x() + tid_x(); k < packs; k += stride) push_pack<E>(l, k, load_pack<E>(p.input, k));
  check_headers<E>(l);
  // Rounds of K packs per thread; `base` is the same in every thread of the block, so every thread
  // meets every block barrier. Sums are written only once the block's header checks are done.
  for (u64 base = (u64)bid_x() * bdim_x(); base < packs; base += K * stride) {
    Pack<E> sums[K];
#pragma unroll
    for (u32 i = 0; i < K; ++i) {
      const u64 k = base + tid_x() + i * stride;
      if (k < packs) sums[i] = receive_sum<E, false>(l, k, load_pack<E>(p.input, k));
    }
    block_sync();
    if (*l.abort) return false;
#pragma unroll
    for (u32 i = 0; i < K; ++i) {
      const u64 k = base + tid_x() + i * stride;
      if (k < packs) store_pack<E>(p.out, k, sums[i]);
    }
  }
  block_sync();
  return *l.abort == 0;
}

// ---- The 2-stage path: a pushed reduce-scatter between two barriers. ----
// Rank r reduces chunk r of the call's packs (chunk_of). Each rank pushes the part of its input in
// chunk o into its slot of rank o's receive area (params.rs `receive_slot_offset`) and arrives at
// barrier 2e; once every peer has arrived, it sums its own chunk in rank order (its own part read
// where it is, the peers' from its local receive area) and pushes the sums into every rank's
// scratch, then barrier 2e + 1; the second kernel reads its scratch locally. Nobody reads a
// peer's memory and nothing is copied locally. The barriers make the areas reusable at once: a
// peer pushes into our receive area again only in a later call, after it passed this call's
// barrier 2e + 1, which needs our arrival, which comes after our last read of the area; it pushes
// into our scratch only after the next call's barrier 2e' (our second kernel has run by then:
// stream order).

// The items rank `r` owns of `items` (params.rs `chunk_range`): packs in the unfused path's
// reduce-scatter (u64), rows in the fused 2-stage call (u32).
template <class T>
__device__ __forceinline__ void chunk_of(u32 r, u32 world, T items, T* start, T* end) {
  const T per_rank = (items + world - 1) / world;
  *start = r * per_rank < items ? r * per_rank : items;
  *end = (r + 1) * per_rank < items ? (r + 1) * per_rank : items;
}

// Sums over ranks of packs `first + i * stride` (i < U, those below `end`) of our chunk (which
// starts at `start`), in rank order, -0.0 read as +0.0 (finish_sum), rounded to storage: our own
// part from our input, every peer's from its slot of our receive area (`slot_bytes` apart:
// params.rs `receive_slot_offset`). The U packs of one rank are read at once, so that a thread
// has U loads in flight, not one.
template <class E, u32 U>
__device__ __forceinline__ void sum_received(const Launch& l, u64 slot_bytes, u64 start, u64 first, u64 stride,
                                             u64 end, Pack<E> (&sums)[U]) {
  constexpr int N = Pack<E>::N;
  const LaunchParams& p = l.p;
  float acc[U][N];
  for (u32 r = 0; r < p.world_size; ++r) {
    const u64 base = r == p.rank ? p.input : p.receive[p.rank] + r * slot_bytes;
    const u64 offset = r == p.rank ? 0 : start;
    Pack<E> x[U];
#pragma unroll
    for (u32 i = 0; i < U; ++i)
      if (first + i * stride < end) x[i] = load_pack<E>(base, first + i * stride - offset);
#ifdef ARFUSE_EXP_SENTINEL_SCATTER  // measurement only: the receive area stays armed (fused_2stage)
#pragma unroll
    for (u32 i = 0; i < U; ++i)
      if (r != p.rank && first + i * stride < end)
        store16_sys((ARFUSE_GLOBAL pack16*)base + (first + i * stride - offset), sentinel_pack());
#endif
#pragma unroll
    for (u32 i = 0; i < U; ++i) {
      float f[N];
      x[i].widen(f);
#pragma unroll
      for (int j = 0; j < N; ++j) acc[i][j] = r == 0 ? f[j] : acc[i][j] + f[j];
    }
  }
#pragma unroll
  for (u32 i = 0; i < U; ++i) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc[i][j] = finish_sum(acc[i][j]);
    sums[i] = Pack<E>::narrow(acc[i]);
  }
}

template <class E>
__device__ __forceinline__ bool reduce_scatter(const Launch& l) {
  const LaunchParams& p = l.p;
  const u64 packs = (p.flags & ARFUSE_FLAG_REFUSED) ? 0 : (u64)p.rows * p.hidden / Pack<E>::N;
  const u64 stride = (u64)gdim_x() * bdim_x();
  const u64 first = (u64)bid_x() * bdim_x() + tid_x();
  // Each thread keeps several accesses in flight (a 16-byte access per thread and iteration
  // leaves too few bytes in flight for the copy rate): 4 packs per push step, 2 per sum step.
  constexpr u32 kPush = 4, kSum = 2;
  // Sender s's slot of an owner's receive area is s chunks in (params.rs `receive_slot_offset`).
  const u64 slot_bytes = (packs + p.world_size - 1) / p.world_size * 16u;
  // Block b pushes what every owner's block b will sum: its share of the owner's chunk. Owners in
  // the order after our rank, so that the ranks do not all write to the same one at once.
  for (u32 i = 1; i < p.world_size; ++i) {
    const u32 owner = (p.rank + i) % p.world_size;
    u64 start, end;
    chunk_of(owner, p.world_size, packs, &start, &end);
    const u64 slot = p.receive[owner] + p.rank * slot_bytes;
    for (u64 k = start + first; k < end; k += kPush * stride) {
      Pack<E> v[kPush];
#pragma unroll
      for (u32 j = 0; j < kPush; ++j)
        if (k + j * stride < end) v[j] = load_pack<E>(p.input, k + j * stride);
#pragma unroll
      for (u32 j = 0; j < kPush; ++j)
        if (k + j * stride < end) store_pack<E>(slot, k + j * stride - start, v[j]);
    }
  }
  if (!barrier<E>(l, 2 * l.epoch, true)) return false;
  u64 start, end;
  chunk_of(p.rank, p.world_size, packs, &start, &end);
  for (u64 k = start + first; k < end; k += kSum * stride) {
    Pack<E> s[kSum];
    sum_received<E, kSum>(l, slot_bytes, start, k, stride, end, s);
#pragma unroll
    for (u32 i = 0; i < kSum; ++i)
      if (k + i * stride < end)
        for (u32 r = 0; r < p.world_size; ++r) store_pack<E>(p.scratch[r], k + i * stride, s[i]);
  }
  return barrier<E>(l, 2 * l.epoch + 1, false);
}

// ---- The fused 2-stage path: a pushed reduce-scatter by rows, the owner's row routine, and a
// local second kernel for the other rows. ----
// Rank r owns rows [r c, (r + 1) c) of the call, c = ceil(rows / P) (params.rs `chunk_len`). Each
// rank pushes its rows of chunk o into its slot of rank o's receive area (`receive_slot_offset`);
// after barrier 2e, each rank sums its own rows in rank order (its own input where it is), pushes
// every rounded sum into each peer's scratch and runs the row routine on the row (residual add,
// RMSNorm, epilogue: the outputs of its rows); barrier 2e + 1 closes the call, and the second
// kernel (scratch_add_rmsnorm) runs the row routine on the other rows from the sums in this
// rank's scratch. Per block: block b pushes, sums and forwards the chunk rows b, b + G, ... of
// every owner, so each barrier pairs a block with its namesakes only. The areas are reused at
// once for the reasons of the packed reduce-scatter above.

// Whether the fused 2-stage path's first kernel runs the row routine on its own rows (one pack a
// thread, a block of up to 1024 threads: source.rs launches it so), or leaves every row to the
// second kernel, which runs at any width.
__device__ __forceinline__ bool owner_normalises(u32 n_packs) { return n_packs <= 1024u; }

template <class E>
__device__ __forceinline__ bool fused_2stage(const Launch& l) {
  const LaunchParams& p = l.p;
  const u32 rows = (p.flags & ARFUSE_FLAG_REFUSED) ? 0 : p.rows;
  const u32 n_packs = p.hidden / Pack<E>::N;
  const u32 t = tid_x(), g = gdim_x();
  // Several rows per step, so that a thread has as many pushes in flight.
  constexpr u32 kRows = 4;
  // Sender s's rows of an owner's chunk are s chunks into its receive area (params.rs
  // `receive_slot_offset`).
  const u64 slot_bytes = (u64)((rows + p.world_size - 1) / p.world_size) * n_packs * 16u;
  for (u32 i = 1; i < p.world_size; ++i) {
    const u32 owner = (p.rank + i) % p.world_size;
    u32 start, end;
    chunk_of(owner, p.world_size, rows, &start, &end);
    const u64 slot = p.receive[owner] + p.rank * slot_bytes;
    for (u32 row = start + bid_x(); row < end; row += kRows * g)
      for (u32 j = t; j < n_packs; j += bdim_x()) {
        Pack<E> v[kRows];
#pragma unroll
        for (u32 u = 0; u < kRows; ++u)
          if (row + u * g < end) v[u] = load_pack<E>(p.input, (u64)(row + u * g) * n_packs + j);
#pragma unroll
        for (u32 u = 0; u < kRows; ++u)
          if (row + u * g < end) {
#ifdef ARFUSE_EXP_SENTINEL_SCATTER
            store16_sys((ARFUSE_GLOBAL pack16*)slot + (u64)(row + u * g - start) * n_packs + j, sendable(v[u]));
#else
            store_pack<E>(slot, (u64)(row + u * g - start) * n_packs + j, v[u]);
#endif
          }
      }
  }
#ifdef ARFUSE_EXP_SENTINEL_SCATTER
  // Measurement only (issue 13 item 3): no barrier 2e. The data is its own arrival flag (the
  // receive area is armed at allocation and re-armed by its reader); the call headers are
  // checked first, so that no sum goes to a peer in another call.
  check_headers<E>(l);
  block_sync();
  if (*l.abort) return false;
#elif !defined(ARFUSE_EXP_NO_2STAGE_BARRIERS)
  if (!barrier<E>(l, 2 * l.epoch, true)) return false;
#endif
  u32 start, end;
  chunk_of(p.rank, p.world_size, rows, &start, &end);
  // Pack `index` of the call summed in rank order (ours from our input, every peer's from its
  // slot of our receive area), rounded, and pushed into every peer's scratch. `received` is where
  // pack 0 of the call would be in sender 0's slot (modulo 2^64), so that `index` needs no offset.
  const u64 received = p.receive[p.rank] - (u64)start * n_packs * 16u;
  auto sum = [&](int, u64 index) {
    constexpr int N = Pack<E>::N;
    float acc[N];
    for (u32 r = 0; r < p.world_size; ++r) {
#ifdef ARFUSE_EXP_SENTINEL_SCATTER
      Pack<E> x;
      if (r == p.rank) {
        x = load_pack<E>(p.input, index);
      } else {
        take_pushed<E, false>(l, (ARFUSE_GLOBAL pack16*)(received + r * slot_bytes) + index, r, x.v);
      }
#else
      const Pack<E> x = load_pack<E>(r == p.rank ? p.input : received + r * slot_bytes, index);
#endif
      float f[N];
      x.widen(f);
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = r == 0 ? f[i] : acc[i] + f[i];
    }
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = finish_sum(acc[i]);
    const Pack<E> s = Pack<E>::narrow(acc);
    for (u32 r = 0; r < p.world_size; ++r)
      if (r != p.rank) store_pack<E>(p.scratch[r], index, s);
    return s;
  };
  if (owner_normalises(n_packs)) {
    auto none = [] {};
    for (u32 row = start + bid_x(); row < end; row += g)
      if (!norm_row<E, 1>(p, row, sum, l.abort, false, Early<E>{}, none)) return false;
  } else {
    // Rows wider than the block (K > 1 packs a thread): the sums go into our own scratch too,
    // and the second kernel normalises every row (the row routine at K > 1 beside this kernel's
    // pushes would spill registers on sm_90).
    for (u32 row = start + bid_x(); row < end; row += g)
      for (u32 j = t; j < n_packs; j += bdim_x()) {
        const u64 index = (u64)row * n_packs + j;
        store_pack<E>(p.scratch[p.rank], index, sum(0, index));
      }
  }
#if defined(ARFUSE_EXP_NO_CLOSING_BARRIER) || defined(ARFUSE_EXP_NO_2STAGE_BARRIERS)
  // Measurement only (issue 13 item 3): what a barrier-free 2-stage call could save at most. No
  // barrier 2e + 1 (and with NO_2STAGE_BARRIERS no barrier 2e either, nor the header check): the
  // second kernel may read sums not yet pushed and a fast peer may push the next call's rows
  // into our receive area while we read it, so the outputs are wrong. This call never waits, but
  // a rank may run calls ahead of its peer past the header rotations, and a later 1-stage call
  // then waits to its deadline (a graph of 100 such calls did, 2026-12-08).
  return true;
#else
  return barrier<E>(l, 2 * l.epoch + 1, false);
#endif
}

// Runs a cross-rank kernel body. With barrier_base 0 the epoch e comes from the rank's epoch word
// (device memory, so a captured graph takes a fresh epoch on every replay); otherwise it is
// barrier_base / 2. The call's header goes to every peer first. Once every block has read the
// word it is advanced: by the one block at once, else by the last block to finish (every block
// reads the word before it counts itself done). Only this rank's later launches read the word
// (stream order makes our writes visible to them): no system fence.
template <class E, class Body>
__device__ __forceinline__ void cross_rank(const LaunchParams& p, u32 op, Body body) {
  const bool device_epoch = p.barrier_base == 0;
  const u64 epoch = device_epoch ? load_relaxed_device(epoch_word(p.signals[p.rank])) + 1 : p.barrier_base / 2;
  __shared__ int abort;
  const u32 t = tid_x();
  if (t == 0) abort = 0;
  block_sync();
  const Launch l = {p, epoch, (u32)(epoch % ARFUSE_PUSH_ROTATIONS), op, &abort};
  const bool one_block = gdim_x() == 1;
  if (device_epoch && one_block && t == 0) store_relaxed_sys(epoch_word(p.signals[p.rank]), epoch);
  publish_header<E>(l);
  // On AMD from the parameters, grid and thread id read afresh (arfuse.h): the masks of the
  // kernel's start would otherwise stay live in SGPRs across the body.
  if (!body(l) || (ARFUSE_FRESH_PARAMS ? fresh_params(p).barrier_base != 0 : !device_epoch) ||
      (ARFUSE_FRESH_PARAMS ? fresh_gdim_x() == 1 : one_block))
    return;
  const LaunchParams& q = fresh_params(p);
  block_sync();
  if ((ARFUSE_FRESH_PARAMS ? fresh_tid_x() : t) == 0) {
    if (fetch_add_device(done_word(q.signals[q.rank]), 1) == gdim_x() - 1) {
      store_relaxed_sys(done_word(q.signals[q.rank]), 0);
      store_relaxed_sys(epoch_word(q.signals[q.rank]), epoch);
    }
  }
}

// The kernel after a cross-rank one (2-stage's second kernel, the unfused path's add+RMSNorm)
// writes nothing once this rank's error word is set (a peer timeout, a call mismatch): there is
// no sum to read then. The word is never cleared, and the
// operator refuses every call after it.
__device__ __forceinline__ bool first_stage_failed(const LaunchParams& p) {
  return p.signals[p.rank] != 0 && load_relaxed_sys(error_word(p.signals[p.rank])) != 0;
}

// The fused 2-stage path's second kernel: the rows the other ranks own (the first kernel did
// ours), from the sums they pushed into our scratch; every row where rows are wider than the
// block (the first kernel then only summed ours, into our scratch too).
template <class E>
__device__ __forceinline__ void scratch_add_rmsnorm(const LaunchParams& p) {
  if (first_stage_failed(p)) return;
  const u64 scratch = p.scratch[p.rank];
  u32 start, end;
  chunk_of(p.rank, p.world_size, p.rows, &start, &end);
  const u32 ours = owner_normalises(p.hidden / Pack<E>::N) ? end - start : 0;
  norm_rows<E>(p, p.rows - ours, [&](u32 i) { return i < start ? i : i + ours; },
               [&](int, u64 k) { return load_pack<E>(scratch, k); });
}

template <class E>
__device__ __forceinline__ void add_rmsnorm(const LaunchParams& p) {
  if (first_stage_failed(p)) return;  // the unfused path's all-reduce gave up: no sum to normalise
  norm_rows<E>(p, p.rows, [](u32 i) { return i; }, [&](int, u64 k) { return load_pack<E>(p.input, k); });
}

template <class E>
__device__ __forceinline__ void allgather(const LaunchParams& p) {
  if (first_stage_failed(p)) return;
  const u64 packs = (u64)p.rows * p.hidden / Pack<E>::N;
  for (u64 k = (u64)bid_x() * bdim_x() + tid_x(); k < packs; k += (u64)gdim_x() * bdim_x())
    store_pack<E>(p.out, k, load_pack<E>(p.scratch[p.rank], k));
}

// ---- The separate FP8 quantisation (Op::QuantizeFp8): a local kernel, no peers. ----
// Reads `input` [rows, hidden] (the `out` of a plain call, or any tensor) and writes `out_q` and
// `scales` exactly as the epilogue kernels do for the same `out` (contract.rs `quantise_row`):
// per element encode(f32(v) / scale), with the epilogue's own store_codes, pack_amax and
// fp8_dynamic_scale. Only the scaling and format bits of LaunchParams::epilogue are read
// (and quant_scale per tensor). The amax is a maximum (exact, independent of the order it is
// taken in), so this kernel's reduction shape need not be the epilogue's for the same bits.

// One row: each thread holds its K packs (K as in norm_row), so the row is read once. Per group,
// the 128 / N lanes of a group (16 for bf16/f16, 32 for f32: inside one 32-lane group, as blocks
// are whole warps and hidden a multiple of 128) exchange their maxima by a butterfly; per token,
// the block does (warps' maxima through shared memory).
template <class E, int K>
__device__ __forceinline__ void quantize_row(const LaunchParams& params, u32 row) {
  constexpr int N = Pack<E>::N;
  const LaunchParams& p = fresh_params(params);  // per row (arfuse.h)
  const u32 t = fresh_tid_x();
  const u32 n_packs = p.hidden / N;
  const u64 row_pack = (u64)row * n_packs;
  const u32 scaling = p.epilogue & ARFUSE_EPILOGUE_SCALE_MASK;
  const bool fnuz = (p.epilogue & ARFUSE_EPILOGUE_FNUZ) != 0u;
  Pack<E> v[K];
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if ((u32)k * bdim_x() >= n_packs) break;  // the same in every thread
    const u32 j = t + k * bdim_x();
    float pack_max = 0.0f;
    if (j < n_packs) {
      v[k] = load_pack<E>(p.input, row_pack + j);
      if (scaling == ARFUSE_EPILOGUE_SCALE_PER_TENSOR)
        store_codes<E>(p.out_q, row_pack + j, v[k], p.quant_scale, fnuz);
      else
        pack_max = pack_amax<E>(v[k]);
    }
    if (scaling == ARFUSE_EPILOGUE_SCALE_PER_GROUP) per_group_codes<E>(p, row, j, n_packs, v[k], pack_max, fnuz);
    amax = pack_max > amax ? pack_max : amax;
  }
  if (scaling != ARFUSE_EPILOGUE_SCALE_PER_TOKEN) return;
  const float scale = per_token_scale(amax, fnuz, (ARFUSE_GLOBAL float*)p.scales + row);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const u32 j = t + k * bdim_x();
    if (j < n_packs) store_codes<E>(p.out_q, row_pack + j, v[k], scale, fnuz);
  }
}

template <class E>
__device__ __forceinline__ void quantize_fp8(const LaunchParams& p) {
  for (u32 row = bid_x(); row < p.rows; row += gdim_x()) {
    if (p.hidden / Pack<E>::N <= bdim_x())
      quantize_row<E, 1>(p, row);
    else
      quantize_row<E, ARFUSE_MAX_PACKS_PER_THREAD>(p, row);
  }
}

// One extern "C" entry point per (op, dtype): the symbols of KernelId::symbol(). The parameters
// are never copied (see `Launch`). The op codes are the indices in Op::ALL.
#define ARFUSE_KERNEL(name) extern "C" __global__ void ARFUSE_LAUNCH_BOUNDS name(const ARFUSE_GRID_CONSTANT LaunchParams p)
#define ARFUSE_INSTANTIATE(dtype, E)                                                                  \
  ARFUSE_KERNEL(fused_ar_rmsnorm_1stage_##dtype) {                                                    \
    const Early<E> early = load_early<E>(p); /* before the epoch read: see load_early */              \
    cross_rank<E>(p, 0, [&](const Launch& l) { return fused_1stage<E>(l, early); });                  \
  }                                                                                                   \
  ARFUSE_KERNEL(reduce_scatter_##dtype) {                                                             \
    cross_rank<E>(p, 1, [](const Launch& l) { return reduce_scatter<E>(l); });                        \
  }                                                                                                   \
  ARFUSE_KERNEL(scratch_add_rmsnorm_##dtype) { scratch_add_rmsnorm<E>(p); }                           \
  ARFUSE_KERNEL(allreduce_1stage_##dtype) {                                                           \
    cross_rank<E>(p, 3, [](const Launch& l) { return allreduce_1stage<E>(l); });                      \
  }                                                                                                   \
  ARFUSE_KERNEL(allgather_##dtype) { allgather<E>(p); }                                               \
  ARFUSE_KERNEL(add_rmsnorm_##dtype) { add_rmsnorm<E>(p); }                                           \
  ARFUSE_KERNEL(fused_ar_rmsnorm_1stage_epi_##dtype) {                                                \
    const Early<Epi<E>> early = load_early<Epi<E>>(p);                                                \
    cross_rank<Epi<E>>(p, 6, [&](const Launch& l) { return fused_1stage<Epi<E>>(l, early); }); \
  }                                                                                                   \
  ARFUSE_KERNEL(scratch_add_rmsnorm_epi_##dtype) { scratch_add_rmsnorm<Epi<E>>(p); }                  \
  ARFUSE_KERNEL(add_rmsnorm_epi_##dtype) { add_rmsnorm<Epi<E>>(p); }

ARFUSE_INSTANTIATE(bf16, Bf16)
ARFUSE_INSTANTIATE(f16, F16)
ARFUSE_INSTANTIATE(f32, F32)

// The separate quantisation kernel (the last op of Op::ALL), apart from the macro above.
#define ARFUSE_INSTANTIATE_QUANTIZE(dtype, E) \
  ARFUSE_KERNEL(quantize_fp8_##dtype) { quantize_fp8<E>(p); }

ARFUSE_INSTANTIATE_QUANTIZE(bf16, Bf16)
ARFUSE_INSTANTIATE_QUANTIZE(f16, F16)
ARFUSE_INSTANTIATE_QUANTIZE(f32, F32)

// The fused 2-stage path's first kernel (the last ops of Op::ALL), plain and with the epilogue.
#define ARFUSE_INSTANTIATE_2STAGE(dtype, E)                                                          \
  ARFUSE_KERNEL(fused_ar_rmsnorm_2stage_##dtype) {                                                 \
    cross_rank<E>(p, 10, [](const Launch& l) { return fused_2stage<E>(l); });                      \
  }                                                                                                \
  ARFUSE_KERNEL(fused_ar_rmsnorm_2stage_epi_##dtype) {                                             \
    cross_rank<Epi<E>>(p, 11, [](const Launch& l) { return fused_2stage<Epi<E>>(l); });            \
  }

ARFUSE_INSTANTIATE_2STAGE(bf16, Bf16)
ARFUSE_INSTANTIATE_2STAGE(f16, F16)
ARFUSE_INSTANTIATE_2STAGE(f32, F32)
