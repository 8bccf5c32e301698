//! The As-ViT network (`docs/methods/asvit.md` §1, arXiv 2202.11921): a strided-conv
//! tokenizer, up to four stages of pre-LN transformer blocks (windowed multi-head attention, GELU
//! MLP) joined by patch merging, no positional embedding, then LayerNorm, mean pool and Linear.
//!
//! The tokenizer's stride and dilation can be changed between epochs (progressive
//! re-tokenization, §4): factor d gives stride 4d and dilation d, the same weights over a
//! d-times larger area and d^2 fewer tokens. Windows are given as a count per side, so they
//! follow the token grid.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use serde::{Deserialize, Serialize};

use super::dag::positive;
use crate::layers::MultiHeadSelfAttention;
use crate::layers::{gelu, unfold, Conv2d, ConvGeometry, LayerNorm, Linear};
use crate::tensor::{host_read, impl_has_params, take_grad, with_grad_mut};
use crate::{Dev, Float, NnError, Tensor2, Tensor3, Tensor4, VarBuilder};

/// Stride of the stage-1 tokenizer at factor 1 (`docs/methods/asvit.md` §1).
pub const TOKENIZER_STRIDE: usize = 4;
/// Stages of the As-ViT space.
pub const MAX_STAGES: usize = 4;

/// The `vit` model block. Per-stage lists all have one entry per stage (1 to 4 stages).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VitSpec {
    /// Kernel of the stage-1 tokenizer (4..=8, stride 4), then of each patch merging (2..=4,
    /// stride 2) [paper seed: 8, 4, 4, 4].
    pub kernels: Vec<usize>,
    /// Attention windows per side in each stage (window = token grid side / split; a split
    /// larger than the grid counts as one token per window) [seed: 2, 1, 1, 1].
    pub splits: Vec<usize>,
    /// MLP expansion ratio of each stage [seed: 3, 2, 4, 6].
    pub expansions: Vec<usize>,
    /// Heads of the last stage, H; stage i has H / 2^(last - i), at least 1 [seed: 32].
    pub heads: usize,
    /// Blocks per stage [search: 1 each].
    #[serde(default)]
    pub depths: Option<Vec<usize>>,
    /// Width of stage 1; stage i has hidden * 2^(i-1) [search: 32].
    pub hidden: usize,
    /// Classes of the classifier head.
    pub classes: usize,
}

impl VitSpec {
    pub fn stages(&self) -> usize {
        self.kernels.len()
    }

    /// Blocks per stage (1 each when not given).
    pub fn depths(&self) -> Vec<usize> {
        self.depths
            .clone()
            .unwrap_or_else(|| vec![1; self.stages()])
    }

    pub fn widths(&self) -> Vec<usize> {
        (0..self.stages()).map(|i| self.hidden << i).collect()
    }

    pub fn stage_heads(&self) -> Vec<usize> {
        let s = self.stages();
        (0..s).map(|i| (self.heads >> (s - 1 - i)).max(1)).collect()
    }

