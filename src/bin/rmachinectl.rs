//! rmachinectl: the rmachines CLI. See `rmachines::cli`.

use clap::Parser;
use rmachines::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    let code = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => match runtime.block_on(cli::run(cli)) {
            Ok(code) => code,
            Err(error) => {
                cli::report(&error);
                1
            }
        },
        Err(error) => {
            cli::report(&format_args!("cannot start the async runtime: {error}"));
            1
        }
    };
    // Exit without waiting for the relay threads of `shell` (blocked reads).
    std::process::exit(code);
}
