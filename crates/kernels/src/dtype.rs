//! Storage dtypes and their conversions to and from `f32`.
//!
//! Every conversion from `f32` to a 16-bit storage type rounds to nearest, ties to even, on
//! every backend (`half` does so on the host; the kernel source writes the same rounding by hand).

use std::fmt;

/// The storage dtype of the tensors an operator moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DType {
    /// bfloat16.
    Bf16 = 0,
    /// IEEE half precision.
    F16 = 1,
    /// IEEE single precision.
    F32 = 2,
}

impl DType {
    /// All dtypes, in a fixed order.
    pub const ALL: [DType; 3] = [DType::Bf16, DType::F16, DType::F32];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Elements per 16-byte pack, the vector width of every kernel.
    pub const fn pack_elems(self) -> usize {
        crate::PACK_BYTES / self.size()
    }

    /// The short name used in kernel symbols and file names (`bf16`, `f16`, `f32`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An element type the kernels accept: `half::bf16`, `half::f16` or `f32`.
pub trait Element: bytemuck::Pod + Copy + Send + Sync + PartialEq + fmt::Debug + 'static {
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Exact widening to `f32`.
    fn to_f32(self) -> f32;
    /// Rounds to nearest, ties to even.
    fn from_f32(value: f32) -> Self;
    /// The raw bits, zero-extended.
    fn to_bits_u32(self) -> u32;
    /// Rebuilds a value from raw bits (the low `8 * size` bits are used).
    fn from_bits_u32(bits: u32) -> Self;
    /// `-0.0` becomes `+0.0`, everything else is unchanged (the contract's input canonicalisation).
    fn canonical_zero(self) -> Self {
        if self.to_bits_u32() == Self::NEG_ZERO_BITS {
            Self::from_bits_u32(0)
        } else {
            self
        }
    }
    /// The bit pattern of `-0.0`.
    const NEG_ZERO_BITS: u32;
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
    const NEG_ZERO_BITS: u32 = 0x8000;
    #[inline]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(value: f32) -> Self {
        half::bf16::from_f32(value)
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        u32::from(self.to_bits())
    }
    #[inline]
    fn from_bits_u32(bits: u32) -> Self {
        half::bf16::from_bits(bits as u16)
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    const NEG_ZERO_BITS: u32 = 0x8000;
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline]
    fn from_f32(value: f32) -> Self {
        half::f16::from_f32(value)
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        u32::from(self.to_bits())
    }
    #[inline]
    fn from_bits_u32(bits: u32) -> Self {
        half::f16::from_bits(bits as u16)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const NEG_ZERO_BITS: u32 = 0x8000_0000;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(value: f32) -> Self {
        value
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
    #[inline]
    fn from_bits_u32(bits: u32) -> Self {
        f32::from_bits(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1.0 + 2^-8 lies exactly between two bf16 values (1.0 and 1.0 + 2^-7): ties go to even (1.0).
        let tie = 1.0f32 + f32::powi(2.0, -8);
        assert_eq!(<half::bf16 as Element>::from_f32(tie).to_bits(), 0x3f80);
        // 1.0 + 3 * 2^-8 ties between 1+2^-7 (odd) and 1+2^-6 (even): goes up.
        let tie_up = 1.0f32 + 3.0 * f32::powi(2.0, -8);
        assert_eq!(<half::bf16 as Element>::from_f32(tie_up).to_bits(), 0x3f82);
    }

    #[test]
    fn negative_zero_is_canonicalised() {
        let nz = half::bf16::from_bits(0x8000);
        assert_eq!(nz.canonical_zero().to_bits(), 0);
        assert_eq!((-0.0f32).canonical_zero().to_bits(), 0);
        let small = half::f16::from_bits(0x8001);
        assert_eq!(small.canonical_zero().to_bits(), 0x8001);
    }

    #[test]
    fn pack_widths() {
        assert_eq!(DType::Bf16.pack_elems(), 8);
        assert_eq!(DType::F16.pack_elems(), 8);
        assert_eq!(DType::F32.pack_elems(), 4);
    }
}
