//! The `pde.generate` artifact: `data.safetensors` + `meta.json`.
//!
//! `data.safetensors` holds f32 tensors `x` `[N, C, n, n]` (inputs), `y` `[N, C_y, n, n]`
//! (solutions; only when labeled) and `coeffs` `[N, k]` (per-sample parameters, columns named in
//! `meta.json`). numpy users read it with `safetensors.numpy.load_file`. `meta.json` holds the
//! resolved config, shapes, channel names, the solver used, and the normalisation statistics of
//! `docs/methods/operator-learning.md` §1 "Model input and scaling". Everything written is a pure
//! function of params and seed (no timings), so equal inputs give byte-identical artifacts.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::generate::Dataset;
use super::params::{Config, Equation, Problem};
use crate::OpError;

pub const DATA_FILE: &str = "data.safetensors";
pub const META_FILE: &str = "meta.json";
/// `meta.json`'s `format`.
pub const FORMAT: &str = "pde.generate";

/// `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdeMeta {
    pub format: String,
    pub equation: Equation,
    pub labeled: bool,
    pub samples: usize,
    pub resolution: usize,
    /// The seed samples were drawn from (stage seed mixed with `config.seed`).
    pub seed: u64,
    pub config: Config,
    /// Tensor name -> shape in `data.safetensors`.
    pub tensors: BTreeMap<String, Vec<usize>>,
    pub channels: Vec<String>,
    pub target_channels: Vec<String>,
    pub coeff_names: Vec<String>,
    pub grid: String,
    pub solver: String,
    /// Poisson/Helmholtz only.
    pub scaling: Option<Scaling>,
    /// Mean and standard deviation of every input channel over this dataset.
    pub channel_stats: ChannelStats,
    /// Helmholtz draws rejected for max |u| > 2.
    pub redraws: u64,
}

/// `docs/methods/operator-learning.md` §1, "Model input and scaling". A training op takes
/// `f_norm_median` and `coeff_channel_medians` of its *training* dataset and, per sample i of any
/// dataset, divides every input channel by s_i = f_norm_i / f_norm_median, then coefficient channel
/// c by `coeff_channel_medians[c]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    /// ||f||_F (1/n)^2 per sample `[N]`.
    pub f_norm: Vec<f64>,
    /// Median of `f_norm` over this dataset.
    pub f_norm_median: f64,
    /// Input channels 1.. (the coefficients), in `channels` order.
    pub coeff_channels: Vec<String>,
    /// Median over samples of |coefficient_i / s_i| per coefficient channel.
    pub coeff_channel_medians: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelStats {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Median of `values` (mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        len if !len.is_multiple_of(2) => v[len / 2],
        len => 0.5 * (v[len / 2 - 1] + v[len / 2]),
    }
}

/// `docs/methods/operator-learning.md` §1, "Model input and scaling": the medians of f_norm and of
/// each coefficient channel after dividing by the per-sample scale. `coeffs` `[N, k]`, `k_channels`
/// coefficient columns that are input channels (the first ones).
fn scaling(data: &Dataset, f_norm: &[f64], coeff_channels: &[String]) -> Scaling {
    let f_norm_median = median(f_norm);
    let k = data.config.coeff_names().len();
    let coeff_channel_medians = (0..coeff_channels.len())
        .map(|c| {
            let scaled: Vec<f64> = f_norm
                .iter()
                .enumerate()
                .map(|(i, &fi)| (data.coeffs[i * k + c] / (fi / f_norm_median)).abs())
                .collect();
            median(&scaled)
        })
        .collect();
    Scaling {
        f_norm: f_norm.to_vec(),
        f_norm_median,
        coeff_channels: coeff_channels.to_vec(),
        coeff_channel_medians,
    }
}

fn channel_stats(x: &[f32], samples: usize, channels: usize, plane: usize) -> ChannelStats {
    let mut mean = vec![0.0; channels];
    let mut std = vec![0.0; channels];
    for c in 0..channels {
        let (mut sum, mut sq) = (0.0f64, 0.0f64);
        for i in 0..samples {
            let start = (i * channels + c) * plane;
            for &v in &x[start..start + plane] {
                sum += f64::from(v);
                sq += f64::from(v) * f64::from(v);
            }
        }
        let count = (samples * plane).max(1) as f64;
        mean[c] = sum / count;
        std[c] = (sq / count - mean[c] * mean[c]).max(0.0).sqrt();
    }
    ChannelStats { mean, std }
}

