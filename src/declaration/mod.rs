//! Instance declarations: `<config-dir>/instances/<name>.toml` files parsed
//! and validated into [`spec::InstanceSpec`].

pub mod spec;
