//! Registration with the host's systemd-machined, on a systemd host: a
//! machine is registered with its current leader while it is active and
//! unregistered when it stops. Failures are warnings: machined is not
//! needed for a machine to run.

use super::Manager;
use crate::runtime::protocol::{MachineState, Status};
use crate::runtime::{self, MachinePlan};
use crate::systemd::Registered;

impl Manager {
    /// Uses the host's systemd from now on: machines start in scopes and
    /// are registered with machined; running (re-adopted) machines are
    /// registered now if they are not yet.
    pub(crate) async fn use_systemd(&self, host: crate::systemd::Host) {
        if self.inner.systemd.set(host).is_err() {
            return;
        }
        let running: Vec<(String, MachineState, u32)> = self
            .lock()
            .values()
            .filter(|e| e.supervisor.is_some())
            .map(|e| (e.info.name.clone(), e.info.state, e.info.leader))
            .collect();
        for (name, state, leader) in running {
            let status = Status {
                state,
                leader,
                supervisor: 0,
                since: 0,
                error: String::new(),
                boots: 0,
            };
            self.sync_registration(&name, &status).await;
        }
    }

    /// Keeps machined's record of `name` in line with its supervisor's
    /// `status`: registered with the current leader while it is active,
    /// unregistered when it stops.
    pub(super) async fn sync_registration(&self, name: &str, status: &Status) {
        let Some(host) = self.inner.systemd.get() else {
            return;
        };
        let wanted = if status.state.is_active() {
            status.leader
        } else {
            0
        };
        let (registered, plan) = {
            let mut machines = self.lock();
            let Some(entry) = machines.get_mut(name) else {
                return;
            };
            if entry.registration_for == wanted {
                return;
            }
            entry.registration_for = wanted;
            (entry.registered, entry.plan.clone())
        };
        if registered != 0 {
            match host.unregister(name).await {
                Ok(()) => tracing::debug!(machine = name, "unregistered from machined"),
                Err(err) => tracing::warn!(machine = name, %err, "cannot unregister from machined"),
            }
        }
        let now = match (plan, wanted != 0) {
            (Some(plan), true) => self.register(host, name, plan, wanted).await,
            _ => 0,
        };
        if let Some(entry) = self.lock().get_mut(name) {
            entry.registered = now;
        }
    }

    /// Registers `name` with `leader`; returns the leader machined knows it
    /// by now (0: not registered).
    async fn register(
        &self,
        host: &crate::systemd::Host,
        name: &str,
        plan: MachinePlan,
        leader: u32,
    ) -> u32 {
        let registration = {
            let name = name.to_owned();
            tokio::task::spawn_blocking(move || registration(&name, &plan, leader)).await
        };
        let outcome = match registration {
            Ok(registration) => host.register(&registration).await,
            Err(err) => {
                tracing::warn!(machine = name, %err, "cannot register with machined");
                return 0;
            }
        };
        match outcome {
            Ok(Registered::Yes) => {
                tracing::info!(machine = name, leader, "registered with machined");
                leader
            }
            Ok(Registered::Already) => leader,
            Ok(Registered::Clash(why)) => {
                tracing::warn!(
                    machine = name,
                    "not registered with machined: {why}; the machine runs anyway"
                );
                0
            }
            Ok(Registered::NoMachined) => {
                tracing::debug!(
                    machine = name,
                    "systemd-machined is not on the bus; not registered"
                );
                0
            }
            Err(err) => {
                tracing::warn!(
                    machine = name,
                    %err,
                    "cannot register with machined; the machine runs anyway"
                );
                0
            }
        }
    }
}

/// What machined is told about a machine with `leader` as init.
fn registration(name: &str, plan: &MachinePlan, leader: u32) -> crate::systemd::Registration {
    let id =
        crate::systemd::machine_id_bytes(&runtime::container::machine_id(plan)).unwrap_or_default();
    let ifindex = plan.network.as_ref().and_then(|net| {
        nix::net::if_::if_nametoindex(net.host_veth.as_str())
            .ok()
            .and_then(|index| i32::try_from(index).ok())
    });
    crate::systemd::Registration {
        name: name.to_owned(),
        id,
        leader,
        root: plan.definition.root.display().to_string(),
        ifindex,
    }
}
