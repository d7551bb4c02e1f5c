//! The separate FP8 quantisation kernel: [`quantize_fp8`].
//!
//! What an engine runs after a plain call (or after any other kernel) when it cannot use the fused
//! FP8 output of [`AllReduceRmsNorm::forward_with`](crate::AllReduceRmsNorm::forward_with): a local
//! kernel (no peers, no shared buffers, no operator needed) that reads a `[rows, hidden]` tensor
//! and writes its FP8 codes and scales. They are bit-identical to what the fused epilogue writes
//! for an `out` of the same values (`arfuse_kernels::contract`, "Epilogues", the one sequence:
//! `contract::quantise_row`), so quantising the plain call's `out` gives the fused call's codes and
//! scales. The bench's `<path>+quant` rows time exactly this pairing.

use crate::operator::{check_hidden, check_quant_out, whole_rows, QuantOut, TensorRef};
use crate::{Error, Result};
use arfuse_kernels::contract::Epilogue;
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
    if let Some(order) = out.scales_order() {
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
    if let Some(order) = out.scales_order() {
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
    check_hidden::<T>(hidden)?;
    let elems = input.len;
    let rows = whole_rows(elems, hidden)?;
    let u32_rows = u32::try_from(rows).map_err(|_| Error::ShapeMismatch {
        what: "input (rows beyond u32)",
        expected: u32::MAX as usize * hidden,
        got: elems,
    })?;
    let input_bytes = elems as u64 * T::DTYPE.size() as u64;
    let scales = check_quant_out(out, rows, hidden, &[("input", input.ptr.0, input_bytes)])?;
    if elems > 0 && input.ptr.0 % PACK_BYTES as u64 != 0 {
        return Err(Error::Misaligned { what: "input", ptr: input.ptr.0, align: PACK_BYTES });
    }
    // Only the scaling and format bits: the kernel reads nothing else of the epilogue.
    let (epilogue, quant_scale) = epilogue_bits(&Epilogue { quant: Some(out.quant), ..Epilogue::default() });
    Ok(LaunchParams {
        input: input.ptr.0,
        out_q: out.codes.ptr.0,
        scales,
        quant_scale,
        epilogue,
        rows: u32_rows,
        hidden: hidden as u32,
        world_size: 1,
        ..LaunchParams::default()
    })
}
