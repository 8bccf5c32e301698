//! The builder that layer and model constructors take, as candle's `VarBuilder`.

use std::cell::RefCell;
use std::rc::Rc;

use dfdx::tensor_ops::Device;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::init::unit_uniform;
use crate::tensor::join;
use crate::{Dev, Float, Init, NnError, Param, ParamKind};

/// What a constructor needs besides its sizes: the device, the dotted name of the layer being
/// built (what the init hook and error messages see), the init scheme and the RNG.
///
/// `vb.pp("fc1")` is the builder of the child `fc1`. Children share their parent's RNG, so
/// weights are drawn in the order the layers are constructed; [`VarBuilder::with_seed`] starts
/// a fresh stream for a component whose weights must not depend on what was built before it.
/// Parameter names in checkpoints come from [`HasParams`](crate::HasParams), not from here; the
/// two agree because constructors name children after their fields.
#[derive(Clone)]
pub struct VarBuilder<'a> {
    dev: &'a Dev,
    init: &'a Init,
    rng: Rc<RefCell<StdRng>>,
    prefix: String,
}

impl<'a> VarBuilder<'a> {
    /// The root builder (empty name), drawing from `StdRng::seed_from_u64(seed)`.
    pub fn new(dev: &'a Dev, init: &'a Init, seed: u64) -> Self {
        Self {
            dev,
            init,
            rng: Rc::new(RefCell::new(StdRng::seed_from_u64(seed))),
            prefix: String::new(),
        }
    }

    /// The builder of the child `name` (`prefix.name`), sharing this builder's RNG.
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            prefix: join(&self.prefix, &name.to_string()),
            ..self.clone()
        }
    }

    /// This builder with its own RNG, seeded with `seed`; the original's stream is untouched.
    pub fn with_seed(&self, seed: u64) -> Self {
        Self {
            rng: Rc::new(RefCell::new(StdRng::seed_from_u64(seed))),
            ..self.clone()
        }
    }

    pub fn device(&self) -> &'a Dev {
        self.dev
    }

    /// The dotted name of the layer being built (empty at the root).
    pub fn name(&self) -> &str {
        &self.prefix
    }

    /// `numel` weights of this layer from the init (its hook sees [`Self::name`]).
    pub fn weights<E: Float>(&self, fan_in: usize, fan_out: usize, numel: usize) -> Vec<E> {
        let mut rng = self.rng.borrow_mut();
        self.init
            .weights(&self.prefix, fan_in, fan_out, numel, &mut rng)
    }

    /// `numel` biases of this layer from the init.
    pub fn biases<E: Float>(&self, fan_in: usize, fan_out: usize, numel: usize) -> Vec<E> {
        let mut rng = self.rng.borrow_mut();
        self.init
            .biases(&self.prefix, fan_in, fan_out, numel, &mut rng)
    }

    /// `numel` weights of this Linear layer ([`Init::linear_weights`]).
    pub fn linear_weights<E: Float>(&self, fan_in: usize, fan_out: usize, numel: usize) -> Vec<E> {
        let mut rng = self.rng.borrow_mut();
        self.init
            .linear_weights(&self.prefix, fan_in, fan_out, numel, &mut rng)
    }

    /// `numel` biases of this Linear layer ([`Init::linear_biases`]).
    pub fn linear_biases<E: Float>(&self, fan_in: usize, fan_out: usize, numel: usize) -> Vec<E> {
        let mut rng = self.rng.borrow_mut();
        self.init
            .linear_biases(&self.prefix, fan_in, fan_out, numel, &mut rng)
    }

    /// `n` draws from U[0, 1) times `scale`, whatever the init (the FNO's spectral weights).
    pub fn unit_uniform<E: Float>(&self, scale: f64, n: usize) -> Vec<E> {
        unit_uniform(scale, n, &mut self.rng.borrow_mut())
    }

    /// A parameter on this builder's device holding `values` (row-major in `shape`).
    pub fn param<E: Float>(
        &self,
        values: Vec<E>,
        shape: Vec<usize>,
        kind: ParamKind,
    ) -> Result<Param<E>, NnError>
    where
        Dev: Device<E>,
    {
        Param::from_vec(self.dev, values, shape, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InitScheme;
    use rand::Rng;
    use std::sync::{Arc, Mutex};

    #[test]
    fn children_are_named_by_path_and_share_one_stream() {
        let (dev, init) = (Dev::default(), Init::default());
        let vb = VarBuilder::new(&dev, &init, 5);
        let blocks = vb.pp("stages").pp(1).pp("blocks");
        assert_eq!(blocks.name(), "stages.1.blocks");
        assert_eq!(vb.name(), "");
        let a: Vec<f64> = blocks.pp("q").weights(4, 4, 3);
        let b: Vec<f64> = vb.pp("k").weights(4, 4, 3);
        let mut rng = StdRng::seed_from_u64(5);
        let want: Vec<f64> = init.weights("x", 4, 4, 6, &mut rng);
        assert_eq!([a, b].concat(), want);
    }

    #[test]
    fn with_seed_starts_a_fresh_stream_and_leaves_the_parent_alone() {
        let (dev, init) = (Dev::default(), Init::default());
        let vb = VarBuilder::new(&dev, &init, 1);
        let fresh: Vec<f64> = vb.with_seed(9).pp("c").unit_uniform(1.0, 2);
        let mut nine = StdRng::seed_from_u64(9);
        assert_eq!(fresh, vec![nine.gen::<f64>(), nine.gen::<f64>()]);
        let parent: Vec<f64> = vb.unit_uniform(1.0, 1);
        assert_eq!(parent, vec![StdRng::seed_from_u64(1).gen::<f64>()]);
    }

    #[test]
    fn the_init_hook_sees_the_builders_name() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let hook = move |layer: &str, _: usize, _: usize| {
            log.lock().unwrap().push(layer.to_string());
            None
        };
        let init = Init::new(InitScheme::KaimingNormal).with_hook(Arc::new(hook));
        let dev = Dev::default();
        let vb = VarBuilder::new(&dev, &init, 0);
        let _: Vec<f32> = vb.pp("head").pp("fc2").weights(2, 2, 4);
        assert_eq!(*seen.lock().unwrap(), ["head.fc2"]);
    }
}