    /// Everything that does not depend on the input shape.
    pub fn validate(&self) -> Result<(), NnError> {
        let s = self.stages();
        if s == 0 || s > MAX_STAGES {
            return Err(NnError::spec(
                "model.kernels",
                format!(
                    "{s} stages: give 1 to {MAX_STAGES} kernels (tokenizer, then one per merging)"
                ),
            ));
        }
        let depths = self.depths();
        for (field, len) in [
            ("model.splits", self.splits.len()),
            ("model.expansions", self.expansions.len()),
            ("model.depths", depths.len()),
        ] {
            if len != s {
                return Err(NnError::spec(
                    field,
                    format!("has {len} entries but `kernels` gives {s} stages; give one per stage"),
                ));
            }
        }
        if !(4..=8).contains(&self.kernels[0]) {
            return Err(NnError::spec(
                "model.kernels.0",
                format!(
                    "tokenizer kernel {} is not in 4..=8 (stride 4)",
                    self.kernels[0]
                ),
            ));
        }
        for (i, &k) in self.kernels.iter().enumerate().skip(1) {
            if !(2..=4).contains(&k) {
                return Err(NnError::spec(
                    format!("model.kernels.{i}"),
                    format!("patch-merging kernel {k} is not in 2..=4 (stride 2)"),
                ));
            }
        }
        for (i, ((&sp, &e), &d)) in self
            .splits
            .iter()
            .zip(&self.expansions)
            .zip(&depths)
            .enumerate()
        {
            positive(&format!("model.splits.{i}"), sp)?;
            positive(&format!("model.expansions.{i}"), e)?;
            positive(&format!("model.depths.{i}"), d)?;
        }
        positive("model.heads", self.heads)?;
        positive("model.hidden", self.hidden)?;
        positive("model.classes", self.classes)?;
        for (i, (w, h)) in self
            .widths()
            .into_iter()
            .zip(self.stage_heads())
            .enumerate()
        {
            if w % h != 0 {
                return Err(NnError::spec(
                    "model.heads",
                    format!(
                        "stage {} has width {w} (hidden {} x 2^{i}) and {h} heads; the width must \
                         be a multiple of the heads",
                        i + 1,
                        self.hidden
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Token grid side of each stage for a square `side` x `side` image at tokenizer factor
    /// `factor`, or an error naming what does not fit.
    pub fn grids(&self, side: usize, factor: usize) -> Result<Vec<usize>, NnError> {
        if factor == 0 {
            return Err(NnError::spec("retokenize", "factor must be at least 1"));
        }
        let geom = tokenizer_geometry(self.kernels[0], factor);
        let span = geom.dilation * (geom.kernel - 1) + 1;
        let Some(g) = (side + 2 * geom.padding)
            .checked_sub(span)
            .map(|r| r / geom.stride + 1)
        else {
            return Err(NnError::spec(
                "input",
                format!(
                    "a {side}px image is smaller than the tokenizer's span {span} (kernel {}, factor {factor})",
                    self.kernels[0]
                ),
            ));
        };
        let mut grids = vec![g];
        for _ in 1..self.stages() {
            let last = grids[grids.len() - 1];
            grids.push(last.div_ceil(2));
        }
        for (i, (&g, &s)) in grids.iter().zip(&self.splits).enumerate() {
            let s = s.min(g);
            if g % s != 0 {
                return Err(NnError::spec(
                    format!("model.splits.{i}"),
                    format!(
                        "stage {} has a {g}x{g} token grid ({side}px image, factor {factor}) that \
                         {s} windows per side do not divide",
                        i + 1
                    ),
                ));
            }
        }
        Ok(grids)
    }

    /// Trainable scalars for `in_channels` input channels (equals the built model's count).
    pub fn param_count(&self, in_channels: usize) -> usize {
        let widths = self.widths();
        let depths = self.depths();
        let k1 = self.kernels[0];
        let mut n = in_channels * k1 * k1 * widths[0] + widths[0];
        for i in 0..self.stages() {
            let c = widths[i];
            if i > 0 {
                let kc = self.kernels[i] * self.kernels[i] * widths[i - 1];
                n += 2 * kc + kc * c + c;
            }
            let e = self.expansions[i] * c;
            let block = 2 * c + 4 * (c * c + c) + 2 * c + (c * e + e) + (e * c + c);
            n += depths[i] * block;
        }
        let c = widths[self.stages() - 1];
        n + 2 * c + c * self.classes + self.classes
    }

    /// Multiply-accumulates of one forward pass on a `side` x `side` image (the count ViT papers
    /// report as FLOPs): convolutions, linear layers and the two attention products; norms,
    /// softmax and GELU are not counted.
    pub fn macs(&self, in_channels: usize, side: usize, factor: usize) -> Result<u64, NnError> {
        let grids = self.grids(side, factor)?;
        let widths = self.widths();
        let depths = self.depths();
        let k1 = self.kernels[0] as u64;
        let mut m = (grids[0] * grids[0]) as u64 * widths[0] as u64 * in_channels as u64 * k1 * k1;
        for i in 0..self.stages() {
            let (g, c) = (grids[i] as u64, widths[i] as u64);
            let n = g * g;
            if i > 0 {
                let k = self.kernels[i] as u64;
                m += n * k * k * widths[i - 1] as u64 * c;
            }
            let window = g / self.splits[i].min(grids[i]) as u64;
            let e = self.expansions[i] as u64;
            let block = 4 * n * c * c + 2 * n * window * window * c + 2 * n * c * c * e;
            m += depths[i] as u64 * block;
        }
        Ok(m + (widths[self.stages() - 1] * self.classes) as u64)
    }
}

/// The tokenizer at factor d: kernel K1, stride 4d, dilation d, padding
/// max(0, ceil((span - stride) / 2)) with span = d (K1 - 1) + 1, so that a side divisible by
/// 4d gives side / (4d) tokens. (The paper's padding K1 - 4, `docs/methods/asvit.md` §1, would
/// add a row of tokens.)
pub fn tokenizer_geometry(kernel: usize, factor: usize) -> ConvGeometry {
    let stride = TOKENIZER_STRIDE * factor;
    let span = factor * (kernel - 1) + 1;
    ConvGeometry {
        kernel,
        stride,
        padding: span.saturating_sub(stride).div_ceil(2),
        dilation: factor,
    }
}

/// LayerNorm, or the identity while the length distortion is measured (`docs/methods/asvit.md` §2).
fn norm<E: Float, T: Tape<E, Dev>>(
    ln: &LayerNorm<E>,
    x: Tensor3<E, T>,
    identity: bool,
) -> Result<Tensor3<E, T>, NnError>
where
    Dev: Device<E>,
{
    if identity {
        Ok(x)
    } else {
        ln.forward(x)
    }
}

/// fc2(GELU(fc1(x))) on every token.
#[derive(Clone, Debug)]
pub struct Mlp<E: Float> {
    pub fc1: Linear<E>,
    pub fc2: Linear<E>,
}
impl_has_params!(Mlp { fc1, fc2 });

impl<E: Float> Mlp<E>
where
    Dev: Device<E>,
{
    /// `dim -> hidden -> dim`.
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self, NnError> {
        Ok(Self {
            fc1: Linear::new(dim, hidden, vb.pp("fc1"))?,
            fc2: Linear::new(hidden, dim, vb.pp("fc2"))?,
        })
    }
}

/// x + Attn(LN(x)), then x + MLP(LN(x)).
#[derive(Clone, Debug)]
pub struct VitBlock<E: Float> {
    pub norm1: LayerNorm<E>,
    pub attn: MultiHeadSelfAttention<E>,
    pub norm2: LayerNorm<E>,
    pub mlp: Mlp<E>,
}
impl_has_params!(VitBlock {
    norm1,
    attn,
    norm2,
    mlp
});

impl<E: Float> VitBlock<E>
where
    Dev: Device<E>,
{
    /// A block of width `dim` with `heads` heads and an MLP of `mlp_hidden` features.
    pub fn new(
        dim: usize,
        heads: usize,
        mlp_hidden: usize,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        Ok(Self {
            norm1: LayerNorm::new(dim, vb.pp("norm1"))?,
            attn: MultiHeadSelfAttention::new(dim, heads, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, mlp_hidden, vb.pp("mlp"))?,
        })
    }
}

/// Unfold K x K (stride 2), LayerNorm(K^2 C), Linear(K^2 C -> 2C).
#[derive(Clone, Debug)]
pub struct PatchMerging<E: Float> {
    pub norm: LayerNorm<E>,
    pub proj: Linear<E>,
    pub kernel: usize,
}
impl_has_params!(PatchMerging { norm, proj });

impl<E: Float> PatchMerging<E>
where
    Dev: Device<E>,
{
    /// Merges `kernel x kernel` windows of `in_channels` into `out_channels`.
    pub fn new(
        in_channels: usize,
        kernel: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        let window = kernel * kernel * in_channels;
        Ok(Self {
            norm: LayerNorm::new(window, vb.pp("norm"))?,
            proj: Linear::new(window, out_channels, vb.pp("proj"))?,
            kernel,
        })
    }
}

#[derive(Clone, Debug)]
pub struct VitStage<E: Float> {
    pub merge: Option<PatchMerging<E>>,
    pub blocks: Vec<VitBlock<E>>,
}
impl_has_params!(VitStage { merge, blocks });

#[derive(Clone, Debug)]
pub struct Vit<E: Float> {
    pub tokenizer: Conv2d<E>,
    pub stages: Vec<VitStage<E>>,
    pub head_norm: LayerNorm<E>,
    pub head: Linear<E>,
    splits: Vec<usize>,
    factor: usize,
    identity_norms: bool,
}
impl_has_params!(Vit {
    tokenizer,
    stages,
    head_norm,
    head
});

impl<E: Float> Vit<E>
where
    Dev: Device<E>,
{
    pub fn new(spec: &VitSpec, in_channels: usize, vb: VarBuilder) -> Result<Self, NnError> {
        spec.validate()?;
        let (widths, heads, depths) = (spec.widths(), spec.stage_heads(), spec.depths());
        let geometry = tokenizer_geometry(spec.kernels[0], 1);
        let tokenizer = Conv2d::new(in_channels, widths[0], geometry, vb.pp("tokenizer"))?;
        let mut stages = Vec::with_capacity(spec.stages());
        for i in 0..spec.stages() {
            let vb = vb.pp("stages").pp(i);
            let c = widths[i];
            let merge = match i {
                0 => None,
                _ => Some(PatchMerging::new(
                    widths[i - 1],
                    spec.kernels[i],
                    c,
                    vb.pp("merge"),
                )?),
            };
            let hidden = spec.expansions[i] * c;
            let blocks = (0..depths[i])
                .map(|j| VitBlock::new(c, heads[i], hidden, vb.pp("blocks").pp(j)))
                .collect::<Result<Vec<_>, NnError>>()?;
            stages.push(VitStage { merge, blocks });
        }
        let last = widths[spec.stages() - 1];
        Ok(Self {
            tokenizer,
            stages,
            head_norm: LayerNorm::new(last, vb.pp("head_norm"))?,
            head: Linear::new(last, spec.classes, vb.pp("head"))?,
            splits: spec.splits.clone(),
            factor: 1,
            identity_norms: false,
        })
    }

    /// Sets the tokenizer to factor d: stride 4d, dilation d (`docs/methods/asvit.md` §4). The
    /// weights stay.
    pub fn set_token_factor(&mut self, factor: usize) -> Result<(), NnError> {
        if factor == 0 {
            return Err(NnError::spec("retokenize", "factor must be at least 1"));
        }
        let g = tokenizer_geometry(self.tokenizer.kernel(), factor);
        self.tokenizer.stride = g.stride;
        self.tokenizer.dilation = g.dilation;
        self.tokenizer.padding = g.padding;
        self.factor = factor;
        Ok(())
    }

    pub fn token_factor(&self) -> usize {
        self.factor
    }

    /// Stage-1 tokens of a `side` x `side` image at the current factor.
    pub fn tokens_per_image(&self, side: usize) -> usize {
        self.tokenizer.out_size(side).map_or(0, |g| g * g)
    }

    /// Replaces every LayerNorm by the identity (`true`) or restores them; the length distortion
    /// is measured without them (`docs/methods/asvit.md` §2).
    pub fn set_identity_norms(&mut self, identity: bool) {
        self.identity_norms = identity;
    }

    /// `(batch, c, h, w)` -> pooled last-stage features `(batch, width)` (after the head's
    /// LayerNorm, before its Linear).
    pub fn features<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor2<E, T>, NnError> {
        let id = self.identity_norms;
        let y = self.tokenizer.forward(x)?;
        let (b, c, g, gw) = *y.shape();
        if g != gw {
            return Err(NnError::shape(
                "vit token grid (square images)",
                (g, g),
                (g, gw),
            ));
        }
        let mut x = y
            .try_reshape_like(&(b, c, g * g))?
            .try_permute::<_, Axes3<0, 2, 1>>()?
            .try_contiguous()?;
        let mut g = g;
        for (i, stage) in self.stages.iter().enumerate() {
            if let Some(m) = &stage.merge {
                let (b, n, c) = *x.shape();
                debug_assert_eq!(n, g * g);
                let grid = x
                    .try_permute::<_, Axes3<0, 2, 1>>()?
                    .try_contiguous()?
                    .try_reshape_like(&(b, c, g, g))?;
                let grid = pad_to_even(grid)?;
                let k = m.kernel;
                let cols = unfold(
                    grid,
                    ConvGeometry {
                        kernel: k,
                        stride: 2,
                        padding: (k - 1) / 2,
                        dilation: 1,
                    },
                )?;
                g = g.div_ceil(2);
                let tokens = cols.try_permute::<_, Axes3<0, 2, 1>>()?.try_contiguous()?;
                x = m.proj.forward3(norm(&m.norm, tokens, id)?)?;
            }
            let split = self.splits[i].min(g);
            if g % split != 0 {
                return Err(NnError::shape(
                    "vit windows (windows per side must divide the token grid)",
                    format!("a grid divisible by {split}"),
                    (g, g),
                ));
            }
            let window = g / split;
            for blk in &stage.blocks {
                let a = norm(&blk.norm1, x.with_empty_tape(), id)?;
                let a = blk.attn.forward_windowed(a, (g, g), window)?;
                x = x.try_add(a)?;
                let h = norm(&blk.norm2, x.with_empty_tape(), id)?;
                let h = blk.mlp.fc2.forward3(gelu(blk.mlp.fc1.forward3(h)?)?)?;
                x = x.try_add(h)?;
            }
        }
        let x = norm(&self.head_norm, x, id)?;
        Ok(x.try_mean::<(usize, usize), Axis<1>>()?)
    }

    /// `(batch, c, h, w)` -> logits `(batch, classes)`.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor2<E, T>, NnError> {
        self.head.forward(self.features(x)?)
    }
}

/// Zero-pads the bottom row and right column of an odd-sided map so that stride-2 patch merging
/// covers every token (`ceil(side / 2)` tokens out). A host kernel, like `unfold`.
fn pad_to_even<E: Float, T: Tape<E, Dev>>(x: Tensor4<E, T>) -> Result<Tensor4<E, T>, NnError>
where
    Dev: Device<E>,
{
    let (b, c, h, w) = *x.shape();
    let (h2, w2) = (h + h % 2, w + w % 2);
    if (h2, w2) == (h, w) {
        return Ok(x);
    }
    let x = x.try_contiguous()?;
    let (x, mut tape) = x.split_tape();
    let xv = host_read(&x);
    let mut out = vec![E::zero(); b * c * h2 * w2];
    let at = move |p: usize, i: usize, j: usize| (p * h2 + i) * w2 + j;
    for p in 0..b * c {
        for i in 0..h {
            for j in 0..w {
                out[at(p, i, j)] = xv[(p * h + i) * w + j];
            }
        }
    }
    let out = x.device().try_tensor_from_vec(out, (b, c, h2, w2))?;
    let out_id = out.clone();
    tape.add_backward_op(move |grads| {
        let go = take_grad(grads, &out_id)?;
        with_grad_mut(grads, &x, |gx| {
            for p in 0..b * c {
                for i in 0..h {
                    for j in 0..w {
                        gx[(p * h + i) * w + j] += go[at(p, i, j)];
                    }
                }
            }
        })?;
        Ok(())
    });
    Ok(out.put_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grad, check_param_grads, rand_tensor};
    use crate::layers::ForwardCtx;
    use crate::models::InputShape;
    use crate::{collect_params, Init, Model, ModelSpec};
    use serde_json::json;

    fn spec(v: serde_json::Value) -> VitSpec {
        match ModelSpec::from_json(v).unwrap() {
            ModelSpec::Vit(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn tiny() -> VitSpec {
        spec(json!({
            "kind": "vit", "kernels": [5, 3], "splits": [2, 1], "expansions": [2, 1],
            "heads": 2, "depths": [1, 2], "hidden": 2, "classes": 3,
        }))
    }

    fn build(s: &VitSpec, channels: usize, side: usize) -> Model<f64> {
        let input = InputShape {
            channels,
            height: side,
            width: side,
        };
        let (dev, init) = (Dev::default(), Init::default());
        Model::build(
            &ModelSpec::Vit(s.clone()),
            input,
            VarBuilder::new(&dev, &init, 3),
        )
        .unwrap()
    }

    #[test]
    fn shapes_names_and_counts() {
        let s = tiny();
        let mut m = build(&s, 2, 16);
        let x = rand_tensor(&Dev::default(), (3, 2, 16, 16), 1);
        let y = m.forward(x, &mut ForwardCtx::eval()).unwrap();
        assert_eq!(*y.shape(), (3, 3));
        assert_eq!(m.num_trainable(), s.param_count(2));
        let names: Vec<String> = collect_params(&m).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[..2], ["tokenizer.weight", "tokenizer.bias"]);
        for want in [
            "stages.0.blocks.0.norm1.weight",
            "stages.0.blocks.0.attn.q.weight",
            "stages.0.blocks.0.mlp.fc2.bias",
            "stages.1.merge.norm.weight",
            "stages.1.merge.proj.weight",
            "stages.1.blocks.1.attn.proj.bias",
            "head_norm.bias",
            "head.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        assert_eq!(names.last().unwrap(), "head.bias");
        // 16px: 4x4 tokens, then 2x2; a 12px image gives 3x3 -> padded to 4 -> 2x2.
        assert_eq!(s.grids(16, 1).unwrap(), [4, 2]);
        assert_eq!(tiny_split1().grids(12, 1).unwrap(), [3, 2]);
        assert!(s.grids(12, 1).is_err(), "2 windows do not divide 3 tokens");
        let x = rand_tensor(&Dev::default(), (1, 2, 12, 12), 1);
        let mut m12 = build(&tiny_split1(), 2, 12);
        assert_eq!(
            *m12.forward(x, &mut ForwardCtx::eval()).unwrap().shape(),
            (1, 3)
        );
        // The published seed at 32 px: 8, 4, 2, 1 tokens per side.
        let seed = spec(json!({
            "kind": "vit", "kernels": [8, 4, 4, 4], "splits": [2, 1, 1, 1],
            "expansions": [3, 2, 4, 6], "heads": 32, "hidden": 32, "classes": 10,
        }));
        assert_eq!(seed.grids(32, 1).unwrap(), [8, 4, 2, 1]);
        assert_eq!(seed.grids(32, 2).unwrap(), [4, 2, 1, 1]);
        let mut big = build(&seed, 3, 32);
        assert_eq!(big.num_trainable(), seed.param_count(3));
        let x = rand_tensor(&Dev::default(), (2, 3, 32, 32), 1);
        assert_eq!(
            *big.forward(x, &mut ForwardCtx::eval()).unwrap().shape(),
            (2, 10)
        );
    }

    fn tiny_split1() -> VitSpec {
        VitSpec {
            splits: vec![3, 1],
            ..tiny()
        }
    }

    #[test]
    fn retokenization_changes_the_token_grid_not_the_weights() {
        let s = tiny();
        let mut m = build(&s, 1, 16);
        let before: Vec<f64> = collect_params(&m)[0].1.to_vec();
        let Some(vit) = m.vit_mut() else { panic!() };
        vit.set_token_factor(2).unwrap();
        assert_eq!(vit.tokenizer.stride, 8);
        assert_eq!(vit.tokenizer.dilation, 2);
        // span 2 * 4 + 1 = 9 -> padding 1: (16 + 2 - 9) / 8 + 1 = 2 tokens per side.
        assert_eq!(vit.tokenizer.out_size(16), Some(2));
        let x = rand_tensor(&Dev::default(), (2, 1, 16, 16), 4);
        let y = m
            .forward(x.clone(), &mut ForwardCtx::eval())
            .unwrap()
            .as_vec();
        assert_eq!(collect_params(&m)[0].1.to_vec(), before);
        m.vit_mut().unwrap().set_token_factor(1).unwrap();
        let z = m.forward(x, &mut ForwardCtx::eval()).unwrap().as_vec();
        assert_ne!(y, z);
        for k in 4..=8 {
            for d in 1..=4 {
                let g = tokenizer_geometry(k, d);
                let span = d * (k - 1) + 1;
                assert_eq!(
                    (32 + 2 * g.padding - span) / g.stride + 1,
                    32 / (4 * d),
                    "k{k} d{d}"
                );
            }
        }
    }

    #[test]
    fn gradients_of_the_whole_model_match_finite_differences() {
        // Two stages, a merge on an odd grid (3x3 -> pad -> 2x2), windows of 1 and 2 tokens.
        let s = VitSpec {
            splits: vec![3, 1],
            ..tiny()
        };
        let mut m = build(&s, 2, 12);
        m.vit_mut().unwrap().set_token_factor(1).unwrap();
        let x = rand_tensor(&Dev::default(), (2, 2, 12, 12), 5);
        let mut ctx = ForwardCtx::eval();
        check_param_grads(&mut m, &x, |m, t| m.forward(t, &mut ctx), 4, 1e-5);
        let probe = m.clone();
        check_input_grad(&x, |t| probe.vit().unwrap().forward(t), 1e-5);
        // And with the LayerNorms as identity (the length-distortion network).
        m.vit_mut().unwrap().set_identity_norms(true);
        let probe = m.clone();
        check_input_grad(&x, |t| probe.vit().unwrap().features(t), 1e-5);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let base = json!({
            "kind": "vit", "kernels": [8, 4], "splits": [2, 1], "expansions": [3, 2],
            "heads": 4, "hidden": 8, "classes": 10,
        });
        let err = |patch: serde_json::Value| {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(patch.as_object().unwrap().clone());
            match ModelSpec::from_json(v).and_then(|s| s.check().map(|_| s)) {
                Err(NnError::InvalidSpec { field, message }) => (field, message),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(err(json!({"splits": [2]})).0, "model.splits");
        assert_eq!(err(json!({"kernels": [3, 4]})).0, "model.kernels.0");
        assert_eq!(err(json!({"kernels": [8, 5]})).0, "model.kernels.1");
        assert_eq!(err(json!({"depths": [1, 0]})).0, "model.depths.1");
        assert_eq!(err(json!({"heads": 3})).0, "model.heads");
        assert_eq!(err(json!({"kernels": [8, 4, 4, 4, 4]})).0, "model.kernels");
        assert_eq!(err(json!({"window": 3})).0, "model");
        // The input decides the grid: 5 windows do not divide an 8x8 grid.
        let s = spec(json!({
            "kind": "vit", "kernels": [4], "splits": [3], "expansions": [2],
            "heads": 1, "hidden": 4, "classes": 2,
        }));
        let input = InputShape {
            channels: 1,
            height: 32,
            width: 32,
        };
        let (dev, init) = (Dev::default(), Init::default());
        let e = Model::<f32>::build(&ModelSpec::Vit(s), input, VarBuilder::new(&dev, &init, 0))
            .unwrap_err();
        assert!(e.to_string().contains("model.splits.0"), "{e}");
    }
}
