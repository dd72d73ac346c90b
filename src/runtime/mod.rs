//! The container runtime (namespaces, mounts, id maps, cgroups, supervisor).

/// Entry point for the daemon binary's internal helper roles (`__supervise`,
/// `__enter`), run before any thread exists.
// TODO(merge): placeholder on branch `dbus`; the runtime on main provides the real one.
pub fn internal_main(_args: Vec<String>) -> i32 {
    1
}
