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
    if !view.error.is_empty() {
        lines.push(("Error", view.error.clone()));
    }
    let mut text = format!("{}\n", view.name);
    for (key, value) in lines {
        text.push_str(&format!("{key:>12}: {value}\n"));
    }
    text
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
        };
        assert!(!status_text(&view).contains("Error"));
        view.error = "root does not exist".into();
        let text = status_text(&view);
        assert!(
            text.contains("       Error: root does not exist\n"),
            "{text}"
        );
        assert!(text.contains("      Leader: -\n"), "{text}");
    }
}
