//! The `symphony` binary; see `symphony --help`.

fn main() -> std::process::ExitCode {
    // A keeper (one per workload, started by the node agent) does nothing else: it is decided
    // before the CLI is parsed, so a keeper touches as little memory as possible.
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new(symphony::node::keeper::ARG))
        && let Some(dir) = args.next()
    {
        return symphony::node::keeper::main(std::path::Path::new(&dir));
    }
    symphony::cli::main()
}
