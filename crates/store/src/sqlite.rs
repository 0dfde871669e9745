//! SQLite backend. PLACEHOLDER: being implemented.
use smithers_core::Result;
pub struct SqliteStore;
impl SqliteStore {
    pub fn open(_path: &std::path::Path) -> Result<Self> { todo!() }
    pub fn open_memory() -> Result<Self> { todo!() }
}
