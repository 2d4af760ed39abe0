//! The `qcow2` command-line tool; see the library's `run`.

fn main() {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let code = qcow2_hosted::cli::run(
        std::env::args_os().collect(),
        &mut stdout.lock(),
        &mut stderr.lock(),
    );
    std::process::exit(code);
}
