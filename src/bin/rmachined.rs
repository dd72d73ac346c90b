//! rmachined: the rmachines system service. See `rmachines::daemon`.

use std::process::ExitCode;

use clap::Parser;
use rmachines::daemon::Args;

/// Hidden first arguments under which the runtime re-executes this binary.
const INTERNAL_ROLES: [&str; 2] = ["__supervise", "__enter"];

fn main() -> ExitCode {
    // The runtime's helper roles must start before any thread exists (they
    // unshare namespaces), so they are dispatched before tokio or logging.
    let role = std::env::args_os().nth(1);
    if role
        .as_deref()
        .and_then(|role| role.to_str())
        .is_some_and(|role| INTERNAL_ROLES.contains(&role))
    {
        let args: Result<Vec<String>, _> =
            std::env::args_os().map(|arg| arg.into_string()).collect();
        let Ok(args) = args else {
            eprintln!("rmachined: internal role arguments are not valid UTF-8");
            return ExitCode::FAILURE;
        };
        let code = rmachines::runtime::internal_main(args);
        return ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1));
    }

    let args = Args::parse();
    limit_malloc_arenas();
    rmachines::daemon::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = args.run_options();
    let config = match args.manager_config() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(rmachines::daemon::run_with(config, options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives every thread that allocates its own malloc arena (up to 8
/// per core); the daemon's tokio workers and blocking threads then keep
/// memory freed in one arena from serving another. Two arenas cut the
/// daemon's RSS by about 3 MiB per 300 machines (docs/performance.md) at no
/// measurable cost: the daemon's hot paths are system calls, not malloc.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt(3) only changes a malloc parameter; called before
        // any other thread exists.
        let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}
