//! `list` and `status`: read-only views of the machines.

use clap::Args;
use serde::Serialize;
use zbus::fdo::PropertiesProxy;
use zbus::names::InterfaceName;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{ObjectPath, OwnedValue};

use super::{table, CliError};
use crate::dbus::proxy::ManagerProxy;

#[derive(Debug, Args)]
pub(crate) struct ListOptions {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StatusOptions {
    /// The machine.
    name: String,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Every property of a Machine object; the JSON of `list` and `status`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MachineView {
    name: String,
    state: String,
    leader: u32,
    root: String,
    definition: String,
    addresses: Vec<String>,
    autostart: bool,
    /// Realtime microseconds of the last state change.
    since: u64,
    error: String,
    /// Accounting; `u64::MAX` (18446744073709551615) = no limit or unknown.
    memory_current: u64,
    memory_max: u64,
    cpu_usage_nsec: u64,
    tasks_current: u64,
    tasks_max: u64,
    oom_kills: u64,
}

impl MachineView {
    /// All properties in one `GetAll` round trip.
    pub(crate) async fn fetch(
        manager: &ManagerProxy<'_>,
        path: &ObjectPath<'_>,
    ) -> Result<Self, CliError> {
        let properties = PropertiesProxy::builder(manager.inner().connection())
            .destination(manager.inner().destination().to_owned())?
            .path(path.to_owned())?
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let mut all = properties
            .get_all(InterfaceName::from_static_str_unchecked(MACHINE_INTERFACE))
            .await
            .map_err(zbus::Error::from)?;
        let mut take = |key: &str| {
            all.remove(key).ok_or_else(|| {
                CliError::Failed(format!("rmachined sent no {key} property for {path}"))
            })
        };
        let name: String = convert(take("Name")?, "Name")?;
        Ok(MachineView {
            state: convert(take("State")?, "State")?,
            leader: convert(take("Leader")?, "Leader")?,
            root: convert(take("Root")?, "Root")?,
            definition: convert(take("Definition")?, "Definition")?,
            addresses: convert(take("Addresses")?, "Addresses")?,
            autostart: convert(take("Autostart")?, "Autostart")?,
            since: convert(take("Since")?, "Since")?,
            error: convert(take("Error")?, "Error")?,
            memory_current: convert(take("MemoryCurrent")?, "MemoryCurrent")?,
            memory_max: convert(take("MemoryMax")?, "MemoryMax")?,
            cpu_usage_nsec: convert(take("CPUUsageNSec")?, "CPUUsageNSec")?,
            tasks_current: convert(take("TasksCurrent")?, "TasksCurrent")?,
            tasks_max: convert(take("TasksMax")?, "TasksMax")?,
            oom_kills: convert(take("OOMKills")?, "OOMKills")?,
            name,
        })
    }
}

const MACHINE_INTERFACE: &str = "org.rmachines1.Machine";

fn convert<T>(value: OwnedValue, key: &str) -> Result<T, CliError>
where
    T: TryFrom<OwnedValue, Error = zbus::zvariant::Error>,
{
    T::try_from(value)
        .map_err(|e| CliError::Failed(format!("rmachined sent a malformed {key} property: {e}")))
}

impl ListOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'_>) -> Result<(), CliError> {
        let mut views = Vec::new();
        for (_, _, _, path) in manager.list().await? {
            views.push(MachineView::fetch(manager, &path).await?);
        }
        if self.json {
            println!("{}", to_json(&views)?);
            return Ok(());
        }
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|view| {
                vec![
                    view.name.clone(),
                    view.state.clone(),
                    leader_text(view.leader),
                    view.addresses.join(","),
                    since_text(view.since),
                ]
            })
            .collect();
        print!(
            "{}",
            table::render(
                &["MACHINE", "STATE", "LEADER", "ADDRESSES", "SINCE"],
                &rows,
                &table::legend(views.len())
            )
        );
        Ok(())
    }
}

impl StatusOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'_>) -> Result<(), CliError> {
        let path = manager.get_machine(&self.name).await?;
        let view = MachineView::fetch(manager, &path).await?;
        if self.json {
            println!("{}", to_json(&view)?);
        } else {
            print!("{}", status_text(&view));
        }
        Ok(())
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(value)
        .map_err(|error| CliError::Failed(format!("cannot write JSON: {error}")))
}

fn status_text(view: &MachineView) -> String {
    let dash = |text: &str| {
        if text.is_empty() {
            "-".to_owned()
        } else {
            text.to_owned()
        }
    };
    let state_line = match since_text(view.since) {
        since if since.is_empty() => view.state.clone(),
        since => format!("{} since {since}", view.state),
    };
    let mut lines = vec![
        ("State", state_line),
        ("Leader", dash(&leader_text(view.leader))),
        ("Root", dash(&view.root)),
        ("Definition", dash(&view.definition)),
        ("Addresses", dash(&view.addresses.join(", "))),
        (
            "Autostart",
            if view.autostart { "yes" } else { "no" }.to_owned(),
        ),
    ];
    lines.extend(usage_lines(view));
    if !view.error.is_empty() {
        lines.push(("Error", view.error.clone()));
    }
    let mut text = format!("{}\n", view.name);
    for (key, value) in lines {
        text.push_str(&format!("{key:>12}: {value}\n"));
    }
    text
}

