//! The manager core for real (as root): definitions on disk, machines
//! through supervisors, shells, reload. The D-Bus face is tested elsewhere.

mod support;

use std::io::Read;
use std::time::Duration;

use rmachines::manager::{Event, MachineState, Manager, ManagerConfig, ManagerError};
use support::*;

struct Env {
    dirs: tempfile::TempDir,
    manager: Manager,
}

impl Env {
    async fn new(files: &[(&str, String)]) -> Env {
        require_root();
        let dirs = tempfile::Builder::new()
            .prefix("rmachines-mgr-")
            .tempdir()
            .unwrap();
        let config = dirs.path().join("etc");
        std::fs::create_dir_all(&config).unwrap();
        for (name, text) in files {
            std::fs::write(config.join(format!("{name}.toml")), text).unwrap();
        }
        let manager = Manager::with_helper(
            ManagerConfig {
                config_dir: config,
                state_dir: dirs.path().join("run"),
                storage_dir: dirs.path().join("lib"),
                network: test_network_config(),
            },
            helper_binary().into(),
        )
        .await
        .unwrap();
        Env { dirs, manager }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Stop whatever a failed test left running.
        let manager = self.manager.clone();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(manager.shutdown());
        })
        .join()
        .unwrap();
        let _ = &self.dirs;
    }
}

fn busybox_toml() -> String {
    format!(
        "root = {:?}\n[network]\nmode = \"none\"\n",
        fixture("busybox")
    )
}

