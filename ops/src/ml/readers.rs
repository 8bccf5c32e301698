//! Dataset readers for files users bring: `data.cifar10` (the official binary batches),
//! `data.mnist` (IDX files) and `data.import` (.npy / .safetensors arrays).
//!
//! Each reads from a workspace-relative `path` that the op declares as a dep, so the files'
//! content is part of the stage key; absolute paths are refused (they could not be hashed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::dataset::{
    split_by_permutation, standardize, write_splits, DatasetMeta, Fractions, Split, Targets, Task,
};
use crate::fail;
use crate::params_doc::required;
use crate::seed::derive_seed;
use crate::{Count, OpError, Outputs, ParamError, RunContext, TypedOp};

fn relative(field: &str, path: &str) -> Result<(), ParamError> {
    if path.is_empty() {
        return Err(ParamError::new(field, "is empty"));
    }
    if Path::new(path).is_absolute() {
        return Err(ParamError::new(
            field,
            format!("'{path}' is absolute; the files must be hashed as a dep, so they must lie in the pipeline's folder"),
        )
        .with_fix("copy or symlink the files into the pipeline's folder and give a relative path"));
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, OpError> {
    std::fs::read(path).map_err(|e| OpError::io(path.display().to_string(), e))
}

/// Writes an official train/test pair: val is carved from the training part by a seeded
/// permutation, test is the official test set; then optional standardisation.
fn write_official(
    ctx: &mut RunContext<'_>,
    out: &mut Outputs<'_>,
    source: &str,
    [train_all, test]: [Split; 2],
    shape: [usize; 3],
    p: &OfficialConfig,
) -> Result<(), OpError> {
    let [train, val, _] = split_by_permutation(
        &train_all,
        Fractions {
            val: p.val_fraction,
            test: 0.0,
        },
        derive_seed(ctx.seed, 2),
    );
    let mut splits = [train, val, test];
    let normalization = p.standardize.then(|| standardize(&mut splits, shape[0]));
    let meta = DatasetMeta {
        task: Task::Classification,
        // CIFAR-10 and MNIST both have ten classes.
        classes: Some(10),
        shape,
        target_shape: None,
        samples: BTreeMap::new(),
        source: source.to_string(),
        normalization,
    };
    write_splits(out, meta, &splits)?;
    let _ = writeln!(
        ctx.log,
        "{source}: train {}, val {}, test {}",
        splits[0].n, splits[1].n, splits[2].n
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// `data.cifar10`: the official CIFAR-10 binary version (`data_batch_1.bin` ..
/// `data_batch_5.bin`, `test_batch.bin`) in the folder `path`. Each record is 1 label byte and
/// 3072 pixel bytes (1024 red, 1024 green, 1024 blue, rows of 32). Pixels are scaled to [0, 1]
/// and, with `standardize` (default), standardised per channel with the training statistics.
/// Whichever training batches are present are read, in order.
pub struct Cifar10Op;

/// The params of `data.cifar10` and `data.mnist`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OfficialParams {
    /// The folder holding the official files, relative to the pipeline's folder (a dep, so
    /// their content is part of the key). Required.
    pub path: Option<String>,
    /// Fraction of the official training set held out as the val split (seeded permutation).
    pub val_fraction: f64,
    /// Standardise every channel with the training split's mean and std.
    pub standardize: bool,
}

impl Default for OfficialParams {
    fn default() -> Self {
        Self {
            path: None,
            val_fraction: 0.1,
            standardize: true,
        }
    }
}

/// Checked [`OfficialParams`].
#[derive(Debug, Clone)]
pub struct OfficialConfig {
    path: String,
    val_fraction: f64,
    standardize: bool,
}

impl OfficialConfig {
    fn resolve(p: OfficialParams) -> Result<Self, ParamError> {
        let path = required(p.path, "path")?;
        relative("path", &path)?;
        Fractions {
            val: p.val_fraction,
            test: 0.0,
        }
        .check()?;
        Ok(Self {
            path,
            val_fraction: p.val_fraction,
            standardize: p.standardize,
        })
    }
}

const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

/// Records of one CIFAR-10 binary batch appended to `x` (scaled to [0, 1]) and `y`.
pub(crate) fn read_cifar_batch(
    path: &Path,
    x: &mut Vec<f32>,
    y: &mut Vec<usize>,
) -> Result<(), OpError> {
    let bytes = read(path)?;
    if bytes.is_empty() || bytes.len() % CIFAR_RECORD != 0 {
        return Err(fail(format!(
            "{}: {} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records; \
             is this the binary version (cifar-10-binary.tar.gz)?",
            path.display(),
            bytes.len()
        )));
    }
    for rec in bytes.chunks_exact(CIFAR_RECORD) {
        if rec[0] >= 10 {
            return Err(fail(format!(
                "{}: label {} is not a CIFAR-10 class (0..10)",
                path.display(),
                rec[0]
            )));
        }
        y.push(rec[0] as usize);
        x.extend(rec[1..].iter().map(|&b| b as f32 / 255.0));
    }
    Ok(())
}

/// The official training batches present and the test batch in `dir`.
fn read_cifar10(ctx: &RunContext<'_>, dir: &Path) -> Result<([Split; 2], [usize; 3]), OpError> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 1..=5 {
        let f = dir.join(format!("data_batch_{i}.bin"));
        if f.exists() {
            ctx.check_cancelled()?;
            read_cifar_batch(&f, &mut x, &mut y)?;
        }
    }
    if y.is_empty() {
        return Err(fail(format!(
            "{}: no data_batch_1.bin .. data_batch_5.bin; point `path` at the extracted \
             cifar-10-batches-bin folder",
            dir.display()
        )));
    }
    let train = Split {
        n: y.len(),
        x,
        y: Targets::Labels(y),
    };
    let (mut tx, mut ty) = (Vec::new(), Vec::new());
    read_cifar_batch(&dir.join("test_batch.bin"), &mut tx, &mut ty)?;
    let test = Split {
        n: ty.len(),
        x: tx,
        y: Targets::Labels(ty),
    };
    Ok(([train, test], [3, 32, 32]))
}

/// `data.cifar10` and `data.mnist`: the same params, each with its reader of the files.
macro_rules! official_reader {
    ($op:ty, $name:literal, $summary:literal, $read:expr) => {
        impl TypedOp for $op {
            const NAME: &'static str = $name;
            const VERSION: u32 = 1;
            const SUMMARY: &'static str = $summary;
            type Params = OfficialParams;
            type Config = OfficialConfig;

            fn resolve(p: OfficialParams) -> Result<OfficialConfig, ParamError> {
                OfficialConfig::resolve(p)
            }
            fn deps(p: &OfficialConfig) -> Vec<String> {
                vec![p.path.clone()]
            }
            fn run(
                &self,
                p: &OfficialConfig,
                ctx: &mut RunContext<'_>,
                out: &mut Outputs<'_>,
            ) -> Result<(), OpError> {
                let (splits, shape) = $read(ctx, &ctx.workspace.join(&p.path))?;
                write_official(ctx, out, Self::NAME, splits, shape, p)
            }
        }
    };
}

official_reader!(
    Cifar10Op,
    "data.cifar10",
    "reads the official CIFAR-10 binary batches from `path` into a dataset",
    read_cifar10
);

// ---------------------------------------------------------------------------------------------

/// `data.mnist`: the IDX files `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` (uncompressed; `.` instead of the last
/// `-` is accepted too) in the folder `path`. Images become `[N, 1, H, W]` in [0, 1], then are
/// standardised with the training statistics unless `standardize: false`.
pub struct MnistOp;

/// An IDX file: magic `0 0 type rank`, `rank` big-endian u32 dims, then the data.
pub(crate) fn read_idx_u8(path: &Path, rank: usize) -> Result<(Vec<usize>, Vec<u8>), OpError> {
    let bytes = read(path)?;
    let bad = |m: String| fail(format!("{}: {m}", path.display()));
    if bytes.len() < 4 + 4 * rank {
        return Err(bad("too short for an IDX file".into()));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != rank {
        return Err(bad(format!(
            "magic {:02x}{:02x}{:02x}{:02x} is not an unsigned-byte IDX file of rank {rank} \
             (gzipped? run gunzip first)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let data = &bytes[4 + 4 * rank..];
    let want: usize = dims.iter().product();
    if data.len() != want {
        return Err(bad(format!(
            "dims {dims:?} need {want} bytes of data, the file has {}",
            data.len()
        )));
    }
    Ok((dims, data.to_vec()))
}

fn mnist_file(dir: &Path, stem: &str) -> PathBuf {
    let dashed = dir.join(format!("{stem}-ubyte"));
    if dashed.exists() {
        return dashed;
    }
    // `train-images.idx3-ubyte` as some mirrors name it.
    match stem.rsplit_once('-') {
        Some((a, b)) => {
            let dotted = dir.join(format!("{a}.{b}-ubyte"));
            if dotted.exists() {
                dotted
            } else {
                dashed
            }
        }
        None => dashed,
    }
}

fn read_mnist(dir: &Path, prefix: &str) -> Result<(Split, usize, usize), OpError> {
    let images = mnist_file(dir, &format!("{prefix}-images-idx3"));
    let labels = mnist_file(dir, &format!("{prefix}-labels-idx1"));
    let (dims, pixels) = read_idx_u8(&images, 3)?;
    let (ldims, l) = read_idx_u8(&labels, 1)?;
    if ldims[0] != dims[0] {
        return Err(fail(format!(
            "{} has {} images but {} has {} labels",
            images.display(),
            dims[0],
            labels.display(),
            ldims[0]
        )));
    }
    if let Some(bad) = l.iter().find(|&&v| v >= 10) {
        return Err(fail(format!(
            "{}: label {bad} is not a digit",
            labels.display()
        )));
    }
    let split = Split {
        n: dims[0],
        x: pixels.iter().map(|&b| b as f32 / 255.0).collect(),
        y: Targets::Labels(l.iter().map(|&v| v as usize).collect()),
    };
    Ok((split, dims[1], dims[2]))
}

/// The official training and test IDX files in `dir`.
fn read_mnist_files(_: &RunContext<'_>, dir: &Path) -> Result<([Split; 2], [usize; 3]), OpError> {
    let (train, h, w) = read_mnist(dir, "train")?;
    let (test, th, tw) = read_mnist(dir, "t10k")?;
    if (h, w) != (th, tw) {
        return Err(fail(format!(
            "training images are {h}x{w} but test images {th}x{tw}"
        )));
    }
    Ok(([train, test], [1, h, w]))
}

official_reader!(
    MnistOp,
    "data.mnist",
    "reads the MNIST IDX files from `path` into a dataset",
    read_mnist_files
);

// ---------------------------------------------------------------------------------------------

/// `data.import`: a user's arrays. `x` and `y` name `.npy` or `.safetensors` files (in a
/// safetensors file the tensor named `x` resp. `y`, or its only tensor; both may be the same
/// file). `x` is `[N, C, H, W]`, `[N, H, W]` (one channel) or `[N, F]` (`[N, 1, 1, F]`), any of
/// f32/f64/u8/i32/i64 (u8 is scaled to [0, 1]). Integer `y` of shape `[N]` gives a
/// classification task (classes = max label + 1 unless `classes` is set); float `y` a
/// regression task with the same rank rules as `x`. Split by seeded permutation.
pub struct ImportOp;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ImportParams {
    /// The inputs: a `.npy` file, or a `.safetensors` file (its tensor `x`, or its only
    /// tensor), relative to the pipeline's folder. Required.
    pub x: Option<String>,
    /// The targets, likewise (tensor `y`); may be the same file as `x`. Required.
    pub y: Option<String>,
    /// Number of classes of integer labels (default: the largest label + 1).
    pub classes: Option<Count>,
    /// Fraction of the samples held out as the val split.
    pub val_fraction: f64,
    /// Fraction of the samples held out as the test split.
    pub test_fraction: f64,
    /// Standardise every channel of `x` with the training split's mean and std.
    pub standardize: bool,
}

impl Default for ImportParams {
    fn default() -> Self {
        Self {
            x: None,
            y: None,
            classes: None,
            val_fraction: 0.1,
            test_fraction: 0.2,
            standardize: false,
        }
    }
}

/// Checked [`ImportParams`].
#[derive(Debug, Clone)]
pub struct ImportConfig {
    x: String,
    y: String,
    classes: Option<usize>,
    fractions: Fractions,
    standardize: bool,
}

/// An array read from a file, as f64 values with a flag for integer dtypes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
    pub integer: bool,
    pub byte: bool,
}

fn decode(dtype: &str, data: &[u8], shape: Vec<usize>, what: &str) -> Result<Array, OpError> {
    macro_rules! le {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            if data.len() % N != 0 {
                return Err(fail(format!("{what}: truncated data")));
            }
            data.chunks_exact(N)
                .map(|c| {
                    let mut b = [0u8; N];
                    b.copy_from_slice(c);
                    <$t>::from_le_bytes(b) as f64
                })
                .collect::<Vec<f64>>()
        }};
    }
    let (values, integer) = match dtype {
        "f4" => (le!(f32), false),
        "f8" => (le!(f64), false),
        "u1" => (data.iter().map(|&b| b as f64).collect(), true),
        "i4" => (le!(i32), true),
        "i8" => (le!(i64), true),
        other => {
            return Err(fail(format!(
                "{what}: dtype {other} is not supported; use float32/float64/uint8/int32/int64"
            )))
        }
    };
    if values.len() != shape.iter().product::<usize>() {
        return Err(fail(format!(
            "{what}: shape {shape:?} does not match {} values",
            values.len()
        )));
    }
    Ok(Array {
        shape,
        values,
        integer,
        byte: dtype == "u1",
    })
}

/// Parses a `.npy` file (format versions 1-3, little-endian or byte dtypes, C order).
pub(crate) fn parse_npy(bytes: &[u8], what: &str) -> Result<Array, OpError> {
    let bad = |m: &str| fail(format!("{what}: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (bad magic)"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported .npy format version")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated or non-text header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))?;
        let rest = &header[at + key.len() + 2..];
        Some(rest[rest.find(':')? + 1..].trim_start())
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\'').and_then(|r| r.split('\'').next()))
        .ok_or_else(|| bad("header has no 'descr'"))?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(bad(
            "Fortran-order arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let shape_text = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("header has no 'shape'"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape in header")))
        .collect::<Result<Vec<_>, _>>()?;
    let (order, dtype) = descr.split_at(1.min(descr.len()));
    if order == ">" {
        return Err(bad("big-endian arrays are not supported"));
    }
    decode(dtype, &bytes[start + header_len..], shape, what)
}

fn read_array(workspace: &Path, rel: &str, key: &str) -> Result<Array, OpError> {
    let path = workspace.join(rel);
    let bytes = read(&path)?;
    let what = path.display().to_string();
    if rel.ends_with(".npy") {
        return parse_npy(&bytes, &what);
    }
    let file =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fail(format!("{what}: {e}")))?;
    let names = file.names();
    let name = if names.iter().any(|n| *n == key) {
        key.to_string()
    } else if names.len() == 1 {
        names[0].clone()
    } else {
        return Err(fail(format!(
            "{what}: no tensor named '{key}' (it has {names:?})"
        )));
    };
    let t = file
        .tensor(&name)
        .map_err(|e| fail(format!("{what}: {e}")))?;
    let dtype = match t.dtype() {
        safetensors::Dtype::F32 => "f4",
        safetensors::Dtype::F64 => "f8",
        safetensors::Dtype::U8 => "u1",
        safetensors::Dtype::I32 => "i4",
        safetensors::Dtype::I64 => "i8",
        other => {
            return Err(fail(format!(
                "{what}: tensor '{name}' has dtype {other:?}; use F32/F64/U8/I32/I64"
            )))
        }
    };
    decode(dtype, t.data(), t.shape().to_vec(), &what)
}

/// `[N, ...]` -> `[C, H, W]` by the rank rules of [`ImportOp`].
fn sample_shape(shape: &[usize], what: &str) -> Result<[usize; 3], OpError> {
    match *shape {
        [_, c, h, w] => Ok([c, h, w]),
        [_, h, w] => Ok([1, h, w]),
        [_, f] => Ok([1, 1, f]),
        [_] => Ok([1, 1, 1]),
        _ => Err(fail(format!(
            "{what} has shape {shape:?}; expected [N, C, H, W], [N, H, W] or [N, F]"
        ))),
    }
}

impl TypedOp for ImportOp {
    const NAME: &'static str = "data.import";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "imports .npy / .safetensors arrays x, y into a dataset";
    type Params = ImportParams;
    type Config = ImportConfig;

    fn resolve(p: ImportParams) -> Result<ImportConfig, ParamError> {
        let x = required(p.x, "x")?;
        let y = required(p.y, "y")?;
        relative("x", &x)?;
        relative("y", &y)?;
        for (field, path) in [("x", &x), ("y", &y)] {
            if !(path.ends_with(".npy") || path.ends_with(".safetensors")) {
                return Err(ParamError::new(
                    field,
                    format!("'{path}' is neither a .npy nor a .safetensors file"),
                ));
            }
        }
        let fractions = Fractions {
            val: p.val_fraction,
            test: p.test_fraction,
        };
        fractions.check()?;
        Ok(ImportConfig {
            x,
            y,
            classes: p.classes.map(Count::get),
            fractions,
            standardize: p.standardize,
        })
    }
    fn deps(p: &ImportConfig) -> Vec<String> {
        if p.x == p.y {
            vec![p.x.clone()]
        } else {
            vec![p.x.clone(), p.y.clone()]
        }
    }
    fn run(
        &self,
        p: &ImportConfig,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let x = read_array(ctx.workspace, &p.x, "x")?;
        let y = read_array(ctx.workspace, &p.y, "y")?;
        let n = x.shape.first().copied().unwrap_or(0);
        if x.shape.len() < 2 {
            return Err(fail(format!(
                "x has shape {:?}; it needs a sample axis and at least one feature axis",
                x.shape
            )));
        }
        if y.shape.first() != Some(&n) {
            return Err(fail(format!(
                "x has {n} samples but y has shape {:?}",
                y.shape
            )));
        }
        let shape = sample_shape(&x.shape, "x")?;
        let scale = if x.byte { 1.0 / 255.0 } else { 1.0 };
        let xs: Vec<f32> = x.values.iter().map(|v| (v * scale) as f32).collect();
        if xs.iter().any(|v| !v.is_finite()) {
            return Err(fail("x holds NaN or infinite values"));
        }
        let (task, classes, target_shape, targets) = if y.integer && y.shape.len() == 1 {
            if let Some(v) = y.values.iter().find(|v| **v < 0.0) {
                return Err(fail(format!("y holds the negative label {v}")));
            }
            let max = y.values.iter().fold(0.0f64, |a, &b| a.max(b)) as usize;
            let classes = p.classes.unwrap_or(max + 1);
            if max >= classes {
                return Err(fail(format!(
                    "y holds label {max} but `classes` is {classes}"
                )));
            }
            let labels = y.values.iter().map(|&v| v as usize).collect();
            (
                Task::Classification,
                Some(classes),
                None,
                Targets::Labels(labels),
            )
        } else {
            if p.classes.is_some() {
                return Err(fail(
                    "`classes` was given but y is not a vector of integer labels",
                ));
            }
            let ts = sample_shape(&y.shape, "y")?;
            let values = y.values.iter().map(|&v| v as f32).collect();
            (Task::Regression, None, Some(ts), Targets::Values(values))
        };
        let all = Split {
            n,
            x: xs,
            y: targets,
        };
        let mut splits = split_by_permutation(&all, p.fractions, derive_seed(ctx.seed, 2));
        let normalization = p.standardize.then(|| standardize(&mut splits, shape[0]));
        let meta = DatasetMeta {
            task,
            classes,
            shape,
            target_shape,
            samples: BTreeMap::new(),
            source: Self::NAME.to_string(),
            normalization,
        };
        write_splits(out, meta, &splits)?;
        let _ = writeln!(
            ctx.log,
            "imported {n} samples of {shape:?}: train {}, val {}, test {}",
            splits[0].n, splits[1].n, splits[2].n
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{read_meta, read_split};
    use crate::testing::OpRun;
    use crate::Op;
    use serde_json::json;

    #[test]
    fn cifar10_reads_official_binary_records() {
        let ws = tempfile::tempdir().unwrap();
        let dir = ws.path().join("cifar");
        std::fs::create_dir(&dir).unwrap();
        // Record i: label i % 10, every pixel byte = 10 i (red), 10 i + 1 (green), + 2 (blue).
        let batch = |n: usize, offset: usize| -> Vec<u8> {
            let mut b = Vec::new();
            for i in offset..offset + n {
                b.push((i % 10) as u8);
                for ch in 0..3 {
                    b.extend(std::iter::repeat_n((10 * i + ch) as u8, 1024));
                }
            }
            b
        };
        std::fs::write(dir.join("data_batch_1.bin"), batch(6, 0)).unwrap();
        std::fs::write(dir.join("data_batch_2.bin"), batch(4, 6)).unwrap();
        std::fs::write(dir.join("test_batch.bin"), batch(3, 20)).unwrap();
        let params = json!({"path": "cifar", "val_fraction": 0.2, "standardize": false});
        assert_eq!(Cifar10Op.plan(&params).unwrap().deps, ["cifar"]);
        let run = OpRun::new(params)
            .workspace(ws.path())
            .seed(1)
            .run(&Cifar10Op);
        let (m, out) = (run.metrics(), &run.out_dir);
        assert_eq!(
            (m["train_samples"], m["val_samples"], m["test_samples"]),
            (8.0, 2.0, 3.0)
        );
        let meta = read_meta(out).unwrap();
        assert_eq!(meta.shape, [3, 32, 32]);
        let test = read_split(out, &meta, "test").unwrap();
        assert_eq!(test.y, Targets::Labels(vec![0, 1, 2]));
        // Sample 1 of the test set is record 21: green plane = 211 / 255.
        assert!((test.x[3072 + 1024] - 211.0 / 255.0).abs() < 1e-6);
        let train = read_split(out, &meta, "train").unwrap();
        let val = read_split(out, &meta, "val").unwrap();
        let Targets::Labels(mut labels) = train.y else {
            panic!()
        };
        let Targets::Labels(vl) = val.y else { panic!() };
        labels.extend(vl);
        labels.sort();
        assert_eq!(labels, (0..10).collect::<Vec<_>>());

        std::fs::write(dir.join("data_batch_1.bin"), vec![0u8; 100]).unwrap();
        let err = OpRun::new(json!({"path": "cifar"}))
            .workspace(ws.path())
            .run(&Cifar10Op)
            .result
            .unwrap_err();
        assert!(err.to_string().contains("CIFAR-10 records"), "{err}");
        assert_eq!(
            Cifar10Op
                .plan(&json!({"path": "/abs/cifar"}))
                .unwrap_err()
                .path,
            "path"
        );
    }

    fn idx(kind_rank: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, kind_rank];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn mnist_reads_idx_files() {
        let ws = tempfile::tempdir().unwrap();
        let dir = ws.path().join("mnist");
        std::fs::create_dir(&dir).unwrap();
        let img: Vec<u8> = (0..5 * 4 * 3).map(|v| v as u8).collect();
        std::fs::write(
            dir.join("train-images-idx3-ubyte"),
            idx(3, &[5, 4, 3], &img),
        )
        .unwrap();
        std::fs::write(
            dir.join("train-labels-idx1-ubyte"),
            idx(1, &[5], &[3, 1, 4, 1, 5]),
        )
        .unwrap();
        // The dotted names some mirrors use.
        std::fs::write(
            dir.join("t10k-images.idx3-ubyte"),
            idx(3, &[2, 4, 3], &img[..24]),
        )
        .unwrap();
        std::fs::write(dir.join("t10k-labels.idx1-ubyte"), idx(1, &[2], &[9, 2])).unwrap();
        let mnist = |params: serde_json::Value| {
            OpRun::new(params)
                .workspace(ws.path())
                .seed(0)
                .run(&MnistOp)
        };
        let run = mnist(json!({"path": "mnist", "val_fraction": 0.0, "standardize": false}));
        run.metrics();
        let out = &run.out_dir;
        let meta = read_meta(out).unwrap();
        assert_eq!(meta.shape, [1, 4, 3]);
        let test = read_split(out, &meta, "test").unwrap();
        assert_eq!(test.y, Targets::Labels(vec![9, 2]));
        assert!((test.x[13] - 13.0 / 255.0).abs() < 1e-6);
        let train = read_split(out, &meta, "train").unwrap();
        assert_eq!(train.n, 5);

        // A label file that disagrees with its images.
        std::fs::write(
            dir.join("train-labels-idx1-ubyte"),
            idx(1, &[4], &[3, 1, 4, 1]),
        )
        .unwrap();
        let err = mnist(json!({"path": "mnist"})).result.unwrap_err();
        assert!(err.to_string().contains("labels"), "{err}");
        // Standardised training pixels have mean 0.
        std::fs::write(
            dir.join("train-labels-idx1-ubyte"),
            idx(1, &[5], &[3, 1, 4, 1, 5]),
        )
        .unwrap();
        let run = mnist(json!({"path": "mnist", "val_fraction": 0.0}));
        run.metrics();
        let meta = read_meta(&run.out_dir).unwrap();
        let train = read_split(&run.out_dir, &meta, "train").unwrap();
        let mean: f64 = train.x.iter().map(|v| *v as f64).sum::<f64>() / train.x.len() as f64;
        assert!(mean.abs() < 1e-5 && meta.normalization.is_some());
    }

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((header.len() as u16).to_le_bytes());
        b.extend(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn import_reads_npy_and_safetensors() {
        let ws = tempfile::tempdir().unwrap();
        let x: Vec<u8> = (0..10 * 6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        std::fs::write(ws.path().join("x.npy"), npy("<f4", "(10, 2, 3)", &x)).unwrap();
        let y: Vec<u8> = (0..10i64).flat_map(|v| (v % 4).to_le_bytes()).collect();
        std::fs::write(ws.path().join("y.npy"), npy("<i8", "(10,)", &y)).unwrap();
        let import = |params: serde_json::Value| {
            OpRun::new(params)
                .workspace(ws.path())
                .seed(5)
                .run(&ImportOp)
        };
        let params = json!({"x": "x.npy", "y": "y.npy", "val_fraction": 0.2, "test_fraction": 0.2});
        assert_eq!(ImportOp.plan(&params).unwrap().deps, ["x.npy", "y.npy"]);
        let run = import(params);
        run.metrics();
        let out = &run.out_dir;
        let meta = read_meta(out).unwrap();
        assert_eq!(
            (meta.task, meta.classes, meta.shape),
            (Task::Classification, Some(4), [1, 2, 3])
        );
        assert_eq!(meta.samples["train"], 6);
        let train = read_split(out, &meta, "train").unwrap();
        // Each sample's pixels are 6k .. 6k + 5 and its label k % 4.
        let Targets::Labels(labels) = &train.y else {
            panic!()
        };
        for (i, &l) in labels.iter().enumerate() {
            let k = train.x[i * 6] as usize / 6;
            assert_eq!(l, k % 4);
            assert_eq!(train.x[i * 6 + 5], (6 * k + 5) as f32);
        }

        // Regression targets from a safetensors file holding both arrays.
        let xb: Vec<u8> = (0..8 * 4).map(|v| v as u8).collect();
        let yb: Vec<u8> = (0..8 * 4)
            .flat_map(|v| (v as f32 * 0.5).to_le_bytes())
            .collect();
        let views = vec![
            (
                "x",
                safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![8, 4], &xb)
                    .unwrap(),
            ),
            (
                "y",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8, 2, 2], &yb)
                    .unwrap(),
            ),
        ];
        std::fs::write(
            ws.path().join("d.safetensors"),
            safetensors::serialize(views, &None).unwrap(),
        )
        .unwrap();
        let params = json!({"x": "d.safetensors", "y": "d.safetensors", "val_fraction": 0.0, "test_fraction": 0.0});
        assert_eq!(ImportOp.plan(&params).unwrap().deps, ["d.safetensors"]);
        let run = import(params);
        run.metrics();
        let out = &run.out_dir;
        let meta = read_meta(out).unwrap();
        assert_eq!(
            (meta.task, meta.shape, meta.target_shape),
            (Task::Regression, [1, 1, 4], Some([1, 2, 2]))
        );
        let train = read_split(out, &meta, "train").unwrap();
        assert!(train.x.iter().all(|v| (0.0..=1.0).contains(v)));

        assert!(parse_npy(&npy(">f4", "(1,)", &[0; 4]), "t").is_err());
        assert!(parse_npy(b"not npy at all", "t").is_err());
        assert_eq!(
            ImportOp
                .plan(&json!({"x": "x.csv", "y": "y.npy"}))
                .unwrap_err()
                .path,
            "x"
        );
        let zero = ImportOp
            .plan(&json!({"x": "x.npy", "y": "y.npy", "classes": 0}))
            .unwrap_err();
        assert_eq!(
            (zero.path.as_str(), zero.message.as_str()),
            ("classes", "must be at least 1")
        );
    }
}
