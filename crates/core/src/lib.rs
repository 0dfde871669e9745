//! Smithers core: the types every other crate shares.

pub mod agent;
pub mod bounds;
pub mod build;
pub mod duration;
pub mod error;
pub mod expr;
pub mod ids;
pub mod json;
pub mod render;
pub mod tree;
pub mod yaml;

pub use agent::AgentDef;
pub use error::{Code, Problem, Result, SmithersError};
pub use render::{OutputsView, RenderCtx, Workflow, check_signal_name};
pub use tree::{Node, NodeRef, Task, TaskKind};
