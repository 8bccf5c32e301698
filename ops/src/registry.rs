//! The table of ops a pipeline can name.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{Op, ShellOp};

/// Ops by name. The engine owns one and resolves every stage's `op:` against it.
#[derive(Clone)]
pub struct Registry {
    ops: BTreeMap<&'static str, Arc<dyn Op>>,
}

impl Registry {
    /// An empty registry (tests register their own ops).
    pub fn empty() -> Self {
        Self {
            ops: BTreeMap::new(),
        }
    }

    /// Every built-in op.
    pub fn builtin() -> Self {
        let mut registry = Self::empty();
        registry.register(Arc::new(ShellOp));
        registry.register(Arc::new(crate::ml::SyntheticImagesOp));
        registry.register(Arc::new(crate::ml::Cifar10Op));
        registry.register(Arc::new(crate::ml::MnistOp));
        registry.register(Arc::new(crate::ml::ImportOp));
        registry.register(Arc::new(crate::ml::TrainOp));
        registry.register(Arc::new(crate::ml::EvaluateOp));
        crate::pde::register(&mut registry);
        crate::arch::register(&mut registry);
        crate::nas::register(&mut registry);
        crate::oplearn::register(&mut registry);
        registry
    }

    pub fn register(&mut self, op: Arc<dyn Op>) {
        self.ops.insert(op.name(), op);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Op>> {
        self.ops.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ops.keys().copied()
    }
}
