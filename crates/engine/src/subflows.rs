//! Workflows registered under keys (a gateway's `[[workflows]]`), so that a `subflow` step can
//! name a workflow the way clients do (`workflow: notify`) wherever its file lives.

use smithers_core::{Code, Result, SmithersError, Workflow};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// The keyed workflows of one engine; empty for an engine that runs files on their own
/// (`smithers up`).
#[derive(Default)]
pub(crate) struct Registry {
    by_key: RwLock<BTreeMap<String, Arc<dyn Workflow>>>,
}

impl Registry {
    /// Replaces the registered workflows.
    pub(crate) fn set(&self, workflows: BTreeMap<String, Arc<dyn Workflow>>) {
        match self.by_key.write() {
            Ok(mut map) => *map = workflows,
            Err(poisoned) => *poisoned.into_inner() = workflows,
        }
    }

    /// The workflow a `subflow` step of `parent` names. A reference that looks like a path (a
    /// `/` or a workflow-file extension) is a file next to `parent`; a bare name is a registered
    /// key first, then a file next to `parent`.
    pub(crate) fn resolve(
        &self,
        parent: &dyn Workflow,
        reference: &str,
    ) -> Result<Arc<dyn Workflow>> {
        if looks_like_path(reference) {
            return parent.subflow(reference);
        }
        let keys: Vec<String> = {
            let map = self.by_key.read().unwrap_or_else(|p| p.into_inner());
            if let Some(wf) = map.get(reference) {
                return Ok(wf.clone());
            }
            map.keys().cloned().collect()
        };
        parent.subflow(reference).map_err(|e| {
            if keys.is_empty() || e.code != Code::WorkflowNotFound {
                return e;
            }
            SmithersError::new(
                e.code,
                format!(
                    "{}, and no workflow is registered under the key `{reference}` (registered: {})",
                    e.message,
                    keys.join(", ")
                ),
            )
            .terminal()
        })
    }
}

/// Whether a subflow reference names a file rather than a key.
fn looks_like_path(reference: &str) -> bool {
    reference.contains('/')
        || [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| reference.ends_with(ext))
}

#[cfg(test)]
mod tests {
    use super::looks_like_path;

    #[test]
    fn paths_and_keys() {
        assert!(looks_like_path("flows/notify"));
        assert!(looks_like_path("notify.yaml"));
        assert!(looks_like_path("notify.yml"));
        assert!(looks_like_path("notify.json"));
        assert!(!looks_like_path("notify"));
        assert!(!looks_like_path("notify-v2"));
    }
}
