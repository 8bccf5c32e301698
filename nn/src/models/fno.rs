//! Fourier neural operators (`docs/methods/operator-learning.md` §2): `fno2d` (lift,
//! L Fourier layers, head) and the MAE-style pretraining model `fno2d_mae` (encoder, bridge,
//! decoder reconstructing the input channels).

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use serde::{Deserialize, Serialize};

use super::dag::positive;
use crate::layers::{gelu, Conv2d, ConvGeometry, SpectralConv2d};
use crate::tensor::impl_has_params;
use crate::{Dev, Float, NnError, Tensor2, Tensor4, VarBuilder};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fno2dSpec {
    /// Channels inside the Fourier layers.
    pub width: usize,
    /// Kept modes (m1 on the first spatial axis, each sign; m2 on the second).
    pub modes: (usize, usize),
    /// Number of Fourier layers, L.
    pub layers: usize,
    /// Hidden width of the head (paper: 128).
    #[serde(default = "default_head_width")]
    pub head_width: usize,
    /// Output channels (paper: 1, the solution u).
    #[serde(default = "default_out_channels")]
    pub out_channels: usize,
}

fn default_head_width() -> usize {
    128
}
fn default_out_channels() -> usize {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fno2dMaeSpec {
    /// Channels inside the Fourier layers.
    pub width: usize,
    /// Kept modes (m1 on the first spatial axis, each sign; m2 on the second).
    pub modes: (usize, usize),
    /// Fourier layers in the encoder and in the decoder, each.
    pub layers: usize,
    /// Hidden width of the head (paper: 128).
    #[serde(default = "default_head_width")]
    pub head_width: usize,
}

impl Fno2dSpec {
    pub(crate) fn validate(&self) -> Result<(), NnError> {
        positive("model.width", self.width)?;
        positive("model.modes.0", self.modes.0)?;
        positive("model.modes.1", self.modes.1)?;
        positive("model.layers", self.layers)?;
        positive("model.head_width", self.head_width)?;
        positive("model.out_channels", self.out_channels)
    }
}

/// One Fourier layer: x <- SpectralConv(x) + Conv1x1(x).
#[derive(Clone, Debug)]
pub struct FourierLayer<E: Float> {
    pub spectral: SpectralConv2d<E>,
    pub pointwise: Conv2d<E>,
}
impl_has_params!(FourierLayer {
    spectral,
    pointwise
});

impl<E: Float> FourierLayer<E>
where
    Dev: Device<E>,
{
    fn new(width: usize, modes: (usize, usize), vb: VarBuilder) -> Result<Self, NnError> {
        Ok(Self {
            spectral: SpectralConv2d::new(width, width, modes, vb.pp("spectral"))?,
            pointwise: Conv2d::new(width, width, ConvGeometry::same(1), vb.pp("pointwise"))?,
        })
    }

    fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor4<E, T>, NnError> {
        let s = self.spectral.forward(x.with_empty_tape())?;
        Ok(s.try_add(self.pointwise.forward(x)?)?)
    }
}

/// `n` Fourier layers at `width`, layer i built by `vb.pp(i)`.
fn fourier_layers<E: Float>(
    n: usize,
    width: usize,
    modes: (usize, usize),
    vb: VarBuilder,
) -> Result<Vec<FourierLayer<E>>, NnError>
where
    Dev: Device<E>,
{
    (0..n)
        .map(|i| FourierLayer::new(width, modes, vb.pp(i)))
        .collect()
}

/// L Fourier layers with GELU after all but the last.
fn run_layers<E: Float, T: Tape<E, Dev>>(
    layers: &[FourierLayer<E>],
    mut x: Tensor4<E, T>,
) -> Result<Tensor4<E, T>, NnError>
where
    Dev: Device<E>,
{
    for (i, layer) in layers.iter().enumerate() {
        x = layer.forward(x)?;
        if i + 1 < layers.len() {
            x = gelu(x)?;
        }
    }
    Ok(x)
}

/// Head: pointwise Linear(width, hidden), GELU, Linear(hidden, out).
#[derive(Clone, Debug)]
pub struct FnoHead<E: Float> {
    pub fc1: Conv2d<E>,
    pub fc2: Conv2d<E>,
}
impl_has_params!(FnoHead { fc1, fc2 });

impl<E: Float> FnoHead<E>
where
    Dev: Device<E>,
{
    fn new(width: usize, hidden: usize, out: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let one = ConvGeometry::same(1);
        Ok(Self {
            fc1: Conv2d::new(width, hidden, one, vb.pp("fc1"))?,
            fc2: Conv2d::new(hidden, out, one, vb.pp("fc2"))?,
        })
    }

    fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor4<E, T>, NnError> {
        self.fc2.forward(gelu(self.fc1.forward(x)?)?)
    }
}

fn check_grid<E: Float>(layers: &[FourierLayer<E>], h: usize, w: usize) -> Result<(), NnError>
where
    Dev: Device<E>,
{
    match layers.first() {
        Some(l) if !l.spectral.fits(h, w) => Err(NnError::spec(
            "model.modes",
            format!(
                "modes {:?} do not fit a {h}x{w} grid (needs h >= 2 m1, w >= 2 (m2 - 1))",
                l.spectral.modes
            ),
        )),
        _ => Ok(()),
    }
}

fn flatten<E: Float, T: Tape<E, Dev>>(y: Tensor4<E, T>) -> Result<Tensor2<E, T>, NnError>
where
    Dev: Device<E>,
{
    let (b, c, h, w) = *y.shape();
    Ok(y.try_reshape_like(&(b, c * h * w))?)
}

/// `fno2d`: lift (pointwise Linear(c_in, width)) -> L Fourier layers -> head.
#[derive(Clone, Debug)]
pub struct Fno2d<E: Float> {
    pub lift: Conv2d<E>,
    pub layers: Vec<FourierLayer<E>>,
    pub head: FnoHead<E>,
}
impl_has_params!(Fno2d { lift, layers, head });

impl<E: Float> Fno2d<E>
where
    Dev: Device<E>,
{
    pub fn new(
        spec: &Fno2dSpec,
        (c_in, h, w): (usize, usize, usize),
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        spec.validate()?;
        let lift = Conv2d::new(c_in, spec.width, ConvGeometry::same(1), vb.pp("lift"))?;
        let layers = fourier_layers(spec.layers, spec.width, spec.modes, vb.pp("layers"))?;
        check_grid(&layers, h, w)?;
        let (width, hidden) = (spec.width, spec.head_width);
        let head = FnoHead::new(width, hidden, spec.out_channels, vb.pp("head"))?;
        Ok(Self { lift, layers, head })
    }

    /// `(batch, c_in, h, w)` -> `(batch, out h w)` (the output field, flattened).
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor2<E, T>, NnError> {
        let z = run_layers(&self.layers, self.lift.forward(x)?)?;
        flatten(self.head.forward(z)?)
    }
}

/// Encoder of [`Fno2dMae`]: lift + Fourier layers (the body that fine-tuning keeps).
#[derive(Clone, Debug)]
pub struct FnoEncoder<E: Float> {
    pub lift: Conv2d<E>,
    pub layers: Vec<FourierLayer<E>>,
}
impl_has_params!(FnoEncoder { lift, layers });

/// Decoder of [`Fno2dMae`]: Fourier layers + a head onto the input channels.
#[derive(Clone, Debug)]
pub struct FnoDecoder<E: Float> {
    pub layers: Vec<FourierLayer<E>>,
    pub head: FnoHead<E>,
}
impl_has_params!(FnoDecoder { layers, head });

/// `fno2d_mae`: Decoder(Bridge(Encoder(x))), reconstructing all input channels.
/// Parameter names `encoder.lift.*`, `encoder.layers.*` map onto an `fno2d`'s `lift.*`,
/// `layers.*` for fine-tuning.
#[derive(Clone, Debug)]
pub struct Fno2dMae<E: Float> {
    pub encoder: FnoEncoder<E>,
    pub bridge: Conv2d<E>,
    pub decoder: FnoDecoder<E>,
}
impl_has_params!(Fno2dMae {
    encoder,
    bridge,
    decoder
});

impl<E: Float> Fno2dMae<E>
where
    Dev: Device<E>,
{
    pub fn new(
        spec: &Fno2dMaeSpec,
        (c_in, h, w): (usize, usize, usize),
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        Fno2dSpec {
            width: spec.width,
            modes: spec.modes,
            layers: spec.layers,
            head_width: spec.head_width,
            out_channels: c_in,
        }
        .validate()?;
        let (width, modes, one) = (spec.width, spec.modes, ConvGeometry::same(1));
        let (enc, dec) = (vb.pp("encoder"), vb.pp("decoder"));
        let encoder = FnoEncoder {
            lift: Conv2d::new(c_in, width, one, enc.pp("lift"))?,
            layers: fourier_layers(spec.layers, width, modes, enc.pp("layers"))?,
        };
        check_grid(&encoder.layers, h, w)?;
        let bridge = Conv2d::new(width, width, one, vb.pp("bridge"))?;
        let decoder = FnoDecoder {
            layers: fourier_layers(spec.layers, width, modes, dec.pp("layers"))?,
            head: FnoHead::new(width, spec.head_width, c_in, dec.pp("head"))?,
        };
        Ok(Self {
            encoder,
            bridge,
            decoder,
        })
    }

    /// `(batch, c_in, h, w)` -> `(batch, c_in h w)`.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor2<E, T>, NnError> {
        let z = run_layers(&self.encoder.layers, self.encoder.lift.forward(x)?)?;
        let z = run_layers(&self.decoder.layers, self.bridge.forward(z)?)?;
        flatten(self.decoder.head.forward(z)?)
    }
}
