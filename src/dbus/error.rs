//! The errors the daemon returns on the bus, named `org.rmachines1.<Variant>`.
//! Each carries a sentence a person can act on. This is the one place a
//! manager error becomes a D-Bus error name (`From<ManagerError>`); the
//! checks at the boundary (`validate`) make theirs directly.

use crate::image::ImageError;
use crate::manager::ManagerError;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.rmachines1")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchMachine(String),
    InvalidDefinition(String),
    AlreadyRunning(String),
    NotRunning(String),
    AccessDenied(String),
    InvalidArgument(String),
    NoSuchUser(String),
    /// A command or environment beyond the documented limits.
    TooLarge(String),
    /// The caller's bus connection cannot carry Unix file descriptors.
    FdPassingUnsupported(String),
    Failed(String),
    NoSuchImage(String),
    ImageExists(String),
    ImageInUse(String),
    InvalidImage(String),
    MachineExists(String),
}

impl From<ManagerError> for Error {
    fn from(error: ManagerError) -> Self {
        let message = error.to_string();
        match error {
            ManagerError::InvalidName(_) => Error::InvalidArgument(message),
            ManagerError::NoSuchMachine(_) => Error::NoSuchMachine(message),
            ManagerError::InvalidDefinition { .. } => Error::InvalidDefinition(message),
            ManagerError::AlreadyRunning(_) => Error::AlreadyRunning(message),
            ManagerError::NotRunning(_) => Error::NotRunning(message),
            ManagerError::NoSuchUser { .. } => Error::NoSuchUser(message),
            ManagerError::Failed { .. }
            | ManagerError::Io { .. }
            | ManagerError::Task { .. }
            | ManagerError::LimitsNotApplied(_) => Error::Failed(message),
            ManagerError::MachineExists(_) => Error::MachineExists(message),
            ManagerError::Image(image) => match image {
                ImageError::InvalidName(_) => Error::InvalidArgument(message),
                ImageError::NoSuchImage(_) => Error::NoSuchImage(message),
                ImageError::Exists(_) | ImageError::Busy(_) => Error::ImageExists(message),
                ImageError::InUse { .. } => Error::ImageInUse(message),
                ImageError::Escape(_)
                | ImageError::Archive(_)
                | ImageError::Oci(_)
                | ImageError::Unsupported(_) => Error::InvalidImage(message),
                ImageError::Io { .. } => Error::Failed(message),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn manager_errors_map_to_spec_names() {
        let cases = [
            (
                ManagerError::InvalidName("x".into()),
                "org.rmachines1.InvalidArgument",
            ),
            (
                ManagerError::NoSuchMachine("x".into()),
                "org.rmachines1.NoSuchMachine",
            ),
            (
                ManagerError::InvalidDefinition {
                    name: "x".into(),
                    error: "bad".into(),
                },
                "org.rmachines1.InvalidDefinition",
            ),
            (
                ManagerError::AlreadyRunning("x".into()),
                "org.rmachines1.AlreadyRunning",
            ),
            (
                ManagerError::NotRunning("x".into()),
                "org.rmachines1.NotRunning",
            ),
            (
                ManagerError::NoSuchUser {
                    machine: "x".into(),
                    user: "u".into(),
                },
                "org.rmachines1.NoSuchUser",
            ),
            (
                ManagerError::Failed {
                    name: "x".into(),
                    source: crate::manager::Failure::SupervisorGone,
                },
                "org.rmachines1.Failed",
            ),
            (
                ManagerError::Io {
                    what: "reading /etc/rmachines".into(),
                    source: std::io::Error::other("io"),
                },
                "org.rmachines1.Failed",
            ),
            (
                ManagerError::LimitsNotApplied(vec!["web: no cgroup".into()]),
                "org.rmachines1.Failed",
            ),
            (
                ManagerError::MachineExists("x".into()),
                "org.rmachines1.MachineExists",
            ),
            (
                ImageError::NoSuchImage("x".into()).into(),
                "org.rmachines1.NoSuchImage",
            ),
            (
                ImageError::Exists("x".into()).into(),
                "org.rmachines1.ImageExists",
            ),
            (
                ImageError::InUse {
                    name: "x".into(),
                    machines: "a".into(),
                }
                .into(),
                "org.rmachines1.ImageInUse",
            ),
            (
                ImageError::Escape("../x".into()).into(),
                "org.rmachines1.InvalidImage",
            ),
        ];
        for (manager_error, name) in cases {
            let sentence = manager_error.to_string();
            let error = Error::from(manager_error);
            assert_eq!(error.name().as_str(), name);
            assert_eq!(error.description(), Some(sentence.as_str()));
        }
    }
}
