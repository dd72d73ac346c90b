//! Who is calling, and may they. The caller's uid comes from the bus
//! (`GetConnectionCredentials` on the message's sender), never from the body.
//! uid 0 may do everything; other callers are asked about to polkit, and
//! refused when polkit is not on the bus.

use std::collections::HashMap;

use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::zvariant::Value;
use zbus::Connection;

use super::error::Error;

const POLKIT_NAME: &str = "org.freedesktop.PolicyKit1";
/// `CheckAuthorizationFlags.AllowUserInteraction`.
const POLKIT_ALLOW_USER_INTERACTION: u32 = 1;

#[zbus::proxy(
    interface = "org.freedesktop.PolicyKit1.Authority",
    default_service = "org.freedesktop.PolicyKit1",
    default_path = "/org/freedesktop/PolicyKit1/Authority"
)]
trait PolkitAuthority {
    #[allow(clippy::type_complexity)]
    fn check_authorization(
        &self,
        subject: &(&str, HashMap<&str, Value<'_>>),
        action_id: &str,
        details: HashMap<&str, &str>,
        flags: u32,
        cancellation_id: &str,
    ) -> zbus::Result<(bool, bool, HashMap<String, String>)>;
}

/// The caller of a method, as the bus knows it.
#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: u32,
    pid: Option<u32>,
}

/// Allows the call in `header` to perform polkit `action` or says why not.
/// `what` names the operation for the log and the error sentence.
pub(crate) async fn authorize(
    connection: &Connection,
    header: &Header<'_>,
    action: &str,
    what: &str,
) -> Result<(), Error> {
    let Some(sender) = header.sender() else {
        // Only peer-to-peer connections lack a sender; we serve on a bus.
        tracing::warn!(action, "refused {what}: the message has no sender");
        return Err(Error::AccessDenied(format!(
            "{what} refused: the caller could not be identified"
        )));
    };
    let caller = caller_of(connection, sender).await?;
    if caller.uid == 0 {
        return Ok(());
    }
    match check_polkit(connection, sender, action).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::warn!(
                uid = caller.uid,
                pid = caller.pid,
                action,
                "refused {what}: polkit said no"
            );
            Err(Error::AccessDenied(format!(
                "{what} is not allowed for uid {}: polkit denied {action}",
                caller.uid
            )))
        }
        Err(reason) => {
            tracing::warn!(
                uid = caller.uid,
                pid = caller.pid,
                action,
                "refused {what}: {reason}"
            );
            Err(Error::AccessDenied(format!(
                "{what} is only allowed to root here ({reason})"
            )))
        }
    }
}

async fn caller_of(connection: &Connection, sender: &UniqueName<'_>) -> Result<Caller, Error> {
    let dbus = zbus::fdo::DBusProxy::new(connection).await?;
    let credentials = dbus
        .get_connection_credentials(BusName::Unique(sender.clone()))
        .await
        .map_err(|error| {
            tracing::warn!(%sender, "refused a call: no credentials for the sender: {error}");
            Error::AccessDenied("the caller's credentials are unknown to the bus".to_owned())
        })?;
    let Some(uid) = credentials.unix_user_id() else {
        tracing::warn!(%sender, "refused a call: the bus does not know the sender's uid");
        return Err(Error::AccessDenied(
            "the caller's uid is unknown to the bus".to_owned(),
        ));
    };
    Ok(Caller {
        uid,
        pid: credentials.process_id(),
    })
}

/// Asks polkit whether `sender` may perform `action`. `Err` holds why polkit
/// could not answer (not on the bus, or it failed).
async fn check_polkit(
    connection: &Connection,
    sender: &UniqueName<'_>,
    action: &str,
) -> Result<bool, String> {
    let dbus = zbus::fdo::DBusProxy::new(connection)
        .await
        .map_err(|error| format!("cannot reach the bus driver: {error}"))?;
    let polkit_name = BusName::try_from(POLKIT_NAME).map_err(|error| error.to_string())?;
    let activatable = dbus
        .list_activatable_names()
        .await
        .map(|names| names.iter().any(|name| name.as_str() == POLKIT_NAME))
        .unwrap_or(false);
    let running = dbus.name_has_owner(polkit_name).await.unwrap_or(false);
    if !running && !activatable {
        return Err("polkit is not on the bus".to_owned());
    }
    let authority = PolkitAuthorityProxy::new(connection)
        .await
        .map_err(|error| format!("cannot reach polkit: {error}"))?;
    let subject_details: HashMap<&str, Value<'_>> =
        HashMap::from([("name", Value::from(sender.as_str()))]);
    let subject = ("system-bus-name", subject_details);
    let (authorized, _challenge, _details) = authority
        .check_authorization(
            &subject,
            action,
            HashMap::new(),
            POLKIT_ALLOW_USER_INTERACTION,
            "",
        )
        .await
        .map_err(|error| format!("polkit failed: {error}"))?;
    Ok(authorized)
}
