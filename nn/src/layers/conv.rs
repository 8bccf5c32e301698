//! 2-D convolution.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::tensor::{
    grad_buffer_apply, grad_buffer_to_host, host_read, impl_has_params, take_grad, with_grad_mut,
};
use crate::{Dev, Float, NnError, Param, ParamKind, Tensor3, Tensor4, VarBuilder};

/// Cross-correlation of `(batch, in, h, w)` with W: `(out, in, k, k)`, plus b: `(out,)`;
/// out size = (h + 2 padding - dilation (k - 1) - 1) / stride + 1 (groups = 1).
#[derive(Clone, Debug)]
pub struct Conv2d<E: Float> {
    pub weight: Param<E>,
    pub bias: Option<Param<E>>,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}
impl_has_params!(Conv2d { weight, bias });

/// Geometry of a [`Conv2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl ConvGeometry {
    /// Stride 1, dilation 1, padding that keeps odd-kernel outputs the input size.
    pub fn same(kernel: usize) -> Self {
        Self {
            kernel,
            stride: 1,
            padding: kernel / 2,
            dilation: 1,
        }
    }
}

impl<E: Float> Conv2d<E>
where
    Dev: Device<E>,
{
    /// `in_channels -> out_channels` with `geometry` and a bias; weights from `vb`'s init.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        geometry: ConvGeometry,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        Self::build(in_channels, out_channels, geometry, true, vb)
    }

    /// `in_channels -> out_channels` with `geometry`, without a bias.
    pub fn no_bias(
        in_channels: usize,
        out_channels: usize,
        geometry: ConvGeometry,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        Self::build(in_channels, out_channels, geometry, false, vb)
    }

    fn build(
        in_channels: usize,
        out_channels: usize,
        geometry: ConvGeometry,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        let ConvGeometry {
            kernel,
            stride,
            padding,
            dilation,
        } = geometry;
        if in_channels == 0 || out_channels == 0 || kernel == 0 || stride == 0 || dilation == 0 {
            return Err(NnError::spec(
                vb.name(),
                format!(
                    "conv2d needs positive channels, kernel, stride and dilation \
                     (in {in_channels}, out {out_channels}, kernel {kernel}, stride {stride}, \
                     dilation {dilation})"
                ),
            ));
        }
        let area = kernel * kernel;
        let (fan_in, fan_out) = (in_channels * area, out_channels * area);
        let w = vb.weights(fan_in, fan_out, out_channels * fan_in);
        let weight = vb.param(
            w,
            vec![out_channels, in_channels, kernel, kernel],
            ParamKind::Trainable,
        )?;
        let bias = if bias {
            let b = vb.biases(fan_in, fan_out, out_channels);
            Some(vb.param(b, vec![out_channels], ParamKind::Trainable)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            dilation,
        })
    }

    pub fn in_channels(&self) -> usize {
        self.weight.shape[1]
    }

    pub fn out_channels(&self) -> usize {
        self.weight.shape[0]
    }

    pub fn kernel(&self) -> usize {
        self.weight.shape[2]
    }

    /// Output side length for an input side `n`, or `None` if the kernel does not fit.
    pub fn out_size(&self, n: usize) -> Option<usize> {
        let span = self.dilation * (self.kernel() - 1) + 1;
        (n + 2 * self.padding)
            .checked_sub(span)
            .map(|r| r / self.stride + 1)
    }

    /// `(batch, in, h, w)` -> `(batch, out, h', w')`.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor4<E, T>, NnError> {
        self.forward_impl(x, false)
    }

    /// `conv(relu(x))` as one op: the ReLU is applied while gathering the input columns and its
    /// mask while scattering their gradient, so neither `relu(x)` nor its gradient is stored.
    pub fn forward_relu_input<T: Tape<E, Dev>>(
        &self,
        x: Tensor4<E, T>,
    ) -> Result<Tensor4<E, T>, NnError> {
        self.forward_impl(x, true)
    }

    fn forward_impl<T: Tape<E, Dev>>(
        &self,
        x: Tensor4<E, T>,
        relu_input: bool,
    ) -> Result<Tensor4<E, T>, NnError> {
        let (_, c, h, w) = *x.shape();
        if c != self.in_channels() {
            return Err(NnError::shape(
                "conv2d input channels",
                self.in_channels(),
                c,
            ));
        }
        let geom = ConvGeometry {
            kernel: self.kernel(),
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        };
        let Some(cols) = Im2col::new(geom, c, h, w) else {
            let span = self.dilation * (self.kernel() - 1) + 1;
            return Err(NnError::shape(
                "conv2d input size (kernel larger than the padded input)",
                format!("sides >= {}", span.saturating_sub(2 * self.padding)),
                (h, w),
            ));
        };
        conv2d(x, &self.weight, self.bias.as_ref(), cols, relu_input)
    }
}

