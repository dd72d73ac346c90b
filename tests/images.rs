//! Images end to end, as root, through a real bus and rmachined: tars in
//! each compression and OCI layouts built here (checked with umoci and
//! skopeo first) are imported, machines are made from them and booted, and
//! the store is checked: images unchanged by their machines, persistent vs
//! ephemeral layers, hostile archives refused, the store private.

mod common;
mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::Harness;
use sha2::{Digest, Sha256};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn ctl(h: &Harness, args: &[&str]) -> Output {
    h.rmachinectl(args)
}

/// `rmachinectl ARGS` reading `stdin`.
fn ctl_with_stdin(h: &Harness, args: &[&str], stdin: Stdio) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rmachinectl"))
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", h.address())
        .stdin(stdin)
        .output()
        .expect("run rmachinectl")
}

fn sh(h: &Harness, machine: &str, script: &str) -> String {
    ok(
        ctl(h, &["shell", machine, "--", "/bin/sh", "-c", script]),
        &format!("{script:?} in {machine}"),
    )
}

fn shell_sh(script: &str) {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {}", text(&out));
}

/// Type, mode, owner, size and link target of every path below `dir`.
fn listing(dir: &Path) -> String {
    let out = Command::new("find")
        .arg(dir)
        .args(["-mindepth", "1", "-printf", "%P %y %m %U:%G %s %l\n"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    lines.sort();
    // Directory sizes depend on the file system's history, not content.
    lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.get(1) == Some(&"d") {
                format!("{} d {} {}", f[0], f[2], f[3])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rmachines-images-")
        .tempdir()
        .unwrap()
}

#[test]
fn tars_in_each_compression_import_and_boot_persistent_and_ephemeral() {
    let busybox = support::fixture("busybox");
    let work = scratch();
    let plain = work.path().join("bb.tar");
    shell_sh(&format!(
        "tar -C {} --numeric-owner -cf {} . && gzip -k {1} && xz -k {1} && zstd -q {1}",
        busybox.display(),
        plain.display()
    ));
    let h = Harness::start();
    let images = h.storage_dir().join("images");
    for (name, file) in [
        ("bb", "bb.tar"),
        ("bb-gz", "bb.tar.gz"),
        ("bb-xz", "bb.tar.xz"),
        ("bb-zst", "bb.tar.zst"),
    ] {
        let path = work.path().join(file);
        let out = ok(
            ctl(&h, &["image", "import", name, path.to_str().unwrap()]),
            &format!("importing {file}"),
        );
        assert!(
            out.contains(&format!("Imported image {name} (tar)")),
            "{out}"
        );
        assert_eq!(listing(&images.join(name)), listing(&busybox), "{file}");
        assert_eq!(mode_of(&images), 0o700);
    }
    // From a pipe, as `mmdebstrap ... | rmachinectl image import NAME -`.
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&busybox)
        .args(["--numeric-owner", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pipe = tar.stdout.take().unwrap();
    ok(
        ctl_with_stdin(&h, &["image", "import", "bb-pipe", "-"], pipe.into()),
        "importing from a pipe",
    );
    assert!(tar.wait().unwrap().success());
    assert_eq!(listing(&images.join("bb-pipe")), listing(&busybox));
    let dup = ctl(&h, &["image", "import", "bb", plain.to_str().unwrap()]);
    assert!(
        !dup.status.success() && text(&dup).contains("already exists"),
        "{}",
        text(&dup)
    );

    let list = ok(ctl(&h, &["image", "list", "--json"]), "image list");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 5, "{list}");

    // A persistent machine keeps its changes across restarts; an ephemeral
    // one loses them; the image sees neither.
    let before = listing(&images.join("bb-gz"));
    let started = std::time::Instant::now();
    ok(
        ctl(&h, &["create", "keep", "--image", "bb-gz"]),
        "create keep",
    );
    let create_time = started.elapsed();
    ok(
        ctl(
            &h,
            &[
                "create",
                "scratch",
                "--image",
                "bb-gz",
                "--ephemeral",
                "--start",
            ],
        ),
        "create scratch",
    );
    ok(ctl(&h, &["start", "keep"]), "start keep");
    let definition = std::fs::read_to_string(h.config_dir().join("keep.toml")).unwrap();
    assert!(definition.contains("image = \"bb-gz\""), "{definition}");
    for m in ["keep", "scratch"] {
        sh(
            &h,
            m,
            "echo changed > /etc/hostname-note && rm /bin/ls && mkdir -p /var/new",
        );
    }
    ok(ctl(&h, &["restart", "keep", "scratch"]), "restart");
    assert_eq!(
        sh(
            &h,
            "keep",
            "cat /etc/hostname-note; test -e /bin/ls || echo no-ls"
        ),
        "changed\nno-ls"
    );
    assert_eq!(
        sh(
            &h,
            "scratch",
            "cat /etc/hostname-note 2>/dev/null; test -e /bin/ls && echo ls"
        ),
        "ls"
    );
    assert_eq!(listing(&images.join("bb-gz")), before, "the image changed");
    let layer = h.storage_dir().join("machines/keep");
    assert!(layer.join("upper/etc/hostname-note").is_file());
    assert_eq!(mode_of(&h.storage_dir().join("machines")), 0o700);

    // Removal: refused while used, the machine only when stopped.
    let refused = ctl(&h, &["image", "remove", "bb-gz"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("keep") && text(&refused).contains("scratch"),
        "{}",
        text(&refused)
    );
    let running = ctl(&h, &["remove", "keep"]);
    assert!(!running.status.success(), "removed a running machine");
    ok(ctl(&h, &["stop", "keep", "scratch"]), "stop");
    ok(ctl(&h, &["remove", "keep", "scratch"]), "remove machines");
    assert!(!layer.exists() && !h.config_dir().join("keep.toml").exists());
    ok(ctl(&h, &["image", "remove", "bb-gz"]), "image remove");
    assert!(!images.join("bb-gz").exists());
    eprintln!("create took {create_time:?}");
}

// ---------------------------------------------------------------------------
// OCI layouts
// ---------------------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a blob; returns its descriptor fields (digest, size).
fn put_blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let hex = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&hex), data).unwrap();
    (format!("sha256:{hex}"), data.len())
}

fn file_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, path, data).unwrap();
}

