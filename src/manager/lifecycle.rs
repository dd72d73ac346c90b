//! A machine's life through its supervisor: start (plan, launch, on a
//! systemd host into its scope), following the supervisor's statuses,
//! stop, re-adoption of a supervisor an earlier daemon left, and the
//! supervisor's end (cleanup, restart policy). The snapshot transitions
//! are [`super::state`]'s; this drives them.

use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use super::link::{self, SupervisorLink};
use super::state::{self, Change, StartProgress};
use super::{check_name, plan, Failure, Manager, ManagerError};
use crate::definition::{Definition, RestartPolicy};
use crate::network;
use crate::runtime::protocol::{now_usec, Command, MachineState, Status};
use crate::runtime::{self, paths, supervisor, MachinePlan};

/// A launched supervisor's control connection, blocking, before tokio has it.
type Control = std::os::unix::net::UnixStream;

impl Manager {
    /// Connects to a supervisor left by an earlier daemon, if one runs.
    pub(super) async fn adopt(&self, name: &str) {
        let dir = runtime::machine_dir(&self.inner.config.state_dir, name);
        let Ok(stream) = link::connect(&dir).await else {
            // No supervisor: whatever a dead one left (its cgroup, host
            // directory, socket) goes now.
            let name = name.to_owned();
            let _ = tokio::task::spawn_blocking(move || supervisor::remove_leftovers(&dir, &name))
                .await;
            return;
        };
        let plan = std::fs::read(dir.join(paths::PLAN))
            .ok()
            .and_then(|d| serde_json::from_slice::<MachinePlan>(&d).ok());
        tracing::info!(machine = name, "re-adopting a running machine");
        if let Some(entry) = self.lock().get_mut(name) {
            entry.plan = plan;
        }
        let link = self.follow(name, stream);
        let mut status = link.status.clone();
        if let Some(entry) = self.lock().get_mut(name) {
            entry.supervisor = Some(link);
        }
        // The supervisor greets with its status: have it before serving.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), status.changed()).await;
    }

