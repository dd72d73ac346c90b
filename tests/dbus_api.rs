//! The org.rmachines1 API through a real bus and a real rmachined, driven
//! with zbus, busctl and rmachinectl. Runs as root (panics otherwise).
mod common;

use std::time::Duration;

use common::{error_name, write_definition, Harness};
use rmachines::dbus::introspection::normalized_interface;
use rmachines::dbus::proxy::{MachineProxy, ManagerProxy};
use rmachines::dbus::{MACHINE_PATH_PREFIX, MANAGER_PATH};
use zbus::fdo::{IntrospectableProxy, ObjectManagerProxy};

const MANAGER_XML: &str = include_str!("../dbus/org.rmachines1.Manager.xml");
const MACHINE_XML: &str = include_str!("../dbus/org.rmachines1.Machine.xml");

async fn introspect(connection: &zbus::Connection, path: &str) -> String {
    IntrospectableProxy::builder(connection)
        .destination("org.rmachines1")
        .expect("destination")
        .path(path.to_owned())
        .expect("path")
        .build()
        .await
        .expect("introspectable proxy")
        .introspect()
        .await
        .expect("Introspect")
}

#[tokio::test(flavor = "multi_thread")]
async fn manager_introspection_matches_the_xml_file() {
    let harness = Harness::start();
    let connection = harness.connection().await;
    let served = introspect(&connection, MANAGER_PATH).await;
    let name = "org.rmachines1.Manager";
    let expected = normalized_interface(MANAGER_XML, name).expect("interface in the file");
    assert_eq!(normalized_interface(&served, name), Some(expected));
    assert!(
        served.contains("org.freedesktop.DBus.ObjectManager"),
        "ObjectManager is served at {MANAGER_PATH}"
    );
    let objects = ObjectManagerProxy::builder(&connection)
        .destination("org.rmachines1")
        .unwrap()
        .path(MANAGER_PATH)
        .unwrap()
        .build()
        .await
        .unwrap()
        .get_managed_objects()
        .await
        .expect("GetManagedObjects");
    assert!(objects.is_empty(), "no definitions, no machine objects");
}