fn describe(config: &Config) -> (String, String, Vec<String>) {
    let frames = |names: &[&str]| -> Vec<String> {
        let Some(w) = config.window() else {
            return Vec::new();
        };
        (1..=w.frames)
            .flat_map(|f| {
                let t = w.t_start + f as f64 * w.steps_per_frame as f64 * w.dt;
                names.iter().map(move |c| format!("{c}(t={t:.6})"))
            })
            .collect()
    };
    let unit_square = "periodic unit square [0,1)^2, nodes x_j = j/n, arrays [y, x]";
    match &config.problem {
        Problem::Poisson { .. } => (
            unit_square.to_string(),
            "spectral (one FFT pair, f64): u_hat = f_hat / (0.01 4 pi^2 (K11 kx^2 + K22 ky^2 + \
             2 K12 kx ky)), cross term 0 on the Nyquist lines, u_hat(0) = 0, mean(u) removed"
                .to_string(),
            vec!["u".to_string()],
        ),
        Problem::Helmholtz { .. } => (
            unit_square.to_string(),
            "spectral (one FFT pair, f64): u_hat = -f_hat / (omega - 0.01 4 pi^2 |k|^2), 0 where \
             the denominator is 0; draws with max|u| > 2 redrawn (labeled sets only)"
                .to_string(),
            vec!["u".to_string()],
        ),
        Problem::ReactionDiffusion { window, .. } => (
            "[-1,1]^2 with no-flux walls, n x n cell centres x_i = -1 + (i + 1/2) 2/n, arrays [y, x]"
                .to_string(),
            format!(
                "cell-centred finite volumes (5-point Laplacian, mirror ghost cells) + classical \
                 RK4, fixed dt = {:e} (burn-in dt = {:e})",
                window.dt, window.burn_in_dt
            ),
            frames(&["u", "v"]),
        ),
        Problem::NavierStokes { window, .. } => (
            "periodic [0,2pi)^2, nodes x_j = 2 pi j/n, arrays [y, x]; forcing -4 cos(4 y)"
                .to_string(),
            format!(
                "pseudo-spectral vorticity form, 2/3-rule dealiasing, Crank-Nicolson diffusion + \
                 Heun advection/forcing, fixed dt = {:e} (burn-in dt = {:e}); w0 ~ GRF(alpha \
                 2.5, tau 3)",
                window.dt, window.burn_in_dt
            ),
            frames(&["w"]),
        ),
    }
}

/// Builds `meta.json`'s content for `data`.
pub fn meta(data: &Dataset) -> PdeMeta {
    let config = &data.config;
    let n = config.resolution;
    let (c_in, c_out) = config.channels();
    let samples = config.samples;
    let channels: Vec<String> = config
        .channel_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut tensors = BTreeMap::new();
    tensors.insert("x".to_string(), vec![samples, c_in, n, n]);
    if data.y.is_some() {
        tensors.insert("y".to_string(), vec![samples, c_out, n, n]);
    }
    let coeff_names: Vec<String> = config.coeff_names().iter().map(|s| s.to_string()).collect();
    tensors.insert("coeffs".to_string(), vec![samples, coeff_names.len()]);
    let (grid, solver, target_channels) = describe(config);
    PdeMeta {
        format: FORMAT.to_string(),
        equation: config.equation,
        labeled: config.labeled,
        samples,
        resolution: n,
        seed: data.seed,
        config: config.clone(),
        tensors,
        scaling: data
            .f_norm
            .as_ref()
            .map(|f| scaling(data, f, &channels[1..])),
        channel_stats: channel_stats(&data.x, samples, c_in, n * n),
        channels,
        target_channels,
        coeff_names,
        grid,
        solver,
        redraws: data.redraws,
    }
}

fn f32_bytes(v: impl Iterator<Item = f32>) -> Vec<u8> {
    v.flat_map(f32::to_le_bytes).collect()
}

/// Writes `data.safetensors` and `meta.json` into `dir`.
pub fn write(dir: &Path, data: &Dataset) -> Result<PdeMeta, OpError> {
    let meta = meta(data);
    let path = dir.join(DATA_FILE);
    let fail = |e: &dyn std::fmt::Display| OpError::Failed(format!("{}: {e}", path.display()));
    let mut named: Vec<(String, Vec<u8>)> = vec![
        ("x".to_string(), f32_bytes(data.x.iter().copied())),
        (
            "coeffs".to_string(),
            f32_bytes(data.coeffs.iter().map(|&v| v as f32)),
        ),
    ];
    if let Some(y) = &data.y {
        named.push(("y".to_string(), f32_bytes(y.iter().copied())));
    }
    let mut views = Vec::new();
    for (name, bytes) in &named {
        let shape = meta.tensors[name].clone();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, bytes.as_slice())
                .map_err(|e| fail(&e))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize_to_file(views, &None, &path).map_err(|e| fail(&e))?;
    let meta_path = dir.join(META_FILE);
    let json = serde_json::to_vec_pretty(&meta)
        .map_err(|e| OpError::Failed(format!("{}: {e}", meta_path.display())))?;
    std::fs::write(&meta_path, json)
        .map_err(|e| OpError::io(format!("cannot write {}", meta_path.display()), e))?;
    Ok(meta)
}

/// Reads `meta.json` of a `pde.generate` artifact.
pub fn read_meta(dir: &Path) -> Result<PdeMeta, OpError> {
    let path = dir.join(META_FILE);
    let text = std::fs::read(&path)
        .map_err(|e| OpError::io(format!("cannot read {}", path.display()), e))?;
    serde_json::from_slice(&text).map_err(|e| {
        OpError::Failed(format!(
            "{}: {e}; is this input the output of a pde.generate stage?",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