fn dir_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Directory);
    builder.append_data(&mut header, path, &[][..]).unwrap();
}

/// An OCI layout of two layers: the busybox tree plus a few files (gzip),
/// then whiteouts (`data/gone`, `sbin/init`), an opaque `opq/` and new
/// files (uncompressed). Its config runs a shell as 1000:1000 in /app.
fn build_layout(layout: &Path, busybox: &Path) {
    let mut base = tar::Builder::new(Vec::new());
    base.follow_symlinks(false);
    base.append_dir_all(".", busybox).unwrap();
    dir_entry(&mut base, "data", 0o755);
    file_entry(&mut base, "data/keep", b"kept\n", 0o644);
    file_entry(&mut base, "data/gone", b"gone\n", 0o644);
    dir_entry(&mut base, "opq", 0o755);
    file_entry(&mut base, "opq/old", b"old\n", 0o644);
    let base = base.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&base).unwrap();
    let base_gz = gz.finish().unwrap();

    let mut top = tar::Builder::new(Vec::new());
    // The new file comes before the opaque mark: it must survive it.
    file_entry(&mut top, "opq/new", b"new\n", 0o644);
    file_entry(&mut top, "opq/.wh..wh..opq", b"", 0o644);
    file_entry(&mut top, "data/.wh.gone", b"", 0o644);
    file_entry(&mut top, "sbin/.wh.init", b"", 0o644);
    dir_entry(&mut top, "app", 0o755);
    // A directory over a directory: merged, with the new mode.
    dir_entry(&mut top, "tmp", 0o1777);
    let top = top.into_inner().unwrap();

    std::fs::create_dir_all(layout).unwrap();
    let (base_digest, base_size) = put_blob(layout, &base_gz);
    let (top_digest, top_size) = put_blob(layout, &top);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello-oci"],
            "Entrypoint": ["sh", "-c"],
            "Cmd": ["trap 'exit 0' TERM; echo $GREETING > /tmp/greeting; pwd > /tmp/pwd; id -u > /tmp/uid; sleep 1000 & wait"],
            "WorkingDir": "/app",
            "User": "1000:1000"
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": [format!("sha256:{}", sha256_hex(&base)), format!("sha256:{}", sha256_hex(&top))]
        },
        "history": []
    });
    let (config_digest, config_size) = put_blob(layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": base_digest, "size": base_size},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": top_digest, "size": top_size}
        ]
    });
    let (manifest_digest, manifest_size) = put_blob(layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"}
        }]
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

