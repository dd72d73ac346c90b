//! Shells and commands in a running machine: the target (its plan, its
//! leader, the guest user), the enter helper spawned with the caller's
//! descriptors or a pty, and the session's end as
//! [`Event::ShellExited`](super::Event::ShellExited). The environment was
//! checked at the boundary ([`crate::dbus::validate::environment`]).

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::{check_name, Event, Failure, Manager, ManagerError, ShellSession};
use crate::runtime::{enter, MachinePlan};

/// How long a shell waits for the guest's account files.
const GUEST_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A running machine and the guest user a session runs as.
struct SessionTarget {
    plan: MachinePlan,
    leader: u32,
    user: enter::GuestUser,
}

/// What a session runs, and how.
struct SessionSpec {
    term: String,
    command: Vec<String>,
    environment: Vec<String>,
    stdio: [OwnedFd; 3],
    controlling_tty: bool,
}

impl Manager {
    /// Starts `command` (empty: the user's login shell) as `user` (empty: root)
    /// on a new pty inside the machine. `environment` holds `K=V` strings.
    pub async fn shell(
        &self,
        name: &str,
        user: &str,
        command: Vec<String>,
        environment: Vec<String>,
    ) -> Result<ShellSession, ManagerError> {
        let target = self.session_target(name, user).await?;
        let failed = |source: Failure| ManagerError::Failed {
            name: name.to_owned(),
            source,
        };
        let (master, slave) = enter::open_guest_pty(
            target.leader as i32,
            target.plan.ids.base + target.user.uid,
            target.plan.ids.base + 5,
        )
        .map_err(|e| failed(e.into()))?;
        let stdio = || slave.try_clone().map_err(|e| failed(e.into()));
        let stdio = [stdio()?, stdio()?, stdio()?];
        drop(slave);
        let spec = SessionSpec {
            term: term(&environment, "xterm-256color"),
            command,
            environment,
            stdio,
            controlling_tty: true,
        };
        let session = self.spawn_session(name, target, spec)?;
        Ok(ShellSession {
            pty_master: master,
            session,
        })
    }

    /// Starts `command` (empty: the user's login shell) as `user` (empty:
    /// root) inside the machine with `stdio` (the caller's descriptors) as
    /// its fd 0, 1 and 2: no pty, no relay. Returns the session number that
    /// [`Event::ShellExited`] reports.
    pub(crate) async fn execute(
        &self,
        name: &str,
        user: &str,
        command: Vec<String>,
        environment: Vec<String>,
        stdio: [OwnedFd; 3],
    ) -> Result<u32, ManagerError> {
        let target = self.session_target(name, user).await?;
        let spec = SessionSpec {
            term: term(&environment, "dumb"),
            command,
            environment,
            stdio,
            controlling_tty: false,
        };
        self.spawn_session(name, target, spec)
    }

    fn sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u32, oneshot::Sender<()>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a session whose caller went away: its command gets SIGHUP (as
    /// from a terminal hangup), the helpers SIGKILL. Returns whether it ran.
    pub(crate) fn hang_up(&self, session: u32) -> bool {
        self.sessions()
            .remove(&session)
            .is_some_and(|hang_up| hang_up.send(()).is_ok())
    }

    /// Whether a session is still running.
    pub(crate) fn session_running(&self, session: u32) -> bool {
        self.sessions().contains_key(&session)
    }

    /// Checks what a shell session needs: a running machine, the user in it.
    async fn session_target(&self, name: &str, user: &str) -> Result<SessionTarget, ManagerError> {
        check_name(name)?;
        let (plan, leader) = {
            let machines = self.lock();
            let entry = machines
                .get(name)
                .ok_or_else(|| ManagerError::NoSuchMachine(name.to_owned()))?;
            match (&entry.plan, entry.info.leader) {
                (Some(plan), leader) if leader != 0 && entry.info.state.is_active() => {
                    (plan.clone(), leader)
                }
                _ => return Err(ManagerError::NotRunning(name.to_owned())),
            }
        };
        // The guest's passwd is untrusted: read off the async workers, with
        // a deadline, and its ids checked against the machine's range.
        let lookup = {
            let (user, size) = (user.to_owned(), plan.ids.size);
            tokio::task::spawn_blocking(move || {
                let found = enter::resolve_user(leader as i32, &user)?;
                enter::check_ids(&found, size).map(|()| found)
            })
        };
        let failed = |source: Failure| ManagerError::Failed {
            name: name.to_owned(),
            source,
        };
        let user = match tokio::time::timeout(GUEST_LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(Ok(user))) => user,
            Ok(Ok(Err(enter::EnterError::NoSuchUser(user)))) => {
                return Err(ManagerError::NoSuchUser {
                    machine: name.to_owned(),
                    user,
                })
            }
            Ok(Ok(Err(enter::EnterError::NotRunning(_)))) => {
                return Err(ManagerError::NotRunning(name.to_owned()))
            }
            Ok(Ok(Err(other))) => return Err(failed(other.into())),
            Ok(Err(join)) => return Err(failed(Failure::Lookup(join))),
            Err(_) => return Err(failed(Failure::LookupTimedOut(GUEST_LOOKUP_TIMEOUT))),
        };
        Ok(SessionTarget { plan, leader, user })
    }

    /// Runs the enter helper and reports its end as [`Event::ShellExited`].
    fn spawn_session(
        &self,
        name: &str,
        target: SessionTarget,
        spec: SessionSpec,
    ) -> Result<u32, ManagerError> {
        let failed = |source: Failure| ManagerError::Failed {
            name: name.to_owned(),
            source,
        };
        let enter_spec = enter::EnterSpec {
            leader: target.leader as i32,
            cgroup: target.plan.cgroup.clone(),
            env: enter::environment(&target.user, &spec.term, &spec.environment),
            argv: spec.command,
            user: target.user,
            controlling_tty: spec.controlling_tty,
            seccomp_cache: Some(self.inner.config.state_dir.clone()),
        };
        let mut std_command =
            enter::spec_command(&self.inner.helper, &enter_spec).map_err(|e| failed(e.into()))?;
        let [stdin, stdout, stderr] = spec.stdio;
        std_command
            .stdin(std::process::Stdio::from(stdin))
            .stdout(std::process::Stdio::from(stdout))
            .stderr(std::process::Stdio::from(stderr));
        let mut child = tokio::process::Command::from(std_command)
            .spawn()
            .map_err(|e| failed(Failure::Spawn(e)))?;
        // The Command (and with it our copies of the caller's descriptors
        // and the spec memfd) is gone once spawned.
        let session = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let (hang_up, mut hung_up) = oneshot::channel();
        self.sessions().insert(session, hang_up);
        let manager = self.clone();
        tokio::spawn(async move {
            let waited = tokio::select! {
                waited = child.wait() => waited,
                Ok(()) = &mut hung_up => {
                    // The helper's death takes the command along
                    // (PDEATHSIG, see runtime::enter).
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let status = match waited {
                Ok(st) => st.code().unwrap_or_else(|| {
                    128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
                }),
                Err(_) => 255,
            };
            manager.sessions().remove(&session);
            manager.emit(Event::ShellExited { session, status });
        });
        Ok(session)
    }
}

/// The session's `TERM`: the caller's, else `default`.
fn term(environment: &[String], default: &str) -> String {
    environment
        .iter()
        .find_map(|e| e.strip_prefix("TERM="))
        .unwrap_or(default)
        .to_owned()
}
