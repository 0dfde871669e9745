//! Expressions and templates (Jinja via minijinja). PLACEHOLDER: being implemented.
