//! `symphony-keeper`: the keeper alone (see `symphony::node::keeper`), a small binary so that
//! each of the hundreds of keepers a node may run costs little memory. The node agent uses it
//! when it lies next to the `symphony` binary, else `symphony __keeper`, which does the same.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next()) {
        (Some(arg), Some(dir)) if arg == symphony::node::keeper::ARG => {
            symphony::node::keeper::main(std::path::Path::new(&dir))
        }
        _ => {
            // Not for people: the agent starts it. A usage line on stderr is all it says.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"usage: symphony-keeper __keeper <run dir> (started by the node agent)\n",
            );
            std::process::ExitCode::from(2)
        }
    }
}
