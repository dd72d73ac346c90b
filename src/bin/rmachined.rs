fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a.starts_with("__")) {
        std::process::exit(rmachines::runtime::internal_main(args));
    }
}
