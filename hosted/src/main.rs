//! The `qcow2` command-line tool; see the library's `run`.

fn main() {
    // Unlocked handles (each write takes the lock): worker threads print warnings on stderr while the
    // command runs.
    let code = qcow2_hosted::cli::run(
        std::env::args_os().collect(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