/// Memory, CPU, tasks and OOM kills, as far as they are known.
fn usage_lines(view: &MachineView) -> Vec<(&'static str, String)> {
    let known = |v: u64| v != u64::MAX;
    let mut lines = Vec::new();
    if known(view.memory_current) {
        let limit = if known(view.memory_max) {
            format!(" (max {})", size_text(view.memory_max))
        } else {
            String::new()
        };
        lines.push((
            "Memory",
            format!("{}{limit}", size_text(view.memory_current)),
        ));
    }
    if known(view.cpu_usage_nsec) {
        lines.push((
            "CPU",
            format!(
                "{}.{:03}s",
                view.cpu_usage_nsec / 1_000_000_000,
                view.cpu_usage_nsec / 1_000_000 % 1000
            ),
        ));
    }
    if known(view.tasks_current) {
        let limit = if known(view.tasks_max) {
            format!(" (limit {})", view.tasks_max)
        } else {
            String::new()
        };
        lines.push(("Tasks", format!("{}{limit}", view.tasks_current)));
    }
    if known(view.oom_kills) && view.oom_kills > 0 {
        lines.push(("OOM kills", view.oom_kills.to_string()));
    }
    lines
}

/// Bytes the way systemctl shows them: `31.2M`, `512M`, `1.5G`.
fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut unit = 0;
    let mut scaled = bytes;
    while scaled >= 1024 && unit + 1 < UNITS.len() {
        scaled /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes}B");
    }
    let divisor = 1u64 << (10 * unit);
    if bytes % divisor == 0 {
        format!("{}{}", bytes / divisor, UNITS[unit])
    } else {
        // Display only: precision loss is fine.
        #[allow(clippy::cast_precision_loss)]
        let value = bytes as f64 / divisor as f64;
        format!("{value:.1}{}", UNITS[unit])
    }
}

fn leader_text(leader: u32) -> String {
    if leader == 0 {
        String::new()
    } else {
        leader.to_string()
    }
}

/// Realtime microseconds as `YYYY-MM-DD HH:MM:SS UTC`; empty for 0.
pub(crate) fn since_text(since: u64) -> String {
    if since == 0 {
        return String::new();
    }
    let seconds = since / 1_000_000;
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_utc() {
        assert_eq!(since_text(0), "");
        assert_eq!(since_text(1_000_000), "1970-01-01 00:00:01 UTC");
        // 2024-02-29 12:34:56 UTC
        assert_eq!(since_text(1_709_210_096_000_000), "2024-02-29 12:34:56 UTC");
    }

    #[test]
    fn status_shows_the_error_only_when_there_is_one() {
        let mut view = MachineView {
            name: "web".into(),
            state: "failed".into(),
            leader: 0,
            root: "/srv/web".into(),
            definition: "/etc/rmachines/web.toml".into(),
            addresses: vec![],
            autostart: false,
            since: 0,
            error: String::new(),
            memory_current: u64::MAX,
            memory_max: u64::MAX,
            cpu_usage_nsec: u64::MAX,
            tasks_current: u64::MAX,
            tasks_max: u64::MAX,
            oom_kills: u64::MAX,
        };
        assert!(!status_text(&view).contains("Error"));
        view.error = "root does not exist".into();
        let text = status_text(&view);
        assert!(
            text.contains("       Error: root does not exist\n"),
            "{text}"
        );
        assert!(text.contains("      Leader: -\n"), "{text}");
        assert!(!text.contains("Memory"), "{text}");
    }

    #[test]
    fn status_shows_accounting_when_known() {
        let view = MachineView {
            name: "web".into(),
            state: "running".into(),
            leader: 42,
            root: "/srv/web".into(),
            definition: "/etc/rmachines/web.toml".into(),
            addresses: vec![],
            autostart: false,
            since: 0,
            error: String::new(),
            memory_current: 32_715_571,
            memory_max: 512 << 20,
            cpu_usage_nsec: 1_204_000_000,
            tasks_current: 12,
            tasks_max: 512,
            oom_kills: 1,
        };
        let text = status_text(&view);
        for line in [
            "      Memory: 31.2M (max 512M)\n",
            "         CPU: 1.204s\n",
            "       Tasks: 12 (limit 512)\n",
            "   OOM kills: 1\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
        let unlimited = MachineView {
            memory_max: u64::MAX,
            tasks_max: u64::MAX,
            oom_kills: 0,
            ..view
        };
        let text = status_text(&unlimited);
        assert!(text.contains("      Memory: 31.2M\n"), "{text}");
        assert!(text.contains("       Tasks: 12\n"), "{text}");
        assert!(!text.contains("OOM"), "{text}");
    }

    #[test]
    fn sizes_read_like_systemctl() {
        assert_eq!(size_text(900), "900B");
        assert_eq!(size_text(512 << 20), "512M");
        assert_eq!(size_text(1536 << 20), "1.5G");
        assert_eq!(size_text(1 << 40), "1T");
    }
}
