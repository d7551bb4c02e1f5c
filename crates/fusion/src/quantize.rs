//! The separate FP8 quantisation kernel: [`quantize_fp8`].
//!
//! What an engine runs after a plain call (or after any other kernel) when it cannot use the fused
//! FP8 output of [`AllReduceRmsNorm::forward_with`](crate::AllReduceRmsNorm::forward_with): a local
//! kernel (no peers, no shared buffers, no operator needed) that reads a `[rows, hidden]` tensor
//! and writes its FP8 codes and scales. They are bit-identical to what the fused epilogue writes
//! for an `out` of the same values (`arfuse_kernels::contract`, "Epilogues", the one sequence:
//! `contract::quantise_row`), so quantising the plain call's `out` gives the fused call's codes and
//! scales. The bench's `<path>+quant` rows time exactly this pairing.

use crate::operator::{QuantOut, TensorRef};
use crate::{Error, Result};
use arfuse_kernels::contract::{Epilogue, Scaling, QUANT_GROUP};
use arfuse_kernels::params::epilogue_bits;
use arfuse_kernels::{Backend, Element, KernelId, LaunchParams, Op, PACK_BYTES};

/// Quantises `input` (`[rows, hidden]` elements of `T`, `rows = input.len() / hidden`) into
/// `out.codes` (`rows * hidden` bytes of `out.quant.format`) and, for the dynamic scalings,
/// `out.scales` (f32 `[rows]` per token, `[rows, hidden / 128]` per group, row major), enqueued on
/// `stream` (finished on return on the cpu backend).
///
/// Validated like a call of the operator, with nothing launched on bad input: a hidden size that
/// is zero, not a whole number of 16-byte packs or above the kernels' limit
/// ([`Error::HiddenUnsupported`], [`Error::HiddenNotMultipleOfPack`]); an input that is not whole
/// rows, codes or scales of the wrong length ([`Error::ShapeMismatch`]); per-group scaling of a
/// hidden size not a multiple of 128 ([`Error::QuantGroupUnsupported`]); a static scale that is not
/// finite and positive ([`Error::BadQuantScale`]); an input or codes not 16-byte aligned, scales
/// not 4-byte aligned ([`Error::Misaligned`]); any overlap of the three ([`Error::Aliasing`]).
/// Zero rows launch nothing.
///
/// On a GPU backend the kernels are loaded on first use if no operator has loaded them on
/// `device` yet ([`Backend::prepare`]); loading can wait for the device to go idle, so an engine
/// whose other kernels spin on peers calls `B::prepare(device)` (or creates its operator) first.
/// Tensors whose owners track their uses (cudarc's) are ordered as in a call of the operator.
pub fn quantize_fp8<B: Backend, T: Element>(
    device: &B::Device,
    stream: &B::Stream,
    input: TensorRef<'_, B, T>,
    hidden: usize,
    mut out: QuantOut<'_, B>,
) -> Result<()> {
    let params = validate::<B, T>(&input, hidden, &out)?;
    if let Some(order) = input.order {
        order.before_read(stream)?;
    }
    if let Some(order) = out.scales.as_mut().and_then(|s| s.order.as_deref_mut()) {
        order.before_write(stream)?;
    }
    let launched = if params.rows == 0 {
        Ok(())
    } else {
        // SAFETY: `validate` checked that `input` holds `rows * hidden` elements of `T`, the codes
        // `rows * hidden` bytes and the scales the scaling's count of f32, all aligned, none
        // overlapping another; the borrows keep them alive and unaliased until the work executed.
        unsafe { B::launch(device, stream, KernelId { op: Op::QuantizeFp8, dtype: T::DTYPE }, &params) }
    };
    if let Some(order) = input.order {
        order.after_read(stream);
    }
    if let Some(order) = out.scales.as_mut().and_then(|s| s.order.as_deref_mut()) {
        order.after_write(stream);
    }
    launched.map_err(Error::from)
}

/// The launch parameters of a valid quantisation, or why it is refused.
fn validate<B: Backend, T: Element>(
    input: &TensorRef<'_, B, T>,
    hidden: usize,
    out: &QuantOut<'_, B>,
) -> Result<LaunchParams> {
    let pack = T::DTYPE.pack_elems();
    let max = arfuse_kernels::max_hidden(T::DTYPE);
    if hidden == 0 || hidden > max {
        return Err(Error::HiddenUnsupported { hidden, max });
    }
    if hidden % pack != 0 {
        return Err(Error::HiddenNotMultipleOfPack { hidden, pack, dtype: T::DTYPE });
    }
    let elems = input.len;
    if elems % hidden != 0 {
        return Err(Error::ShapeMismatch {
            what: "input (not a whole number of rows)",
            expected: elems.next_multiple_of(hidden),
            got: elems,
        });
    }
    let rows = elems / hidden;
    let u32_rows = u32::try_from(rows).map_err(|_| Error::ShapeMismatch {
        what: "input (rows beyond u32)",
        expected: u32::MAX as usize * hidden,
        got: elems,
    })?;
    match out.quant.scaling {
        Scaling::PerTensor(scale) if !scale.is_finite() || scale <= 0.0 => return Err(Error::BadQuantScale { scale }),
        Scaling::PerGroup if hidden % QUANT_GROUP != 0 => {
            return Err(Error::QuantGroupUnsupported { hidden, group: QUANT_GROUP })
        }
        _ => {}
    }
    if out.codes.len != elems {
        return Err(Error::ShapeMismatch { what: "codes", expected: elems, got: out.codes.len });
    }
    let want_scales = rows * out.quant.scaling.scales_per_row(hidden);
    let scales = out.scales.as_ref().map_or((0, 0), |t| (t.ptr.0, t.len));
    if scales.1 != want_scales {
        return Err(Error::ShapeMismatch { what: "scales", expected: want_scales, got: scales.1 });
    }
    if elems > 0 {
        for (what, ptr) in [("input", input.ptr.0), ("codes", out.codes.ptr.0)] {
            if ptr % PACK_BYTES as u64 != 0 {
                return Err(Error::Misaligned { what, ptr, align: PACK_BYTES });
            }
        }
    }
    if want_scales > 0 && scales.0 % 4 != 0 {
        return Err(Error::Misaligned { what: "scales", ptr: scales.0, align: 4 });
    }
    let spans = [
        ("input", input.ptr.0, elems as u64 * T::DTYPE.size() as u64),
        ("codes", out.codes.ptr.0, elems as u64),
        ("scales", scales.0, want_scales as u64 * 4),
    ];
    for (i, &(a, pa, la)) in spans.iter().enumerate() {
        for &(b, pb, lb) in &spans[i + 1..] {
            let overlap = la > 0
                && lb > 0
                && u128::from(pa) < u128::from(pb) + u128::from(lb)
                && u128::from(pb) < u128::from(pa) + u128::from(la);
            if overlap {
                return Err(Error::Aliasing { a, b, identical: pa == pb && la == lb });
            }
        }
    }
    // Only the scaling and format bits: the kernel reads nothing else of the epilogue.
    let (epilogue, quant_scale) = epilogue_bits(&Epilogue { quant: Some(out.quant), ..Epilogue::default() });
    Ok(LaunchParams {
        input: input.ptr.0,
        out_q: out.codes.ptr.0,
        scales: scales.0,
        quant_scale,
        epilogue,
        rows: u32_rows,
        hidden: hidden as u32,
        world_size: 1,
        ..LaunchParams::default()
    })
}
