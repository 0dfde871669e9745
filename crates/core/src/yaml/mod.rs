//! YAML workflow loader. PLACEHOLDER: being implemented.
