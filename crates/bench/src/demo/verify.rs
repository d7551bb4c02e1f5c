//! `arfuse-demo --verify-dump DIR`: checks the files a `--dump` wrote, independently of the run
//! that wrote them. For every shape it reads every rank's file (`rank{R}-{tokens}x{hidden}-{dtype}
//! .safetensors`: tensors `input`, `residual`, `weight`, `out`, `residual_out`; metadata
//! `world_size`, `rank`, `eps`), rebuilds the problem from the ranks' inputs, computes the
//! reference, and checks each rank: the same residual and weight as rank 0, `residual_out`
//! bit-exact, `out` within the accepted band (at most 1 ulp, as the demo's table), every element
//! written.

use anyhow::{bail, Context, Result};
use arfuse_kernels::{DType, Element};
use arfuse_testkit::{unwritten, Fixture, Problem, Reference};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a verification covered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The directory checked.
    pub dir: PathBuf,
    /// Files read (one per rank and shape).
    pub files: usize,
    /// Shapes (each with every rank's file).
    pub shapes: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verify-dump {}: {} files, {} shapes ({}): every rank's residual_out bit-exact against the \
             reference, out within 1 ulp of the accepted band, every element written",
            self.dir.display(),
            self.files,
            self.shapes.len(),
            self.shapes.join(", ")
        )
    }
}

/// `rank{R}-{rows}x{hidden}-{dtype}.safetensors` → (rank, rows, hidden, dtype).
fn parse_name(name: &str) -> Option<(usize, usize, usize, DType)> {
    let stem = name.strip_suffix(".safetensors")?.strip_prefix("rank")?;
    let mut parts = stem.splitn(3, '-');
    let rank = parts.next()?.parse().ok()?;
    let (rows, hidden) = parts.next()?.split_once('x')?;
    let dtype_name = parts.next()?;
    let dtype = DType::ALL.into_iter().find(|d| d.name() == dtype_name)?;
    Some((rank, rows.parse().ok()?, hidden.parse().ok()?, dtype))
}

/// A dumped shape: rows, hidden and the dtype's name (`DType` has no order).
type ShapeKey = (usize, usize, &'static str);

/// Checks every dumped shape in `dir`; an error names the first file or rank that is wrong.
pub fn verify_dump(dir: &Path) -> Result<Summary> {
    let mut groups: BTreeMap<ShapeKey, (DType, BTreeMap<usize, PathBuf>)> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if let Some((rank, rows, hidden, dtype)) = parse_name(name) {
            groups.entry((rows, hidden, dtype.name())).or_insert_with(|| (dtype, BTreeMap::new())).1.insert(rank, path);
        }
    }
    if groups.is_empty() {
        bail!("{}: no rank*-*x*-*.safetensors files (written by `arfuse-demo --dump`)", dir.display());
    }
    let mut files = 0;
    let mut shapes = Vec::new();
    for ((rows, hidden, _), (dtype, ranks)) in &groups {
        let shape = format!("{rows}x{hidden} {dtype}");
        match dtype {
            DType::Bf16 => verify_shape::<half::bf16>(*rows, *hidden, ranks),
            DType::F16 => verify_shape::<half::f16>(*rows, *hidden, ranks),
            DType::F32 => verify_shape::<f32>(*rows, *hidden, ranks),
        }
        .with_context(|| format!("{}: {shape}", dir.display()))?;
        files += ranks.len();
        shapes.push(format!("{shape} x{}", ranks.len()));
    }
    Ok(Summary { dir: dir.to_path_buf(), files, shapes })
}

/// One rank's file, read.
struct RankFile<T> {
    world_size: usize,
    eps: f32,
    input: Vec<T>,
    residual: Vec<T>,
    weight: Vec<T>,
    out: Vec<T>,
    residual_out: Vec<T>,
    /// `--fp8`'s output: the quantisation (the `fp8` metadata), the codes and the scales.
    fp8: Option<(arfuse_kernels::contract::Quant, Vec<u8>, Vec<f32>)>,
}