async fn wait_running(manager: &Manager, name: &str) {
    for _ in 0..400 {
        if manager.get(name).unwrap().state == MachineState::Running {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name} never ran: {:?}", manager.get(name));
}

#[tokio::test(flavor = "multi_thread")]
async fn start_shell_stop_and_the_state_sequence() {
    let env = Env::new(&[("mgr-a", busybox_toml())]).await;
    let m = &env.manager;
    let mut events = m.subscribe();
    m.start("mgr-a").await.unwrap();
    assert!(matches!(
        m.start("mgr-a").await,
        Err(ManagerError::AlreadyRunning(_))
    ));
    wait_running(m, "mgr-a").await;
    let info = m.get("mgr-a").unwrap();
    assert!(info.leader > 0);

    let session = m
        .shell(
            "mgr-a",
            "",
            vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo shell-ok; exit 7".into(),
            ],
            vec![],
        )
        .await
        .unwrap();
    let mut output = Vec::new();
    let mut master = std::fs::File::from(session.pty_master);
    // Reading a pty whose other side closed ends in EIO: what was read counts.
    let output = tokio::task::spawn_blocking(move || {
        let _ = master.read_to_end(&mut output);
        output
    })
    .await
    .expect("the pty reader panicked");
    assert!(
        String::from_utf8_lossy(&output).contains("shell-ok"),
        "{}",
        String::from_utf8_lossy(&output)
    );
    let mut states = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::ShellExited { session: s, status } if s == session.session => break status,
            Event::StateChanged { state, .. } => states.push(state),
            _ => {}
        }
    };
    assert_eq!(status, 7);
    assert!(matches!(
        m.shell("mgr-a", "nosuchuser", vec![], vec![]).await,
        Err(ManagerError::NoSuchUser { .. })
    ));

    m.stop("mgr-a").await.unwrap();
    assert_eq!(m.get("mgr-a").unwrap().state, MachineState::Stopped);
    assert!(matches!(
        m.stop("mgr-a").await,
        Err(ManagerError::NotRunning(_))
    ));
    while let Ok(event) = events.try_recv() {
        if let Event::StateChanged { name, state, .. } = event {
            assert_eq!(name, "mgr-a");
            states.push(state);
        }
    }
    // The whole sequence (starting may repeat as the supervisor confirms it).
    states.dedup();
    assert_eq!(
        states,
        [
            MachineState::Starting,
            MachineState::Running,
            MachineState::Stopping,
            MachineState::Stopped
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_definitions_fail_alone_and_bad_names_are_refused() {
    let env = Env::new(&[
        ("good", busybox_toml()),
        ("broken", "root = \"/nonexistent\"\nbogus = 1\n".into()),
        (
            "noinit",
            format!(
                "root = {:?}\n",
                env!("CARGO_MANIFEST_DIR").to_owned() + "/docs"
            ),
        ),
    ])
    .await;
    let m = &env.manager;
    let list = m.list();
    assert_eq!(
        list.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["broken", "good", "noinit"]
    );
    assert_eq!(list[0].state, MachineState::Failed);
    assert!(list[0].error.contains("broken.toml"), "{}", list[0].error);
    assert!(matches!(
        m.start("broken").await,
        Err(ManagerError::InvalidDefinition { .. })
    ));
    let err = m.start("noinit").await.unwrap_err();
    assert!(err.to_string().contains("/sbin/init"), "{err}");
    assert_eq!(m.get("noinit").unwrap().state, MachineState::Failed);
    for bad in ["", "../x", "a/b", &"a".repeat(10_000), "nul\0byte"] {
        assert!(
            matches!(m.get(bad), Err(ManagerError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(m.start(bad).await, Err(ManagerError::InvalidName(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        m.start("unknown").await,
        Err(ManagerError::NoSuchMachine(_))
    ));
    m.start("good").await.unwrap();
    wait_running(m, "good").await;
    m.stop("good").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_adds_and_removes_without_disturbing_running_machines() {
    let env = Env::new(&[("keep", busybox_toml())]).await;
    let m = &env.manager;
    m.start("keep").await.unwrap();
    wait_running(m, "keep").await;
    let leader = m.get("keep").unwrap().leader;
    let config = env.dirs.path().join("etc");
    std::fs::write(config.join("added.toml"), busybox_toml()).unwrap();
    let summary = m.reload().await.unwrap();
    assert_eq!(summary.added, ["added"]);
    std::fs::remove_file(config.join("added.toml")).unwrap();
    let summary = m.reload().await.unwrap();
    assert_eq!(summary.removed, ["added"]);
    assert_eq!(
        m.get("keep").unwrap().leader,
        leader,
        "running machine disturbed"
    );
    m.stop("keep").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_shows_a_broken_file_of_a_running_machine_until_it_is_fixed() {
    let env = Env::new(&[("fixlater", busybox_toml())]).await;
    let m = &env.manager;
    m.start("fixlater").await.unwrap();
    wait_running(m, "fixlater").await;
    let leader = m.get("fixlater").unwrap().leader;
    let file = env.dirs.path().join("etc/fixlater.toml");
    std::fs::write(&file, format!("{}colour = \"red\"\n", busybox_toml())).unwrap();
    m.reload().await.unwrap();
    let info = m.get("fixlater").unwrap();
    assert_eq!(info.state, MachineState::Running, "still running");
    assert_eq!(info.leader, leader, "running machine disturbed");
    assert!(
        info.error.starts_with(&file.display().to_string()) && info.error.contains("colour"),
        "the broken file is shown: {:?}",
        info.error
    );
    std::fs::write(&file, busybox_toml()).unwrap();
    m.reload().await.unwrap();
    assert_eq!(m.get("fixlater").unwrap().error, "", "fixed file, no error");
    m.stop("fixlater").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_machines_start_concurrently() {
    let files: Vec<(String, String)> = (0..20)
        .map(|i| (format!("many-{i:02}"), busybox_toml()))
        .collect();
    let refs: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let env = Env::new(&refs).await;
    let m = &env.manager;
    let mut tasks = tokio::task::JoinSet::new();
    for (name, _) in &files {
        let m = m.clone();
        let name = name.clone();
        tasks.spawn(async move { m.start(&name).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    for (name, _) in &files {
        wait_running(m, name).await;
    }
    let cgroups: Vec<_> = files
        .iter()
        .map(|(n, _)| rmachines::runtime::cgroup::machine_cgroup_path(n).unwrap())
        .collect();
    m.shutdown().await;
    assert!(m.list().iter().all(|i| i.state == MachineState::Stopped));
    for cg in cgroups {
        assert!(!cg.exists(), "{} left behind", cg.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_daemon_readopts_machines_that_outlived_the_old_one() {
    let env = Env::new(&[("adopted", busybox_toml())]).await;
    env.manager.start("adopted").await.unwrap();
    wait_running(&env.manager, "adopted").await;
    let leader = env.manager.get("adopted").unwrap().leader;
    // A second manager on the same directories stands for a restarted
    // daemon: the first one's supervisor is still there to be found.
    let config = ManagerConfig {
        config_dir: env.dirs.path().join("etc"),
        state_dir: env.dirs.path().join("run"),
        storage_dir: env.dirs.path().join("lib"),
        network: test_network_config(),
    };
    let second = Manager::with_helper(config, helper_binary().into())
        .await
        .unwrap();
    let info = second.get("adopted").unwrap();
    assert_eq!(info.state, MachineState::Running);
    assert_eq!(info.leader, leader);
    second.stop("adopted").await.unwrap();
    assert_eq!(second.get("adopted").unwrap().state, MachineState::Stopped);
    assert!(!rmachines::runtime::cgroup::machine_cgroup_path("adopted")
        .unwrap()
        .exists());
}

/// Whether a registry file under the storage directory names `machine`.
fn registry_names(storage: &std::path::Path, file: &str, machine: &str) -> bool {
    std::fs::read_to_string(storage.join(file))
        .map(|text| text.contains(&format!("\"{machine}\"")))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_definition_gives_back_its_ids_and_address() {
    let private = format!(
        "root = {:?}\n[network]\nmode = \"private\"\n",
        fixture("busybox")
    );
    let env = Env::new(&[("gone-stopped", private.clone()), ("gone-running", private)]).await;
    let m = &env.manager;
    let storage = env.dirs.path().join("lib");
    let config = env.dirs.path().join("etc");
    for name in ["gone-stopped", "gone-running"] {
        m.start(name).await.unwrap();
        wait_running(m, name).await;
        for file in ["idranges.json", "addresses.json"] {
            assert!(
                registry_names(&storage, file, name),
                "{name} not in {file} while it runs"
            );
        }
    }
    // Stopped, then its file removed: forgotten at the reload.
    m.stop("gone-stopped").await.unwrap();
    std::fs::remove_file(config.join("gone-stopped.toml")).unwrap();
    // Running, its file removed: kept until it stops.
    std::fs::remove_file(config.join("gone-running.toml")).unwrap();
    let summary = m.reload().await.unwrap();
    assert_eq!(summary.removed, ["gone-stopped"]);
    for file in ["idranges.json", "addresses.json"] {
        assert!(
            !registry_names(&storage, file, "gone-stopped"),
            "gone-stopped still in {file}"
        );
        assert!(
            registry_names(&storage, file, "gone-running"),
            "gone-running left {file} while it still runs"
        );
    }
    m.stop("gone-running").await.unwrap();
    assert!(matches!(
        m.get("gone-running"),
        Err(ManagerError::NoSuchMachine(_))
    ));
    for file in ["idranges.json", "addresses.json"] {
        assert!(
            !registry_names(&storage, file, "gone-running"),
            "gone-running still in {file} after it stopped"
        );
    }
}