/// A half-open index range `(lo, hi)`.
type Span = (usize, usize);

/// Where each im2col entry of one sample comes from: row `(c, p, q)`, column `(i, j)` holds
/// x[c, i stride + p dilation - padding, j stride + q dilation - padding] (0 outside).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Im2col {
    pub geom: ConvGeometry,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Im2col {
    /// `None` when the kernel does not fit the padded input.
    pub fn new(geom: ConvGeometry, c: usize, h: usize, w: usize) -> Option<Self> {
        let ConvGeometry {
            kernel: k,
            stride,
            padding,
            dilation,
        } = geom;
        if k == 0 || stride == 0 || dilation == 0 {
            return None;
        }
        let out = |n: usize| {
            (n + 2 * padding)
                .checked_sub(dilation * (k - 1) + 1)
                .map(|r| r / stride + 1)
        };
        Some(Self {
            geom,
            c,
            h,
            w,
            ho: out(h)?,
            wo: out(w)?,
        })
    }

    /// Rows: c k k.
    pub fn rows(&self) -> usize {
        self.c * self.geom.kernel * self.geom.kernel
    }

    /// Columns: h' w'.
    pub fn cols(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1, stride-1, unpadded kernel: the columns are the input itself.
    fn is_identity(&self) -> bool {
        self.geom.kernel == 1 && self.geom.stride == 1 && self.geom.padding == 0
    }

    /// For kernel offset `p` (dilated) along an axis of `n` pixels with `out` outputs: the
    /// outputs `lo..hi` whose input index `o stride + p dilation - padding` lies inside.
    pub(crate) fn valid(&self, p: usize, n: usize, out: usize) -> (usize, usize) {
        let ConvGeometry {
            stride,
            padding,
            dilation,
            ..
        } = self.geom;
        let off = p * dilation;
        // smallest o with o stride + off >= padding
        let lo = padding.saturating_sub(off).div_ceil(stride);
        // one past the largest o with o stride + off - padding <= n - 1
        let hi = if n + padding > off {
            ((n - 1 + padding - off) / stride + 1).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// The valid output ranges of every kernel offset: `(rows, cols)`, one `(lo, hi)` per offset
    /// along each axis (see [`Self::valid`]).
    fn ranges(&self) -> (Vec<Span>, Vec<Span>) {
        let k = self.geom.kernel;
        (
            (0..k).map(|p| self.valid(p, self.h, self.ho)).collect(),
            (0..k).map(|q| self.valid(q, self.w, self.wo)).collect(),
        )
    }

    /// Stride 1 with as many output as input columns: every valid entry of a row `(c, p, q)` is
    /// the input plane shifted by a constant, so a row is one contiguous copy (or add), plus the
    /// few entries that wrap around a line end, which lie outside the input.
    pub fn is_shift(&self) -> bool {
        self.geom.stride == 1 && self.wo == self.w
    }

    /// Backward of one sample for a [shift](Self::is_shift) geometry, without forming columns:
    /// per kernel offset (p, q) with flat input shift `off`, the valid outputs are one
    /// contiguous run `start..end` of the flat output (less the entries that wrap around a line
    /// end), so dW[:, :, p, q] += dy[:, run] x[:, run + off]^T and dx[:, run + off] +=
    /// W[:, :, p, q]^T dy[:, run], each one strided gemm. The wrapped entries are zeroed in
    /// copies of dy per column offset q, which makes their terms exact zeros: `masked` holds
    /// k copies `(o, l)` for dx and k transposed ones `(l, o)` for dW (so that gemm's left
    /// operand is column-major and not repacked for every offset), plus dy^T: (2 k + 1) o l
    /// scratch in all.
    /// `dwt` is dW^T, `(c k k, o)`; `w` is W, `(o, c k k)`; `dy` is `(o, l)`.
    pub fn shift_backward<E: Float>(
        &self,
        x: &[E],
        dy: &[E],
        w: &[E],
        dwt: &mut [E],
        dx: &mut [E],
        masked: &mut [E],
    ) {
        let (k, l, hw, wo) = (self.geom.kernel, self.cols(), self.h * self.w, self.wo);
        let (c, o) = (self.c, dy.len() / l.max(1));
        let (row_ranges, col_ranges) = self.ranges();
        let ConvGeometry {
            padding, dilation, ..
        } = self.geom;
        // dy^T once (in 16 x 16 tiles, so that both sides are read and written in runs), then
        // per q the masked copies: lines of dy, or rows of dy^T, zeroed outside jlo..jhi.
        let (plain, rest) = masked.split_at_mut(k * o * l);
        let (transposed, dyt) = rest.split_at_mut(k * o * l);
        const TILE: usize = 16;
        for o0 in (0..o).step_by(TILE) {
            for p0 in (0..l).step_by(TILE) {
                for oi in o0..(o0 + TILE).min(o) {
                    for pos in p0..(p0 + TILE).min(l) {
                        dyt[pos * o + oi] = dy[oi * l + pos];
                    }
                }
            }
        }
        for (q, &(jlo, jhi)) in col_ranges.iter().enumerate() {
            let (jlo, jhi) = (jlo.min(wo), jhi.max(jlo).min(wo));
            let mq = &mut plain[q * o * l..(q + 1) * o * l];
            mq.copy_from_slice(dy);
            for line in mq.chunks_exact_mut(wo) {
                line[..jlo].fill(E::zero());
                line[jhi..].fill(E::zero());
            }
            let mt = &mut transposed[q * o * l..(q + 1) * o * l];
            mt.copy_from_slice(dyt);
            for line in mt.chunks_exact_mut(wo * o) {
                line[..jlo * o].fill(E::zero());
                line[jhi * o..].fill(E::zero());
            }
        }
        let (plain, transposed) = (&*plain, &*transposed);
        for (p, &(ilo, ihi)) in row_ranges.iter().enumerate() {
            for (q, &(jlo, jhi)) in col_ranges.iter().enumerate() {
                if ilo >= ihi || jlo >= jhi {
                    continue;
                }
                let (start, end) = (ilo * wo + jlo, (ihi - 1) * wo + jhi);
                // Flat input index of output `start`: (ilo + p d - pad, jlo + q d - pad).
                let src = (ilo + p * dilation - padding) * self.w + jlo + q * dilation - padding;
                let (dyq, dyqt) = (
                    &plain[q * o * l..(q + 1) * o * l],
                    &transposed[q * o * l..(q + 1) * o * l],
                );
                let pq = p * k + q;
                gemm_strided(
                    (o, c, end - start),
                    (&mut dwt[pq * o..], (1, k * k * o)),
                    true,
                    (&dyqt[start * o..], (1, o)),
                    (&x[src..], (1, hw)),
                );
                gemm_strided(
                    (c, end - start, o),
                    (&mut dx[src..], (hw, 1)),
                    true,
                    (&w[pq..], (k * k, c * k * k)),
                    (&dyq[start..], (l, 1)),
                );
            }
        }
    }

    /// Fills `cols` (rows x cols) from one sample `x` (c h w).
    pub fn fill<E: Float>(&self, x: &[E], cols: &mut [E]) {
        let (k, l, (h, w), wo) = (self.geom.kernel, self.cols(), (self.h, self.w), self.wo);
        let ConvGeometry {
            stride,
            padding,
            dilation,
            ..
        } = self.geom;
        let (row_ranges, col_ranges) = self.ranges();
        let shift = self.is_shift();
        for ch in 0..self.c {
            let plane = &x[ch * h * w..(ch + 1) * h * w];
            for (p, &(ilo, ihi)) in row_ranges.iter().enumerate() {
                for (q, &(jlo, jhi)) in col_ranges.iter().enumerate() {
                    let row = &mut cols[((ch * k + p) * k + q) * l..][..l];
                    if ilo >= ihi || jlo >= jhi {
                        row.fill(E::zero());
                        continue;
                    }
                    row[..ilo * wo].fill(E::zero());
                    row[ihi * wo..].fill(E::zero());
                    let y0 = ilo * stride + p * dilation - padding;
                    let x0 = jlo * stride + q * dilation - padding;
                    if shift {
                        let (start, end) = (ilo * wo + jlo, (ihi - 1) * wo + jhi);
                        let src = y0 * w + x0;
                        row[start..end].copy_from_slice(&plane[src..src + end - start]);
                        if jlo > 0 || jhi < wo {
                            for line in row[ilo * wo..ihi * wo].chunks_exact_mut(wo) {
                                line[..jlo].fill(E::zero());
                                line[jhi..].fill(E::zero());
                            }
                        }
                        continue;
                    }
                    for (di, line) in row[ilo * wo..ihi * wo].chunks_exact_mut(wo).enumerate() {
                        let y = y0 + di * stride;
                        let src = &plane[y * w..(y + 1) * w];
                        line[..jlo].fill(E::zero());
                        line[jhi..].fill(E::zero());
                        let dst = &mut line[jlo..jhi];
                        if stride == 1 {
                            dst.copy_from_slice(&src[x0..x0 + dst.len()]);
                        } else {
                            for (d, s) in dst.iter_mut().zip(src[x0..].iter().step_by(stride)) {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    }

    /// col2im: adds each entry of `dcols` (rows x cols) to the pixel of `dx` (c h w) it came
    /// from. `dcols` is scratch: the entries that map outside the input may be overwritten.
    pub fn scatter_add<E: Float>(&self, dcols: &mut [E], dx: &mut [E]) {
        let (k, l, (h, w), wo) = (self.geom.kernel, self.cols(), (self.h, self.w), self.wo);
        let ConvGeometry {
            stride,
            padding,
            dilation,
            ..
        } = self.geom;
        let (row_ranges, col_ranges) = self.ranges();
        let shift = self.is_shift();
        for ch in 0..self.c {
            let plane = &mut dx[ch * h * w..(ch + 1) * h * w];
            for (p, &(ilo, ihi)) in row_ranges.iter().enumerate() {
                for (q, &(jlo, jhi)) in col_ranges.iter().enumerate() {
                    if ilo >= ihi || jlo >= jhi {
                        continue;
                    }
                    let row = &mut dcols[((ch * k + p) * k + q) * l..][..l];
                    let y0 = ilo * stride + p * dilation - padding;
                    let x0 = jlo * stride + q * dilation - padding;
                    if shift {
                        // Zero the entries that wrap around a line end, then add the valid rows
                        // as one contiguous run.
                        if jlo > 0 || jhi < wo {
                            for line in row[ilo * wo..ihi * wo].chunks_exact_mut(wo) {
                                line[..jlo].fill(E::zero());
                                line[jhi..].fill(E::zero());
                            }
                        }
                        let (start, end) = (ilo * wo + jlo, (ihi - 1) * wo + jhi);
                        let dst = y0 * w + x0;
                        for (d, s) in plane[dst..dst + end - start]
                            .iter_mut()
                            .zip(&row[start..end])
                        {
                            *d += *s;
                        }
                        continue;
                    }
                    for (di, line) in row[ilo * wo..ihi * wo].chunks_exact(wo).enumerate() {
                        let y = y0 + di * stride;
                        let src = &line[jlo..jhi];
                        let dst = &mut plane[y * w..(y + 1) * w];
                        if stride == 1 {
                            for (d, s) in dst[x0..x0 + src.len()].iter_mut().zip(src) {
                                *d += *s;
                            }
                        } else {
                            for (d, s) in dst[x0..].iter_mut().step_by(stride).zip(src) {
                                *d += *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Row-major `c (m, n) (+)= a (m, k) @ b (k, n)`, where `c_t` / `a_t` / `b_t` mean the slice
/// holds the transpose (`(n, m)` / `(k, m)` / `(n, k)`); `accumulate` adds to `c` instead of
/// overwriting it. One thread: callers parallelise over samples.
///
/// gemm works on a column-major destination (it transposes the problem otherwise) and packs
/// its left operand unless that is column-major too; so when both operands are stored with `k`
/// contiguous, `c_t` with the small operand as `a` keeps the large one from being repacked.
#[allow(clippy::too_many_arguments)]
fn matmul<E: Float>(
    (m, n, k): (usize, usize, usize),
    c: &mut [E],
    c_t: bool,
    accumulate: bool,
    a: &[E],
    a_t: bool,
    b: &[E],
    b_t: bool,
) {
    let c_s = if c_t { (1, m) } else { (n, 1) };
    let a_s = if a_t { (1, m) } else { (k, 1) };
    let b_s = if b_t { (1, k) } else { (n, 1) };
    gemm_strided((m, n, k), (c, c_s), accumulate, (a, a_s), (b, b_s));
}

/// `c (m, n) (+)= a (m, k) @ b (k, n)` on strided views: `(slice, (row stride, column stride))`,
/// entry (i, j) at `slice[i rs + j cs]`. One thread.
fn gemm_strided<E: Float>(
    (m, n, k): (usize, usize, usize),
    (c, (c_rs, c_cs)): (&mut [E], (usize, usize)),
    accumulate: bool,
    (a, (a_rs, a_cs)): (&[E], (usize, usize)),
    (b, (b_rs, b_cs)): (&[E], (usize, usize)),
) {
    if m == 0 || n == 0 {
        return;
    }
    // One past the last entry a (rows, cols) view addresses.
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(
        c.len() >= extent(m, n, c_rs, c_cs)
            && a.len() >= extent(m, k, a_rs, a_cs)
            && b.len() >= extent(k, n, b_rs, b_cs)
    );
    // SAFETY: every entry the strides address lies inside its slice (asserted above), and `c`
    // does not alias `a` or `b` (it is borrowed mutably). `E` is f32 or f64, the types gemm
    // supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            E::one(),
            E::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `c (m, n) = a (m, k) @ b (k, n)`, all row-major, into memory not yet initialised; returns `c`
/// initialised. One thread.
fn matmul_uninit<'c, E: Float>(
    (m, n, k): (usize, usize, usize),
    c: &'c mut [MaybeUninit<E>],
    a: &[E],
    b: &[E],
) -> &'c mut [E] {
    assert!(c.len() == m * n && a.len() >= m * k && b.len() >= k * n);
    // SAFETY: as in `matmul`; with `read_dst` false gemm only writes `c` (dst := a b), every one
    // of its m n entries, so afterwards `c` is initialised and may be viewed as `[E]`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().cast::<E>(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            E::one(),
            E::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        &mut *(c as *mut [MaybeUninit<E>] as *mut [E])
    }
}

/// Convolution (optionally of `relu(x)`) as one host op: per sample, im2col into a scratch buffer
/// (none for 1x1 stride-1 kernels), a matmul with W: `(out, c k k)`, plus the bias; samples in
/// parallel on rayon. The op keeps its host copy of the input (under the ReLU, `relu(x)`: formed
/// once per sample, not once per kernel offset) for backward, which rebuilds each sample's
/// columns: dW = sum_n dy_n cols_n^T, dx_n = col2im(W^T dy_n) (masked by relu(x) > 0, i.e.
/// x > 0, under the ReLU), db = sum of dy over batch and pixels. Input and output tensors are
/// held as ghosts (gradient ids only).
///
/// dfdx 0.13 gates its conv2d behind the nightly compiler. On CUDA this op copies through the
/// host (`host_read`, `take_grad`, `with_grad_mut`): correct, but slow.
pub(crate) fn conv2d<E: Float, T: Tape<E, Dev>>(
    x: Tensor4<E, T>,
    weight: &Param<E>,
    bias: Option<&Param<E>>,
    g: Im2col,
    relu_input: bool,
) -> Result<Tensor4<E, T>, NnError>
where
    Dev: Device<E>,
{
    let b = x.shape().0;
    let o = weight.shape[0];
    let (ckk, l, chw) = (g.rows(), g.cols(), g.c * g.h * g.w);
    if weight.numel() != o * ckk {
        return Err(NnError::shape("conv2d weight", (o, ckk), &weight.shape));
    }
    let direct = g.is_identity();
    let plan = Conv2dPlan {
        g,
        o,
        ckk,
        l,
        chw,
        direct,
        shift: g.is_shift() && !direct,
        scratch: if direct { 0 } else { ckk * l },
        // Samples in fixed chunks (set by the batch size, not the thread count), one scratch
        // buffer per chunk; in backward the chunks' partial dW and db are summed in order, so
        // the result is bit-identical from run to run.
        chunk: b.div_ceil(8).max(1),
        relu_input,
        has_bias: bias.is_some(),
    };
    let x = x.try_contiguous()?;
    let (x, mut tape) = x.split_tape();
    let mut xv = host_read(&x);
    let (dev, x) = (x.device().clone(), x.ghost());
    if relu_input {
        relu_in_place(&mut xv, chw);
    }
    let (wv, bv) = (host_read(&weight.value), bias.map(|p| host_read(&p.value)));
    let y = plan.forward(b, &xv, &wv, bv.as_deref());
    let out = dev.try_tensor_from_vec(y, (b, o, g.ho, g.wo))?;
    let out_id = out.ghost();
    let (weight, bias) = (weight.value.clone(), bias.map(|p| p.value.clone()));
    tape.add_backward_op(move |grads| {
        let go = grad_buffer_to_host(grads.get_or_alloc_mut(&out_id)?)?;
        let wv = host_read(&weight);
        let chunk = plan.chunk;
        let partials = grad_buffer_apply(grads.get_or_alloc_mut(&x)?, |gx| {
            gx.par_chunks_mut(chunk * chw)
                .zip(xv.par_chunks(chunk * chw))
                .zip(go.par_chunks(chunk * o * l))
                .map(|((gxc, xc), goc)| plan.backward_chunk(gxc, xc, goc, &wv))
                .collect::<Vec<_>>()
        })?;
        let (mut dwt, mut db) = (vec![E::zero(); o * ckk], vec![E::zero(); o]);
        for (pw, pb) in partials {
            dwt.iter_mut().zip(pw).for_each(|(a, v)| *a += v);
            db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
        }
        with_grad_mut(grads, &weight, |gw| {
            for (r, gr) in gw.chunks_mut(ckk).enumerate() {
                for (ci, g) in gr.iter_mut().enumerate() {
                    *g += dwt[ci * o + r];
                }
            }
        })?;
        if let Some(bias) = &bias {
            with_grad_mut(grads, bias, |gb| {
                gb.iter_mut().zip(&db).for_each(|(a, &b)| *a += b)
            })?;
        }
        Ok(())
    });
    Ok(out.put_tape(tape))
}

/// The sizes and strategy of one [`conv2d`] call, shared by its forward and backward.
#[derive(Clone, Copy)]
struct Conv2dPlan {
    g: Im2col,
    /// Output channels.
    o: usize,
    /// Rows (c k k) and columns (h' w') of one sample's im2col matrix.
    ckk: usize,
    l: usize,
    /// Values in one input sample, c h w.
    chw: usize,
    /// A 1x1 stride-1 kernel: the input is its own column matrix.
    direct: bool,
    /// A shift geometry (see `Im2col::is_shift`), not `direct`.
    shift: bool,
    /// Size of the forward's column buffer.
    scratch: usize,
    /// Samples per parallel chunk.
    chunk: usize,
    relu_input: bool,
    has_bias: bool,
}

impl Conv2dPlan {
    /// y `(b, o, l)` = W cols(x) + bias, per sample, from the (already ReLU'd) input `xv`.
    fn forward<E: Float>(&self, b: usize, xv: &[E], wv: &[E], bv: Option<&[E]>) -> Vec<E> {
        let Conv2dPlan {
            g,
            o,
            ckk,
            l,
            chw,
            direct,
            scratch,
            chunk,
            ..
        } = *self;
        let mut y = Vec::with_capacity(b * o * l);
        y.spare_capacity_mut()
            .par_chunks_mut(chunk * o * l)
            .zip(xv.par_chunks(chunk * chw))
            .for_each(|(yc, xc)| {
                let mut cols = vec![E::zero(); scratch];
                for (yn, xn) in yc.chunks_mut(o * l).zip(xc.chunks(chw)) {
                    let src: &[E] = if direct {
                        xn
                    } else {
                        g.fill(xn, &mut cols);
                        &cols
                    };
                    let yn = matmul_uninit((o, l, ckk), yn, wv, src);
                    if let Some(bv) = bv {
                        for (row, &bo) in yn.chunks_mut(l).zip(bv) {
                            row.iter_mut().for_each(|v| *v += bo);
                        }
                    }
                }
            });
        // SAFETY: the chunks cover all b o l entries and `matmul_uninit` wrote every one of them.
        unsafe { y.set_len(b * o * l) };
        y
    }

    /// One chunk of samples' backward: adds dx into `gxc` and returns the chunk's partial
    /// (dW^T, db).
    fn backward_chunk<E: Float>(
        &self,
        gxc: &mut [E],
        xc: &[E],
        goc: &[E],
        wv: &[E],
    ) -> (Vec<E>, Vec<E>) {
        let Conv2dPlan {
            g,
            o,
            ckk,
            l,
            chw,
            direct,
            shift,
            scratch,
            relu_input,
            has_bias,
            ..
        } = *self;
        // dW^T: (c k k, o); see `matmul` on why transposed.
        let (mut dwt, mut db) = (vec![E::zero(); o * ckk], vec![E::zero(); o]);
        // Columns, then their gradient, in one buffer; a shift geometry needs
        // neither, only k masked copies of dy.
        let mut cols = vec![E::zero(); if shift { 0 } else { scratch }];
        let mut masked = vec![
            E::zero();
            if shift {
                (2 * g.geom.kernel + 1) * o * l
            } else {
                0
            }
        ];
        let mut dx = vec![E::zero(); if relu_input { chw } else { 0 }];
        let samples = gxc
            .chunks_mut(chw)
            .zip(xc.chunks(chw))
            .zip(goc.chunks(o * l));
        for ((gxn, xn), gon) in samples {
            if has_bias {
                for (acc, row) in db.iter_mut().zip(gon.chunks(l)) {
                    *acc += row.iter().fold(E::zero(), |s, &v| s + v);
                }
            }
            // Under the ReLU the gradient goes to a scratch image first, then
            // through the mask relu(x) > 0.
            let target: &mut [E] = if relu_input {
                dx.fill(E::zero());
                &mut dx
            } else {
                gxn
            };
            if shift {
                g.shift_backward(xn, gon, wv, &mut dwt, target, &mut masked);
            } else if direct {
                matmul((o, ckk, l), &mut dwt, true, true, gon, false, xn, true);
                matmul((ckk, l, o), target, false, true, wv, true, gon, false);
            } else {
                g.fill(xn, &mut cols);
                matmul((o, ckk, l), &mut dwt, true, true, gon, false, &cols, true);
                matmul((ckk, l, o), &mut cols, false, false, wv, true, gon, false);
                g.scatter_add(&mut cols, target);
            }
            if relu_input {
                for ((gv, &d), &xi) in gxn.iter_mut().zip(&dx).zip(xn) {
                    *gv += if xi > E::zero() { d } else { E::zero() };
                }
            }
        }
        (dwt, db)
    }
}

/// x <- max(x, 0), in parallel over pieces of `piece` values.
fn relu_in_place<E: Float>(x: &mut [E], piece: usize) {
    x.par_chunks_mut(piece.max(1))
        .for_each(|p| p.iter_mut().for_each(|v| *v = v.max(E::zero())));
}

/// im2col: `(batch, c, h, w)` -> `(batch, c k k, h' w')`, the columns of [`Im2col`] for every
/// sample. Convolution does not use it (it never stores a whole batch of columns); it is for
/// layers that need the windows themselves. The backward pass is col2im. On CUDA the kernel
/// copies through the host (slow path).
pub fn unfold<E: Float, T: Tape<E, Dev>>(
    x: Tensor4<E, T>,
    geom: ConvGeometry,
) -> Result<Tensor3<E, T>, NnError>
where
    Dev: Device<E>,
{
    let (b, c, h, w) = *x.shape();
    let Some(g) = Im2col::new(geom, c, h, w) else {
        return Err(NnError::shape(
            "unfold input (kernel larger than padded input)",
            geom.kernel,
            (h, w),
        ));
    };
    let (rows, l, chw) = (g.rows(), g.cols(), c * h * w);
    let x = x.try_contiguous()?;
    let (x, mut tape) = x.split_tape();
    let xv = host_read(&x);
    let mut cols = vec![E::zero(); b * rows * l];
    cols.par_chunks_mut(rows * l)
        .zip(xv.par_chunks(chw))
        .for_each(|(cs, xs)| g.fill(xs, cs));
    let out = x.device().try_tensor_from_vec(cols, (b, rows, l))?;
    let out_id = out.clone();
    tape.add_backward_op(move |grads| {
        let mut go = take_grad(grads, &out_id)?;
        with_grad_mut(grads, &x, |gx| {
            gx.par_chunks_mut(chw)
                .zip(go.par_chunks_mut(rows * l))
                .for_each(|(gxs, gs)| g.scatter_add(gs, gxs))
        })?;
        Ok(())
    });
    Ok(out.put_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grad, check_param_grads, rand_tensor};
    use crate::Init;

    fn conv(geom: ConvGeometry, bias: bool) -> Conv2d<f64> {
        let (dev, init) = (Dev::default(), Init::default());
        let vb = VarBuilder::new(&dev, &init, 0).pp("conv");
        if bias {
            Conv2d::new(2, 3, geom, vb).unwrap()
        } else {
            Conv2d::no_bias(2, 3, geom, vb).unwrap()
        }
    }

    /// Direct definition: y[b,o,i,j] = b[o] + sum_{c,p,q} x[b,c,i s + p d - pad, j s + q d - pad] W[o,c,p,q].
    fn naive(l: &Conv2d<f64>, x: &[f64], (bn, h, w): (usize, usize, usize)) -> Vec<f64> {
        let (o_n, c_n, k) = (l.out_channels(), l.in_channels(), l.kernel());
        let (ho, wo) = (l.out_size(h).unwrap(), l.out_size(w).unwrap());
        let wt = l.weight.to_vec();
        let bias = l.bias.as_ref().map(|b| b.to_vec());
        let mut y = vec![0.0; bn * o_n * ho * wo];
        for b in 0..bn {
            for o in 0..o_n {
                for i in 0..ho {
                    for j in 0..wo {
                        let mut acc = bias.as_ref().map_or(0.0, |bv| bv[o]);
                        for c in 0..c_n {
                            for p in 0..k {
                                for q in 0..k {
                                    let yy = (i * l.stride + p * l.dilation) as isize
                                        - l.padding as isize;
                                    let xx = (j * l.stride + q * l.dilation) as isize
                                        - l.padding as isize;
                                    if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w
                                    {
                                        acc += x
                                            [((b * c_n + c) * h + yy as usize) * w + xx as usize]
                                            * wt[((o * c_n + c) * k + p) * k + q];
                                    }
                                }
                            }
                        }
                        y[((b * o_n + o) * ho + i) * wo + j] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn matches_direct_convolution_for_stride_padding_dilation() {
        let dev = Dev::default();
        for geom in [
            ConvGeometry::same(3),
            ConvGeometry {
                kernel: 3,
                stride: 2,
                padding: 1,
                dilation: 1,
            },
            ConvGeometry {
                kernel: 2,
                stride: 1,
                padding: 0,
                dilation: 2,
            },
            ConvGeometry {
                kernel: 1,
                stride: 1,
                padding: 0,
                dilation: 1,
            },
            ConvGeometry {
                kernel: 3,
                stride: 2,
                padding: 2,
                dilation: 2,
            },
            ConvGeometry {
                kernel: 3,
                stride: 3,
                padding: 1,
                dilation: 1,
            },
            ConvGeometry {
                kernel: 1,
                stride: 2,
                padding: 1,
                dilation: 1,
            },
            // Stride 1 and output as wide as the input: the shifted-row gather.
            ConvGeometry {
                kernel: 3,
                stride: 1,
                padding: 2,
                dilation: 2,
            },
            ConvGeometry {
                kernel: 3,
                stride: 1,
                padding: 0,
                dilation: 1,
            },
        ] {
            let l = conv(geom, true);
            let x = rand_tensor(&dev, (2, 2, 5, 6), 4);
            let y = l.forward(x.clone()).unwrap();
            assert_eq!(
                *y.shape(),
                (2, 3, l.out_size(5).unwrap(), l.out_size(6).unwrap())
            );
            let want = naive(&l, &x.as_vec(), (2, 5, 6));
            for (a, b) in y.as_vec().iter().zip(&want) {
                assert!((a - b).abs() < 1e-10, "{geom:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Dev::default();
        let geom = ConvGeometry {
            kernel: 3,
            stride: 2,
            padding: 1,
            dilation: 1,
        };
        let mut l = conv(geom, true);
        let x = rand_tensor(&dev, (2, 2, 5, 5), 5);
        check_input_grad(&x, |t| l.forward(t), 1e-6);
        check_param_grads(&mut l, &x, |m, t| m.forward(t), 10, 1e-6);
    }

    #[test]
    fn pointwise_and_relu_fused_gradients_match_finite_differences() {
        let dev = Dev::default();
        let x = rand_tensor(&dev, (2, 2, 4, 3), 6);
        for geom in [
            ConvGeometry::same(1),
            ConvGeometry::same(3),
            ConvGeometry {
                kernel: 2,
                stride: 2,
                padding: 1,
                dilation: 2,
            },
            ConvGeometry {
                kernel: 3,
                stride: 1,
                padding: 2,
                dilation: 2,
            },
        ] {
            let mut l = conv(geom, true);
            check_input_grad(&x, |t| l.forward(t), 1e-6);
            check_input_grad(&x, |t| l.forward_relu_input(t), 1e-6);
            check_param_grads(&mut l, &x, |m, t| m.forward_relu_input(t), 10, 1e-6);
            // conv(relu(x)) fused equals the two ops.
            let fused = l.forward_relu_input(x.clone()).unwrap().as_vec();
            let apart = l.forward(x.clone().relu()).unwrap().as_vec();
            for (a, b) in fused.iter().zip(&apart) {
                assert!((a - b).abs() < 1e-12, "{geom:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn unfold_gathers_windows_and_scatters_gradients_back() {
        let dev = Dev::default();
        let geom = ConvGeometry {
            kernel: 2,
            stride: 2,
            padding: 1,
            dilation: 1,
        };
        let x = rand_tensor(&dev, (2, 2, 3, 4), 7);
        let cols = unfold(x.clone(), geom).unwrap();
        // out sides: (3 + 2 - 2) / 2 + 1 = 2 and (4 + 2 - 2) / 2 + 1 = 3.
        assert_eq!(*cols.shape(), (2, 8, 6));
        let (cv, xv) = (cols.as_vec(), x.as_vec());
        for b in 0..2 {
            for c in 0..2 {
                for p in 0..2 {
                    for q in 0..2 {
                        for i in 0..2 {
                            for j in 0..3 {
                                let (y, xx) = ((i * 2 + p) as isize - 1, (j * 2 + q) as isize - 1);
                                let want = if (0..3).contains(&y) && (0..4).contains(&xx) {
                                    xv[((b * 2 + c) * 3 + y as usize) * 4 + xx as usize]
                                } else {
                                    0.0
                                };
                                let row = (c * 2 + p) * 2 + q;
                                assert_eq!(cv[(b * 8 + row) * 6 + i * 3 + j], want);
                            }
                        }
                    }
                }
            }
        }
        check_input_grad(&x, |t| unfold(t, geom), 1e-6);
    }

    #[test]
    fn rejects_bad_inputs() {
        let l = conv(
            ConvGeometry {
                kernel: 3,
                stride: 1,
                padding: 0,
                dilation: 1,
            },
            false,
        );
        let dev = Dev::default();
        assert!(l.forward(rand_tensor(&dev, (1, 3, 5, 5), 1)).is_err());
        assert!(l.forward(rand_tensor(&dev, (1, 2, 2, 2), 1)).is_err());
    }
}