    /// Opens the link to a supervisor and starts the task that takes its
    /// statuses in, one at a time, then its end.
    fn follow(&self, name: &str, stream: UnixStream) -> SupervisorLink {
        let (commands, statuses) = link::open(name, stream);
        let (status_tx, status) = watch::channel(None);
        let manager = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move { manager.take_statuses(name, statuses, status_tx).await });
        SupervisorLink::new(commands, status)
    }

    async fn take_statuses(
        &self,
        name: String,
        mut statuses: mpsc::UnboundedReceiver<Status>,
        status_tx: watch::Sender<Option<Status>>,
    ) {
        while let Some(status) = statuses.recv().await {
            self.apply_status(&name, &status);
            let _ = status_tx.send(Some(status.clone()));
            self.sync_registration(&name, &status).await;
        }
        self.supervisor_gone(&name, status_tx).await;
    }

    /// The supervisor is gone: its last word is in its state file. One that
    /// died took its machine along (PDEATHSIG); what it would have cleaned
    /// is cleaned here, and the restart policy applies.
    /// `status_tx` is dropped last: that ends `stop`'s wait.
    async fn supervisor_gone(&self, name: &str, status_tx: watch::Sender<Option<Status>>) {
        let dir = runtime::machine_dir(&self.inner.config.state_dir, name);
        let log = dir.join(paths::SUPERVISOR_LOG);
        let (last, died) = state::final_status(supervisor::read_state(&dir), &log, now_usec());
        self.sync_registration(name, &last).await;
        let (plan, restart) = match self.lock().get_mut(name) {
            Some(entry) => {
                entry.supervisor = None;
                let restart = entry.definition.as_ref().map(|d| d.restart).ok();
                (entry.plan.take(), restart)
            }
            None => (None, None),
        };
        if died {
            let cleanup_name = name.to_owned();
            let _ = tokio::task::spawn_blocking(move || {
                supervisor::remove_leftovers(&dir, &cleanup_name);
                if let Some(net) = plan.as_ref().and_then(|p| p.network.as_ref()) {
                    if let Err(err) = network::firewall::leave(net) {
                        tracing::warn!(machine = %cleanup_name, %err, "removing a dead supervisor's network");
                    }
                }
            })
            .await;
        }
        self.apply_status(name, &last);
        let _ = status_tx.send(Some(last));
        self.forget_if_undefined(name).await;
        if died && restart.is_some_and(|r| r != RestartPolicy::No) {
            tracing::warn!(machine = %name, "the supervisor died; restarting the machine (restart policy)");
            let manager = self.clone();
            let name = name.to_owned();
            tokio::spawn(async move {
                if let Err(err) = manager.start(&name).await {
                    tracing::error!(machine = %name, %err, "restart after the supervisor's death failed");
                }
            });
        }
    }

    /// The snapshot follows a supervisor's status.
    fn apply_status(&self, name: &str, status: &Status) {
        self.transition(name, |entry| {
            let addresses = entry
                .plan
                .as_ref()
                .and_then(|plan| plan.network.as_ref())
                .map(|net| net.addresses())
                .unwrap_or_default();
            (entry.info.follow(status, addresses), ())
        });
    }

    /// Returns once init is executing; the state then goes on to `running`.
    pub async fn start(&self, name: &str) -> Result<(), ManagerError> {
        check_name(name)?;
        let definition = self.begin_start(name)?;
        let failed = |source: Failure| ManagerError::Failed {
            name: name.to_owned(),
            source,
        };
        let mut status = match self.launch(name, definition).await {
            Ok(status) => status,
            Err(source) => {
                let err = failed(source);
                let error = err.to_string();
                self.transition(name, |entry| {
                    (entry.info.set(MachineState::Failed, error, now_usec()), ())
                });
                return Err(err);
            }
        };
        // Wait until init executes (leader known) or the boot failed.
        loop {
            match state::start_progress(status.borrow_and_update().as_ref()) {
                StartProgress::Started => return Ok(()),
                StartProgress::Failed(why) => return Err(failed(Failure::Ended(why))),
                StartProgress::Pending => {}
            }
            if status.changed().await.is_err() {
                return Err(failed(Failure::SupervisorGone));
            }
        }
    }

    /// The start's first transition: the definition it starts with.
    fn begin_start(&self, name: &str) -> Result<Definition, ManagerError> {
        let result = self.transition(name, |entry| {
            let definition = match entry.definition.clone() {
                Ok(definition) => definition,
                Err(error) => {
                    let refused = ManagerError::InvalidDefinition {
                        name: name.to_owned(),
                        error,
                    };
                    return (Change::Nothing, Err(refused));
                }
            };
            match entry
                .info
                .begin_start(entry.supervisor.is_some(), now_usec())
            {
                Ok(()) => (Change::State, Ok(definition)),
                Err(state::AlreadyActive) => (
                    Change::Nothing,
                    Err(ManagerError::AlreadyRunning(name.to_owned())),
                ),
            }
        });
        result.unwrap_or_else(|| Err(ManagerError::NoSuchMachine(name.to_owned())))
    }

    /// Plans the machine, launches its supervisor and links to it.
    async fn launch(
        &self,
        name: &str,
        definition: Definition,
    ) -> Result<watch::Receiver<Option<Status>>, Failure> {
        let config = self.inner.config.clone();
        let helper = self.inner.helper.clone();
        let owned_name = name.to_owned();
        let systemd = self.inner.systemd.get().cloned();
        let held = systemd.is_some();
        let stop_timeout = definition.stop_timeout;
        let (plan, launched) = tokio::task::spawn_blocking(
            move || -> Result<(MachinePlan, supervisor::Launched), Failure> {
                let plan = plan::assemble(&config, &owned_name, definition)?;
                // A machine root without init fails here with a clear sentence.
                runtime::container::inspect_init(&plan)?;
                let launched = if held {
                    supervisor::launch_held(&helper, &plan)
                } else {
                    supervisor::launch(&helper, &plan)
                };
                Ok((plan, launched?))
            },
        )
        .await??;
        let (plan, control) = match systemd {
            Some(host) => {
                self.enter_scope(&host, name, plan, launched, stop_timeout)
                    .await?
            }
            None => tokio::task::spawn_blocking(move || finish_launch(plan, launched)).await??,
        };
        let stream = UnixStream::from_std(control).map_err(Failure::Connect)?;
        // The plan goes in first so the first status already shows the addresses.
        if let Some(entry) = self.lock().get_mut(name) {
            entry.plan = Some(plan);
        }
        let link = self.follow(name, stream);
        let status = link.status.clone();
        if let Some(entry) = self.lock().get_mut(name) {
            entry.supervisor = Some(link);
        }
        Ok(status)
    }

    /// On a systemd host: puts the held supervisor in the machine's new
    /// scope (in the scope's `supervisor` cgroup), plans the machine's
    /// cgroup below the scope, and releases the supervisor.
    async fn enter_scope(
        &self,
        host: &crate::systemd::Host,
        name: &str,
        mut plan: MachinePlan,
        mut launched: supervisor::Launched,
        stop_timeout: std::time::Duration,
    ) -> Result<(MachinePlan, Control), Failure> {
        let pid = launched.child.id();
        let scope = match host.start_scope(name, pid, stop_timeout).await {
            Ok(scope) => scope,
            Err(err) => {
                // Unreleased, the held process exits at once.
                drop(launched.hold.take());
                let _ = tokio::task::spawn_blocking(move || launched.child.wait()).await;
                return Err(Failure::Scope(Box::new(err)));
            }
        };
        tracing::info!(machine = name, unit = %scope.unit, cgroup = %scope.cgroup.display(), "machine scope started");
        plan.cgroup = crate::systemd::payload_cgroup(&scope.cgroup);
        tokio::task::spawn_blocking(move || {
            let cgroup = crate::systemd::supervisor_cgroup(&scope.cgroup);
            crate::systemd::move_into(&cgroup, pid)
                .map_err(|source| Failure::IntoScope { cgroup, source })?;
            write_plan(&plan)?;
            launched.release()?;
            finish_launch(plan, launched)
        })
        .await?
    }

    /// Graceful stop, SIGKILL after the stop timeout; returns once stopped.
    pub async fn stop(&self, name: &str) -> Result<(), ManagerError> {
        check_name(name)?;
        let link = {
            let machines = self.lock();
            let entry = machines
                .get(name)
                .ok_or_else(|| ManagerError::NoSuchMachine(name.to_owned()))?;
            entry
                .supervisor
                .clone()
                .ok_or_else(|| ManagerError::NotRunning(name.to_owned()))?
        };
        link.send(Command::Stop);
        link.wait_stopped().await;
        Ok(())
    }
}

/// Writes the plan where the supervisor (and a later daemon) reads it.
fn write_plan(plan: &MachinePlan) -> Result<(), Failure> {
    let file = plan.machine_dir.join(paths::PLAN);
    let data = serde_json::to_vec_pretty(plan)?;
    crate::statefile::write_atomic(&file, &data).map_err(|e| Failure::PlanFile {
        action: e.action,
        path: e.path,
        source: e.source,
    })
}

/// Reaps the launcher (it exits as soon as the supervisor forked away) and
/// readies the control connection for tokio.
fn finish_launch(
    plan: MachinePlan,
    mut launched: supervisor::Launched,
) -> Result<(MachinePlan, Control), Failure> {
    let _ = launched.child.wait();
    launched.control.set_nonblocking(true)?;
    Ok((plan, launched.control))
}