fn read_rank<T: Element>(path: &Path, rank: usize, rows: usize, hidden: usize) -> Result<RankFile<T>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).with_context(|| format!("{}", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| meta.get(key).with_context(|| format!("{}: no `{key}` in the metadata", path.display()));
    let world_size: usize = field("world_size")?.parse().context("world_size")?;
    let eps: f32 = field("eps")?.parse().context("eps")?;
    if field("rank")?.parse::<usize>().context("rank")? != rank {
        bail!("{}: its metadata names another rank", path.display());
    }
    let tensors = SafeTensors::deserialize(&bytes).with_context(|| format!("{}", path.display()))?;
    let want = match T::DTYPE {
        DType::Bf16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
    };
    let read = |name: &str, shape: &[usize]| -> Result<Vec<T>> {
        let view = tensors.tensor(name).with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        if view.dtype() != want || view.shape() != shape {
            bail!(
                "{}: tensor `{name}` is {:?} {:?}, expected {want:?} {shape:?}",
                path.display(),
                view.dtype(),
                view.shape()
            );
        }
        // The file's bytes need not be aligned for `T`: read element by element.
        Ok(view.data().chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect())
    };
    let matrix = [rows, hidden];
    let fp8 = match meta.get("fp8") {
        None => None,
        Some(spec) => {
            let quant = super::parse_fp8(spec).with_context(|| format!("{}: fp8 metadata", path.display()))?;
            let codes = tensors.tensor("out_fp8").with_context(|| format!("{}: tensor `out_fp8`", path.display()))?;
            if codes.dtype() != Dtype::U8 || codes.shape() != matrix {
                bail!(
                    "{}: tensor `out_fp8` is {:?} {:?}, expected U8 {matrix:?}",
                    path.display(),
                    codes.dtype(),
                    codes.shape()
                );
            }
            let per_row = quant.scaling.scales_per_row(hidden);
            let scales = if per_row == 0 {
                Vec::new()
            } else {
                let view = tensors.tensor("scales").with_context(|| format!("{}: tensor `scales`", path.display()))?;
                if view.dtype() != Dtype::F32 || view.shape() != [rows, per_row] {
                    bail!("{}: tensor `scales` is {:?} {:?}", path.display(), view.dtype(), view.shape());
                }
                view.data().chunks_exact(4).map(bytemuck::pod_read_unaligned).collect()
            };
            Some((quant, codes.data().to_vec(), scales))
        }
    };
    Ok(RankFile {
        fp8,
        world_size,
        eps,
        input: read("input", &matrix)?,
        residual: read("residual", &matrix)?,
        weight: read("weight", &[hidden])?,
        out: read("out", &matrix)?,
        residual_out: read("residual_out", &matrix)?,
    })
}

fn verify_shape<T: Element>(rows: usize, hidden: usize, ranks: &BTreeMap<usize, PathBuf>) -> Result<()> {
    let mut files = Vec::new();
    for (&rank, path) in ranks {
        files.push(read_rank::<T>(path, rank, rows, hidden)?);
    }
    let first = files.first().context("no files")?;
    let world_size = first.world_size;
    if ranks.keys().copied().ne(0..world_size) {
        bail!("world size {world_size}, but the files are of ranks {:?}", ranks.keys().collect::<Vec<_>>());
    }
    let bits = |v: &[T]| v.iter().map(|x| x.to_bits_u32()).collect::<Vec<_>>();
    for (rank, file) in files.iter().enumerate() {
        if file.world_size != world_size || file.eps.to_bits() != first.eps.to_bits() {
            bail!("rank {rank}'s world size or eps differs from rank 0's");
        }
        if bits(&file.residual) != bits(&first.residual) || bits(&file.weight) != bits(&first.weight) {
            bail!("rank {rank}'s residual or weight differs from rank 0's (every rank gets the same)");
        }
    }
    let problem = Problem::new(world_size, rows, hidden, T::DTYPE).with_eps(first.eps);
    let inputs = files.iter().map(|f| f.input.clone()).collect();
    let fixture = Fixture::from_parts(&problem, inputs, first.residual.clone(), first.weight.clone());
    let reference = Reference::compute(&fixture);
    for (rank, file) in files.iter().enumerate() {
        let unwritten = unwritten(&file.out).len() + unwritten(&file.residual_out).len();
        if unwritten > 0 {
            bail!("rank {rank}: {unwritten} output elements were never written");
        }
        let residual = reference.residual_out_mismatches(&file.residual_out);
        if residual.total > 0 {
            bail!("rank {rank}: residual_out: {residual}");
        }
        let out = reference.out_violations(&file.out, 1);
        if out.total > 0 {
            bail!("rank {rank}: out: {out}");
        }
        if let Some((quant, codes, scales)) = &file.fp8 {
            let fp8 = super::Fp8Out { quant: *quant, codes, scales };
            super::check_fp8(&format!("rank {rank}"), &fixture, &fp8)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_name;
    use arfuse_kernels::DType;

    #[test]
    fn dump_names_parse_and_strangers_do_not() {
        assert_eq!(parse_name("rank3-128x4096-bf16.safetensors"), Some((3, 128, 4096, DType::Bf16)));
        assert_eq!(parse_name("rank0-1x2880-f32.safetensors"), Some((0, 1, 2880, DType::F32)));
        assert_eq!(parse_name("rank0-1x2880-f8.safetensors"), None);
        assert_eq!(parse_name("notes.txt"), None);
        assert_eq!(parse_name("rank-1x2-bf16.safetensors"), None);
    }
}
