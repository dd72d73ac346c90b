//! Generates man pages and shell completions from the clap definitions:
//! `cargo run --example gendocs -- OUT-DIR`. Packaging runs it (scripts/package.sh).
//! `rmachines.toml(5)` is written by hand (`man/rmachines.toml.5`) and copied.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

fn man_page(command: clap::Command, section: &str, dir: &Path) -> std::io::Result<()> {
    let name = command.get_name().to_owned();
    let man = clap_mangen::Man::new(command).section(section);
    let mut page = Vec::new();
    man.render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.{section}")), page)
}

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/assets".into()),
    );
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // rmachinectl(1) and one page per verb (rmachinectl-start(1), ...).
    clap_mangen::generate_to(rmachines::cli::Cli::command(), &man)?;
    man_page(rmachines::daemon::Args::command(), "8", &man)?;
    let manual = Path::new(env!("CARGO_MANIFEST_DIR")).join("man/rmachines.toml.5");
    std::fs::copy(manual, man.join("rmachines.toml.5"))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = rmachines::cli::Cli::command();
        clap_complete::generate_to(shell, &mut command, "rmachinectl", &completions)?;
    }
    println!(
        "wrote man pages to {} and completions to {}",
        man.display(),
        completions.display()
    );
    Ok(())
}
