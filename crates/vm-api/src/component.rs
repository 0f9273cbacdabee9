//! Components of a VM that pause and save themselves: the vCPU, the irqchip and clock,
//! guest memory, each device, each DMA front-end, the interrupt sources.
//!
//! A snapshot is a set of [`Section`]s keyed by component ([`Snapshottable::id`]):
//! each a version and the component's own typed state (a serde struct), so one
//! component's format changes without touching another's, and a state written by
//! another version of a component is refused with a line naming it.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A component's saved state: its format version and its typed fields.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// The component's state format version.
    pub version: u32,
    /// Its fields (the component's own serde struct).
    pub state: serde_json::Value,
}

/// Why a component could not pause, resume, save or restore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{component}: {why}")]
pub struct ComponentError {
    /// Which component ([`Snapshottable::id`] or a name).
    pub component: String,
    /// Why, in one line.
    pub why: String,
}

impl ComponentError {
    /// `component` failed, saying `why`.
    pub fn new(component: impl Into<String>, why: impl Into<String>) -> ComponentError {
        ComponentError { component: component.into(), why: why.into() }
    }
}

impl Section {
    /// `state` as version `version` of `component`'s format.
    pub fn new<T: Serialize>(component: &str, version: u32, state: &T) -> Result<Section, ComponentError> {
        let state = serde_json::to_value(state).map_err(|e| ComponentError::new(component, e.to_string()))?;
        Ok(Section { version, state })
    }

    /// The state as `component`'s type, if it is of `version` (another version is
    /// refused, naming both).
    pub fn read<T: DeserializeOwned>(&self, component: &str, version: u32) -> Result<T, ComponentError> {
        if self.version != version {
            return Err(ComponentError::new(
                component,
                format!("state of format version {}; this passthru reads version {version}", self.version),
            ));
        }
        serde_json::from_value(self.state.clone()).map_err(|e| ComponentError::new(component, format!("state: {e}")))
    }
}

/// A component that stops and starts again (a device quiesced: no DMA in flight, no
/// interrupt raised, while paused).
pub trait Pausable: Send + Sync {
    /// Stops it; it stays consistent and quiet until [`Pausable::resume`].
    fn pause(&self) -> Result<(), ComponentError>;
    /// Starts it again.
    fn resume(&self) -> Result<(), ComponentError>;
}

/// A component whose state a snapshot holds.
pub trait Snapshottable: Send + Sync {
    /// Its section's key, unique in the VM (`vcpu0`, `irqchip`, `device/dma0`,
    /// `frontend/pvdma`, ...).
    fn id(&self) -> String;
    /// Checks, before anything stops, that a snapshot can save it (a refusal names
    /// why; nothing is written).
    fn can_save(&self) -> Result<(), ComponentError> {
        Ok(())
    }
    /// Its state (the VM is paused); None: nothing to save now (a vCPU that never ran).
    fn save(&self) -> Result<Option<Section>, ComponentError>;
    /// Takes back what [`Snapshottable::save`] returned, in a VM built like the saved
    /// one.
    fn restore(&self, section: &Section) -> Result<(), ComponentError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct S {
        a: u64,
        b: Vec<String>,
    }

    #[test]
    fn a_section_round_trips_and_refuses_another_version() {
        let s = S { a: 7, b: vec!["x".into()] };
        let sec = Section::new("c", 2, &s).unwrap();
        assert_eq!(sec.read::<S>("c", 2).unwrap(), s);
        let e = sec.read::<S>("c", 3).unwrap_err().to_string();
        assert_eq!(e, "c: state of format version 2; this passthru reads version 3");
        let bad = Section { version: 2, state: serde_json::json!({ "a": "no" }) };
        assert!(bad.read::<S>("c", 2).unwrap_err().to_string().starts_with("c: state: "));
    }
}