#[test]
fn oci_layouts_import_with_whiteouts_and_run_their_config() {
    let busybox = support::fixture("busybox");
    let work = scratch();
    let layout = work.path().join("layout");
    build_layout(&layout, &busybox);
    // A real OCI tool must accept the layout before we do.
    let image_ref = format!("{}:latest", layout.display());
    ok(
        Command::new("umoci")
            .args(["stat", "--image", &image_ref])
            .output()
            .unwrap(),
        "umoci stat",
    );
    let archive = work.path().join("layout.tar");
    ok(
        Command::new("skopeo")
            .args([
                "copy",
                "-q",
                &format!("oci:{image_ref}"),
                &format!("oci-archive:{}:latest", archive.display()),
            ])
            .output()
            .unwrap(),
        "skopeo copy (checks every blob's digest)",
    );

    let h = Harness::start();
    let images = h.storage_dir().join("images");
    let out = ok(
        ctl(&h, &["image", "import", "app", layout.to_str().unwrap()]),
        "importing the layout directory",
    );
    assert!(out.contains("(oci)"), "{out}");
    ok(
        ctl(
            &h,
            &[
                "image",
                "import",
                "app-tar",
                archive.to_str().unwrap(),
                "--format",
                "oci",
                "--ref",
                "latest",
            ],
        ),
        "importing the layout archive",
    );
    let tree = images.join("app");
    assert_eq!(listing(&tree), listing(&images.join("app-tar")));
    assert_eq!(
        std::fs::read_to_string(tree.join("data/keep")).unwrap(),
        "kept\n"
    );
    assert!(!tree.join("data/gone").exists(), "whiteout not applied");
    assert!(!tree.join("sbin/init").exists(), "whiteout not applied");
    assert!(
        !tree.join("opq/old").exists(),
        "opaque directory kept old files"
    );
    assert!(
        tree.join("opq/new").is_file(),
        "opaque mark removed its own layer's file"
    );
    assert_eq!(mode_of(&tree.join("tmp")), 0o1777);
    assert!(!tree.join("opq/.wh..wh..opq").exists() && !tree.join("data/.wh.gone").exists());
    let bad_ref = ctl(
        &h,
        &[
            "image",
            "import",
            "x",
            layout.to_str().unwrap(),
            "--ref",
            "nope",
        ],
    );
    assert!(
        text(&bad_ref).contains("no manifest tagged \"nope\""),
        "{}",
        text(&bad_ref)
    );

    // No init: the OCI config is the machine's.
    ok(
        ctl(&h, &["create", "app1", "--image", "app", "--start"]),
        "create app1",
    );
    let definition = std::fs::read_to_string(h.config_dir().join("app1.toml")).unwrap();
    assert!(
        definition.contains("boot = false") && definition.contains("\"/bin/sh\""),
        "{definition}"
    );
    // The command writes its files soon after it runs (a loaded host: wait).
    let mut seen = String::new();
    for _ in 0..100 {
        seen = sh(
            &h,
            "app1",
            "cat /tmp/greeting /tmp/pwd /tmp/uid 2>/dev/null || true",
        );
        if seen.lines().count() == 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(seen, "hello-oci\n/app\n1000");
    // The same image boots twice at once.
    ok(
        ctl(
            &h,
            &[
                "create",
                "app2",
                "--image",
                "app-tar",
                "--ephemeral",
                "--start",
            ],
        ),
        "create app2",
    );
    ok(ctl(&h, &["stop", "app1", "app2"]), "stop");

    // A corrupt blob is refused.
    let blobs = layout.join("blobs/sha256");
    let config_blob = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .find(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("hello-oci")))
        .unwrap()
        .path();
    let mut data = std::fs::read(&config_blob).unwrap();
    data[10] ^= 1;
    std::fs::write(&config_blob, data).unwrap();
    let corrupt = ctl(&h, &["image", "import", "broken", layout.to_str().unwrap()]);
    assert!(
        text(&corrupt).contains("does not match its digest"),
        "{}",
        text(&corrupt)
    );
    assert!(!images.join("broken").exists() && !images.join(".partial-broken").exists());
}

// ---------------------------------------------------------------------------
// Hostile archives and the store's privacy
// ---------------------------------------------------------------------------

