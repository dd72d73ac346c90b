//! The manager's image verbs: import, list, remove, and machines created
//! from an image and removed with their writable layer.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use super::{check_name, io_err, Event, Manager, ManagerError};
use crate::image::{self, Format, ImageError, ImageInfo, ImportRequest, Progress};

/// How often an import reports its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// An image and the machines whose definitions name it.
pub(crate) type ImageUse = (ImageInfo, Vec<String>);

impl Manager {
    fn images_dir(&self) -> std::path::PathBuf {
        image::images_dir(&self.inner.config.storage_dir)
    }

    /// Imports the caller's file, pipe or directory as image `name`;
    /// reports progress as [`Event::ImportProgress`].
    pub(crate) async fn import_image(
        &self,
        name: &str,
        source: OwnedFd,
        format: Format,
        reference: Option<String>,
    ) -> Result<ImageInfo, ManagerError> {
        crate::definition::validate_image_name(name).map_err(ManagerError::InvalidName)?;
        if !self
            .inner
            .imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned())
        {
            return Err(ImageError::Busy(name.to_owned()).into());
        }
        let progress = Arc::new(Progress::default());
        let images = self.images_dir();
        let request = ImportRequest {
            name: name.to_owned(),
            source,
            format,
            reference,
        };
        let worker_progress = progress.clone();
        let mut work =
            tokio::task::spawn_blocking(move || image::import(&images, request, &worker_progress));
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                _ = ticker.tick() => self.emit(Event::ImportProgress {
                    name: name.to_owned(),
                    done: progress.done.load(std::sync::atomic::Ordering::Relaxed),
                    total: progress.total.load(std::sync::atomic::Ordering::Relaxed),
                }),
            }
        };
        self.inner
            .imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let info = result.map_err(|source| ManagerError::Task {
            what: "the import stopped",
            source,
        })??;
        tracing::info!(
            image = name,
            files = info.stats.files,
            bytes = info.size,
            "image imported"
        );
        // Definitions that name this image become valid.
        self.reload().await?;
        Ok(info)
    }

    /// Machines whose definition names `image`.
    fn users_of(&self, image: &str) -> Vec<String> {
        self.lock()
            .values()
            .filter(|entry| {
                entry
                    .definition
                    .as_ref()
                    .is_ok_and(|def| def.image.as_deref() == Some(image))
                    || entry
                        .plan
                        .as_ref()
                        .is_some_and(|plan| plan.definition.image.as_deref() == Some(image))
                    || definition_names_image(&entry.info.definition, image)
            })
            .map(|entry| entry.info.name.clone())
            .collect()
    }

    /// Every image, with the machines that use it.
    pub(crate) fn list_images(&self) -> Result<Vec<ImageUse>, ManagerError> {
        let images = image::list(&self.images_dir())?;
        Ok(images
            .into_iter()
            .map(|info| {
                let users = self.users_of(&info.name);
                (info, users)
            })
            .collect())
    }

    /// Removes image `name`; refused while a machine's definition names it.
    pub(crate) async fn remove_image(&self, name: &str) -> Result<(), ManagerError> {
        crate::definition::validate_image_name(name).map_err(ManagerError::InvalidName)?;
        let users = self.users_of(name);
        if !users.is_empty() {
            return Err(ImageError::InUse {
                name: name.to_owned(),
                machines: users.join(", "),
            }
            .into());
        }
        let images = self.images_dir();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || image::remove(&images, &owned))
            .await
            .map_err(|source| ManagerError::Task {
                what: "removing the image",
                source,
            })??;
        self.reload().await?;
        Ok(())
    }

    /// Writes `<config-dir>/NAME.toml` for a machine made from `image`. An
    /// OCI image without an init gives a `boot = false` machine running its
    /// entrypoint with its environment, directory and user.
    pub(crate) async fn create_machine(
        &self,
        name: &str,
        image_name: &str,
        ephemeral: bool,
        autostart: bool,
    ) -> Result<(), ManagerError> {
        check_name(name)?;
        let images = self.images_dir();
        let info = image::info(&images, image_name)?;
        let text = image::definition_text(&info, &images.join(image_name), ephemeral, autostart)?;
        let dir = self.inner.config.config_dir.clone();
        let file = dir.join(format!("{name}.toml"));
        if self.lock().contains_key(name) {
            return Err(ManagerError::MachineExists(name.to_owned()));
        }
        let written = (|| {
            std::fs::create_dir_all(&dir)?;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)?;
            std::io::Write::write_all(&mut out, text.as_bytes())
        })();
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ManagerError::MachineExists(name.to_owned()))
            }
            Err(e) => return Err(io_err(&format!("writing {}", file.display()))(e)),
        }
        // A writable layer left by an earlier machine of this name is not
        // this one's.
        image::remove_layer(&self.inner.config.storage_dir, name)?;
        self.reload().await?;
        Ok(())
    }

    /// Deletes a stopped machine's definition and its writable layer.
    pub(crate) async fn remove_machine(&self, name: &str) -> Result<(), ManagerError> {
        check_name(name)?;
        let file = {
            let machines = self.lock();
            let entry = machines
                .get(name)
                .ok_or_else(|| ManagerError::NoSuchMachine(name.to_owned()))?;
            if entry.supervisor.is_some() || entry.info.state.is_active() {
                return Err(ManagerError::AlreadyRunning(name.to_owned()));
            }
            std::path::PathBuf::from(&entry.info.definition)
        };
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&format!("removing {}", file.display()))(e)),
        }
        image::remove_layer(&self.inner.config.storage_dir, name)?;
        self.reload().await?;
        Ok(())
    }
}

/// Whether a (possibly broken) definition file says `image = "NAME"`: a
/// definition broken for another reason still holds on to its image.
fn definition_names_image(file: &str, image: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    table.get("image").and_then(|v| v.as_str()) == Some(image)
}
