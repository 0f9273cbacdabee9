//! Front-ends by name: the built-in ones, those a test or an embedding program
//! registers at run time, and the ones a VM has built.
//!
//! A VM builds a front-end only when it uses it: when it is created with devices that
//! name it, or when a device naming it is hot-plugged ([`Frontends::get_or_build`]).
//! Adding a front-end is one module and one line in [`BUILT_IN`].

use crate::frontend::{Frontend, FrontendError, Registration};
pub use crate::frontend::{Render, Tool};
use std::sync::{Arc, Mutex};

/// The front-ends passthru has: the first is the default.
pub const BUILT_IN: &[Registration] =
    &[crate::identity::REGISTRATION, crate::pvdma::REGISTRATION, crate::tce::REGISTRATION, crate::viommu::REGISTRATION];

static EXTRA: Mutex<Vec<Registration>> = Mutex::new(Vec::new());

/// Registers a front-end beyond the built-in ones (for a test, or an embedding
/// program), before the VMs that should have it are built. A name already taken is
/// refused.
pub fn register(r: Registration) -> Result<(), String> {
    if find(r.name).is_some() {
        return Err(format!("a DMA front-end named '{}' is already registered", r.name));
    }
    EXTRA.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    Ok(())
}

/// Every registered front-end, built-in first.
pub fn registered() -> Vec<Registration> {
    let mut all = BUILT_IN.to_vec();
    all.extend(EXTRA.lock().unwrap_or_else(|e| e.into_inner()).iter().copied());
    all
}

/// The front-end registered as `name`.
pub fn find(name: &str) -> Option<Registration> {
    registered().into_iter().find(|r| r.name == name)
}

/// The registered names, for errors: "identity, pvdma".
pub fn names() -> String {
    registered().iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
}

/// The name of the default front-end.
pub fn default_name() -> &'static str {
    BUILT_IN[0].name
}

/// Checks a `dma=NAME` value: the name, or an error listing the registered ones.
pub fn parse_name(name: &str) -> Result<String, String> {
    match find(name) {
        Some(r) => Ok(r.name.to_string()),
        None => Err(format!("dma={name}: no such DMA front-end; use one of {}", names())),
    }
}

/// The front-ends one VM has built, and what it builds more from.
pub struct Frontends {
    ctx: crate::frontend::Context,
    built: Mutex<Vec<Arc<dyn Frontend>>>,
}

impl std::fmt::Debug for Frontends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.all().iter().map(|x| x.name())).finish()
    }
}

impl Frontends {
    /// The front-ends of the VM of `ctx`, building `names` now (in that order, each
    /// once).
    pub fn new(ctx: crate::frontend::Context, names: &[String]) -> Result<Frontends, FrontendError> {
        let f = Frontends { ctx, built: Mutex::new(Vec::new()) };
        for n in names {
            f.get_or_build(n)?;
        }
        Ok(f)
    }

    /// The one named `name`, built now if the VM has not built it yet.
    pub fn get_or_build(&self, name: &str) -> Result<Arc<dyn Frontend>, FrontendError> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = built.iter().find(|f| f.name() == name) {
            return Ok(Arc::clone(f));
        }
        let r = find(name).ok_or_else(|| {
            FrontendError::NotFound(format!("no DMA front-end named '{name}'; use one of {}", names()))
        })?;
        let f = (r.build)(&self.ctx).map_err(|e| FrontendError::Build(format!("DMA front-end {name}: {e}")))?;
        built.push(Arc::clone(&f));
        Ok(f)
    }

    /// The one named `name`, if the VM has built it.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Frontend>> {
        self.built.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|f| f.name() == name).cloned()
    }

    /// Those built, in the order they were.
    pub fn all(&self) -> Vec<Arc<dyn Frontend>> {
        self.built.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
