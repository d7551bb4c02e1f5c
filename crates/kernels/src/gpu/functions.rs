//! [`FunctionTable`]: the loaded function of every kernel of a module, found by [`KernelId`]
//! without a lookup by name at launch time.

use crate::{DType, Error, KernelId, Op, Result};

/// One slot per (op, dtype), in the order of [`Op::ALL`] × [`DType::ALL`].
fn slot(kernel: KernelId) -> usize {
    let op = Op::ALL.iter().position(|&op| op == kernel.op).unwrap_or(0);
    let dtype = DType::ALL.iter().position(|&dtype| dtype == kernel.dtype).unwrap_or(0);
    op * DType::ALL.len() + dtype
}

/// The functions of one loaded module, `None` where the module has no such kernel (e.g. an f32
/// variant left out of a build).
pub(crate) struct FunctionTable<F> {
    functions: Vec<Option<F>>,
}

impl<F> FunctionTable<F> {
    /// A table with no functions (a module whose functions are not resolved yet; the hip backend
    /// owns its module before it resolves them, so that an error unloads it).
    #[cfg_attr(not(feature = "hip"), allow(dead_code))]
    pub(crate) const fn empty() -> Self {
        FunctionTable { functions: Vec::new() }
    }

    /// Resolves every kernel with `resolve` (`Ok(None)`: the module lacks the symbol), in slot order.
    pub(crate) fn resolve(mut resolve: impl FnMut(KernelId) -> Result<Option<F>>) -> Result<Self> {
        let mut functions = Vec::with_capacity(Op::ALL.len() * DType::ALL.len());
        for op in Op::ALL {
            for dtype in DType::ALL {
                let kernel = KernelId { op, dtype };
                debug_assert_eq!(slot(kernel), functions.len());
                functions.push(resolve(kernel)?);
            }
        }
        Ok(FunctionTable { functions })
    }

    /// Every function the module has.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &F> {
        self.functions.iter().flatten()
    }

    /// The function of `kernel`, or [`Error::Compile`] naming its symbol, the architecture and
    /// `module` (what was loaded, e.g. `sm_90 cubin`) if the module does not define it.
    pub(crate) fn get(&self, kernel: KernelId, arch: &str, module: impl FnOnce() -> String) -> Result<&F> {
        self.functions.get(slot(kernel)).and_then(Option::as_ref).ok_or_else(|| Error::Compile {
            kernel: kernel.symbol(),
            arch: arch.to_string(),
            log: format!("the loaded module ({}) has no symbol `{}`", module(), kernel.symbol()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_its_own_slot_and_a_missing_one_is_named() {
        let table = FunctionTable::resolve(|k| Ok((k.dtype != DType::F32).then(|| k.symbol()))).expect("resolve");
        for op in Op::ALL {
            let bf16 = KernelId { op, dtype: DType::Bf16 };
            assert_eq!(table.get(bf16, "sm_90", String::new).ok(), Some(&bf16.symbol()));
            let f32 = KernelId { op, dtype: DType::F32 };
            match table.get(f32, "sm_90", || "sm_90 cubin".into()) {
                Err(Error::Compile { kernel, arch, log }) => {
                    assert_eq!((kernel.as_str(), arch.as_str()), (f32.symbol().as_str(), "sm_90"));
                    assert!(log.contains("sm_90 cubin") && log.contains(&f32.symbol()), "{log}");
                }
                other => panic!("expected a compile error, got {other:?}"),
            }
        }
        assert!(FunctionTable::<()>::empty()
            .get(KernelId { op: Op::ALL[0], dtype: DType::Bf16 }, "x", String::new)
            .is_err());
    }
}
