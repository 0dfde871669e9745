//! Conformance suite. PLACEHOLDER: being implemented.