/// A tar entry with a raw name (the tar crate refuses `..` in set_path).
fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    link: Option<&str>,
    data: &[u8],
) {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

fn tar_file(dir: &Path, name: &str, fill: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> PathBuf {
    let mut builder = tar::Builder::new(Vec::new());
    fill(&mut builder);
    let path = dir.join(name);
    std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
    path
}

#[test]
fn hostile_archives_never_write_outside_and_devices_are_dropped() {
    let work = scratch();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let h = Harness::start();
    let images = h.storage_dir().join("images");

    let dotdot = tar_file(work.path(), "dotdot.tar", |b| {
        raw_entry(b, tar::EntryType::Regular, "a/../../../escaped", None, b"x");
    });
    let out = ctl(&h, &["image", "import", "dotdot", dotdot.to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out).contains("leads out of the image"),
        "{}",
        text(&out)
    );
    assert!(!images.join("dotdot").exists() && !images.join(".partial-dotdot").exists());

    // A symlink to an absolute host path, then a file "through" it: it
    // lands inside the image, at that path of the image.
    let target = outside.display().to_string();
    let through = tar_file(work.path(), "symlink.tar", |b| {
        let mut so_far = String::new();
        for part in target.trim_start_matches('/').split('/') {
            so_far.push_str(part);
            so_far.push('/');
            raw_entry(b, tar::EntryType::Directory, &so_far, None, b"");
        }
        raw_entry(b, tar::EntryType::Symlink, "evil", Some(&target), b"");
        raw_entry(b, tar::EntryType::Regular, "evil/pwned", None, b"pwned");
        raw_entry(b, tar::EntryType::Symlink, "up", Some("../../../.."), b"");
        raw_entry(b, tar::EntryType::Regular, "up/pwned2", None, b"pwned");
    });
    ok(
        ctl(
            &h,
            &["image", "import", "through", through.to_str().unwrap()],
        ),
        "symlink tar",
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote outside the image"
    );
    let tree = images.join("through");
    assert_eq!(
        std::fs::read_to_string(tree.join(format!(".{target}/pwned"))).unwrap(),
        "pwned"
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("pwned2")).unwrap(),
        "pwned"
    );
    assert!(!Path::new("/pwned2").exists());
    // Through a symlink to a host directory the image does not have: refused.
    let dangling = tar_file(work.path(), "dangling.tar", |b| {
        raw_entry(b, tar::EntryType::Symlink, "evil", Some(&target), b"");
        raw_entry(b, tar::EntryType::Regular, "evil/pwned", None, b"pwned");
    });
    let out = ctl(
        &h,
        &["image", "import", "dangling", dangling.to_str().unwrap()],
    );
    assert!(
        !out.status.success() && text(&out).contains("evil"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote outside the image"
    );
    assert!(!images.join("dangling").exists());

    let hardlink = tar_file(work.path(), "hardlink.tar", |b| {
        raw_entry(
            b,
            tar::EntryType::Link,
            "passwd",
            Some("../../../../etc/passwd"),
            b"",
        );
    });
    let out = ctl(
        &h,
        &["image", "import", "hardlink", hardlink.to_str().unwrap()],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let abs_link = tar_file(work.path(), "abslink.tar", |b| {
        raw_entry(b, tar::EntryType::Link, "shadow", Some("/etc/shadow"), b"");
    });
    let out = ctl(
        &h,
        &["image", "import", "abslink", abs_link.to_str().unwrap()],
    );
    assert!(
        !out.status.success() && text(&out).contains("not in the image"),
        "{}",
        text(&out)
    );

    let devices = tar_file(work.path(), "devices.tar", |b| {
        raw_entry(b, tar::EntryType::Directory, "dev/", None, b"");
        raw_entry(b, tar::EntryType::Char, "dev/sda", None, b"");
        raw_entry(b, tar::EntryType::Block, "dev/mem", None, b"");
        raw_entry(b, tar::EntryType::Regular, "etc/hostname", None, b"dev\n");
    });
    let out = ok(
        ctl(
            &h,
            &["image", "import", "devices", devices.to_str().unwrap()],
        ),
        "devices",
    );
    assert!(out.contains("2 device nodes were not kept"), "{out}");
    let tree = images.join("devices");
    assert!(tree.join("dev").is_dir() && std::fs::read_dir(tree.join("dev")).unwrap().count() == 0);

    // Unprivileged host users cannot look into the store.
    for path in [images.clone(), images.join("devices/etc")] {
        let out = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "ls",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "nobody could list {}",
            path.display()
        );
    }
    assert_eq!(mode_of(&images), 0o700);

    // Nobody may import, create or remove through the bus (no polkit here).
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_rmachinectl"))
        .args(["image", "import", "sneaky", "-"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", h.address())
        .stdin(std::fs::File::open(&devices).unwrap())
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out).contains("only allowed to root"),
        "{}",
        text(&out)
    );
    assert!(!images.join("sneaky").exists());
    for call in [
        &[
            "/org/rmachines1",
            "org.rmachines1.Manager",
            "RemoveImage",
            "s",
            "devices",
        ][..],
        &[
            "/org/rmachines1",
            "org.rmachines1.Manager",
            "CreateMachine",
            "ssbb",
            "m",
            "devices",
            "false",
            "false",
        ][..],
    ] {
        let out = h.busctl_call_as_nobody(call);
        assert!(text(&out).contains("AccessDenied"), "{}", text(&out));
    }
    assert!(images.join("devices").is_dir());
}

// ---------------------------------------------------------------------------
// A Debian image boots as cleanly as the plain tree
// ---------------------------------------------------------------------------

/// The journal's I/O errors and the failed units of a booted systemd guest.
fn boot_problems(h: &Harness, machine: &str) -> (String, String) {
    let mut state = String::new();
    for _ in 0..200 {
        state = sh(h, machine, "systemctl is-system-running || true");
        if state == "running" || state == "degraded" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let eio = sh(
        h,
        machine,
        "journalctl -b --no-pager | grep -i 'input/output error' || true",
    );
    let failed = sh(
        h,
        machine,
        "systemctl list-units --failed --no-legend --plain | cut -d' ' -f1",
    );
    (eio, format!("{state}: {failed}"))
}

const NO_NET: &str = "[network]\nmode = \"none\"\n";

#[test]
fn debian_image_and_ephemeral_roots_boot_as_cleanly_as_a_plain_root() {
    let debian = support::fixture("debian");
    let plain = support::FixtureCopy::new("debian", "deb-plain");
    let h = Harness::start_with(|c| {
        common::write_definition(c, "deb-plain", &plain.path, NO_NET);
        common::write_definition(
            c,
            "deb-eph-root",
            &debian,
            &format!("ephemeral = true\n{NO_NET}"),
        );
    });
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&debian)
        .args(["--numeric-owner", "--xattrs", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pipe = tar.stdout.take().unwrap();
    ok(
        ctl_with_stdin(&h, &["image", "import", "debian", "-"], pipe.into()),
        "importing debian",
    );
    assert!(tar.wait().unwrap().success());
    ok(
        ctl(&h, &["create", "deb-layer", "--image", "debian"]),
        "create deb-layer",
    );
    ok(
        ctl(
            &h,
            &["create", "deb-eph", "--image", "debian", "--ephemeral"],
        ),
        "create deb-eph",
    );
    for machine in ["deb-layer", "deb-eph"] {
        let def = h.config_dir().join(format!("{machine}.toml"));
        let mut text = std::fs::read_to_string(&def).unwrap();
        text.push_str(NO_NET);
        std::fs::write(&def, text).unwrap();
    }
    ok(ctl(&h, &["reload"]), "reload");
    let machines = ["deb-plain", "deb-eph-root", "deb-layer", "deb-eph"];
    ok(
        ctl(
            &h,
            &["start", "deb-plain", "deb-eph-root", "deb-layer", "deb-eph"],
        ),
        "start",
    );
    let (plain_eio, plain_failed) = boot_problems(&h, "deb-plain");
    assert_eq!(plain_eio, "", "the plain root logged I/O errors");
    for machine in &machines[1..] {
        let (eio, failed) = boot_problems(&h, machine);
        assert_eq!(eio, "", "{machine}: I/O errors in the journal");
        assert_eq!(
            failed, plain_failed,
            "{machine}: failed units differ from the plain root's"
        );
    }
    // systemd-tmpfiles' D! /tmp/.X11-unix again, after a restart on the
    // persistent layer (the whiteout is now in the upper layer).
    ok(ctl(&h, &["restart", "deb-layer"]), "restart");
    let (eio, failed) = boot_problems(&h, "deb-layer");
    assert_eq!((eio.as_str(), failed.as_str()), ("", plain_failed.as_str()));
    ok(
        ctl(
            &h,
            &["stop", "deb-plain", "deb-eph-root", "deb-layer", "deb-eph"],
        ),
        "stop",
    );
}