#[tokio::test(flavor = "multi_thread")]
async fn machine_introspection_matches_the_xml_file() {
    let roots = tempfile::tempdir().unwrap();
    let harness = Harness::start_with(|config| write_definition(config, "web", roots.path(), ""));
    let connection = harness.connection().await;
    let manager = ManagerProxy::new(&connection).await.unwrap();
    let path = manager.get_machine("web").await.expect("GetMachine web");
    assert_eq!(path.as_str(), format!("{MACHINE_PATH_PREFIX}/web"));
    let served = introspect(&connection, path.as_str()).await;
    let name = "org.rmachines1.Machine";
    assert_eq!(
        normalized_interface(&served, name),
        normalized_interface(MACHINE_XML, name)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_on_an_empty_config_dir_is_empty() {
    let harness = Harness::start();
    let connection = harness.connection().await;
    let manager = ManagerProxy::new(&connection).await.unwrap();
    assert!(manager.list().await.expect("List").is_empty());
}

fn two_definitions(config: &std::path::Path, existing_root: &std::path::Path) {
    write_definition(config, "good", existing_root, "");
    write_definition(config, "broken", &existing_root.join("missing"), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_with_definitions_keeps_serving() {
    let roots = tempfile::tempdir().unwrap();
    let harness = Harness::start_with(|config| two_definitions(config, roots.path()));
    let connection = harness.connection().await;
    let manager = ManagerProxy::new(&connection).await.unwrap();
    let machines = manager
        .list()
        .await
        .expect("List answers with definitions present");
    // Whatever the core gives, every entry's path is the escaped name.
    for (name, _, _, path) in &machines {
        assert_eq!(path.as_str(), rmachines::dbus::machine_path(name).as_str());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn list_shows_definitions_and_a_broken_one_as_failed() {
    let roots = tempfile::tempdir().unwrap();
    let harness = Harness::start_with(|config| two_definitions(config, roots.path()));
    let connection = harness.connection().await;
    let manager = ManagerProxy::new(&connection).await.unwrap();
    let machines = manager.list().await.unwrap();
    let summary: Vec<(&str, &str, u32)> = machines
        .iter()
        .map(|(name, state, leader, _)| (name.as_str(), state.as_str(), *leader))
        .collect();
    assert_eq!(summary, [("broken", "failed", 0), ("good", "stopped", 0)]);
    let broken = MachineProxy::builder(&connection)
        .path(machines[0].3.clone())
        .unwrap()
        .build()
        .await
        .unwrap();
    assert!(
        !broken.error().await.unwrap().is_empty(),
        "broken has an Error"
    );
    let status = harness.rmachinectl(&["status", "broken"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("failed") && text.contains("Error:"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_names_get_the_right_errors_and_the_daemon_keeps_serving() {
    let harness = Harness::start();
    let connection = harness.connection().await;
    let manager = ManagerProxy::new(&connection).await.unwrap();
    let long = "a".repeat(10_000);
    for bad in ["", "../x", "a/b", "..", "Web", long.as_str()] {
        assert_eq!(
            error_name(manager.get_machine(bad).await),
            "org.rmachines1.InvalidArgument",
            "GetMachine({:?})",
            &bad[..bad.len().min(20)]
        );
        assert_eq!(
            error_name(manager.start(bad).await),
            "org.rmachines1.InvalidArgument"
        );
        assert_eq!(
            error_name(manager.stop(bad).await),
            "org.rmachines1.InvalidArgument"
        );
    }
    match manager.get_machine("nope").await {
        Err(zbus::Error::MethodError(name, Some(sentence), _)) => {
            assert_eq!(name.as_str(), "org.rmachines1.NoSuchMachine");
            assert!(sentence.contains("nope"), "{sentence}");
        }
        other => panic!("expected NoSuchMachine, got {other:?}"),
    }
    assert_eq!(
        error_name(manager.shell("web", "../root", &[], &[]).await),
        "org.rmachines1.InvalidArgument"
    );
    assert_eq!(
        error_name(manager.shell("web", "", &[], &["no-equals-sign"]).await),
        "org.rmachines1.InvalidArgument"
    );

    // A NUL cannot be in a D-Bus string: the call fails somewhere (in zbus or
    // at the bus, which may drop that connection) and the daemon is unharmed.
    {
        let throwaway = harness.connection().await;
        let proxy = ManagerProxy::new(&throwaway).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), proxy.get_machine("a\0b")).await;
        match result {
            Ok(Err(_)) => {}
            Ok(Ok(path)) => panic!("a name with NUL was accepted: {path:?}"),
            Err(_) => panic!("a name with NUL got no answer within 5 s"),
        }
    }
    let fresh = harness.connection().await;
    let manager = ManagerProxy::new(&fresh).await.unwrap();
    manager.list().await.expect("the daemon still answers");
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_non_root_caller_may_list_but_not_manage() {
    let harness = Harness::start();
    let list = harness.busctl_call_as_nobody(&[MANAGER_PATH, "org.rmachines1.Manager", "List"]);
    assert!(
        list.status.success(),
        "List as nobody: {}",
        stderr_of(&list)
    );
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "a(ssuo) 0");

    let calls: [&[&str]; 4] = [
        &["Start", "s", "web"],
        &["Stop", "s", "web"],
        &["Shell", "ssasas", "web", "", "0", "0"],
        &["Reload"],
    ];
    for call in calls {
        let mut args = vec![MANAGER_PATH, "org.rmachines1.Manager"];
        args.extend_from_slice(call);
        let output = harness.busctl_call_as_nobody(&args);
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{} as nobody succeeded", call[0]);
        assert!(
            stderr.contains("error-name=org.rmachines1.AccessDenied"),
            "{} as nobody: {stderr}",
            call[0]
        );
    }
    let log = harness.daemon_log();
    assert!(
        log.contains("refused Start") && log.contains("uid=65534") && log.contains("pid="),
        "refusals are logged with uid and pid:\n{log}"
    );

    // Root gets past authorisation (to the stub's or core's answer).
    let output =
        harness.busctl_call(&[MANAGER_PATH, "org.rmachines1.Manager", "Start", "s", "web"]);
    assert!(
        stderr_of(&output).contains("error-name=org.rmachines1.NoSuchMachine"),
        "{}",
        stderr_of(&output)
    );
    let output = harness.busctl_call(&[MANAGER_PATH, "org.rmachines1.Manager", "Reload"]);
    assert!(
        output.status.success(),
        "Reload as root: {}",
        stderr_of(&output)
    );
}

#[test]
fn rmachinectl_list_as_table_and_json() {
    let harness = Harness::start();
    let output = harness.rmachinectl(&["list"]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "MACHINE  STATE  LEADER  ADDRESSES  SINCE\n\n0 machines listed.\n"
    );
    let output = harness.rmachinectl(&["list", "--json"]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("valid JSON");
    assert_eq!(json, serde_json::json!([]));
}

#[test]
fn rmachinectl_list_and_status_show_definitions() {
    let roots = tempfile::tempdir().unwrap();
    let harness = Harness::start_with(|config| two_definitions(config, roots.path()));
    let output = harness.rmachinectl(&["list"]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(text.contains("good") && text.contains("broken"), "{text}");
    assert!(text.ends_with("2 machines listed.\n"), "{text}");
    let output = harness.rmachinectl(&["list", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for key in ["name", "state", "leader", "addresses", "since"] {
        assert!(entries[0].get(key).is_some(), "list --json has {key}");
    }
    let output = harness.rmachinectl(&["status", "good", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for key in [
        "name",
        "state",
        "leader",
        "root",
        "definition",
        "addresses",
        "autostart",
        "since",
        "error",
    ] {
        assert!(json.get(key).is_some(), "status --json has {key}");
    }
}

#[test]
fn rmachinectl_errors_are_one_line_with_nonzero_exit() {
    let harness = Harness::start();
    for args in [
        &["status", "nope"][..],
        &["start", "--no-block", "a/b"],
        &["stop", "nope"],
        &["shell", "nope", "--", "true"],
    ] {
        let output = harness.rmachinectl(args);
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("rmachinectl: "), "{args:?}: {stderr}");
    }
    let output = harness.rmachinectl(&["start", "one", "two"]);
    assert_eq!(
        stderr_of(&output).lines().count(),
        2,
        "one line per failed machine"
    );
}

#[test]
fn daemon_notifies_systemd_and_exits_cleanly_on_sigterm() {
    let mut harness = Harness::start();
    assert!(
        harness
            .notifications()
            .iter()
            .any(|datagram| datagram.contains("STATUS=0 machines running")),
        "{:?}",
        harness.notifications()
    );
    let status = harness.terminate_daemon();
    assert!(status.success(), "rmachined exits 0 on SIGTERM: {status}");
}
