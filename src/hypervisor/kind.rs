//! Which VMM a guest runs under. The hypervisor layer owns the name because
//! it is a fact about backends; the declaration (`hypervisor = "qemu"`),
//! the settings (the default backend) and the store (the backend a guest
//! was created with) all refer to it from above.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    CloudHypervisor,
    Qemu,
}

impl HypervisorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HypervisorKind::CloudHypervisor => "cloud-hypervisor",
            HypervisorKind::Qemu => "qemu",
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
